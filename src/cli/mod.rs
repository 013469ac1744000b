//! The `baton` command line. Every command works on the embedded default unless told
//! otherwise: state in `DATA_DIR/baton.db` (SQLite), mail in `DATA_DIR/outbox/`, chains in the
//! in-process Lambda model. `--database-url` points state and sources at PostgreSQL instead.

pub mod demo;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::adapters::postgres::PostgresStore;
use crate::config::Config;
use crate::engine::event::ControlAction;
use crate::engine::run::RunStatus;
use crate::engine::{Engine, Outcome};
use crate::jobs::KindRegistry;
use crate::local::driver::{LocalParts, LocalRuntime};
use crate::local::faults::Faults;
use crate::local::outbox::Outbox;
use crate::local::sqlite::SqliteStore;
use crate::ports::SystemClock;
use crate::sql::SqlStore;

const ABOUT: &str = "Large batch jobs as self-invoking worker chains: on AWS Lambda, or on one machine.";

const LONG_ABOUT: &str = "\
Large batch jobs as self-invoking worker chains: on AWS Lambda, or on one machine.

A run splits its job's items into pages (key ranges fixed at start). K chains claim pages and
process them; each hop works until its time budget is nearly spent, then invokes the next hop.
Nobody is processed twice, nobody is missed, and a stuck chain is restarted by the sweeper.

Start here:
  baton demo                      mail 10,000 synthetic users through 4 chains, locally
  baton demo --chaos --seed 7     the same with injected faults (duplicates, crashes, ...)
  baton status --json             the latest run, for scripts

With your own job (see README.md, Configuration):
  baton run monthly-newsletter    run a configured job locally, to its end
  baton pause | resume | cancel   from a second terminal while it runs
  baton preview monthly-newsletter --key 42   render one recipient's message";

