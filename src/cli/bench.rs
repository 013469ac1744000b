//! `baton bench`: the arguments; the benchmark itself is [`crate::bench`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use crate::bench::fakes::Latency;
use crate::bench::{Options, Simulated};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Run only this scenario (repeat for several): baseline, bare-ses, one-chain, rate-1000,
    /// rate-1000-8, rate-14, embedded-p100, embedded-1m, chaos. Default: all.
    #[arg(long = "scenario", value_name = "NAME")]
    pub scenarios: Vec<String>,
    /// About 2% of each scenario's size: a smoke run of a few seconds each.
    #[arg(long)]
    pub quick: bool,
    /// Inject the demo's faults into every embedded scenario (the `chaos` scenario always has them).
    #[arg(long)]
    pub chaos: bool,
    /// The Data API's simulated round trip per statement, milliseconds.
    #[arg(long, default_value_t = 20.0, value_name = "MS")]
    pub data_api_ms: f64,
    /// Lambda `Invoke`'s simulated latency, milliseconds.
    #[arg(long, default_value_t = 30.0, value_name = "MS")]
    pub invoke_ms: f64,
    /// SES `SendEmail`'s simulated latency, milliseconds.
    #[arg(long, default_value_t = 50.0, value_name = "MS")]
    pub ses_ms: f64,
    /// Each latency varies uniformly by this fraction of itself either way.
    #[arg(long, default_value_t = 0.2, value_name = "FRACTION")]
    pub jitter: f64,
    /// SES's per-second sending rate (429 above it) where the scenario sets no rate.
    #[arg(long, default_value_t = 10_000.0, value_name = "PER_SECOND")]
    pub ses_max_rate: f64,
    /// Run the state on this PostgreSQL database instead of SQLite (tables `baton_*`,
    /// `baton_bench_users` and `baton_bench_sent` are created there, the last two replaced).
    /// Only from this flag, never from BATON_DATABASE_URL: a benchmark does not go to the
    /// database a shell happens to point at.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Where each scenario's files and the plot (`send-rate.svg`) go.
    #[arg(long, default_value = "baton-bench")]
    pub out: PathBuf,
    /// One JSON object: every scenario's figures, the targets, the prices.
    #[arg(long)]
    pub json: bool,
    /// Internal: run one scenario (JSON) in this process and print its figures.
    #[arg(long, hide = true)]
    pub child: Option<String>,
}

pub async fn run(args: BenchArgs) -> Result<ExitCode> {
    if let Some(spec) = &args.child {
        return crate::bench::child(spec).await;
    }
    for (flag, v) in [("--data-api-ms", args.data_api_ms), ("--invoke-ms", args.invoke_ms), ("--ses-ms", args.ses_ms)] {
        if !(0.0..=60_000.0).contains(&v) {
            anyhow::bail!("{flag}: must be between 0 and 60000 milliseconds, got {v}");
        }
    }
    if !(0.0..=1.0).contains(&args.jitter) {
        anyhow::bail!("--jitter: must be a fraction between 0 and 1, got {}", args.jitter);
    }
    if !(args.ses_max_rate >= 1.0 && args.ses_max_rate.is_finite()) {
        anyhow::bail!("--ses-max-rate: must be at least 1 message per second, got {}", args.ses_max_rate);
    }
    let latency = |mean_ms| Latency { mean_ms, jitter: args.jitter };
    crate::bench::run(Options {
        scenarios: args.scenarios,
        quick: args.quick,
        simulated: Simulated {
            data_api: latency(args.data_api_ms),
            invoke: latency(args.invoke_ms),
            ses: latency(args.ses_ms),
            ses_max_rate: args.ses_max_rate,
        },
        out: args.out,
        database_url: args.database_url,
        json: args.json,
        chaos: args.chaos,
    })
    .await
}
