//! `baton demo`: the embedded default end to end. Creates `DATA_DIR/baton.db` with N synthetic
//! users, runs the monthly newsletter through K chains of the local Lambda model (optionally
//! with faults), writes `DATA_DIR/outbox/`, then checks the outbox against the users: nobody
//! twice, nobody missed (but those counted `unknown`, at most once each).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use super::wiring::{InvokerKind, MailerKind, StoreKind};
use super::{Common, print_status};
use crate::adapters::local::faults::{Faults, FaultyStore, SqlFaultCounts};
use crate::adapters::local::lambda::LambdaCounts;
use crate::adapters::local::outbox;
use crate::compose::{self, AdapterSettings, Adapters, Aws, OpenedMailer};
use crate::config::{Config, JobConfig, NewsletterConfig, Settings};
use crate::engine::Outcome;
use crate::engine::run::RunStatus;
use crate::engine::state::RunState;
use crate::ports::{Clock, SystemClock};
use crate::runtime::LocalRuntime;
use crate::sql::{SqlStore, statements as st};

pub const JOB: &str = "monthly-newsletter";

/// The config the demo ran with, written into its data dir (with the demo's own unsubscribe
/// secret): `baton resume` finds it there, and it is a starting point for a job of your own.
pub const CONFIG_FILE: &str = "demo.toml";

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Synthetic users to create (a few have deliberately invalid or empty addresses, and a few
    /// hostile names).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub users: u32,
    /// Worker chains (the run's concurrency).
    #[arg(long, default_value_t = 4)]
    pub chains: u32,
    /// Users per page.
    #[arg(long, default_value_t = 100)]
    pub page_size: u32,
    /// Each hop's deadline (the function timeout). Short, so every chain makes many hops.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub hop_timeout: Duration,
    /// Pages a hop processes before it hands over to the next hop, so every chain makes many
    /// hops however fast the machine is.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub pages_per_hop: u32,
    /// Messages per second over all chains; 0 for no limit.
    #[arg(long, default_value_t = 0.0)]
    pub send_rate: f64,
    /// Inject faults at the documented default rates: 2% duplicate hop deliveries, 1% lost hop
    /// events, 1% hops crashing mid-page, 5% delayed hop events, 5% sandboxes whose deadline
    /// outlives the lease, clocks off by up to 100 ms per invocation, 2% transient mail errors,
    /// 1% mail throttling, 0.2% ambiguous mail timeouts (accepted, but the caller sees a
    /// timeout), 0.3% SQL statements failing before commit and 0.3% committing with their
    /// answer lost, a duplicate key appearing mid-run, and eight concurrent cold-start
    /// migrations.
    #[arg(long)]
    pub chaos: bool,
    /// Seed for the synthetic users and the fault schedule: the same seed, the same run.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Replace a --data-dir that holds files the demo did not create (the demo starts from an
    /// empty `baton.db` and `outbox/` every time; without this it refuses to delete anything
    /// else).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub trace: super::TraceArgs,
    #[command(flatten)]
    pub common: Common,
}

/// What a demo leaves in its data dir, and may therefore replace.
const DEMO_FILES: [&str; 7] =
    ["baton.db", "baton.db-wal", "baton.db-shm", "baton.db-journal", "outbox", CONFIG_FILE, MARKER];
/// Marks a data dir the demo created.
const MARKER: &str = ".baton-demo";

/// Refuses (unless `force`) to clear a data dir holding anything a demo did not create: another
/// run's `baton.db`, or files of the user's.
fn check_data_dir_is_the_demos(dir: &std::path::Path, force: bool) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other.with_context(|| format!("cannot read --data-dir {}", dir.display()))?,
    };
    let names: Vec<String> =
        entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    if names.is_empty() || force {
        return Ok(());
    }
    let foreign: Vec<&String> = names.iter().filter(|n| !DEMO_FILES.contains(&n.as_str())).collect();
    let why = if !foreign.is_empty() {
        format!(
            "holds files the demo did not create ({})",
            foreign.iter().take(5).map(|n| super::printable(n)).collect::<Vec<_>>().join(", ")
        )
    } else if !names.iter().any(|n| n == MARKER) {
        "holds a baton.db that a demo did not create (runs of your own jobs?)".to_owned()
    } else if let Some(foreign) = foreign_contents(&dir.join("baton.db"))? {
        // The demo made the folder, but it has been used since (the README's next step runs a
        // job of your own against the demo's users): its ledger must not be wiped.
        format!("holds {foreign}, not only the demo's")
    } else {
        return Ok(());
    };
    bail!(
        "--data-dir {} {why}; the demo replaces its data dir. Choose another --data-dir (or BATON_DATA_DIR), or pass \
         --force to replace it anyway",
        dir.display()
    )
}

