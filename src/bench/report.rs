//! The figures of each scenario ([`Row`]), the targets they are held to ([`targets`]), and the
//! table for people.

use serde::Serialize;

use super::{Measured, Scenario, Simulated, prices};

/// Dollars per million emails, by service, at [`prices::STATED`].
#[derive(Debug, Clone, Serialize)]
pub struct Dollars {
    pub lambda: f64,
    pub data_api: f64,
    pub ses: f64,
    pub total: f64,
}

/// One scenario's figures, fields named plainly for `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was measured (`scenario`, `what`, `path`, `users`, `chains`, `page_size`,
    /// `in_flight`, `send_rate` (0: none), `chaos`).
    #[serde(flatten)]
    pub scenario: Scenario,
    pub run_status: String,
    /// Messages the provider accepted.
    pub sent: u64,
    /// Recipients mailed more than once: must be 0.
    pub duplicated: u64,
    /// Deliverable recipients never mailed and not `unknown`: must be 0.
    pub missed: u64,
    pub unknown: u64,
    pub wall_seconds: f64,
    /// From the first accepted send to the last.
    pub send_seconds: f64,
    pub sends_per_second: f64,
    pub sends_per_second_per_chain: f64,
    /// The physical limit's wall time at the configured rate: N / R.
    pub limit_seconds: Option<f64>,
    /// Achieved rate over the configured one, first send to last.
    pub rate_vs_limit: Option<f64>,
    pub sql_statements_per_1000: f64,
    pub invokes_per_1000: f64,
    pub cpu_us_per_item: f64,
    /// Of `cpu_us_per_item`, the outbox's writer thread: writing one `.eml` file per message.
    pub outbox_cpu_us_per_item: f64,
    pub peak_rss_mb: f64,
    /// Every hop's wall time × the function's memory, per 1,000 emails.
    pub billed_gb_seconds_per_1000: f64,
    pub dollars_per_million: Dollars,
    /// `429 TooManyRequestsException` answers from SES.
    pub throttled: u64,
    /// Accepted sends per chain per `bucket_ms`.
    pub bucket_ms: u64,
    pub series: Vec<Vec<u32>>,
}

impl Row {
    pub fn new(s: &Scenario, m: Measured) -> Row {
        let sent = m.sent.max(1) as f64;
        let per_1000 = |n: f64| n * 1000.0 / sent;
        let sends_per_second =
            if m.send_seconds > 0.0 { m.sent.saturating_sub(1) as f64 / m.send_seconds } else { 0.0 };
        let send_rate = s.limited_rate();
        let billed_gb_s = m.billed_ms as f64 / 1000.0 * prices::MEMORY_GB;
        let per_million = 1e6 / sent;
        let lambda = (billed_gb_s * prices::LAMBDA_GB_SECOND + m.invokes as f64 * prices::LAMBDA_REQUEST) * per_million;
        let data_api = m.sql_statements as f64 * prices::DATA_API_REQUEST * per_million;
        let ses = prices::SES_MESSAGE * 1e6;
        Row {
            scenario: s.clone(),
            run_status: m.run_status,
            sent: m.sent,
            duplicated: m.duplicated,
            missed: m.deliverable.saturating_sub(m.distinct + m.unknown),
            unknown: m.unknown,
            wall_seconds: m.wall_seconds,
            send_seconds: m.send_seconds,
            sends_per_second,
            sends_per_second_per_chain: sends_per_second / s.chains.max(1) as f64,
            limit_seconds: send_rate.map(|r| m.sent as f64 / r),
            rate_vs_limit: send_rate.map(|r| sends_per_second / r),
            sql_statements_per_1000: per_1000(m.sql_statements as f64),
            invokes_per_1000: per_1000(m.invokes as f64),
            cpu_us_per_item: m.cpu_seconds * 1e6 / sent,
            outbox_cpu_us_per_item: m.outbox_cpu_seconds * 1e6 / sent,
            peak_rss_mb: m.peak_rss_mb,
            billed_gb_seconds_per_1000: per_1000(billed_gb_s),
            dollars_per_million: Dollars { lambda, data_api, ses, total: lambda + data_api + ses },
            throttled: m.throttled,
            bucket_ms: super::plot::BUCKET_MS,
            series: m.series,
        }
    }

    pub fn one_line(&self) -> String {
        format!(
            "{} sent in {:.1}s: {:.0}/s ({:.0}/s per chain){}, {:.1} SQL/1k, {:.1} µs CPU/email, {:.0} MB peak, {} duplicated, {} missed, {} unknown",
            self.sent,
            self.wall_seconds,
            self.sends_per_second,
            self.sends_per_second_per_chain,
            self.rate_vs_limit.map(|r| format!(", {:.1}% of the rate", r * 100.0)).unwrap_or_default(),
            self.sql_statements_per_1000,
            self.cpu_us_per_item,
            self.peak_rss_mb,
            self.duplicated,
            self.missed,
            self.unknown,
        )
    }
}

/// A target and whether this run met it (`None`: a scenario it needs was not run).
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

