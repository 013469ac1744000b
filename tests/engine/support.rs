//! Test support: a fresh store per test (a SQLite file, or a new database on the throwaway
//! PostgreSQL server that `scripts/with-postgres` starts), source tables, the engine on the
//! local adapters with faults, and the exactly-once checks.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use baton::adapters::local::faults::Faults;
use baton::adapters::local::outbox::{self, Outbox};
use baton::adapters::local::sqlite::SqliteStore;
use baton::adapters::postgres::PostgresStore;
use baton::compose::Adapters;
use baton::config::{Config, JobConfig, NewsletterConfig, Settings};
use baton::engine::run::RunStatus;
use baton::engine::{Engine, Outcome, Tracing};
use baton::jobs::KindRegistry;
use baton::ports::{MailError, Mailer, ManualClock, OutgoingMail};
use baton::runtime::LocalRuntime;
use baton::sql::{CountingStore, Params, SqlStore, Stmt, Value};

pub const JOB: &str = "news";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh, migrated store. SQLite: a file in `dir`. PostgreSQL: a new database.
pub async fn fresh_store(backend: Backend, dir: &std::path::Path) -> Arc<dyn SqlStore> {
    let store: Arc<dyn SqlStore> = match backend {
        Backend::Sqlite => Arc::new(SqliteStore::open(&dir.join("baton.db")).unwrap()),
        Backend::Postgres => Arc::new(PostgresStore::connect(&fresh_database_url().await, 24).unwrap()),
    };
    baton::sql::migrations::migrate(store.as_ref(), 0).await.unwrap();
    store
}

/// A fresh store that `n` processes (stores of their own) migrated at once, as Lambda's cold
/// starts do on a fresh database.
pub async fn concurrently_migrated_store(backend: Backend, dir: &std::path::Path, n: usize) -> Arc<dyn SqlStore> {
    let stores = stores_on_a_fresh_database(backend, dir, n).await;
    for r in futures::future::join_all(stores.iter().map(|s| baton::sql::migrations::migrate(s.as_ref(), 0))).await {
        r.unwrap_or_else(|e| panic!("{backend:?}: a concurrent migration failed: {e}"));
    }
    stores.into_iter().next().unwrap()
}

/// `n` stores (connections or pools of their own, like separate processes) on one new, empty
/// database.
pub async fn stores_on_a_fresh_database(backend: Backend, dir: &std::path::Path, n: usize) -> Vec<Arc<dyn SqlStore>> {
    match backend {
        Backend::Sqlite => {
            (0..n).map(|_| Arc::new(SqliteStore::open(&dir.join("baton.db")).unwrap()) as Arc<dyn SqlStore>).collect()
        }
        Backend::Postgres => {
            let url = fresh_database_url().await;
            (0..n).map(|_| Arc::new(PostgresStore::connect(&url, 24).unwrap()) as Arc<dyn SqlStore>).collect()
        }
    }
}

