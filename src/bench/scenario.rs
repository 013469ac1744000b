//! A child's side of `baton bench`: one scenario, measured from the run's start to its end
//! (users are created before, and checks are made after, outside the figures).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use futures::StreamExt;
use tokio::time::Instant;

use super::fakes::{self, DataApiLatency, FakeLambda, Tally};
use super::{Child, Measured, Path, plot};
use crate::adapters::aws::invoke::LambdaInvoker;
use crate::adapters::aws::ses::SesMailer;
use crate::adapters::local::faults::{Faults, FaultyStore};
use crate::adapters::local::outbox::Outbox;
use crate::adapters::local::sqlite::SqliteStore;
use crate::adapters::postgres::PostgresStore;
use crate::cli::demo::{create_users, newsletter_job, synthetic_user};
use crate::compose::Adapters;
use crate::config::{Config, Settings};
use crate::engine::state::State;
use crate::engine::{Engine, Outcome};
use crate::jobs::{Item, ItemContext, Job, JobDeps, KindRegistry};
use crate::ports::{Clock, MailError, Mailer, OutgoingMail, SystemClock};
use crate::sql::{CountingStore, SqlStore, statements as st};

const JOB: &str = "bench-newsletter";
const SEED: u64 = 1;

pub async fn run(child: &Child) -> Result<Measured> {
    std::fs::create_dir_all(&child.dir).with_context(|| format!("cannot create {}", child.dir.display()))?;
    match child.scenario.path {
        Path::Embedded | Path::Aws => engine_run(child).await,
        Path::Baseline => baseline(child).await,
        Path::BareSes => bare_ses(child).await,
    }
}

/// The state store with the scenario's users, and its table name.
async fn users_store(child: &Child) -> Result<(Arc<dyn SqlStore>, &'static str)> {
    let (store, table): (Arc<dyn SqlStore>, _) = match &child.database_url {
        Some(url) => (Arc::new(PostgresStore::connect(url, 16)?), "baton_bench_users"),
        None => (Arc::new(SqliteStore::open(&child.dir.join("baton.db"))?), "users"),
    };
    crate::sql::migrations::migrate(store.as_ref(), SystemClock.now_ms()).await?;
    create_users(store.as_ref(), table, child.scenario.users, SEED, child.database_url.is_none()).await?;
    Ok((store, table))
}

/// Synthetic user `i`'s id, and its address if it can be mailed.
fn user(i: u32) -> (i64, Option<String>) {
    let (id, email, ..) = synthetic_user(i, SEED);
    (id, email.filter(|e| crate::mail::deliverable(e, false).is_ok()))
}

/// Users whose address can be mailed: each must be mailed exactly once.
fn deliverable(users: u32) -> u64 {
    (0..users).filter(|i| user(*i).1.is_some()).count() as u64
}

fn ses_mailer(child: &Child) -> Result<Arc<SesMailer>> {
    let endpoint = child.ses_endpoint.as_deref().context("an AWS scenario needs the SES fake's endpoint")?;
    Ok(Arc::new(SesMailer::new(SesMailer::client_from(&fakes::sdk_config(endpoint)), None)))
}

fn config(child: &Child, table: &str) -> Config {
    let s = &child.scenario;
    let secret = "bench-0123456789abcdef0123456789abcdef".to_owned().into();
    let mut job = newsletter_job(table, &secret, s.chaos, (s.page_size, s.chains), s.send_rate);
    if let Some(n) = job.newsletter.as_mut() {
        n.in_flight = s.in_flight;
    }
    job.run_deadline = Duration::from_secs(6 * 3600);
    let settings = if s.chaos {
        // As the demo under --chaos: short hops, so that many hops meet the faults.
        Settings {
            hop_timeout: Duration::from_secs(1),
            hop_margin: Duration::from_millis(400),
            sweep_interval: Duration::from_millis(500),
            reserved_concurrency: s.chains * 2 + 2,
            max_pages_per_hop: Some(2),
            ..Settings::default()
        }
    } else {
        // Hops of a minute, as a function timeout of a minute would make them.
        Settings {
            hop_timeout: Duration::from_secs(60),
            hop_margin: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(30),
            reserved_concurrency: s.chains * 2 + 2,
            ..Settings::default()
        }
    };
    Config { settings, jobs: [(JOB.to_owned(), job)].into() }
}

