//! The runtimes a command drives a run with ([`Runtime`]):
//!
//! - [`LocalRuntime`]: the engine on the in-process Lambda model, its queue running in the
//!   background, the sweeper on a timer (in AWS, a schedule), and a progress bar fed from the
//!   state tables. The first Ctrl-C pauses the run (resume it with `baton resume`); a second one
//!   quits at once.
//! - `Runtime::Remote`: the chains run in Lambda; this process only watches the state tables.
//!
//! Both are built by [`crate::compose::assemble`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::adapters::local::lambda::{LambdaCounts, LocalLambda};
use crate::compose::Adapters;
use crate::engine::event::{ControlAction, Event};
use crate::engine::run::{RunProgress, RunStatus};
use crate::engine::{Engine, EngineError, Outcome};

/// The engine on the chosen adapters: chains run here (local invoker) or in Lambda.
pub enum Runtime {
    Local(LocalRuntime),
    Remote(Arc<Engine>),
}

impl Runtime {
    pub fn engine(&self) -> &Arc<Engine> {
        match self {
            Runtime::Local(local) => &local.engine,
            Runtime::Remote(engine) => engine,
        }
    }

    /// Local: drives the run here to its end. Remote: watches it (the chains and the sweep
    /// schedule run in AWS) until it is final or paused.
    pub async fn drive(&self, run_id: &str, show_progress: bool) -> Result<RunStatus, EngineError> {
        match self {
            Runtime::Local(local) => local.drive(run_id, show_progress).await,
            Runtime::Remote(engine) => {
                let bar = progress_bar(show_progress);
                loop {
                    let progress = engine.progress(run_id).await?;
                    update_bar(&bar, &progress);
                    if progress.is_settled() {
                        bar.finish_and_clear();
                        return Ok(engine.status(Some(run_id)).await?.expect("run exists"));
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }
}

/// The engine wired to the local Lambda model, with its queue running.
pub struct LocalRuntime {
    pub engine: Arc<Engine>,
    pub lambda: LocalLambda,
    queue: JoinHandle<()>,
}

impl LocalRuntime {
    /// The engine on `adapters` and the local Lambda model, whose queue starts running now.
    pub fn start(adapters: Adapters) -> LocalRuntime {
        let (lambda, queue) = LocalLambda::new(adapters.faults.clone(), adapters.seed);
        let settings = adapters.config.settings.clone();
        let engine = Arc::new(Engine::new(adapters.engine_parts(Arc::new(lambda.clone()))));
        let queue = tokio::spawn(queue.run(engine.clone(), settings.reserved_concurrency, settings.hop_timeout));
        LocalRuntime { engine, lambda, queue }
    }

    pub fn lambda_counts(&self) -> LambdaCounts {
        self.lambda.stats.counts()
    }

    /// Invocations accepted and not yet finished.
    pub fn outstanding(&self) -> u64 {
        self.lambda.stats.outstanding.load(Ordering::SeqCst)
    }

    /// Drives `run_id` until it is final or paused, sweeping on the configured interval.
    /// Returns the run's last status.
    pub async fn drive(&self, run_id: &str, show_progress: bool) -> Result<RunStatus, EngineError> {
        let sweep_every = self.engine.config().settings.sweep_interval;
        let mut next_sweep = Instant::now() + sweep_every;
        let bar = progress_bar(show_progress);
        let mut interrupts = 0u32;
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let mut watch = Watch::default();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = &mut ctrl_c, if interrupts == 0 => {
                    interrupts += 1;
                    say(&bar, "Pausing: chains stop after their current page. `baton resume` continues. Ctrl-C again quits now.");
                    self.engine.control(run_id, ControlAction::Pause).await?;
                    let (bar, active) = (bar.clone(), self.outstanding());
                    tokio::spawn(async move {
                        if tokio::signal::ctrl_c().await.is_ok() {
                            say(&bar, &format!(
                                "Quit with the run still pausing and {active} hop(s) mid-page: what they had claimed \
                                 becomes `unknown` (never sent twice) once their leases end. `baton resume` continues \
                                 the rest; `baton status --list unknown` shows what to check by hand."
                            ));
                            std::process::exit(130)
                        }
                    });
                }
            }
            if Instant::now() >= next_sweep {
                // As the schedule does in AWS: a `sweep` event, in a trace of its own.
                let deadline = Instant::now() + self.engine.config().settings.hop_timeout;
                if let Outcome::Swept(report) = self.engine.handle(Event::Sweep {}, deadline).await?
                    && report.restarted + report.revived + report.parked > 0
                {
                    tracing::info!(?report, "sweep");
                }
                next_sweep = Instant::now() + sweep_every;
            }
            // Polled when a page closed or a hop ended here, and now and then for changes made elsewhere
            // (`baton pause` in another terminal): a statement per page at most, not per tick.
            if !watch.due(&self.engine) {
                continue;
            }
            let progress = self.engine.progress(run_id).await?;
            update_bar(&bar, &progress);
            if progress.is_settled() {
                self.drain(self.engine.config().settings.hop_timeout * 2).await;
                bar.finish_and_clear();
                return Ok(self.engine.status(Some(run_id)).await?.expect("run exists"));
            }
        }
    }

    /// Waits (bounded) for invocations in flight to finish.
    pub async fn drain(&self, at_most: Duration) {
        let until = Instant::now() + at_most;
        while self.outstanding() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for LocalRuntime {
    fn drop(&mut self) {
        self.queue.abort();
    }
}

/// When a watcher in the engine's process polls a run's progress: after pages closed or hops
/// ended here (at most every [`Watch::MIN`]), or after [`Watch::IDLE`] without any, for
/// changes made by other processes.
#[derive(Default)]
pub struct Watch {
    seen: Option<(u64, Instant)>,
}

impl Watch {
    pub const MIN: Duration = Duration::from_millis(100);
    pub const IDLE: Duration = Duration::from_secs(2);

    pub fn due(&mut self, engine: &Engine) -> bool {
        let (pages, now) = (engine.changes(), Instant::now());
        let due = match self.seen {
            None => true,
            Some((seen, at)) => (pages != seen && now >= at + Self::MIN) || now >= at + Self::IDLE,
        };
        if due {
            self.seen = Some((pages, now));
        }
        due
    }
}

/// Polls `run_id` with [`Watch`] until it is final or paused; returns its last status (the
/// benchmark's runs, whose chains run in this process behind a Lambda `Invoke` endpoint).
pub async fn watch_until_settled(engine: &Engine, run_id: &str) -> Result<RunStatus, EngineError> {
    let mut watch = Watch::default();
    loop {
        if watch.due(engine) && engine.progress(run_id).await?.is_settled() {
            return Ok(engine.status(Some(run_id)).await?.expect("run exists"));
        }
        tokio::time::sleep(Watch::MIN).await;
    }
}

/// A line for the user on stderr: above the progress bar when there is one, plain otherwise
/// (a hidden bar would swallow it).
fn say(bar: &ProgressBar, line: &str) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

fn progress_bar(show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:40.cyan/blue} {pos}/{len} items {rate} eta {eta} {msg}")
            .expect("valid template")
            .with_key("rate", |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}/s", state.per_sec());
            })
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn update_bar(bar: &ProgressBar, p: &RunProgress) {
    // An empty run shows an empty bar, not a full one.
    bar.set_length((p.total as u64).max(1));
    bar.set_position(p.items_done as u64);
    bar.set_message(format!(
        "| pages {}/{} | {} chains active, {} hops | {}",
        p.pages_done, p.pages_total, p.active_chains, p.hops, p.status
    ));
}
