//! `baton bench`: the real engine on the real stores against simulated AWS latencies, beside the
//! naive design and the physical limit, reported as people decide (wall time, sends per second,
//! dollars per million emails).
//!
//! - [`scenarios`]: what is measured, at which size. `--quick` shrinks every size for a smoke
//!   run.
//! - Each scenario runs in a child process of its own (`baton bench --child NAME`), so its CPU
//!   time and peak memory are its own; the SES fake runs in the parent, so its cost is not in
//!   baton's figures. The child prints one JSON line: [`Measured`].
//! - [`scenario`]: the child's side. Paths: `embedded` (SQLite, `.eml` outbox, the local Lambda
//!   model), `aws` (SQLite or PostgreSQL behind the Data API's latency, SES v2 and Lambda
//!   `Invoke` through the real SDK clients to loopback fakes), `baseline` (the article's design:
//!   fixed id ranges per chain, one user at a time), `bare-ses` (a bare `SendEmail` loop with the
//!   same client: the SDK's own cost).
//! - [`report`]: the table, the targets, `--json`; [`plot`]: the SVG of send rate per chain.

pub mod fakes;
pub mod plot;
mod report;
mod scenario;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub use report::{Row, Target, targets};

use fakes::{FakeSes, Latency};

/// List prices the dollars are computed with (us-east-1, 2026), stated in every report.
pub mod prices {
    /// Lambda on arm64, per GB-second.
    pub const LAMBDA_GB_SECOND: f64 = 0.000_013_333_4;
    /// Lambda, per request.
    pub const LAMBDA_REQUEST: f64 = 0.20 / 1e6;
    /// The RDS Data API, per request (first billion a month).
    pub const DATA_API_REQUEST: f64 = 0.35 / 1e6;
    /// SES, per outbound message.
    pub const SES_MESSAGE: f64 = 0.10 / 1000.0;
    /// The function's configured memory (the template's default `MemorySize`), GB.
    pub const MEMORY_GB: f64 = 0.5;
    pub const STATED: &str = "list prices (us-east-1): Lambda arm64 $0.0000133334/GB-s at 512 MB + $0.20/1M \
                              requests, Data API $0.35/1M requests, SES $0.10/1000 messages";
}

/// How a scenario's mail, state and chains are served.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    /// SQLite, the `.eml` outbox, the local Lambda model: the embedded default, no latency.
    Embedded,
    /// The Data API's latency over the store, SES v2 and Lambda `Invoke` through the SDK.
    Aws,
    /// The article's design on the `Aws` path's services.
    Baseline,
    /// A bare `SendEmail` loop with the same client and window.
    BareSes,
}

/// One measured situation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scenario {
    #[serde(rename = "scenario")]
    pub name: String,
    pub what: String,
    pub path: Path,
    pub users: u32,
    pub chains: u32,
    pub page_size: u32,
    pub in_flight: u32,
    /// Messages per second over the whole run; 0 for no limit.
    pub send_rate: f64,
    pub chaos: bool,
}

impl Scenario {
    /// The run's configured rate (messages per second), if limited.
    pub fn limited_rate(&self) -> Option<f64> {
        (self.send_rate > 0.0).then_some(self.send_rate)
    }
}

/// Simulated service latencies and limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Simulated {
    pub data_api: Latency,
    pub invoke: Latency,
    pub ses: Latency,
    /// SES's per-second sending rate when the scenario sets no rate of its own.
    pub ses_max_rate: f64,
}

/// What `baton bench` was asked.
#[derive(Debug, Clone)]
pub struct Options {
    pub scenarios: Vec<String>,
    pub quick: bool,
    pub simulated: Simulated,
    pub out: PathBuf,
    pub database_url: Option<String>,
    pub json: bool,
    pub chaos: bool,
}