/// Counts accepted sends per recipient and per chain over time.
struct Recorder {
    inner: Arc<dyn Mailer>,
    origin: std::time::Instant,
    series: std::sync::Mutex<Vec<Vec<u32>>>,
    first_us: AtomicU64,
    last_us: AtomicU64,
    sent: AtomicU64,
    /// Per recipient, where this side sees the truth (the outbox).
    tally: Option<Tally>,
}

impl Recorder {
    fn new(inner: Arc<dyn Mailer>, chains: u32, tally: Option<Tally>) -> Recorder {
        Recorder {
            inner,
            origin: std::time::Instant::now(),
            series: std::sync::Mutex::new(vec![Vec::new(); chains.max(1) as usize]),
            first_us: AtomicU64::new(u64::MAX),
            last_us: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            tally,
        }
    }

    fn restart_clock(&mut self) {
        self.origin = std::time::Instant::now();
    }

    fn record(&self, mail: &OutgoingMail) {
        let us = self.origin.elapsed().as_micros() as u64;
        self.first_us.fetch_min(us, Ordering::Relaxed);
        self.last_us.fetch_max(us, Ordering::Relaxed);
        self.sent.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = &self.tally {
            t.accept(&mail.to);
        }
        let chain = mail.tags.iter().find(|(k, _)| k == "chain").and_then(|(_, v)| v.parse::<usize>().ok());
        let bucket = (us / 1000 / plot::BUCKET_MS) as usize;
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = series.get_mut(chain.unwrap_or(0)) {
            if s.len() <= bucket {
                s.resize(bucket + 1, 0);
            }
            s[bucket] += 1;
        }
    }

    fn send_seconds(&self) -> f64 {
        let (first, last) = (self.first_us.load(Ordering::Relaxed), self.last_us.load(Ordering::Relaxed));
        if first == u64::MAX { 0.0 } else { (last.saturating_sub(first)) as f64 / 1e6 }
    }
}

#[async_trait]
impl Mailer for Recorder {
    async fn send(&self, mail: &OutgoingMail) -> Result<(), MailError> {
        let result = self.inner.send(mail).await;
        if result.is_ok() {
            self.record(mail);
        }
        result
    }

    async fn max_rate(&self) -> Result<Option<f64>, MailError> {
        self.inner.max_rate().await
    }
}