/// A new, empty database on the throwaway PostgreSQL server; its URL.
pub async fn fresh_database_url() -> String {
    let url = std::env::var("BATON_TEST_PG_URL")
        .expect("BATON_TEST_PG_URL is not set: run the suite with `scripts/test` (it starts a throwaway PostgreSQL)");
    let admin = PostgresStore::connect(&url, 1).unwrap();
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    admin.query(Stmt::new(format!("CREATE DATABASE {name}"), Params::new())).await.unwrap();
    format!("{}/{name}", url.rsplit_once('/').unwrap().0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Int,
    Text,
    Uuid,
}

/// A source row: key, address (None = NULL), name.
pub type User = (Value, Option<String>, String);

/// `n` users with sparse integer ids; every 25th has an invalid address.
pub fn int_users(n: usize) -> Vec<User> {
    (0..n)
        .map(|i| {
            let id = (i as i64) * 13 + 5;
            let email = if i % 25 == 24 { "not-an-address".to_owned() } else { format!("user{id}@example.com") };
            (Value::Int(id), Some(email), format!("Zoë {i}"))
        })
        .collect()
}

pub async fn create_users(store: &dyn SqlStore, backend: Backend, kind: KeyKind, users: &[User]) {
    let key_type = match (kind, backend) {
        (KeyKind::Int, _) => "BIGINT",
        (KeyKind::Text, _) | (KeyKind::Uuid, Backend::Sqlite) => "TEXT",
        (KeyKind::Uuid, Backend::Postgres) => "UUID",
    };
    store.query(Stmt::new("DROP TABLE IF EXISTS users", Params::new())).await.unwrap();
    store
        .query(Stmt::new(
            format!("CREATE TABLE users (id {key_type} PRIMARY KEY, email TEXT, name TEXT NOT NULL)"),
            Params::new(),
        ))
        .await
        .unwrap();
    for chunk in users.chunks(300) {
        let mut params = Params::new();
        let rows: Vec<String> = chunk
            .iter()
            .enumerate()
            .map(|(i, (id, email, name))| {
                params.push(format!("i{i}"), id.clone());
                params.push(format!("e{i}"), email.clone());
                params.push(format!("n{i}"), name.as_str());
                format!("(:i{i}, :e{i}, :n{i})")
            })
            .collect();
        let sql = format!("INSERT INTO users (id, email, name) VALUES {}", rows.join(", "));
        store.query(Stmt::new(sql, params)).await.unwrap();
    }
}

pub fn newsletter_job(page_size: u32, chains: u32) -> JobConfig {
    JobConfig {
        kind: "newsletter".into(),
        source: "SELECT id, email, name FROM users".into(),
        key_column: "id".into(),
        page_size,
        chains,
        max_failures: None,
        max_failure_percent: None,
        ambiguity: Default::default(),
        run_deadline: Duration::from_secs(600),
        hop_slack: 20,
        time_zone: "UTC".into(),
        newsletter: Some(NewsletterConfig {
            email_column: "email".into(),
            from: "News <news@example.com>".into(),
            subject: "Hello {{ recipient.name }}".into(),
            text: Some("Hi {{ recipient.name }}. Unsubscribe: {{ unsubscribe_url }}".into()),
            html: None,
            text_file: None,
            html_file: None,
            send_rate: 0.0,
            in_flight: 16,
            max_attempts: 8,
            unsubscribe_url: "https://example.com/u".into(),
            unsubscribe_secret: Some("0123456789abcdef0123".into()),
            unsubscribe_secret_env: "BATON_TEST_NO_SUCH_VAR".into(),
            configuration_set: None,
            vars: Default::default(),
            smtputf8: false,
        }),
        sql: None,
        params: None,
    }
}

/// Hops duplicated, lost, crashed and delayed, as the report and trace tests put a run through.
pub fn hop_chaos() -> Faults {
    Faults {
        duplicate_hop: 0.15,
        drop_hop: 0.06,
        crash_hop: 0.04,
        delay_hop: 0.1,
        max_delay: Duration::from_millis(50),
        ..Faults::default()
    }
}

pub fn test_settings() -> Settings {
    Settings {
        hop_timeout: Duration::from_millis(400),
        hop_margin: Duration::from_millis(100),
        sweep_interval: Duration::from_millis(100),
        reserved_concurrency: 16,
        max_pages_per_hop: None,
        soft_bounce_limit: 3,
    }
}

/// Settings for a hop the test kills (`Manual::kill_after_sends`): a budget long enough that its
/// own cut-off never comes first on a loaded machine.
pub fn killable() -> Settings {
    Settings { hop_timeout: Duration::from_secs(5), hop_margin: Duration::from_secs(1), ..test_settings() }
}

/// Settings under which a hop holds one page at a time and hands over after it (so that it
/// heartbeats): for cases that strike one page's statement (a hop holding two would see the
/// struck attempts shared between its pages).
pub fn one_page_per_hop() -> Settings {
    Settings { max_pages_per_hop: Some(1), ..test_settings() }
}

/// The outbox, plus what tests need to steer: permanent rejections by address suffix, an
/// account-level stop, and a count of accepted messages.
pub struct TestMailer {
    pub outbox: Outbox,
    pub reject_suffix: Option<String>,
    /// Messages to these addresses are accepted, but the caller is told the outcome is unknown.
    pub ambiguous_suffix: Option<String>,
    pub stopped: std::sync::atomic::AtomicBool,
    pub accepted: AtomicU64,
    /// When each accepted message went out.
    pub sent_at: std::sync::Mutex<Vec<std::time::Instant>>,
    /// How long each send takes (a provider's latency).
    pub latency: Duration,
    /// Each send's recipient, start and end.
    pub sends: std::sync::Mutex<Vec<(String, std::time::Instant, std::time::Instant)>>,
}

impl TestMailer {
    pub fn new(outbox_dir: &std::path::Path, faults: Faults, seed: u64) -> TestMailer {
        TestMailer {
            outbox: Outbox::new(outbox_dir, faults, seed, None).unwrap(),
            reject_suffix: None,
            ambiguous_suffix: None,
            stopped: Default::default(),
            accepted: AtomicU64::new(0),
            sent_at: Default::default(),
            latency: Duration::ZERO,
            sends: Default::default(),
        }
    }
}

#[async_trait]
impl Mailer for TestMailer {
    async fn send(&self, mail: &OutgoingMail) -> Result<(), MailError> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(MailError::AccountStopped("daily sending quota exceeded".into()));
        }
        if let Some(s) = &self.reject_suffix
            && mail.to.ends_with(s.as_str())
        {
            return Err(MailError::Permanent("address rejected by the provider".into()));
        }
        let started = std::time::Instant::now();
        tokio::time::sleep(self.latency).await;
        let r = self.outbox.send(mail).await;
        self.sends.lock().unwrap().push((mail.to.clone(), started, std::time::Instant::now()));
        let r = match (&self.ambiguous_suffix, r) {
            (Some(s), Ok(())) if mail.to.ends_with(s.as_str()) => {
                Err(MailError::Ambiguous("the request timed out after the message was accepted".into()))
            }
            (_, r) => r,
        };
        if r.is_ok() || matches!(r, Err(MailError::Ambiguous(_))) {
            self.accepted.fetch_add(1, Ordering::SeqCst);
            self.sent_at.lock().unwrap().push(std::time::Instant::now());
        }
        r
    }
}