#[derive(Parser, Debug)]
#[command(name = "baton", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Folder for the embedded default: `baton.db` (SQLite state and sources) and `outbox/`.
    #[arg(long, env = "BATON_DATA_DIR", default_value = "baton-data", global = true)]
    pub data_dir: PathBuf,
    /// Use PostgreSQL for state and job sources instead of `DATA_DIR/baton.db`.
    #[arg(long, env = "BATON_DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// The configuration file.
    #[arg(long, env = "BATON_CONFIG", default_value = "baton.toml", global = true)]
    pub config: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output (repeat for more); logs go to stderr. `RUST_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create synthetic users and mail them a newsletter through K chains, locally.
    Demo(demo::DemoArgs),
    /// Start (or continue) a run of a configured job and drive it to its end, locally.
    Run {
        /// The job's name in the config file.
        job: String,
        /// Which run: defaults to the current month (YYYY-MM), so running twice in a month
        /// continues the same run instead of mailing everyone again.
        #[arg(long)]
        run_key: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Show a run: status, item counts, pages, and each chain's hops against its budget.
    Status {
        /// A run id; defaults to the latest run.
        run_id: Option<String>,
        /// Also list items in this ledger state (unknown, failed, skipped).
        #[arg(long, value_parser = ["unknown", "failed", "skipped", "claimed"])]
        list: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Pause a run: each chain stops after its current page and parks at its checkpoint.
    Pause {
        run_id: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Resume a paused run and drive it to its end in this terminal.
    Resume {
        run_id: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Cancel a run: chains stop after their current page; nothing more is sent.
    Cancel {
        run_id: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Restart stuck chains and re-offer expired pages, then drive restarted runs to their end.
    Sweep {
        #[command(flatten)]
        common: Common,
    },
    /// Render one recipient's message without sending it.
    Preview {
        job: String,
        /// The recipient's key; defaults to the first one.
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        common: Common,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbose = match &cli.command {
        Command::Demo(a) => a.common.verbose,
        Command::Run { common, .. }
        | Command::Status { common, .. }
        | Command::Pause { common, .. }
        | Command::Resume { common, .. }
        | Command::Cancel { common, .. }
        | Command::Sweep { common }
        | Command::Preview { common, .. } => common.verbose,
    };
    init_logging(verbose);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info,baton=info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

async fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Demo(args) => demo::run(args).await,
        Command::Run { job, run_key, common } => {
            let local = open_local(&common, true).await?;
            let started = local.engine.start(&job, run_key.as_deref()).await?;
            let Outcome::Started { run_id, existing, .. } = &started else { unreachable!() };
            if *existing {
                let status = local.engine.status(Some(run_id)).await?.expect("exists");
                if status.is_terminal() {
                    print_status(&status, common.json);
                    eprintln!("run {run_id} of `{job}` already {}; use --run-key for a new run", status.status);
                    return Ok(exit_for(&status));
                }
                eprintln!("continuing run {run_id} (already {}); the sweeper restarts its chains", status.status);
                local.engine.sweep().await?;
            }
            finish(&local, run_id, &common).await
        }
        Command::Status { run_id, list, common } => {
            let engine = open_engine(&common, false).await?;
            let Some(status) = engine.status(run_id.as_deref()).await? else {
                bail!("no runs yet in {}; start one with `baton run JOB` or `baton demo`", where_is(&common));
            };
            print_status(&status, common.json);
            if let Some(state) = list {
                for (key, reason) in engine.items_in_state(&status.run_id, &state, 1000).await? {
                    println!("{state}\t{key}\t{}", reason.unwrap_or_default());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pause { run_id, common } => control(&common, run_id, ControlAction::Pause).await,
        Command::Cancel { run_id, common } => control(&common, run_id, ControlAction::Cancel).await,
        Command::Resume { run_id, common } => {
            let local = open_local(&common, true).await?;
            let id = latest_or(&local.engine, run_id, &common).await?;
            local.engine.control(&id, ControlAction::Resume).await?;
            finish(&local, &id, &common).await
        }
        Command::Sweep { common } => {
            let local = open_local(&common, true).await?;
            let report = local.engine.sweep().await?;
            if common.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "swept {} open run(s): {} chain(s) restarted, {} revived, {} parked, {} completed, {} failed",
                    report.runs, report.restarted, report.revived, report.parked, report.completed, report.failed
                );
            }
            if report.restarted + report.revived > 0
                && let Some(status) = local.engine.status(None).await?
                && !status.is_terminal()
            {
                return finish(&local, &status.run_id, &common).await;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Preview { job, key, common } => {
            let engine = open_engine(&common, true).await?;
            match engine.preview(&job, key.as_deref()).await? {
                None => bail!("no recipient found{}", key.map(|k| format!(" with key {k}")).unwrap_or_default()),
                Some(r) if common.json => println!(
                    "{}",
                    serde_json::json!({"subject": r.subject, "text": r.text, "html": r.html, "unsubscribe_url": r.unsubscribe_url})
                ),
                Some(r) => {
                    println!("Subject: {}\nList-Unsubscribe: <{}>\n", r.subject, r.unsubscribe_url);
                    if let Some(t) = r.text {
                        println!("--- text ---\n{t}");
                    }
                    if let Some(h) = r.html {
                        println!("--- html ---\n{h}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn control(common: &Common, run_id: Option<String>, action: ControlAction) -> Result<ExitCode> {
    let engine = open_engine(common, false).await?;
    let id = latest_or(&engine, run_id, common).await?;
    let outcome = engine.control(&id, action).await?;
    if common.json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else if let Outcome::Controlled { status, .. } = outcome {
        println!("run {id} is now {status}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn latest_or(engine: &Engine, run_id: Option<String>, common: &Common) -> Result<String> {
    match run_id {
        Some(id) => Ok(id),
        None => match engine.status(None).await? {
            Some(s) => Ok(s.run_id),
            None => bail!("no runs yet in {}", where_is(common)),
        },
    }
}

async fn finish(local: &LocalRuntime, run_id: &str, common: &Common) -> Result<ExitCode> {
    let status = local.drive(run_id, !common.json && std::io::IsTerminal::is_terminal(&std::io::stderr())).await?;
    print_status(&status, common.json);
    Ok(exit_for(&status))
}

fn exit_for(status: &RunStatus) -> ExitCode {
    match status.status.as_str() {
        "succeeded" => ExitCode::SUCCESS,
        "paused" => ExitCode::from(3),
        _ => ExitCode::FAILURE,
    }
}

fn where_is(common: &Common) -> String {
    match &common.database_url {
        Some(_) => "the PostgreSQL database".into(),
        None => common.data_dir.join("baton.db").display().to_string(),
    }
}

/// The state store chosen by the flags, migrated.
pub async fn open_store(common: &Common) -> Result<Arc<dyn SqlStore>> {
    let store: Arc<dyn SqlStore> = match &common.database_url {
        Some(url) => Arc::new(PostgresStore::connect(url, 16)?),
        None => {
            std::fs::create_dir_all(&common.data_dir)
                .with_context(|| format!("cannot create --data-dir {}", common.data_dir.display()))?;
            Arc::new(SqliteStore::open(&common.data_dir.join("baton.db"))?)
        }
    };
    crate::sql::migrations::migrate(store.as_ref(), crate::ports::Clock::now_ms(&SystemClock)).await?;
    Ok(store)
}

fn load_config(path: &Path, required: bool) -> Result<Config> {
    if !required && !path.exists() {
        return Ok(Config::default());
    }
    if !path.exists() {
        bail!(
            "config file {} not found: pass --config PATH or set BATON_CONFIG (README.md, Configuration, has an example)",
            path.display()
        );
    }
    Ok(Config::load(path)?)
}

/// An engine for commands that run no chains here (status, pause, cancel, preview): its
/// invoker's queue is not served, and these commands never invoke.
async fn open_engine(common: &Common, config_required: bool) -> Result<Engine> {
    let config = load_config(&common.config, config_required)?;
    let store = open_store(common).await?;
    let (lambda, _unserved) = crate::local::lambda::LocalLambda::new(Faults::default(), 0);
    Ok(Engine::new(crate::engine::EngineParts {
        store,
        invoker: Arc::new(lambda),
        mailer: Arc::new(Outbox::new(&common.data_dir.join("outbox"), Faults::default(), 0, None)?),
        clock: Arc::new(SystemClock),
        config,
        kinds: KindRegistry::default(),
    }))
}

/// The engine on the local adapters, with the Lambda model's queue running.
pub async fn open_local(common: &Common, config_required: bool) -> Result<LocalRuntime> {
    let config = load_config(&common.config, config_required)?;
    let store = open_store(common).await?;
    let outbox = Outbox::new(&common.data_dir.join("outbox"), Faults::default(), 0, None)
        .with_context(|| format!("cannot create the outbox in {}", common.data_dir.display()))?;
    Ok(LocalRuntime::start(LocalParts {
        store,
        mailer: Arc::new(outbox),
        clock: Arc::new(SystemClock),
        config,
        kinds: KindRegistry::default(),
        faults: Faults::default(),
        seed: 0,
    }))
}

pub fn print_status(s: &RunStatus, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(s).expect("status serialises"));
        return;
    }
    println!("run {} of `{}` ({}): {}", s.run_id, s.job, s.run_key, s.status);
    if let Some(r) = &s.reason {
        println!("  reason:  {r}");
    }
    println!(
        "  items:   {} total | {} done | {} failed | {} skipped | {} unknown | {} pending",
        s.total,
        s.done,
        s.failed,
        s.skipped,
        s.unknown,
        s.pending + s.claimed
    );
    println!("  pages:   {}/{} done   elapsed {:.1}s", s.pages_done, s.pages_total, s.elapsed_ms as f64 / 1000.0);
    for c in &s.chains {
        println!(
            "  chain {:>3}: {:<7} {:>4} hops of {} budget, {} restarts{}",
            c.chain,
            c.status,
            c.hops,
            c.hop_budget,
            c.restarts,
            c.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
        );
    }
}