/// The engine's run of the newsletter: embedded (the local Lambda model) or the AWS path (the
/// Lambda fake in this process, SES in the parent).
async fn engine_run(child: &Child) -> Result<Measured> {
    let s = &child.scenario;
    let (store, table) = users_store(child).await?;
    let config = config(child, table);
    let faults = if s.chaos { Faults::chaos() } else { Faults::default() };
    let store: Arc<dyn SqlStore> = match (s.path, s.chaos) {
        (Path::Aws, _) => Arc::new(DataApiLatency { inner: store, latency: child.simulated.data_api }),
        (_, true) => Arc::new(FaultyStore::new(store, faults.clone(), SEED)),
        _ => store,
    };
    let counting = Arc::new(CountingStore::new(store.clone()));
    let (mailer, tally, writer_cpu): (Arc<dyn Mailer>, _, _) = match s.path {
        Path::Aws => (ses_mailer(child)?, None, None),
        _ => {
            let outbox = Outbox::new(&child.dir.join("outbox"), faults.clone(), SEED, None)?;
            let cpu = outbox.writer_cpu_ns.clone();
            (Arc::new(outbox), Some(Tally::new(s.users)), Some(cpu))
        }
    };
    let mut recorder = Recorder::new(mailer, s.chains, tally);
    let deliverable = deliverable(s.users);
    recorder.restart_clock();
    let recorder = Arc::new(recorder);
    let adapters = Adapters { faults, seed: SEED, ..Adapters::new(counting.clone(), recorder.clone(), config.clone()) };
    let (cpu0, _) = super::usage();
    let started = Instant::now();
    let (engine, local, lambda) = match s.path {
        Path::Aws => {
            let fake = Arc::new(FakeLambda::new(child.simulated.invoke, config.settings.hop_timeout));
            let url = fakes::serve_lambda(fake.clone()).await?;
            let client = LambdaInvoker::client_from(&fakes::sdk_config(&url));
            let engine = Arc::new(Engine::new(adapters.engine_parts(Arc::new(LambdaInvoker::new(client, "bench")))));
            let _ = fake.engine.set(engine.clone());
            (engine, None, Some(fake))
        }
        _ => {
            let local = crate::runtime::LocalRuntime::start(adapters);
            (local.engine.clone(), Some(local), None)
        }
    };
    // A run of its own each time: on a shared PostgreSQL database, a run key used before would
    // continue (here: find finished) the earlier scenario's run.
    let run_key = format!("bench-{}-{}", s.name, SystemClock.now_ms());
    let Outcome::Started { run_id, .. } = engine.start(JOB, Some(&run_key)).await? else {
        bail!("the run did not start")
    };
    let status = match &local {
        Some(local) => local.drive(&run_id, false).await?,
        None => crate::runtime::watch_until_settled(&engine, &run_id).await?,
    };
    let wall = started.elapsed().as_secs_f64();
    let (cpu1, peak) = super::usage();
    let outbox_cpu = writer_cpu.map_or(0, |c| c.load(Ordering::Relaxed)) as f64 / 1e9;
    let statements = counting.statements();
    // Hops still recording their end.
    match &local {
        Some(local) => local.drain(Duration::from_secs(5)).await,
        None => tokio::time::sleep(Duration::from_millis(300)).await,
    }
    let invokes = match (&local, &lambda) {
        (Some(local), _) => local.lambda_counts().accepted,
        (_, Some(fake)) => fake.invokes.load(Ordering::Relaxed),
        _ => 0,
    };
    let billed = store.query(st::bench_billed_ms(&run_id)).await?.first().and_then(|r| r.int("ms").ok()).unwrap_or(0);
    let (distinct, duplicated) = recorder.tally.as_ref().map_or((0, 0), Tally::distinct_and_duplicated);
    Ok(Measured {
        sent: recorder.sent.load(Ordering::Relaxed),
        distinct,
        duplicated,
        unknown: status.unknown as u64,
        deliverable,
        wall_seconds: wall,
        send_seconds: recorder.send_seconds(),
        sql_statements: statements,
        invokes,
        billed_ms: billed.max(0) as u64,
        cpu_seconds: (cpu1 - cpu0).as_secs_f64(),
        outbox_cpu_seconds: outbox_cpu,
        peak_rss_mb: peak,
        throttled: 0,
        run_status: status.status.to_string(),
        series: recorder.series.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    })
}