pub struct Setup {
    pub job: JobConfig,
    pub settings: Settings,
    pub faults: Faults,
    pub seed: u64,
    pub kinds: KindRegistry,
    pub reject_suffix: Option<String>,
    pub ambiguous_suffix: Option<String>,
    /// Where the engine's spans go (nowhere unless a test collects them).
    pub tracing: Tracing,
    /// How long each send takes.
    pub mail_latency: Duration,
}

impl Setup {
    pub fn new(job: JobConfig) -> Self {
        Setup {
            job,
            settings: test_settings(),
            faults: Faults::default(),
            seed: 1,
            kinds: KindRegistry::default(),
            reject_suffix: None,
            ambiguous_suffix: None,
            tracing: Tracing::default(),
            mail_latency: Duration::ZERO,
        }
    }
}

pub struct Harness {
    pub backend: Backend,
    /// The store as it is (for checks); the engine uses `faulty`, which injects the SQL faults
    /// of the setup's fault schedule.
    pub store: Arc<dyn SqlStore>,
    pub faulty: Arc<baton::adapters::local::faults::FaultyStore>,
    pub local: LocalRuntime,
    pub mailer: Arc<TestMailer>,
    pub outbox_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// A store with `users` in it (integer keys) and an engine over it.
    pub async fn with_users(backend: Backend, users: &[User], setup: Setup) -> Harness {
        Self::with_source(backend, KeyKind::Int, users, setup).await
    }

    pub async fn with_source(backend: Backend, kind: KeyKind, users: &[User], setup: Setup) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = fresh_store(backend, dir.path()).await;
        create_users(store.as_ref(), backend, kind, users).await;
        Self::on_store(backend, store, dir, setup)
    }

    pub fn on_store(backend: Backend, store: Arc<dyn SqlStore>, dir: tempfile::TempDir, setup: Setup) -> Harness {
        let outbox_dir = dir.path().join("outbox");
        let mailer = Arc::new(TestMailer {
            reject_suffix: setup.reject_suffix,
            ambiguous_suffix: setup.ambiguous_suffix,
            latency: setup.mail_latency,
            ..TestMailer::new(&outbox_dir, setup.faults.clone(), setup.seed)
        });
        let clock = ManualClock::default();
        let config = Config { settings: setup.settings, jobs: [(JOB.to_owned(), setup.job)].into() };
        config.validate().unwrap();
        let faulty =
            Arc::new(baton::adapters::local::faults::FaultyStore::new(store.clone(), setup.faults.clone(), setup.seed));
        let local = LocalRuntime::start(Adapters {
            clock: Arc::new(clock),
            kinds: setup.kinds,
            faults: setup.faults,
            seed: setup.seed,
            tracing: setup.tracing,
            ..Adapters::new(faulty.clone(), mailer.clone(), config)
        });
        Harness { backend, store, faulty, local, mailer, outbox_dir, _dir: dir }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.local.engine
    }

    /// Drives the run to a final or paused state, failing the test after a minute.
    pub async fn drive(&self, run_id: &str) -> RunStatus {
        tokio::time::timeout(Duration::from_secs(60), self.local.drive(run_id, false))
            .await
            .expect("run did not settle within 60s")
            .unwrap()
    }

    /// Nothing is `unknown` unless a hop was killed at its hard deadline mid-page (which an
    /// overloaded machine can cause; then `unknown` is the correct, at-most-once answer).
    pub fn assert_no_unknown_without_kills(&self, status: &RunStatus) {
        let counts = self.local.lambda_counts();
        assert!(
            status.unknown == 0 || counts.timed_out + counts.crashed > 0,
            "items became unknown although no hop was killed: {status:?} {counts:?}"
        );
    }

    pub async fn count(&self, sql: &str) -> i64 {
        let rows = self.store.query(Stmt::new(sql, Params::new())).await.unwrap();
        rows.rows[0][0].as_i64().unwrap()
    }

    /// The product's promise, checked against the outbox by the same check `baton demo` makes
    /// ([`baton::audit`]), plus the ledger's accounting and every chain's hop budget.
    pub async fn assert_exactly_once(&self, run_id: &str, users: &[User]) {
        let status = self.status(run_id).await;
        let recipients = users
            .iter()
            .map(|(key, email, _)| baton::audit::Recipient { key: key.key_text().unwrap(), address: email.clone() });
        let found = baton::audit::exactly_once(self.engine(), run_id, recipients, Some(&self.sent())).await.unwrap();
        assert!(found.holds(), "{:?}: not exactly once: {found:?} (status {status:?})", self.backend);
        assert!(status.accounted(), "done + failed + skipped + unknown != total: {status:?}");
        for c in &status.chains {
            assert!(c.hops <= c.hop_budget, "chain {} exceeded its budget: {c:?}", c.chain);
        }
    }
}

