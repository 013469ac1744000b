//! The `baton` command line. Every command works on the embedded default unless told
//! otherwise: state in `DATA_DIR/baton.db` (SQLite), mail in `DATA_DIR/outbox/`, chains in the
//! in-process Lambda model. `--database-url` points state and sources at PostgreSQL instead.
//!
//! - this module: the flags ([`Cli`], [`Common`]), logging, and dispatch to a command;
//! - `commands`: one function per command;
//! - [`demo`]: `baton demo`, end to end with its own checks;
//! - [`wiring`]: flags to typed adapter settings, then [`crate::compose`] builds the engine.

pub mod bench;
mod commands;
pub mod demo;
pub mod serve;
mod suppress;
pub mod wiring;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;

use crate::engine::event::ControlAction;
use crate::engine::run::RunStatus;
use crate::telemetry::{Telemetry, TraceSettings};
use crate::text::{printable, printable_text};

/// A flag's value that must never be printed (`Debug` shows it redacted).
fn secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(value.into())
}

/// `--config` when not given.
pub const DEFAULT_CONFIG: &str = "baton.toml";

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
    #[arg(long, env = "BATON_DATABASE_URL", global = true, hide_env_values = true, value_parser = secret)]
    pub database_url: Option<SecretString>,
    /// The configuration file.
    #[arg(long, env = "BATON_CONFIG", default_value = DEFAULT_CONFIG, global = true)]
    pub config: PathBuf,
    /// Where state and job sources live (default: sqlite, or postgres when --database-url is given).
    #[arg(long, env = "BATON_STORE", value_enum, global = true)]
    pub store: Option<wiring::StoreKind>,
    /// Aurora cluster ARN, for `--store data-api`.
    #[arg(long, env = "BATON_DB_CLUSTER_ARN", global = true)]
    pub db_cluster_arn: Option<String>,
    /// Secrets Manager ARN of the database credentials, for `--store data-api`.
    #[arg(long, env = "BATON_DB_SECRET_ARN", global = true)]
    pub db_secret_arn: Option<String>,
    /// Database name, for `--store data-api`.
    #[arg(long, env = "BATON_DB_NAME", default_value = crate::compose::DEFAULT_DB_NAME, global = true)]
    pub db_name: String,
    /// How mail goes out.
    #[arg(long, env = "BATON_MAILER", value_enum, default_value = "outbox", global = true)]
    pub mailer: wiring::MailerKind,
    /// SES configuration set for sends, with `--mailer ses`.
    #[arg(long, env = "BATON_SES_CONFIGURATION_SET", global = true)]
    pub ses_configuration_set: Option<String>,
    /// How a chain invokes its next hop.
    #[arg(long, env = "BATON_INVOKER", value_enum, default_value = "local", global = true)]
    pub invoker: wiring::InvokerKind,
    /// The baton Lambda function (name or ARN), for `--invoker lambda`, `brake` and `release`.
    #[arg(long, env = "BATON_FUNCTION", global = true)]
    pub function: Option<String>,
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
    /// Measure: the engine on the real stores against simulated AWS latencies, beside the
    /// naive design and the physical limit (a table, `--json`, and an SVG of send rates).
    Bench(bench::BenchArgs),
    /// Start (or continue) a run of a configured job and drive it to its end, locally.
    Run {
        /// The job's name in the config file.
        job: String,
        /// Which run: defaults to the current month (YYYY-MM), so running twice in a month
        /// continues the same run instead of mailing everyone again.
        #[arg(long)]
        run_key: Option<String>,
        #[command(flatten)]
        trace: TraceArgs,
        #[command(flatten)]
        common: Common,
    },
    /// Show a run: status, item counts, pages, and each chain's hops against its budget.
    Status {
        /// A run id; defaults to the latest run.
        run_id: Option<String>,
        /// Also list items in this ledger state (unknown, failed, skipped, claimed), or the
        /// source rows left out because their key is NULL (null-keys). One per line:
        /// `STATE<TAB>KEY<TAB>REASON`, control characters escaped.
        #[arg(long, value_parser = ["unknown", "failed", "skipped", "claimed", "null-keys"])]
        list: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Picture a run as one self-contained HTML page (no network needed to view it): a lane per
    /// chain with its hops and pages over time, coloured by outcome, restarts and duplicate
    /// deliveries marked, stuck chains and failures highlighted, the send rate, the counts.
    Report {
        /// A run id; defaults to the latest run.
        run_id: Option<String>,
        /// Where to write the page.
        #[arg(long, default_value = "report.html", value_name = "PATH")]
        out: PathBuf,
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
    /// Change a live run's send rate or chain count (the rest of its config is fixed when it
    /// starts; a changed config file applies to the next run). The rate applies from each
    /// chain's next hop; with fewer chains, the others end after their current page. New chains
    /// start at once in Lambda (`--invoker lambda`), or with the next sweep of the `baton run`
    /// driving the run locally.
    Tune {
        /// A run id; defaults to the latest run.
        run_id: Option<String>,
        /// Messages per second for the whole run (0 for no limit).
        #[arg(long)]
        send_rate: Option<f64>,
        /// Worker chains (1-1000).
        #[arg(long)]
        chains: Option<u32>,
        #[command(flatten)]
        common: Common,
    },
    /// Create or upgrade baton's tables in the store (SQLite, PostgreSQL, or Aurora through the
    /// Data API: `--store data-api --db-cluster-arn ARN --db-secret-arn ARN`) and print the
    /// schema version. Safe to run again and beside running functions, which also migrate at
    /// start: each version is applied once, in one transaction.
    Migrate {
        #[command(flatten)]
        common: Common,
    },
    /// Restart stuck chains and re-offer expired pages, then drive restarted runs to their end.
    Sweep {
        #[command(flatten)]
        common: Common,
    },
    /// Start a run in Lambda and return at once (needs `--invoker lambda`: the chains run in
    /// Lambda). Locally, where chains run in this process, use `baton run`. The run is planned
    /// with this machine's job file; a stack deployed from `deploy/` is started by invoking its
    /// function (README.md, "Deploy"), whose job file, parameters and key are its own.
    Start {
        job: String,
        #[arg(long)]
        run_key: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Emergency brake: set the function's reserved concurrency to 0, stopping every hop
    /// (queued ones included) without a deploy. Undo with `baton release`.
    Brake {
        #[command(flatten)]
        common: Common,
    },
    /// Release the brake: restore the function's reserved concurrency (`--concurrency N`), or
    /// remove the reservation.
    Release {
        #[arg(long)]
        concurrency: Option<i32>,
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
    /// The suppression list every newsletter run honours: unsubscribes, bounces, complaints and
    /// your own additions. `baton suppress add a@example.com`, `list`, `import FILE`, `export`.
    Suppress {
        #[command(subcommand)]
        action: suppress::SuppressCommand,
        #[command(flatten)]
        common: Common,
    },
    /// Serve the one-click unsubscribe links (RFC 8058) over HTTP here, as the Function URL does
    /// in AWS: GET shows a confirmation button, POST `List-Unsubscribe=One-Click` records it.
    Serve {
        /// Address and port to listen on (`127.0.0.1:0` picks a free port, printed first).
        #[arg(long, default_value = serve::DEFAULT_LISTEN, value_name = "ADDR:PORT")]
        listen: std::net::SocketAddr,
        #[command(flatten)]
        common: Common,
    },
}

pub fn main() -> ExitCode {
    // Output piped into `head` and the like ends quietly when the reader goes, as with other
    // command-line tools, instead of panicking on a broken pipe.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let verbose = match &cli.command {
        Command::Demo(a) => a.common.verbose,
        Command::Bench(_) => 0,
        Command::Run { common, .. }
        | Command::Status { common, .. }
        | Command::Report { common, .. }
        | Command::Pause { common, .. }
        | Command::Resume { common, .. }
        | Command::Cancel { common, .. }
        | Command::Sweep { common }
        | Command::Migrate { common }
        | Command::Tune { common, .. }
        | Command::Start { common, .. }
        | Command::Brake { common }
        | Command::Release { common, .. }
        | Command::Preview { common, .. }
        | Command::Suppress { common, .. }
        | Command::Serve { common, .. } => common.verbose,
    };
    init_logging(verbose);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            // Errors quote data (addresses, keys, SQL text): lines stay lines, other control
            // characters are escaped.
            eprintln!("error: {}", printable_text(&format!("{e:#}")));
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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Where spans go (`demo` and `run`; every command follows the `OTEL_EXPORTER_OTLP_*`
/// variables). README.md, "Tracing a stuck chain".
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TraceArgs {
    /// Send spans to an OpenTelemetry collector over OTLP/HTTP: its base URL, e.g.
    /// http://localhost:4318 (`/v1/traces` is added). `OTEL_EXPORTER_OTLP_ENDPOINT` does the same.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Write spans to PATH as OTLP JSON lines (one export request per line), no collector needed.
    #[arg(long, value_name = "PATH")]
    pub trace_file: Option<PathBuf>,
}

impl TraceArgs {
    fn settings(&self) -> TraceSettings {
        TraceSettings { otlp_endpoint: self.otlp_endpoint.clone(), trace_file: self.trace_file.clone() }
    }
}

/// Runs `command` with span export set up, and exports what is left before returning.
async fn dispatch(command: Command) -> Result<ExitCode> {
    let settings = match &command {
        Command::Demo(args) => args.trace.settings(),
        Command::Run { trace, .. } => trace.settings(),
        _ => TraceSettings::default(),
    };
    let telemetry = Telemetry::install(&settings)?;
    let code = run_command(command).await;
    telemetry.shutdown().await;
    code
}

async fn run_command(command: Command) -> Result<ExitCode> {
    match command {
        Command::Demo(args) => demo::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Run { job, run_key, common, .. } => commands::run(&job, run_key, &common).await,
        Command::Status { run_id, list, common } => commands::status(run_id, list, &common).await,
        Command::Report { run_id, out, common } => commands::report(run_id, &out, &common).await,
        Command::Pause { run_id, common } => commands::control(&common, run_id, ControlAction::Pause).await,
        Command::Cancel { run_id, common } => commands::control(&common, run_id, ControlAction::Cancel).await,
        Command::Resume { run_id, common } => commands::resume(run_id, &common).await,
        Command::Tune { run_id, send_rate, chains, common } => commands::tune(run_id, send_rate, chains, &common).await,
        Command::Sweep { common } => commands::sweep(&common).await,
        Command::Migrate { common } => commands::migrate(&common).await,
        Command::Start { job, run_key, common } => commands::start(&job, run_key, &common).await,
        Command::Brake { common } => commands::brake(&common).await,
        Command::Release { concurrency, common } => commands::release(concurrency, &common).await,
        Command::Preview { job, key, common } => commands::preview(&job, key, &common).await,
        Command::Suppress { action, common } => suppress::run(action, &common).await,
        Command::Serve { listen, common } => {
            let rt = wiring::open_runtime(&common, wiring::Use::Record).await?;
            serve::serve(rt.engine().clone(), listen).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn print_status(s: &RunStatus, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(s).expect("status serialises"));
        return;
    }
    println!("run {} of `{}` ({}): {}", printable(&s.run_id), printable(&s.job), printable(&s.run_key), s.status);
    if let Some(r) = &s.reason {
        println!("  reason:  {}", printable(r));
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
    if s.null_keys > 0 {
        println!("  left out: {} source rows with a NULL key (not part of the run)", s.null_keys);
    }
    println!("  pages:   {}/{} done   elapsed {:.1}s", s.pages_done, s.pages_total, s.elapsed_ms as f64 / 1000.0);
    let m = &s.mail;
    if m != &Default::default() {
        println!(
            "  SES:     {} delivered | {} bounced ({} permanent) | {} complaints",
            m.delivered,
            m.hard_bounced + m.soft_bounced,
            m.hard_bounced,
            m.complained
        );
    }
    for c in &s.chains {
        println!(
            "  chain {:>3}: {:<7} {:>4} hops of {} budget, {} restarts{}",
            c.chain,
            c.status,
            c.hops,
            c.hop_budget,
            c.restarts,
            c.reason.as_deref().map(|r| format!(" ({})", printable(r))).unwrap_or_default()
        );
        if c.stuck {
            println!(
                "      STUCK: no sign of life for {}s (active, silent past the stale threshold); the next sweep restarts it",
                c.heartbeat_age_ms / 1000
            );
        }
        if let Some(e) = &c.last_error {
            println!("      last error: {}", printable(e));
        }
        if let Some(t) = &c.last_trace_id {
            println!("      last hop's trace id: {t}");
        }
        if let Some(w) = &c.warning {
            println!("      warning: {}", printable(w));
        }
    }
}