/// The article's design: each chain owns a fixed range of ids and, one user at a time, reads
/// the row, sends, and writes the result, with nothing else in flight.
async fn baseline(child: &Child) -> Result<Measured> {
    let s = &child.scenario;
    let (store, table) = users_store(child).await?;
    let config = config(child, table);
    store.transaction(st::bench_baseline_table()).await?;
    let ids = store.query(st::bench_user_ids(table)).await?;
    let ids: Vec<i64> = ids.rows.iter().filter_map(|r| r[0].as_i64()).collect();
    let slow: Arc<dyn SqlStore> = Arc::new(DataApiLatency { inner: store.clone(), latency: child.simulated.data_api });
    let counting = Arc::new(CountingStore::new(slow));
    let recorder = Arc::new(Recorder::new(ses_mailer(child)?, s.chains, None));
    let deps =
        JobDeps { store: counting.clone(), mailer: recorder.clone(), clock: Arc::new(SystemClock), configured: None };
    let Job::Items(job) = KindRegistry::default().build(JOB, &config.jobs[JOB], &deps)? else {
        bail!("the newsletter is an item job")
    };
    let deliverable = deliverable(s.users);
    let (cpu0, _) = super::usage();
    let started = Instant::now();
    let per_chain = ids.len().div_ceil(s.chains.max(1) as usize).max(1);
    let chains = ids.chunks(per_chain).enumerate().map(|(chain, range)| {
        let (job, store) = (job.clone(), counting.clone());
        let (lo, hi) = (range[0] - 1, range[range.len() - 1]);
        async move {
            let cx = ItemContext {
                run_id: "baseline".into(),
                run_key: "baseline".into(),
                chain: chain as u32,
                soft_deadline: Instant::now() + Duration::from_secs(24 * 3600),
            };
            let mut last = lo;
            loop {
                let rows = store.query(st::bench_next_user(table, last, hi)).await?;
                let Some(row) = rows.rows.first() else { break };
                last = row[0].as_i64().unwrap_or(hi);
                let item = Item { key: last.to_string(), columns: Arc::new(rows.columns.clone()), values: row.clone() };
                let outcome = job.process(&item, &cx).await;
                let state = outcome.ledger().map(|(s, _)| s.as_str().to_owned()).unwrap_or_default();
                store.query(st::bench_user_sent(last, &state)).await?;
            }
            Ok::<_, anyhow::Error>(())
        }
    });
    for done in futures::future::join_all(chains).await {
        done?;
    }
    let wall = started.elapsed().as_secs_f64();
    let (cpu1, peak) = super::usage();
    Ok(Measured {
        sent: recorder.sent.load(Ordering::Relaxed),
        deliverable,
        wall_seconds: wall,
        send_seconds: recorder.send_seconds(),
        sql_statements: counting.statements(),
        invokes: s.chains as u64,
        billed_ms: (wall * 1000.0) as u64 * s.chains as u64,
        cpu_seconds: (cpu1 - cpu0).as_secs_f64(),
        peak_rss_mb: peak,
        run_status: "succeeded".into(),
        series: recorder.series.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        ..Measured::default()
    })
}

/// `SendEmail` with the same client and window, messages built beforehand: what the SDK and
/// HTTP cost by themselves.
async fn bare_ses(child: &Child) -> Result<Measured> {
    let s = &child.scenario;
    let mailer = ses_mailer(child)?;
    let recorder = Arc::new(Recorder::new(mailer, 1, None));
    let mut mails = Vec::new();
    for i in 0..s.users {
        let (id, Some(to)) = user(i) else { continue };
        let message_id = format!("bare.{id}@baton.example");
        let url = format!("https://example.com/unsubscribe?u={id}&sig=0123456789abcdef");
        let text = format!("Hello user {id},\n\nHere is what happened this month.\n\nUnsubscribe: {url}\n");
        let html = format!("<p>Hello user {id},</p><p>Here is what happened this month.</p><a href=\"{url}\">x</a>");
        let raw = crate::mail::build(&crate::mail::Message {
            from: (Some("Baton Monthly"), "news@baton.example"),
            to: &to,
            subject: "Your December update",
            text: Some(&text),
            html: Some(&html),
            unsubscribe_url: &url,
            message_id: &message_id,
            date: 0,
        })?;
        // The tags a run's messages carry, so that the SDK serialises the same request.
        let tags = [("job", JOB), ("chain", "0"), ("run_id", "0123456789abcdef0123456789abcdef"), ("run_key", "bench")];
        let tags = tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        mails.push(OutgoingMail { from: "news@baton.example".into(), to, message_id, raw, tags });
    }
    let deliverable = mails.len() as u64;
    let (cpu0, _) = super::usage();
    let started = Instant::now();
    let failed = futures::stream::iter(mails.iter())
        .map(|m| recorder.send(m))
        .buffer_unordered(s.in_flight.max(1) as usize)
        .filter(|r| std::future::ready(r.is_err()))
        .count()
        .await;
    let wall = started.elapsed().as_secs_f64();
    let (cpu1, peak) = super::usage();
    if failed > 0 {
        eprintln!("bare-ses: {failed} sends failed (not retried)");
    }
    Ok(Measured {
        sent: recorder.sent.load(Ordering::Relaxed),
        deliverable,
        wall_seconds: wall,
        send_seconds: recorder.send_seconds(),
        cpu_seconds: (cpu1 - cpu0).as_secs_f64(),
        peak_rss_mb: peak,
        run_status: "succeeded".into(),
        series: recorder.series.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        ..Measured::default()
    })
}