/// What in a demo's `baton.db` is not the demo's: a table besides its users and baton's own,
/// or a run other than the demo's (deleting its ledger would let it mail everyone again).
fn foreign_contents(db: &std::path::Path) -> Result<Option<String>> {
    if !db.exists() {
        return Ok(None);
    }
    // Read-only: a database that is not the demo's must come out of this check unchanged.
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("cannot read {}", db.display()))?;
    let tables: Vec<String> = conn
        .prepare(st::SQLITE_TABLES)
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .with_context(|| format!("cannot read {}", db.display()))?;
    let mine = |t: &String| {
        ["users", "users_late"].contains(&t.as_str()) || t.starts_with("baton_") || t.starts_with("sqlite_")
    };
    if let Some(t) = tables.iter().find(|t| !mine(t)) {
        return Ok(Some(format!("a table `{}`", super::printable(t))));
    }
    if tables.iter().any(|t| t == "baton_runs") {
        let other: Option<(String, String)> = conn
            .query_row(st::RUN_OTHER_THAN, [JOB, "demo"], |r| Ok((r.get(0)?, r.get(1)?)))
            .map(Some)
            .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })
            .with_context(|| format!("cannot read {}", db.display()))?;
        if let Some((job, key)) = other {
            return Ok(Some(format!("a run of `{}` ({})", super::printable(&job), super::printable(&key))));
        }
    }
    Ok(None)
}

/// Writes the demo's config (with its secret, which guards nothing real) to `DATA_DIR/demo.toml`.
fn write_demo_config(dir: &std::path::Path, config: &Config, secret: &SecretString) -> Result<()> {
    let mut value = toml::Value::try_from(config).context("the demo config serialises")?;
    if let Some(n) = value.get_mut("jobs").and_then(|j| j.get_mut(JOB)).and_then(|j| j.get_mut("newsletter"))
        && let Some(table) = n.as_table_mut()
    {
        table.insert("unsubscribe_secret".into(), toml::Value::String(secret.expose_secret().to_owned()));
    }
    let text = format!(
        "# Written by `baton demo`: the job it ran, with a throwaway unsubscribe secret. `baton resume`,\n\
         # `status` and `sweep` read it from here. For a job of your own start from examples/baton.toml\n\
         # and keep your secret in BATON_UNSUBSCRIBE_SECRET (README.md, \"Your own job\").\n{}",
        toml::to_string_pretty(&value).context("the demo config serialises")?
    );
    std::fs::write(dir.join(CONFIG_FILE), text)
        .with_context(|| format!("cannot write {}", dir.join(CONFIG_FILE).display()))
}

/// The demo's job: what a user's `baton.toml` would hold.
pub fn demo_job(args: &DemoArgs, table: &str, secret: &SecretString) -> JobConfig {
    newsletter_job(table, secret, args.chaos, (args.page_size, args.chains), args.send_rate)
}