/// The standard scenarios at full size (`quick`: about 2% of it, for a smoke run).
pub fn scenarios(quick: bool, sim: &Simulated) -> Vec<Scenario> {
    let size = |n: u32| if quick { (n / 50).max(100) } else { n };
    let in_flight = crate::config::default_in_flight();
    let page = 1000;
    // The fewest chains that hold 1,000/s: each sends at most `in_flight / SES latency`, and
    // gets 80% of it with the pauses between pages and the jitter.
    let per_chain = in_flight as f64 / (sim.ses.mean_ms / 1000.0).max(1e-3) * 0.8;
    let fewest = (1000.0 / per_chain).ceil().max(1.0) as u32;
    let s = |name: &str, what: &str, path: Path, users: u32, chains: u32, page_size: u32, send_rate: f64| Scenario {
        name: name.into(),
        what: what.into(),
        path,
        users: size(users),
        chains,
        page_size,
        in_flight,
        send_rate,
        chaos: false,
    };
    vec![
        s("baseline", "the article's design: fixed id ranges, one user at a time", Path::Baseline, 400, 4, 1, 0.0),
        s("bare-ses", "a bare SendEmail loop, same client and window", Path::BareSes, 20_000, 1, page, 0.0),
        s("one-chain", "one chain, defaults, no rate limit", Path::Aws, 20_000, 1, page, 0.0),
        s("rate-1000", "send_rate 1,000/s, the fewest chains that hold it", Path::Aws, 100_000, fewest, page, 1000.0),
        s("rate-1000-8", "send_rate 1,000/s over 8 chains", Path::Aws, 100_000, 8, page, 1000.0),
        s("rate-14", "send_rate 14/s (the SES starter quota)", Path::Aws, 700, 1, page, 14.0),
        s("embedded-p100", "embedded default, pages of 100", Path::Embedded, 100_000, 4, 100, 0.0),
        s("embedded-1m", "embedded default, 1,000,000 users", Path::Embedded, 1_000_000, 4, page, 0.0),
        Scenario {
            chaos: true,
            ..s("chaos", "embedded default under injected faults", Path::Embedded, 20_000, 8, 100, 0.0)
        },
    ]
}

/// What a child measured for one scenario.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Measured {
    /// Messages the provider accepted (the outbox wrote, SES answered 200).
    pub sent: u64,
    /// Recipients accepted at least once / more than once (embedded: counted by the outbox's
    /// wrapper; AWS paths: by the SES fake, in the parent).
    pub distinct: u64,
    pub duplicated: u64,
    /// Items the run recorded `unknown` (may or may not have gone out).
    pub unknown: u64,
    /// Recipients with a deliverable address.
    pub deliverable: u64,
    pub wall_seconds: f64,
    /// From the first accepted send to the last.
    pub send_seconds: f64,
    pub sql_statements: u64,
    pub invokes: u64,
    pub billed_ms: u64,
    pub cpu_seconds: f64,
    /// Of which the outbox's writer thread (embedded: mostly the kernel creating `.eml` files).
    pub outbox_cpu_seconds: f64,
    pub peak_rss_mb: f64,
    pub throttled: u64,
    pub run_status: String,
    /// Accepted sends per chain per [`plot::BUCKET_MS`], from the start of the run.
    pub series: Vec<Vec<u32>>,
}

/// Runs the chosen scenarios, each in a child process, and reports. Fails when any scenario
/// lost or doubled a message.
pub async fn run(options: Options) -> Result<std::process::ExitCode> {
    let mut chosen = scenarios(options.quick, &options.simulated);
    if !options.scenarios.is_empty() {
        let names: Vec<String> = chosen.iter().map(|s| s.name.clone()).collect();
        if let Some(unknown) = options.scenarios.iter().find(|n| !names.contains(n)) {
            bail!("--scenario {unknown}: no such scenario; choose from {}", names.join(", "));
        }
        chosen.retain(|s| options.scenarios.contains(&s.name));
    }
    if options.chaos {
        chosen.iter_mut().filter(|s| s.path == Path::Embedded).for_each(|s| s.chaos = true);
    }
    std::fs::create_dir_all(&options.out).with_context(|| format!("cannot create --out {}", options.out.display()))?;
    let mut rows = Vec::new();
    for scenario in &chosen {
        if !options.json {
            eprintln!("{}: {} users, {} ...", scenario.name, scenario.users, scenario.what);
        }
        let measured = measure(scenario, &options).await?;
        let row = Row::new(scenario, measured);
        if !options.json {
            eprintln!("  {}", row.one_line());
        }
        rows.push(row);
    }
    let svg = options.out.join("send-rate.svg");
    std::fs::write(&svg, plot::svg(&rows)).with_context(|| format!("cannot write {}", svg.display()))?;
    let targets = targets(&rows);
    if options.json {
        let out = serde_json::json!({ "scenarios": rows, "targets": targets, "prices": prices::STATED,
            "simulated": options.simulated, "plot": svg.display().to_string() });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", report::table(&rows, &targets, &options.simulated));
        println!("Send rate per chain over time: {}", svg.display());
    }
    let lost_or_doubled = rows.iter().any(|r| r.duplicated > 0 || r.missed > 0);
    Ok(if lost_or_doubled { std::process::ExitCode::from(2) } else { std::process::ExitCode::SUCCESS })
}