/// What both ways of driving the engine share: the job's run, its status, and what was mailed.
#[allow(async_fn_in_trait)]
pub trait Rig {
    fn engine(&self) -> &Engine;
    fn outbox_dir(&self) -> &std::path::Path;

    /// Starts the test job's run `t`.
    async fn start(&self) -> String {
        match self.engine().start(JOB, Some("t")).await.unwrap() {
            Outcome::Started { run_id, .. } => run_id,
            other => panic!("unexpected {other:?}"),
        }
    }

    async fn status(&self, run_id: &str) -> RunStatus {
        self.engine().status(Some(run_id)).await.unwrap().unwrap()
    }

    /// The recipient of every message in the outbox, once per message.
    fn sent(&self) -> Vec<String> {
        outbox::recipients(self.outbox_dir()).unwrap_or_default()
    }
}

impl Rig for Harness {
    fn engine(&self) -> &Engine {
        &self.local.engine
    }
    fn outbox_dir(&self) -> &std::path::Path {
        &self.outbox_dir
    }
}

impl Rig for Manual {
    fn engine(&self) -> &Engine {
        &self.engine
    }
    fn outbox_dir(&self) -> &std::path::Path {
        &self.outbox_dir
    }
}

// ---- step-by-step driving -------------------------------------------------------------------

use baton::engine::event::Event;
use baton::ports::{InvokeError, Invoker};
use baton::sql::{Rows, SqlError};
use std::sync::Mutex;

/// Records invoked events instead of running them; the test delivers them.
#[derive(Default)]
pub struct RecordingInvoker {
    pub events: Mutex<std::collections::VecDeque<Event>>,
    /// When set, every invoke fails with this error (and records nothing).
    pub failing: Mutex<Option<InvokeError>>,
}

#[async_trait]
impl Invoker for RecordingInvoker {
    async fn invoke(&self, event: &Event) -> Result<(), InvokeError> {
        if let Some(e) = self.failing.lock().unwrap().clone() {
            return Err(e);
        }
        self.events.lock().unwrap().push_back(event.clone());
        Ok(())
    }
}

/// When a [`StepStore`] fault strikes: before the statement runs, or after it committed (its
/// response lost). The same faults, with the same meaning, as the chaos store's.
pub use baton::adapters::local::faults::SqlFault as Strike;

struct Planned {
    statement: &'static str,
    /// Runs of the statement let through before it strikes.
    spare: u32,
    strike: Strike,
    times: u32,
}

/// A store that fails chosen statements (by name) a chosen number of times: a database fault,
/// a response lost after commit, or (failing more times than the engine retries) a hop dying
/// between two statements.
pub struct StepStore {
    inner: Arc<dyn SqlStore>,
    planned: Mutex<Option<Planned>>,
    pub struck: AtomicU64,
    gate: Mutex<Option<Gate>>,
    /// The longest SQL text seen (the Data API refuses more than 64 KiB).
    pub longest_sql: AtomicU64,
}