/// The demo's newsletter over the synthetic users in `table` (`chaos`: with a second table that
/// can add rows mid-run), in pages of `page_size` through `chains` chains at `send_rate`.
pub fn newsletter_job(
    table: &str,
    secret: &SecretString,
    chaos: bool,
    (page_size, chains): (u32, u32),
    send_rate: f64,
) -> JobConfig {
    JobConfig {
        kind: "newsletter".into(),
        // Under --chaos a second table can add rows mid-run, like a source built on a join.
        source: if chaos {
            format!(
                "SELECT id, email, name, city, plan FROM {table} \
                 UNION ALL SELECT id, email, name, city, plan FROM {table}_late"
            )
        } else {
            format!("SELECT id, email, name, city, plan FROM {table}")
        },
        key_column: "id".into(),
        page_size,
        chains,
        max_failures: None,
        max_failure_percent: Some(5.0),
        ambiguity: Default::default(),
        run_deadline: Duration::from_secs(3600),
        hop_slack: 20,
        time_zone: "UTC".into(),
        newsletter: Some(NewsletterConfig {
            email_column: "email".into(),
            from: "Baton Monthly <news@baton.example>".into(),
            subject: "{{ recipient.name }}, your {{ vars.month }} update".into(),
            text: Some(
                "Hello {{ recipient.name }},\n\nHere is what happened in {{ recipient.city }} this month.\n\
                 Your plan: {{ recipient.plan }}.\n\nUnsubscribe: {{ unsubscribe_url }}\n"
                    .into(),
            ),
            html: Some(
                "<p>Hello {{ recipient.name }},</p><p>Here is what happened in {{ recipient.city }} this month.</p>\
                 <p>Your plan: <b>{{ recipient.plan }}</b>.</p><p><a href=\"{{ unsubscribe_url }}\">Unsubscribe</a></p>"
                    .into(),
            ),
            text_file: None,
            html_file: None,
            send_rate,
            in_flight: crate::config::default_in_flight(),
            max_attempts: 8,
            // `baton serve` (which listens here by default) answers these links.
            unsubscribe_url: format!("http://{}/unsubscribe", super::serve::DEFAULT_LISTEN),
            unsubscribe_secret: Some(secret.clone()),
            unsubscribe_secret_env: "BATON_UNSUBSCRIBE_SECRET".into(),
            configuration_set: None,
            vars: [("month".to_owned(), toml::Value::String("December".into()))].into(),
            smtputf8: false,
        }),
        sql: None,
        params: None,
    }
}

/// The demo's unsubscribe key, new for every demo (kept in `DATA_DIR/demo.toml`, where `baton
/// serve` finds it): no fixed value may end up in a config someone copies.
fn demo_secret() -> SecretString {
    format!("demo-{:032x}", rand::random::<u128>()).into()
}

/// A config error in the demo's own job, told in terms of the demo's flags.
fn demo_flag_error(e: crate::config::ConfigError) -> String {
    let crate::config::ConfigError::Invalid { field, message } = &e else { return e.to_string() };
    let flag = match field.rsplit('.').next() {
        Some("page_size") => "--page-size",
        Some("chains" | "reserved_concurrency") => "--chains",
        Some("send_rate") => "--send-rate",
        Some("hop_timeout" | "hop_margin" | "sweep_interval") => "--hop-timeout",
        _ => return e.to_string(),
    };
    format!("{flag}: {message}")
}

const FIRST: [&str; 12] =
    ["Zoë", "José", "Łukasz", "美咲", "Ольга", "Søren", "Aoife", "Nguyễn", "François", "Ayşe", "Đorđe", "María"];
const LAST: [&str; 8] = ["Müller", "O'Brien", "García", "Kowalski", "田中", "Иванова", "Ødegaard", "Smith"];
const CITIES: [&str; 6] = ["Zürich", "Kraków", "São Paulo", "Tōkyō", "Reykjavík", "Montréal"];
const PLANS: [&str; 3] = ["free", "pro", "team"];

/// Names a hostile data source might hold: header injection (CR, LF, a blank line that would
/// end the headers), NUL, terminal escapes, right-to-left overrides, template syntax, text that
/// looks like an RFC 2047 encoded word, Unicode line separators, and 100 KB of text. Every
/// 251st demo user has one; none may change a message's headers.
pub fn hostile_names() -> Vec<String> {
    vec![
        "Eve\r\nBcc: bcc@evil.example".into(),
        "Eve\nReply-To: reply@evil.example".into(),
        "Eve\rContent-Type: text/html".into(),
        "Mallory\r\n\r\n<h1>the body is mine</h1>".into(),
        "Nul\0byte".into(),
        "\u{202E}lanretxe\u{202C} RTL".into(),
        "\u{1b}[2J\u{1b}[31mred".into(),
        "{{ recipient.email }} {% if true %}x{% endif %}".into(),
        "=?utf-8?B?QmNjOiBldmlsQGV2aWwuZXhhbXBsZQ==?=".into(),
        "Line\u{2028}separator\u{85}next".into(),
        "Big ".to_owned() + &"ß".repeat(50_000),
    ]
}

