//! An in-process model of Lambda's asynchronous invocation, with what matters of it for chains:
//! an unbounded queue, bounded concurrency (reserved concurrency), a hard per-invocation
//! deadline (the function timeout: the handler is dropped mid-await, like a frozen sandbox), no
//! retries (`MaximumRetryAttempts = 0`), and optional faults: duplicate delivery, lost events,
//! delays, crashes at a random moment of a hop, clocks that disagree between invocations, and
//! sandboxes whose deadline is longer than `hop_timeout`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use super::faults::{Faults, dice};
use crate::engine::Engine;
use crate::engine::event::Event;
use crate::ports::{InvokeError, Invoker, with_clock_skew};

/// Counters of what the model did, for the demo's summary and for tests.
#[derive(Debug, Default)]
pub struct LambdaStats {
    pub accepted: AtomicU64,
    pub delivered: AtomicU64,
    pub duplicated: AtomicU64,
    pub dropped: AtomicU64,
    pub crashed: AtomicU64,
    pub timed_out: AtomicU64,
    pub errors: AtomicU64,
    /// Invocations given a deadline longer than `hop_timeout` (fault injection).
    pub long_lived: AtomicU64,
    /// Accepted events not yet finished (queued, delayed or running).
    pub outstanding: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LambdaCounts {
    pub accepted: u64,
    pub delivered: u64,
    pub duplicated: u64,
    pub dropped: u64,
    pub crashed: u64,
    pub timed_out: u64,
    pub errors: u64,
    pub long_lived: u64,
}

impl LambdaStats {
    pub fn counts(&self) -> LambdaCounts {
        let g = |a: &AtomicU64| a.load(Ordering::SeqCst);
        LambdaCounts {
            accepted: g(&self.accepted),
            delivered: g(&self.delivered),
            duplicated: g(&self.duplicated),
            dropped: g(&self.dropped),
            crashed: g(&self.crashed),
            timed_out: g(&self.timed_out),
            errors: g(&self.errors),
            long_lived: g(&self.long_lived),
        }
    }
}

/// The invoker half: what the engine calls to continue a chain.
#[derive(Clone)]
pub struct LocalLambda {
    tx: mpsc::UnboundedSender<Event>,
    faults: Faults,
    seed: u64,
    /// How often each event has been invoked, so a re-sent hop rolls new dice.
    sends: Arc<Mutex<HashMap<String, u64>>>,
    pub stats: Arc<LambdaStats>,
}

/// The queue half: delivers events to the engine under the concurrency limit.
pub struct LambdaQueue {
    rx: mpsc::UnboundedReceiver<Event>,
    faults: Faults,
    seed: u64,
    stats: Arc<LambdaStats>,
}

impl LocalLambda {
    pub fn new(faults: Faults, seed: u64) -> (LocalLambda, LambdaQueue) {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(LambdaStats::default());
        (
            LocalLambda { tx, faults: faults.clone(), seed, sends: Default::default(), stats: stats.clone() },
            LambdaQueue { rx, faults, seed, stats },
        )
    }

    fn enqueue(&self, event: Event, delay: Option<Duration>) {
        self.stats.outstanding.fetch_add(1, Ordering::SeqCst);
        match delay {
            None => {
                let _ = self.tx.send(event);
            }
            Some(d) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    let _ = tx.send(event);
                });
            }
        }
    }
}

fn identity(event: &Event) -> String {
    match event {
        Event::Hop { chain, hop, .. } => format!("hop/{chain}/{hop}"),
        other => other.to_json(),
    }
}

#[async_trait]
impl Invoker for LocalLambda {
    async fn invoke(&self, event: &Event) -> Result<(), InvokeError> {
        event.to_payload().map_err(|e| InvokeError::Fatal(e.to_string()))?;
        self.stats.accepted.fetch_add(1, Ordering::SeqCst);
        let id = identity(event);
        let n = {
            let mut sends = self.sends.lock().unwrap_or_else(|e| e.into_inner());
            let n = sends.entry(id.clone()).or_default();
            *n += 1;
            *n
        };
        let is_hop = matches!(event, Event::Hop { .. });
        let roll = |what: &str| dice(self.seed, &[what.as_bytes(), id.as_bytes(), &n.to_le_bytes()]);
        if is_hop && roll("drop") < self.faults.drop_hop {
            self.stats.dropped.fetch_add(1, Ordering::SeqCst);
            return Ok(()); // accepted, then lost: the caller cannot tell.
        }
        let delay = |what: &str| {
            (is_hop && roll(what) < self.faults.delay_hop)
                .then(|| self.faults.max_delay.mul_f64(roll(&format!("{what}-len"))))
        };
        self.enqueue(event.clone(), delay("delay"));
        if is_hop && roll("duplicate") < self.faults.duplicate_hop {
            self.stats.duplicated.fetch_add(1, Ordering::SeqCst);
            self.enqueue(event.clone(), delay("delay-dup"));
        }
        Ok(())
    }
}

impl LambdaQueue {
    /// Delivers events until every sender is gone. Each invocation gets `timeout` and runs
    /// with at most `concurrency` others.
    pub async fn run(mut self, engine: Arc<Engine>, concurrency: u32, timeout: Duration) {
        let slots = Arc::new(Semaphore::new(concurrency as usize));
        let mut deliveries: HashMap<String, u64> = HashMap::new();
        while let Some(event) = self.rx.recv().await {
            let permit = slots.clone().acquire_owned().await.expect("never closed");
            let id = identity(&event);
            let n = deliveries.entry(id.clone()).or_default();
            *n += 1;
            let crash_roll = dice(self.seed, &[b"crash", id.as_bytes(), &n.to_le_bytes()]);
            let is_hop = matches!(event, Event::Hop { .. });
            let roll = |what: &[u8]| dice(self.seed, &[what, id.as_bytes(), &n.to_le_bytes()]);
            // A sandbox whose function timeout is longer than `hop_timeout`.
            let long = is_hop && roll(b"long") < self.faults.long_sandbox;
            if long {
                self.stats.long_lived.fetch_add(1, Ordering::SeqCst);
            }
            let lifetime = if long { timeout * 3 } else { timeout };
            let crash_at = (is_hop && crash_roll < self.faults.crash_hop).then(|| lifetime.mul_f64(roll(b"crash-at")));
            let skew_ms = (self.faults.clock_skew.as_millis() as f64 * (roll(b"skew") * 2.0 - 1.0)) as i64;
            let engine = engine.clone();
            let stats = self.stats.clone();
            stats.delivered.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let started = Instant::now();
                let deadline = started + lifetime;
                let kill_at = crash_at.map(|c| started + c).unwrap_or(deadline);
                tokio::select! {
                    result = with_clock_skew(skew_ms, engine.handle(event.clone(), deadline)) => {
                        if let Err(e) = result {
                            stats.errors.fetch_add(1, Ordering::SeqCst);
                            tracing::warn!(event = %event.to_json(), error = %e, "invocation failed");
                        }
                    }
                    _ = tokio::time::sleep_until(kill_at) => {
                        let counter = if crash_at.is_some() { &stats.crashed } else { &stats.timed_out };
                        counter.fetch_add(1, Ordering::SeqCst);
                        tracing::debug!(event = %event.to_json(), "invocation killed");
                    }
                }
                stats.outstanding.fetch_sub(1, Ordering::SeqCst);
                drop(permit);
            });
        }
    }
}