/// A statement held back: the test hears when it is reached and says when it may run.
struct Gate {
    statement: &'static str,
    reached: tokio::sync::oneshot::Sender<()>,
    release: tokio::sync::oneshot::Receiver<()>,
}

impl StepStore {
    /// The hop dies at the next `statement`: it fails every time the engine re-runs it.
    pub fn fail_next(&self, statement: &'static str) {
        self.strike(statement, Strike::BeforeCommit, baton::engine::SQL_ATTEMPTS);
    }

    pub fn strike(&self, statement: &'static str, strike: Strike, times: u32) {
        self.strike_after(statement, 0, strike, times);
    }

    /// As [`Self::strike`], once `spare` runs of the statement went through.
    pub fn strike_after(&self, statement: &'static str, spare: u32, strike: Strike, times: u32) {
        *self.planned.lock().unwrap() = Some(Planned { statement, spare, strike, times });
    }

    /// Holds the next `statement` until the returned sender fires; the receiver hears when it
    /// was reached (a hop stalled at a chosen point, e.g. between two protocol steps).
    pub fn hold_before(
        &self,
        statement: &'static str,
    ) -> (tokio::sync::oneshot::Receiver<()>, tokio::sync::oneshot::Sender<()>) {
        let (reached, reached_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release) = tokio::sync::oneshot::channel();
        *self.gate.lock().unwrap() = Some(Gate { statement, reached, release });
        (reached_rx, release_tx)
    }

    async fn pass_gate(&self, name: &str) {
        let gate = {
            let mut slot = self.gate.lock().unwrap();
            if slot.as_ref().is_some_and(|g| g.statement == name) { slot.take() } else { None }
        };
        if let Some(gate) = gate {
            let _ = gate.reached.send(());
            let _ = gate.release.await;
        }
    }

    /// Whether this statement is struck, and how.
    fn take(&self, name: &str) -> Option<Strike> {
        let mut slot = self.planned.lock().unwrap();
        let planned = slot.as_mut().filter(|p| p.statement == name)?;
        if planned.spare > 0 {
            planned.spare -= 1;
            return None;
        }
        planned.times -= 1;
        let strike = planned.strike;
        if planned.times == 0 {
            *slot = None;
        }
        self.struck.fetch_add(1, Ordering::SeqCst);
        Some(strike)
    }
}

#[async_trait]
impl SqlStore for StepStore {
    async fn query(&self, stmt: Stmt) -> Result<Rows, SqlError> {
        self.pass_gate(stmt.name).await;
        self.longest_sql.fetch_max(stmt.sql.len() as u64, Ordering::SeqCst);
        Strike::query(self.take(stmt.name), self.inner.as_ref(), stmt).await
    }
    async fn transaction(&self, stmts: Vec<Stmt>) -> Result<Vec<Rows>, SqlError> {
        let strike = self.take(stmts.first().map(|s| s.name).unwrap_or_default());
        Strike::transaction(strike, self.inner.as_ref(), stmts).await
    }
    fn dynamic_types(&self) -> bool {
        self.inner.dynamic_types()
    }
}

/// A mailer that hangs forever once `limit` messages went out, so a hop can be killed mid-page
/// at a known point.
pub struct HangingMailer {
    pub inner: TestMailer,
    pub limit: AtomicU64,
}

#[async_trait]
impl Mailer for HangingMailer {
    async fn send(&self, mail: &OutgoingMail) -> Result<(), MailError> {
        if self.inner.accepted.load(Ordering::SeqCst) >= self.limit.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.send(mail).await
    }
}

/// The engine with a recording invoker: the test decides when each event is delivered.
pub struct Manual {
    pub engine: Engine,
    pub invoker: Arc<RecordingInvoker>,
    pub store: Arc<StepStore>,
    pub counting: Arc<CountingStore<Arc<dyn SqlStore>>>,
    pub clock: ManualClock,
    pub mailer: Arc<HangingMailer>,
    pub outbox_dir: PathBuf,
    pub settings: Settings,
    pub _dir: tempfile::TempDir,
}

impl Manual {
    pub async fn new(backend: Backend, users: &[User], job: JobConfig, kinds: KindRegistry) -> Manual {
        Self::with_settings(backend, users, job, kinds, test_settings()).await
    }