/// One synthetic user: sparse ids, unicode names (every 251st hostile, see [`hostile_names`]),
/// unique addresses but every 997th invalid and every 1499th empty.
pub fn synthetic_user(i: u32, seed: u64) -> (i64, Option<String>, String, &'static str, &'static str) {
    let r = crate::adapters::local::faults::dice(seed, &[b"user", &i.to_le_bytes()]);
    let id = i as i64 * 7 + (r * 7.0) as i64 + 1;
    let pick = |n: usize, salt: u32| ((r * 1e6) as usize + salt as usize * 7919 + i as usize) % n;
    let email = if i % 1499 == 1498 {
        Some(String::new())
    } else if i % 997 == 996 {
        Some(format!("user{id}.example.com"))
    } else if i % 2003 == 2002 {
        None
    } else {
        Some(format!("user{id}@example.com"))
    };
    let name = if i % 251 == 250 {
        let hostile = hostile_names();
        hostile[(i as usize / 251) % hostile.len()].clone()
    } else {
        format!("{} {}", FIRST[pick(FIRST.len(), 1)], LAST[pick(LAST.len(), 2)])
    };
    (id, email, name, CITIES[pick(CITIES.len(), 3)], PLANS[pick(PLANS.len(), 4)])
}

/// Creates `table` with `n` synthetic users through the SQL port, so the demo works on any
/// store. Inserts go in transactions of 8,000 users, so memory stays flat however many users.
pub(crate) async fn create_users(store: &dyn SqlStore, table: &str, n: u32, seed: u64, nul_ok: bool) -> Result<()> {
    const ROWS: u32 = 400;
    const PER_TRANSACTION: u32 = 20;
    let mut batch = st::demo_tables(table);
    let mut start = 0;
    while start < n {
        let end = (start + ROWS).min(n);
        let users: Vec<st::DemoUser> = (start..end)
            .map(|i| {
                let (id, email, name, city, plan) = synthetic_user(i, seed);
                // PostgreSQL text cannot hold NUL: there, such data cannot reach baton at all.
                let name = if nul_ok { name } else { name.replace('\0', "") };
                (id, email, name, city, plan)
            })
            .collect();
        batch.push(st::insert_demo_users(table, false, &users));
        start = end;
        if batch.len() as u32 >= PER_TRANSACTION || start >= n {
            store.transaction(std::mem::take(&mut batch)).await?;
        }
    }
    if !batch.is_empty() {
        store.transaction(batch).await?;
    }
    Ok(())
}

/// Faults injected during a demo run, by class, and what they can account for.
#[derive(Debug, Default, Serialize)]
pub struct Injected {
    pub sql: SqlFaultCounts,
    pub mail_ambiguous: u64,
    /// Keys that got a second source row mid-run.
    pub duplicate_keys: Vec<String>,
    pub concurrent_migrations: usize,
    /// Sends still in flight when a hop had to stop waiting for them (observed, not injected).
    pub cut_off_in_flight: u64,
    /// The most `unknown` items the ambiguous outcomes can explain: every ambiguous send, every
    /// send cut off in flight, and two pages' worth (a hop holds the page it sends and the next
    /// one) for every hop that was killed or failed.
    pub ambiguous_outcomes: u64,
}

#[derive(Debug, Serialize)]
pub struct DemoSummary {
    pub run: RunStatus,
    pub wall_seconds: f64,
    pub messages_per_second: f64,
    /// Messages found in the outbox (`None` when mail went to a provider such as SES).
    pub outbox_files: Option<usize>,
    pub valid_users: usize,
    pub duplicated_addresses: Vec<String>,
    pub missed_users: usize,
    pub unknown_users: usize,
    /// Addresses mailed although they are not deliverable (must be none).
    pub undeliverable_mailed: Vec<String>,
    /// Users suppressed before the run (unsubscribed or complained), to be skipped.
    pub suppressed_users: usize,
    /// Addresses mailed although they were suppressed before the run (must be none).
    pub suppressed_mailed: Vec<String>,
    /// Whether the mail itself was checked (the outbox), or only the ledger (a provider such as
    /// SES keeps no copy here): `duplicated_addresses`, `missed_users` and
    /// `undeliverable_mailed` mean something only when this is true.
    pub mail_checked: bool,
    pub hops: LambdaCounts,
    /// What the fault injection did (with `--chaos`).
    pub injected: Injected,
    /// Statements the engine issued for the run (planning, hops, sweeps, progress polls).
    pub sql_statements: u64,
    pub sql_statements_per_page: f64,
    pub faults: Faults,
    pub checks_passed: bool,
}