/// Runs one scenario in a child process; on the AWS paths the SES fake serves from here.
async fn measure(scenario: &Scenario, options: &Options) -> Result<Measured> {
    let sim = &options.simulated;
    let ses = match scenario.path {
        Path::Embedded => None,
        _ => {
            let max_rate = if scenario.send_rate > 0.0 { scenario.send_rate } else { sim.ses_max_rate };
            let fake = Arc::new(FakeSes::new(sim.ses, max_rate, scenario.users));
            let url = fakes::serve_ses(fake.clone()).await?;
            Some((fake, url))
        }
    };
    let dir = options.out.join(&scenario.name);
    let _ = std::fs::remove_dir_all(&dir);
    let exe = std::env::current_exe().context("cannot find this program to run a scenario in")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("bench").arg("--child").arg(serde_json::to_string(&Child {
        scenario: scenario.clone(),
        simulated: sim.clone(),
        dir: dir.clone(),
        ses_endpoint: ses.as_ref().map(|(_, url)| url.clone()),
        database_url: options.database_url.clone(),
    })?);
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::inherit());
    let output = tokio::task::spawn_blocking(move || cmd.output()).await?.context("cannot run a scenario")?;
    if !output.status.success() {
        bail!("scenario {} failed ({})", scenario.name, output.status);
    }
    let line = String::from_utf8_lossy(&output.stdout);
    let mut measured: Measured = serde_json::from_str(line.trim())
        .with_context(|| format!("scenario {} answered: {}", scenario.name, line.trim()))?;
    if let Some((fake, _)) = ses {
        let (distinct, duplicated) = fake.tally.distinct_and_duplicated();
        (measured.distinct, measured.duplicated) = (distinct, duplicated);
        measured.throttled = fake.throttled.load(std::sync::atomic::Ordering::Relaxed);
    }
    // The outbox's files are not needed past the count: a million of them fill a disk.
    let _ = std::fs::remove_dir_all(dir.join("outbox"));
    Ok(measured)
}

/// What the parent hands a child: one scenario and where its services are.
#[derive(Debug, Serialize, Deserialize)]
pub struct Child {
    pub scenario: Scenario,
    pub simulated: Simulated,
    pub dir: PathBuf,
    pub ses_endpoint: Option<String>,
    pub database_url: Option<String>,
}

/// The child's side: runs the scenario described by `spec` (JSON) and prints one line.
pub async fn child(spec: &str) -> Result<std::process::ExitCode> {
    let child: Child = serde_json::from_str(spec).context("--child takes the scenario as JSON")?;
    let measured = scenario::run(&child).await?;
    println!("{}", serde_json::to_string(&measured)?);
    Ok(std::process::ExitCode::SUCCESS)
}

/// This process's CPU time (user + system) and peak resident memory (MB) so far.
pub fn usage() -> (Duration, f64) {
    // SAFETY: getrusage writes into the zeroed struct it is given and reads nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64);
    (t(u.ru_utime) + t(u.ru_stime), u.ru_maxrss as f64 / 1024.0)
}