/// The targets, judged on the rows of this run.
pub fn targets(rows: &[Row]) -> Vec<Target> {
    let get = |name: &str| rows.iter().find(|r| r.scenario.name == name);
    let mut out = Vec::new();
    let mut add = |target: &str, measured: Option<(String, bool)>| {
        let (measured, met) = match measured {
            Some((m, met)) => (m, Some(met)),
            None => ("not run".to_owned(), None),
        };
        out.push(Target { target: target.into(), measured, met });
    };
    add(
        "one chain with the defaults: ≥ 1,000 sends/s at 50 ms SES",
        get("one-chain").map(|r| (format!("{:.0}/s", r.sends_per_second), r.sends_per_second >= 1000.0)),
    );
    for name in ["rate-1000", "rate-1000-8"] {
        add(
            &format!("{name}: ≥ 98% of the run's rate, first send to last"),
            get(name).and_then(|r| r.rate_vs_limit).map(|v| (format!("{:.1}%", v * 100.0), v >= 0.98)),
        );
    }
    for name in ["embedded-p100", "embedded-1m"] {
        add(
            &format!("{name}: ≤ 30 µs CPU per email"),
            get(name).map(|r| {
                let files = r.outbox_cpu_us_per_item;
                (
                    format!("{:.1} µs, of which {files:.1} µs writing the .eml files", r.cpu_us_per_item),
                    r.cpu_us_per_item <= 30.0,
                )
            }),
        );
    }
    add(
        "SES path CPU per email ≤ 1.3 × a bare SendEmail loop",
        get("one-chain").zip(get("bare-ses")).map(|(r, b)| {
            let x = r.cpu_us_per_item / b.cpu_us_per_item.max(1e-9);
            (format!("{:.0} vs {:.0} µs: {x:.2}×", r.cpu_us_per_item, b.cpu_us_per_item), x <= 1.3)
        }),
    );
    add(
        "rate-limited CPU per email within 1.2 × unlimited",
        get("rate-1000").zip(get("one-chain")).map(|(r, u)| {
            let x = r.cpu_us_per_item / u.cpu_us_per_item.max(1e-9);
            (format!("{:.0} vs {:.0} µs: {x:.2}×", r.cpu_us_per_item, u.cpu_us_per_item), x <= 1.2)
        }),
    );
    add(
        "peak memory at 1,000,000 users ≤ 64 MB",
        get("embedded-1m")
            .filter(|r| r.scenario.users >= 1_000_000)
            .map(|r| (format!("{:.0} MB", r.peak_rss_mb), r.peak_rss_mb <= 64.0)),
    );
    for name in ["one-chain", "rate-1000", "embedded-1m"] {
        add(
            &format!("{name}: ≤ 8 SQL statements per 1,000 items (default page size, polling included)"),
            get(name).map(|r| (format!("{:.2}", r.sql_statements_per_1000), r.sql_statements_per_1000 <= 8.0)),
        );
    }
    add(
        "sends per chain per second ≥ 50 × the baseline's",
        get("one-chain").zip(get("baseline")).map(|(r, b)| {
            let x = r.sends_per_second_per_chain / b.sends_per_second_per_chain.max(1e-9);
            (
                format!("{:.0} vs {:.1}/s: {x:.0}×", r.sends_per_second_per_chain, b.sends_per_second_per_chain),
                x >= 50.0,
            )
        }),
    );
    add(
        "nothing lost, nothing twice (outside `unknown`)",
        Some((
            format!(
                "{} duplicated, {} missed",
                rows.iter().map(|r| r.duplicated).sum::<u64>(),
                rows.iter().map(|r| r.missed).sum::<u64>()
            ),
            rows.iter().all(|r| r.duplicated == 0 && r.missed == 0),
        )),
    );
    out
}

/// The table for people: one line per scenario, then the targets.
pub fn table(rows: &[Row], targets: &[Target], sim: &Simulated) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nSimulated: Data API {:.0} ms, Invoke {:.0} ms, SES {:.0} ms (each ±{:.0}%); SES {:.0}/s unless the scenario sets a rate.",
        sim.data_api.mean_ms,
        sim.invoke.mean_ms,
        sim.ses.mean_ms,
        sim.ses.jitter * 100.0,
        sim.ses_max_rate
    );
    let _ = writeln!(
        t,
        "{:<14} {:>6} {:>8} {:>7} {:>7} {:>7} {:>6} {:>7} {:>6} {:>7} {:>7} {:>6} {:>8} {:>7} {:>4} {:>4} {:>4}",
        "scenario",
        "chains",
        "sent",
        "wall s",
        "send/s",
        "/chain",
        "vs R",
        "SQL/1k",
        "inv/1k",
        "CPU µs",
        ".eml µs",
        "RSS MB",
        "GB-s/1k",
        "$/1M",
        "dup",
        "miss",
        "unk"
    );
    for r in rows {
        let _ = writeln!(
            t,
            "{:<14} {:>6} {:>8} {:>7.1} {:>7.0} {:>7.1} {:>6} {:>7.2} {:>6.3} {:>7.1} {:>7.1} {:>6.0} {:>8.3} {:>7.2} {:>4} {:>4} {:>4}",
            r.scenario.name,
            r.scenario.chains,
            r.sent,
            r.wall_seconds,
            r.sends_per_second,
            r.sends_per_second_per_chain,
            r.rate_vs_limit.map(|v| format!("{:.1}%", v * 100.0)).unwrap_or_else(|| "-".into()),
            r.sql_statements_per_1000,
            r.invokes_per_1000,
            r.cpu_us_per_item,
            r.outbox_cpu_us_per_item,
            r.peak_rss_mb,
            r.billed_gb_seconds_per_1000,
            r.dollars_per_million.total,
            r.duplicated,
            r.missed,
            r.unknown
        );
    }
    let _ = writeln!(t, "\n$/1M: {}; SES is $100 of it.", prices::STATED);
    let _ = writeln!(t, "\nTargets:");
    for target in targets {
        let mark = match target.met {
            Some(true) => "met    ",
            Some(false) => "MISSED ",
            None => "-      ",
        };
        let _ = writeln!(t, "  {mark} {}: {}", target.target, target.measured);
    }
    t
}