/// What the demo runs: where, under which key, with which config, checked before anything in
/// the data dir is touched.
struct DemoPlan {
    embedded: bool,
    table: &'static str,
    run_key: String,
    secret: SecretString,
    config: Config,
    /// The adapters the flags choose, checked with the rest.
    adapters: AdapterSettings,
    faults: Faults,
}

impl DemoPlan {
    fn check(args: &DemoArgs) -> Result<DemoPlan> {
        let common = &args.common;
        if common.invoker != InvokerKind::Local {
            bail!("the demo runs its chains in this process: use `--invoker local` (the default)");
        }
        let embedded = common.store_kind() == StoreKind::Sqlite;
        // On a shared database the demo never touches a `users` table of yours, and each demo
        // is a run of its own.
        let (table, run_key) = if embedded {
            ("users", "demo".to_owned())
        } else {
            ("baton_demo_users", format!("demo-{}", SystemClock.now_ms()))
        };
        let secret = demo_secret();
        let settings = Settings {
            hop_timeout: args.hop_timeout,
            hop_margin: args.hop_timeout * 2 / 5,
            sweep_interval: (args.hop_timeout / 2).max(Duration::from_millis(100)),
            reserved_concurrency: args.chains.saturating_mul(2).saturating_add(2).min(10_000),
            max_pages_per_hop: Some(args.pages_per_hop),
            ..Settings::default()
        };
        let config = Config { settings, jobs: [(JOB.to_owned(), demo_job(args, table, &secret))].into() };
        config.validate().map_err(|e| anyhow::anyhow!("{}", demo_flag_error(e)))?;
        let adapters = common.adapter_settings()?;
        check_data_dir_is_the_demos(&common.data_dir, args.force)?;
        let faults = if args.chaos { Faults::chaos() } else { Faults::default() };
        Ok(DemoPlan { embedded, table, run_key, secret, config, adapters, faults })
    }

    /// Marks the data dir as the demo's and clears what an earlier demo left.
    fn prepare_data_dir(&self, dir: &std::path::Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create --data-dir {}", dir.display()))?;
        std::fs::write(dir.join(MARKER), "created by `baton demo`; it may replace this folder\n")
            .with_context(|| format!("cannot write to --data-dir {}", dir.display()))?;
        if self.embedded {
            for stale in ["baton.db", "baton.db-wal", "baton.db-shm", "baton.db-journal"] {
                let _ = std::fs::remove_file(dir.join(stale));
            }
        }
        let _ = std::fs::remove_dir_all(dir.join("outbox"));
        write_demo_config(dir, &self.config, &self.secret)
    }
}

/// The demo's adapters, wrapped to inject SQL faults and count statements.
struct DemoAdapters {
    store: Arc<dyn SqlStore>,
    faulty: Arc<FaultyStore>,
    counting: Arc<crate::sql::CountingStore<Arc<FaultyStore>>>,
    mailer: OpenedMailer,
    concurrent_migrations: usize,
}

async fn open_adapters(args: &DemoArgs, plan: &DemoPlan) -> Result<DemoAdapters> {
    let common = &args.common;
    let settings = &plan.adapters;
    let aws = Aws::default();
    let store = compose::open_store(settings, true, &aws).await?;
    let concurrent_migrations = if args.chaos {
        // Cold starts of a fan-out migrate at once: eight more stores, each migrating.
        let others = futures::future::join_all((0..8).map(|_| compose::open_store(settings, true, &aws))).await;
        others.into_iter().collect::<Result<Vec<_>, _>>()?.len()
    } else {
        0
    };
    if !common.json {
        let place = match plan.embedded {
            true => common.data_dir.join("baton.db").display().to_string(),
            false => format!("table {}", plan.table),
        };
        eprintln!("Creating {} synthetic users in {place} ...", args.users);
    }
    create_users(store.as_ref(), plan.table, args.users, args.seed, plan.embedded).await?;
    let mailer = compose::open_mailer(&settings.mailer, &plan.faults, args.seed, &aws).await?;
    let faulty = Arc::new(FaultyStore::new(store.clone(), plan.faults.clone(), args.seed));
    let counting = Arc::new(crate::sql::CountingStore::new(faulty.clone()));
    Ok(DemoAdapters { store, faulty, counting, mailer, concurrent_migrations })
}

pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    let common = &args.common;
    let plan = DemoPlan::check(&args)?;
    plan.prepare_data_dir(&common.data_dir)?;
    let opened = open_adapters(&args, &plan).await?;
    let started = Instant::now();
    let local = LocalRuntime::start(Adapters {
        faults: plan.faults.clone(),
        seed: args.seed,
        ..Adapters::new(opened.counting.clone(), opened.mailer.port(), plan.config.clone())
    });
    if plan.embedded {
        suppress_some(&local.engine, &args, &plan).await?;
    }
    let Outcome::Started { run_id, pages, chains, .. } = local.engine.start(JOB, Some(&plan.run_key)).await? else {
        unreachable!("start returns Started")
    };
    if !common.json {
        eprintln!(
            "Run {run_id}: {pages} pages through {chains} chains, hop timeout {}{}",
            humantime::format_duration(args.hop_timeout),
            if args.chaos { ", with injected faults" } else { "" }
        );
    }
    let twin = args.chaos.then(|| {
        let engine = local.engine.clone();
        tokio::spawn(add_twin_mid_run(engine, opened.store.clone(), plan.table, run_id.clone(), args.users, args.seed))
    });
    let status = local.drive(&run_id, !common.json && std::io::IsTerminal::is_terminal(&std::io::stderr())).await?;
    if status.status == RunState::Paused {
        // Not a failed check: the run stopped where asked, and continues from there.
        print_status(&status, common.json);
        eprintln!(
            "Paused with {} of {} items settled. `baton resume --data-dir {}` continues it (the demo's config is in {}).",
            status.done + status.failed + status.skipped + status.unknown,
            status.total,
            common.data_dir.display(),
            common.data_dir.join(CONFIG_FILE).display()
        );
        return Ok(ExitCode::from(3));
    }
    let duplicate_keys = match twin {
        Some(task) => task.await.unwrap_or(Ok(None))?.into_iter().collect(),
        None => Vec::new(),
    };
    let ran = Ran { local, run_id, status, wall: started.elapsed().as_secs_f64(), duplicate_keys };
    let summary = summarise(&args, &plan, &opened, ran).await?;
    report(&summary, common)
}

/// Before the embedded demo's run (never in a database of yours): every 97th synthetic user
/// unsubscribes through the one-click endpoint (the handler a Function URL runs) and every
/// 331st complains through an SES event, so the run must skip them; the checks read the
/// suppression list. Under `--chaos` the store fails now and then: each is retried as a mail
/// client or EventBridge would.
async fn suppress_some(engine: &crate::engine::Engine, args: &DemoArgs, plan: &DemoPlan) -> Result<()> {
    use crate::engine::suppression::{MailEvent, MailEventKind};
    let n = plan.config.jobs[JOB].newsletter.as_ref().expect("the demo job is a newsletter");
    let secret = n.secret().expect("the demo sets its secret");
    for i in 0..args.users {
        let (_, email, ..) = synthetic_user(i, args.seed);
        let Some(address) = email.and_then(|e| crate::mail::deliverable(&e, false).ok()) else { continue };
        for attempt in 1..=5 {
            let done = if i % 97 == 13 {
                let url = crate::mail::unsubscribe_url(&n.unsubscribe_url, secret.expose_secret(), JOB, &address);
                let request = crate::inbound::HttpRequest {
                    method: "POST".into(),
                    raw_query: url.split_once('?').map(|(_, q)| q.to_owned()).unwrap_or_default(),
                    headers: vec![("content-type".into(), "application/x-www-form-urlencoded".into())],
                    body: b"List-Unsubscribe=One-Click".to_vec(),
                };
                crate::inbound::unsubscribe::handle(engine, &request).await.status == 200
            } else if i % 331 == 7 {
                let complaint = MailEvent {
                    key: format!("complaint:demo-{i}"),
                    kind: MailEventKind::Complaint,
                    recipients: vec![address.clone()],
                    run_id: None,
                    job: Some(JOB.into()),
                    detail: Some("complaint: abuse".into()),
                    at_ms: engine.now_ms() - 1,
                };
                engine.record_mail_event(&complaint).await.is_ok()
            } else {
                break;
            };
            if done {
                break;
            }
            anyhow::ensure!(attempt < 5, "the demo could not record user {i}'s unsubscribe or complaint");
        }
    }
    Ok(())
}