    pub async fn with_settings(
        backend: Backend,
        users: &[User],
        job: JobConfig,
        kinds: KindRegistry,
        settings: Settings,
    ) -> Manual {
        let dir = tempfile::tempdir().unwrap();
        let raw = fresh_store(backend, dir.path()).await;
        create_users(raw.as_ref(), backend, KeyKind::Int, users).await;
        let counting = Arc::new(CountingStore::new(raw));
        let store = Arc::new(StepStore {
            inner: counting.clone(),
            planned: Mutex::new(None),
            struck: AtomicU64::new(0),
            gate: Mutex::new(None),
            longest_sql: AtomicU64::new(0),
        });
        let outbox_dir = dir.path().join("outbox");
        let mailer = Arc::new(HangingMailer {
            inner: TestMailer::new(&outbox_dir, Faults::default(), 1),
            limit: AtomicU64::new(u64::MAX),
        });
        let invoker = Arc::new(RecordingInvoker::default());
        let clock = ManualClock::default();
        let config = Config { settings: settings.clone(), jobs: [(JOB.to_owned(), job)].into() };
        let adapters =
            Adapters { clock: Arc::new(clock.clone()), kinds, ..Adapters::new(store.clone(), mailer.clone(), config) };
        let engine = Engine::new(adapters.engine_parts(invoker.clone()));
        Manual { engine, invoker, store, counting, clock, mailer, outbox_dir, settings, _dir: dir }
    }

    pub fn next_event(&self) -> Option<Event> {
        self.invoker.events.lock().unwrap().pop_front()
    }

    pub fn pending_events(&self) -> usize {
        self.invoker.events.lock().unwrap().len()
    }

    /// Delivers one event with the configured hop timeout; `None` when nothing is queued.
    pub async fn deliver_next(&self) -> Option<Result<Outcome, baton::engine::EngineError>> {
        let event = self.next_event()?;
        Some(self.deliver(event).await)
    }

    pub async fn deliver(&self, event: Event) -> Result<Outcome, baton::engine::EngineError> {
        let deadline = tokio::time::Instant::now() + self.settings.hop_timeout;
        self.engine.handle(event, deadline).await
    }

    /// Delivers `event` and kills its hop (drops it, as Lambda's timeout would) once `sent`
    /// messages in all went out, however long that takes; panics if the hop ends first. Run it
    /// with a `hop_timeout` long enough that the hop's own cut-off does not come first.
    pub async fn kill_after_sends(&self, event: Event, sent: u64) {
        let reached = async {
            while self.mailer.inner.accepted.load(Ordering::SeqCst) < sent {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        tokio::select! {
            ended = self.deliver(event) => panic!("the hop ended before it was killed: {ended:?}"),
            reached = tokio::time::timeout(Duration::from_secs(20), reached) => {
                reached.unwrap_or_else(|_| panic!("{sent} messages never went out"))
            }
        }
    }

    /// Delivers queued events until none is left; returns every outcome.
    pub async fn pump(&self) -> Vec<Outcome> {
        let mut out = Vec::new();
        while let Some(r) = self.deliver_next().await {
            out.push(r.unwrap());
        }
        out
    }

    /// Moves the clock past every lease and heartbeat, as if the dead hop's time had passed.
    pub fn expire_leases(&self) {
        self.clock.advance_ms(self.settings.stale_after().as_millis() as i64 + 1);
    }
}

pub fn duplicates(addresses: &[String]) -> Vec<String> {
    let mut seen = HashSet::new();
    addresses.iter().filter(|a| !seen.insert(a.as_str())).cloned().collect()
}

/// A fresh PostgreSQL database holding `users`: its store, its name and its URL.
pub async fn pg_with_users(dir: &std::path::Path, users: &[User]) -> (Arc<dyn SqlStore>, String, String) {
    let store = fresh_store(Backend::Postgres, dir).await;
    create_users(store.as_ref(), Backend::Postgres, KeyKind::Int, users).await;
    let name = store.query(Stmt::new("SELECT current_database() AS d", Params::new())).await.unwrap();
    let name = name.first().unwrap().text("d").unwrap().unwrap();
    let admin = std::env::var("BATON_TEST_PG_URL").unwrap();
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    (store, name, url)
}

/// Region and credentials for a spawned `baton` talking to loopback fakes (never real AWS).
pub fn fake_aws_env(cmd: &mut std::process::Command) -> &mut std::process::Command {
    cmd.env("AWS_REGION", "eu-west-1")
        .env("AWS_ACCESS_KEY_ID", "AKIDTEST")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env("AWS_EC2_METADATA_DISABLED", "true")
}
