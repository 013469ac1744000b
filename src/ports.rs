//! The engine's ports besides SQL ([`crate::sql::SqlStore`]): continuing a chain, sending mail,
//! and telling time. The engine never names an adapter; `local/` implements these for one
//! machine, and the AWS adapters implement them for Lambda.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::engine::event::Event;

/// Continues a chain: hands an event to the function's asynchronous invocation queue.
///
/// Error contract: `Ok` means the queue accepted the event (which may still be lost or delivered
/// twice, as with Lambda). `Err` says how it failed ([`InvokeError`]). Hops are fork-proof, so
/// an event accepted twice is harmless: the adapter may re-send freely.
#[async_trait]
pub trait Invoker: Send + Sync {
    async fn invoke(&self, event: &Event) -> Result<(), InvokeError>;
}

/// How an invoke failed. The engine fails the run on `Fatal` and leaves the others to the
/// sweeper, which restarts the chain from its checkpoint (harmless if the event did arrive).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvokeError {
    /// Not accepted, for a passing reason (throttled, not ready, retries spent): retry later.
    #[error("{0}")]
    Retryable(String),
    /// The request may or may not have queued the event (a timeout after it left, an
    /// unreadable answer).
    #[error("outcome unknown: {0}")]
    Ambiguous(String),
    /// Will not succeed however often it is tried (Lambda's recursion stop, a payload too
    /// large, no permission); the message names the fix.
    #[error("{0}")]
    Fatal(String),
}

impl InvokeError {
    pub fn is_fatal(&self) -> bool {
        matches!(self, InvokeError::Fatal(_))
    }
}

/// One message ready to send: envelope plus the complete RFC 5322 bytes.
#[derive(Debug, Clone)]
pub struct OutgoingMail {
    pub from: String,
    pub to: String,
    pub message_id: String,
    pub raw: Vec<u8>,
    /// Tags for the provider (SES `EmailTags`); the outbox ignores them.
    pub tags: Vec<(String, String)>,
}

/// How a send failed. The engine's handling differs per kind, which is why they are kinds.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum MailError {
    /// The provider is over its rate: slow down and retry.
    #[error("throttled: {0}")]
    Throttled(String),
    /// A passing failure before the message was accepted: retry.
    #[error("transient: {0}")]
    Transient(String),
    /// This message will never be accepted (bad address, rejected content).
    #[error("rejected: {0}")]
    Permanent(String),
    /// The request may or may not have been accepted (timeout after sending). Never blindly
    /// retried under the at-most-once policy.
    #[error("outcome unknown: {0}")]
    Ambiguous(String),
    /// The whole account cannot send (quota spent, sending paused): pause the run.
    #[error("sending stopped for the account: {0}")]
    AccountStopped(String),
}

/// Sends one message. Error contract: see [`MailError`]; `Ok` means accepted exactly once.
#[async_trait]
pub trait Mailer: Send + Sync {
    async fn send(&self, mail: &OutgoingMail) -> Result<(), MailError>;

    /// The provider's maximum send rate (messages per second), if it has one. A run's rate is
    /// capped by it at start. `AccountStopped` means the account cannot send at all.
    async fn max_rate(&self) -> Result<Option<f64>, MailError> {
        Ok(None)
    }
}

/// Wall-clock time in epoch milliseconds, for leases, heartbeats and deadlines stored in the
/// database. Tests use [`ManualClock`] to expire leases without waiting.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        now + CLOCK_SKEW_MS.try_with(|s| *s).unwrap_or(0)
    }
}

tokio::task_local! {
    /// How far this invocation's clock is off (fault injection: the clocks of different Lambda
    /// sandboxes disagree). Zero unless set with [`with_clock_skew`].
    static CLOCK_SKEW_MS: i64;
}

/// Runs `f` as if this machine's clock were off by `skew_ms` (the local Lambda model gives each
/// invocation its own skew under chaos).
pub async fn with_clock_skew<F: std::future::Future>(skew_ms: i64, f: F) -> F::Output {
    CLOCK_SKEW_MS.scope(skew_ms, f).await
}

/// The system clock plus an offset a test can move forward.
#[derive(Default, Clone)]
pub struct ManualClock {
    offset_ms: Arc<AtomicI64>,
}

impl ManualClock {
    pub fn advance_ms(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        SystemClock.now_ms() + self.offset_ms.load(Ordering::SeqCst)
    }
}