/// A demo run that ended (not paused).
struct Ran {
    local: LocalRuntime,
    run_id: String,
    status: RunStatus,
    wall: f64,
    duplicate_keys: Vec<String>,
}

fn report(summary: &DemoSummary, common: &Common) -> Result<ExitCode> {
    let outbox_dir = common.data_dir.join("outbox");
    let outbox = (common.mailer == MailerKind::Outbox).then_some(outbox_dir.as_path());
    if common.json {
        println!("{}", serde_json::to_string_pretty(summary)?);
    } else {
        print_summary(summary, outbox);
    }
    let ok = summary.run.status == "succeeded" && summary.checks_passed;
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Checks the run against the synthetic users and counts what the fault injection did.
async fn summarise(args: &DemoArgs, plan: &DemoPlan, opened: &DemoAdapters, ran: Ran) -> Result<DemoSummary> {
    let engine = &ran.local.engine;
    // Sends the hop stopped waiting for at its cut-off (a slow disk or provider, not a fault
    // that was injected): ambiguous outcomes too.
    let cut_off = engine
        .items_in_state(&ran.run_id, "unknown", i64::MAX)
        .await?
        .iter()
        .filter(|(_, reason)| reason.as_deref() == Some(crate::engine::hop::CUT_OFF_IN_FLIGHT))
        .count() as u64;
    let hops = ran.local.lambda_counts();
    let injected = injected(args, opened, &hops, ran.duplicate_keys, cut_off);
    let outbox = match &opened.mailer {
        OpenedMailer::Outbox(_) => Some(outbox::recipients(&args.common.data_dir.join("outbox"))?),
        OpenedMailer::Ses(_) => None,
    };
    let recipients = (0..args.users).map(|i| {
        let (id, email, ..) = synthetic_user(i, args.seed);
        crate::audit::Recipient { key: id.to_string(), address: email }
    });
    let found = crate::audit::exactly_once(engine, &ran.run_id, recipients, outbox.as_deref()).await?;
    let run = ran.status;
    let mut checks_passed = run.accounted() && run.claimed == 0 && found.holds();
    if args.chaos {
        checks_passed &= run.unknown as u64 <= injected.ambiguous_outcomes;
    }
    let statements = opened.counting.statements();
    Ok(DemoSummary {
        messages_per_second: run.done as f64 / ran.wall.max(1e-9),
        wall_seconds: ran.wall,
        outbox_files: outbox.as_ref().map(Vec::len),
        valid_users: found.deliverable,
        missed_users: found.missed.len(),
        unknown_users: found.unknown,
        duplicated_addresses: found.duplicated,
        undeliverable_mailed: found.undeliverable_mailed,
        suppressed_users: found.suppressed,
        suppressed_mailed: found.suppressed_mailed,
        mail_checked: outbox.is_some(),
        hops,
        injected,
        faults: plan.faults.clone(),
        checks_passed,
        sql_statements: statements,
        sql_statements_per_page: statements as f64 / run.pages_total.max(1) as f64,
        run,
    })
}

/// What the fault injection did, and how many outcomes it could have made ambiguous.
fn injected(
    args: &DemoArgs,
    opened: &DemoAdapters,
    hops: &LambdaCounts,
    duplicate_keys: Vec<String>,
    cut_off: u64,
) -> Injected {
    let mail_ambiguous = match &opened.mailer {
        OpenedMailer::Outbox(outbox) => outbox.ambiguous.load(std::sync::atomic::Ordering::SeqCst),
        OpenedMailer::Ses(_) => 0,
    };
    Injected {
        sql: opened.faulty.counts(),
        mail_ambiguous,
        duplicate_keys,
        concurrent_migrations: opened.concurrent_migrations,
        cut_off_in_flight: cut_off,
        ambiguous_outcomes: mail_ambiguous
            + cut_off
            + 2 * args.page_size as u64 * (hops.crashed + hops.timed_out + hops.errors),
    }
}

/// Under `--chaos`: once a tenth of the items are done, the user in the middle gets a second
/// source row with the same key (a join gone wrong, a row inserted mid-run). Returns its key.
async fn add_twin_mid_run(
    engine: Arc<crate::engine::Engine>,
    store: Arc<dyn SqlStore>,
    table: &'static str,
    run_id: String,
    users: u32,
    seed: u64,
) -> Result<Option<String>> {
    loop {
        let p = engine.progress(&run_id).await?;
        if p.is_settled() {
            return Ok(None);
        }
        if p.items_done * 10 >= p.total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (id, _, name, city, plan) = synthetic_user(users / 2, seed);
    let twin = (id, Some(format!("twin{id}@example.com")), name, city, plan);
    store.query(st::insert_demo_users(table, true, &[twin])).await?;
    Ok(Some(id.to_string()))
}

fn print_summary(s: &DemoSummary, outbox_dir: Option<&std::path::Path>) {
    print_status(&s.run, false);
    println!(
        "  hops:    {} delivered | {} duplicated | {} lost | {} crashed | {} timed out",
        s.hops.delivered, s.hops.duplicated, s.hops.dropped, s.hops.crashed, s.hops.timed_out
    );
    match (s.outbox_files, outbox_dir) {
        (Some(n), Some(dir)) => println!(
            "  outbox:  {n} messages in {} ({:.0} messages/s over {:.1}s)",
            dir.display(),
            s.messages_per_second,
            s.wall_seconds
        ),
        _ => println!(
            "  mail:    {} accepted by the provider ({:.0} messages/s over {:.1}s); check its side for delivery",
            s.run.done, s.messages_per_second, s.wall_seconds
        ),
    }
    println!(
        "  sql:     {} statements, {:.1} per page (planning, hops, sweeps and progress polls included)",
        s.sql_statements, s.sql_statements_per_page
    );
    let i = &s.injected;
    if s.faults != Faults::default() {
        println!(
            "  faults:  {} long-lived sandboxes | sql: {} failed before commit, {} committed with the answer lost | \
             {} ambiguous sends | {} duplicate keys mid-run | {} concurrent migrations",
            s.hops.long_lived,
            i.sql.failed_before_commit,
            i.sql.response_lost,
            i.mail_ambiguous,
            i.duplicate_keys.len(),
            i.concurrent_migrations
        );
    }
    print_checks(s);
}

/// The demo's checks, one line each: `ok` or `FAIL`.
fn print_checks(s: &DemoSummary) {
    let i = &s.injected;
    let mark = |ok: bool| if ok { "ok  " } else { "FAIL" };
    if s.outbox_files.is_some() {
        println!(
            "  {} nobody got it twice ({} duplicated addresses)",
            mark(s.duplicated_addresses.is_empty()),
            s.duplicated_addresses.len()
        );
        println!(
            "  {} nobody was missed: {} valid users, {} missed, {} unknown (sent at most once, never retried)",
            mark(s.missed_users == 0),
            s.valid_users,
            s.missed_users,
            s.unknown_users
        );
        println!(
            "  {} nobody undeliverable was mailed ({})",
            mark(s.undeliverable_mailed.is_empty()),
            s.undeliverable_mailed.len()
        );
        println!(
            "  {} nobody suppressed was mailed ({} unsubscribed or complained before the run, {} mailed)",
            mark(s.suppressed_mailed.is_empty()),
            s.suppressed_users,
            s.suppressed_mailed.len()
        );
    }
    println!(
        "  {} done + failed + skipped + unknown = total ({} + {} + {} + {} = {})",
        mark(s.run.accounted()),
        s.run.done,
        s.run.failed,
        s.run.skipped,
        s.run.unknown,
        s.run.total
    );
    let over: Vec<_> = s.run.chains.iter().filter(|c| c.hops > c.hop_budget).collect();
    println!("  {} every chain within its hop budget", mark(over.is_empty()));
    println!("  {} no item left claimed ({})", mark(s.run.claimed == 0), s.run.claimed);
    if s.faults != Faults::default() {
        println!(
            "  {} unknown ({}) within the ambiguous outcomes injected ({})",
            mark(s.run.unknown as u64 <= i.ambiguous_outcomes),
            s.run.unknown,
            i.ambiguous_outcomes
        );
    }
}
