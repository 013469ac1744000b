//! The invariant cases. Each takes the backend it runs on.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use baton::adapters::local::faults::Faults;
use baton::config::{Ambiguity, Config, SqlJobConfig};
use baton::engine::event::{ControlAction, Event};
use baton::engine::{EngineError, HopNext, Outcome};
use baton::jobs::{Job, JobError, KindRegistry, RangeJob, RangeOutcome};
use baton::sql::{Value, migrations};
use tokio::time::Instant;

use crate::support::*;

fn setup(page_size: u32, chains: u32) -> Setup {
    Setup::new(newsletter_job(page_size, chains))
}

/// As [`setup`], with hops of `hop_timeout`, `hop_margin` of it kept back.
fn setup_with_hops(page_size: u32, chains: u32, hop_timeout: Duration, hop_margin: Duration) -> Setup {
    let mut s = setup(page_size, chains);
    (s.settings.hop_timeout, s.settings.hop_margin) = (hop_timeout, hop_margin);
    s
}

async fn run_and_check(backend: Backend, kind: KeyKind, users: Vec<User>, s: Setup) -> baton::engine::run::RunStatus {
    let h = Harness::with_source(backend, kind, &users, s).await;
    let run = h.start().await;
    let status = h.drive(&run).await;
    assert_eq!(status.status, "succeeded", "{status:?}");
    h.assert_exactly_once(&run, &users).await;
    h.assert_no_unknown_without_kills(&status);
    status
}

pub async fn migrations_apply_once_and_are_safe_twice(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = fresh_store(b, dir.path()).await; // migrated once already
    assert!(migrations::migrate(store.as_ref(), 0).await.unwrap().is_empty());
    let (a, c) = tokio::join!(migrations::migrate(store.as_ref(), 0), migrations::migrate(store.as_ref(), 0));
    assert!(a.unwrap().is_empty() && c.unwrap().is_empty());
    let rows = store
        .query(baton::sql::Stmt::new("SELECT COUNT(*) FROM baton_schema_migrations", Default::default()))
        .await
        .unwrap();
    assert_eq!(rows.rows[0][0].as_i64(), Some(migrations::MIGRATIONS.len() as i64));
}

pub async fn run_sends_each_valid_user_exactly_once(b: Backend) {
    let users = int_users(250);
    let status = run_and_check(b, KeyKind::Int, users, setup(10, 3)).await;
    assert_eq!(status.total, 250);
    assert_eq!(status.skipped, 10, "every 25th address is invalid");
    assert_eq!(status.done, 240);
    assert_eq!(status.pages_done, 25);
}

pub async fn duplicated_hop_does_not_fork_its_chain(b: Backend) {
    let users = int_users(60);
    let m = Manual::new(b, &users, newsletter_job(10, 1), KindRegistry::default()).await;
    let run = m.start().await;
    let hop1 = m.next_event().expect("hop 1 of chain 0");
    // The same hop delivered twice at once: exactly one runs. The other loses at the fork guard,
    // or (if the winner finished the whole run first, as CI once saw) finds the run over.
    let (a, c) = tokio::join!(m.deliver(hop1.clone()), m.deliver(hop1.clone()));
    let outcomes = [a.unwrap(), c.unwrap()];
    let refused = |o: &Outcome| matches!(o, Outcome::Duplicate | Outcome::Hopped { pages: 0, next: HopNext::Stopped });
    assert_eq!(outcomes.iter().filter(|o| refused(o)).count(), 1, "{outcomes:?}");
    m.pump().await;
    // A late third delivery after the run ended is refused too, with no side effect.
    let late = m.deliver(hop1).await.unwrap();
    assert!(matches!(late, Outcome::Duplicate | Outcome::Hopped { pages: 0, next: HopNext::Stopped }), "{late:?}");
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded");
    assert!(duplicates(&m.sent()).is_empty());
    assert_eq!(m.sent().len(), 58);
    assert_eq!(status.chains.len(), 1);
}

pub async fn duplicate_deliveries_throughout_a_run_send_nothing_twice(b: Backend) {
    let users = int_users(300);
    let mut s = setup(10, 3);
    s.faults = Faults { duplicate_hop: 0.5, delay_hop: 0.3, max_delay: Duration::from_millis(50), ..Faults::default() };
    s.job.newsletter.as_mut().unwrap().send_rate = 600.0; // several hops per chain
    let h = Harness::with_users(b, &users, s).await;
    let run = h.start().await;
    let status = h.drive(&run).await;
    assert_eq!(status.status, "succeeded");
    assert!(h.local.lambda_counts().duplicated > 0, "the fault must have fired");
    h.assert_exactly_once(&run, &users).await;
    // Duplicates alone never make anything ambiguous.
    h.assert_no_unknown_without_kills(&status);
}

pub async fn start_twice_is_one_run(b: Backend) {
    let users = int_users(30);
    let m = Manual::new(b, &users, newsletter_job(10, 2), KindRegistry::default()).await;
    let first = m.start().await;
    let queued = m.pending_events();
    let again = m.engine.start(JOB, Some("t")).await.unwrap();
    assert!(matches!(again, Outcome::Started { ref run_id, existing: true, .. } if *run_id == first), "{again:?}");
    assert_eq!(m.pending_events(), queued, "a second start invokes nothing");
    let (x, y) = tokio::join!(m.engine.start(JOB, Some("u")), m.engine.start(JOB, Some("u")));
    let ids: Vec<_> = [x.unwrap(), y.unwrap()]
        .into_iter()
        .map(|o| match o {
            Outcome::Started { run_id, .. } => run_id,
            o => panic!("{o:?}"),
        })
        .collect();
    assert_eq!(ids[0], ids[1], "two concurrent starts of one run key make one run");
}

pub async fn completion_is_marked_exactly_once(b: Backend) {
    let users = int_users(40);
    let m = Manual::new(b, &users, newsletter_job(10, 4), KindRegistry::default()).await;
    let run = m.start().await;
    // Deliver every chain's first hop at once, so they race to the end.
    let events: Vec<Event> = std::iter::from_fn(|| m.next_event()).collect();
    let outcomes = futures::future::join_all(events.into_iter().map(|e| m.deliver(e))).await;
    let mut outcomes: Vec<Outcome> = outcomes.into_iter().map(Result::unwrap).collect();
    outcomes.extend(m.pump().await);
    let completed = outcomes.iter().filter(|o| matches!(o, Outcome::Hopped { next: HopNext::Completed, .. })).count();
    assert_eq!(completed, 1, "{outcomes:?}");
    assert_eq!(m.status(&run).await.status, "succeeded");
    // The sweeper finds nothing left to complete.
    assert_eq!(m.engine.sweep().await.unwrap().completed, 0);
}

pub async fn expired_lease_reoffers_page_without_resending_done_items(b: Backend) {
    let users = int_users(20);
    let m = Manual::with_settings(b, &users, newsletter_job(10, 1), KindRegistry::default(), one_page_per_hop()).await;
    let run = m.start().await;
    // Hop 1 sends the whole first page and records it, then dies before finishing the page.
    m.store.fail_next("finish_page");
    let hop1 = m.next_event().unwrap();
    assert!(m.deliver(hop1).await.is_err());
    let sent_before = m.sent();
    assert_eq!(sent_before.len(), 10, "first page sent: {sent_before:?}");
    // Nothing happens until the lease expires; then the sweeper restarts the chain.
    assert_eq!(m.engine.sweep().await.unwrap().restarted, 0);
    m.expire_leases();
    assert_eq!(m.engine.sweep().await.unwrap().restarted, 1);
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded", "{status:?}");
    let sent = m.sent();
    assert!(duplicates(&sent).is_empty(), "re-offered page re-sent done items: {:?}", duplicates(&sent));
    assert_eq!(sent.len(), 20);
    assert_eq!(status.unknown, 0);
}

async fn crash_mid_page(b: Backend, ambiguity: Ambiguity) -> (Manual, String) {
    let users = int_users(20);
    let mut job = newsletter_job(10, 1);
    job.ambiguity = ambiguity;
    job.newsletter.as_mut().unwrap().in_flight = 1;
    let m = Manual::with_settings(b, &users, job, KindRegistry::default(), killable()).await;
    let run = m.start().await;
    m.mailer.limit.store(4, Ordering::SeqCst);
    let hop1 = m.next_event().unwrap();
    // The hop hangs after 4 sends and is killed, mid-page.
    m.kill_after_sends(hop1, 4).await;
    m.mailer.limit.store(u64::MAX, Ordering::SeqCst);
    assert_eq!(m.sent().len(), 4);
    m.expire_leases();
    assert_eq!(m.engine.sweep().await.unwrap().restarted, 1);
    m.pump().await;
    (m, run)
}

pub async fn crash_mid_page_leaves_unknown_never_resent_at_most_once(b: Backend) {
    let (m, run) = crash_mid_page(b, Ambiguity::AtMostOnce).await;
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded");
    let sent = m.sent();
    assert!(duplicates(&sent).is_empty(), "{:?}", duplicates(&sent));
    // The crashed page's 10 claims are unknown (4 of them did go out); page 2 went normally.
    assert_eq!(status.unknown, 10, "{status:?}");
    assert_eq!(sent.len(), 4 + 10);
    assert!(status.accounted());
}

pub async fn crash_mid_page_is_resent_at_least_once(b: Backend) {
    let (m, run) = crash_mid_page(b, Ambiguity::AtLeastOnce).await;
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded");
    assert_eq!(status.unknown, 0);
    let sent = m.sent();
    // Nobody missed; only the 4 that went out before the crash went out twice.
    assert_eq!(duplicates(&sent).len(), 4, "{:?}", duplicates(&sent));
    assert_eq!(status.done, 20);
}

/// Waits until the mailer accepted at least `n` messages.
async fn wait_for_sends(h: &Harness, n: u64) {
    let until = Instant::now() + Duration::from_secs(30);
    while h.mailer.accepted.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < until, "sends did not reach {n}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn slow_setup() -> Setup {
    let mut s = setup(10, 3);
    s.job.newsletter.as_mut().unwrap().send_rate = 300.0;
    s
}

/// Starts the run, cancels it once `sends` went out, and drives it to its end: the run's status
/// and how many messages went out after the cancel.
async fn cancel_after_sends(h: &Harness, sends: u64) -> (String, baton::engine::run::RunStatus, u64) {
    let run = h.start().await;
    wait_for_sends(h, sends).await;
    h.engine().control(&run, ControlAction::Cancel).await.unwrap();
    let at_cancel = h.mailer.accepted.load(Ordering::SeqCst);
    let status = h.drive(&run).await;
    h.local.drain(Duration::from_secs(2)).await;
    assert_eq!(status.status, "cancelled", "{status:?}");
    let after = h.mailer.accepted.load(Ordering::SeqCst) - at_cancel;
    assert!(duplicates(&h.sent()).is_empty());
    (run, status, after)
}

pub async fn cancel_stops_sends_within_two_pages_per_chain(b: Backend) {
    let users = int_users(600);
    let h = Harness::with_users(b, &users, slow_setup()).await;
    let (run, status, after) = cancel_after_sends(&h, 60).await;
    // A hop holds up to two pages (the one being sent and the next; pages of 10 through a
    // window of 16 always hold both), and sends that took their pacer slot before the switch
    // still go out: the bound is two pages per chain (a loaded CI machine saw 34 of 30 against
    // one page per chain). An ignored cancel would send 540 more.
    assert!(after <= 3 * 2 * 10, "{after} sends after cancel; at most two pages per chain allowed");
    assert!(status.pending > 0, "cancel left the rest unsent");
    // A cancelled run stays cancelled: resume is refused and revives nothing (failed before
    // the fix: chain 0 was revived, left `active` with a restart counted).
    // (Compared as stored: how long ago each chain last showed life moves with the clock.)
    let stored = |mut chains: Vec<baton::engine::run::ChainStatus>| {
        chains.iter_mut().for_each(|c| c.heartbeat_age_ms = 0);
        chains
    };
    let chains_before = stored(h.status(&run).await.chains);
    let err = h.engine().control(&run, ControlAction::Resume).await.unwrap_err().to_string();
    assert!(err.contains("is cancelled") && err.contains("cannot resume"), "{err}");
    let after = h.status(&run).await;
    assert_eq!(after.status, "cancelled");
    assert_eq!(stored(after.chains), chains_before, "resume of a cancelled run changed its chains");
}

pub async fn cancel_stops_a_long_page_within_a_heartbeat(b: Backend) {
    // One chain at 100 sends a second through pages of 300 (3 s each) in hops of 4 s, which
    // heartbeat every second: a cancel half a second into the first page stops its sends at
    // the next heartbeat (at most 1 s of sends, 100, plus the window's 16 that took their
    // slots), not at the next page's claim (failed before the heartbeat carried the run's
    // status: the page's other ~250 went out).
    let users = int_users(600);
    let mut s = setup_with_hops(300, 1, Duration::from_secs(4), Duration::from_millis(500));
    s.job.newsletter.as_mut().unwrap().send_rate = 100.0;
    let h = Harness::with_users(b, &users, s).await;
    let (_, _, after) = cancel_after_sends(&h, 50).await;
    assert!(after <= 150, "{after} sends after cancel; a heartbeat (1 s, 100 sends) and a window (16) allowed");
}

pub async fn pause_then_resume_completes_without_duplicates(b: Backend) {
    let users = int_users(500);
    let h = Harness::with_users(b, &users, slow_setup()).await;
    let run = h.start().await;
    wait_for_sends(&h, 60).await;
    h.engine().control(&run, ControlAction::Pause).await.unwrap();
    let at_pause = h.mailer.accepted.load(Ordering::SeqCst);
    let paused = h.drive(&run).await;
    assert_eq!(paused.status, "paused");
    assert!(paused.chains.iter().all(|c| c.status != "active"), "{paused:?}");
    let parked = h.mailer.accepted.load(Ordering::SeqCst);
    assert!(parked - at_pause <= 3 * 2 * 10, "pause takes effect within two pages per chain (as cancel, above)");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(h.mailer.accepted.load(Ordering::SeqCst), parked, "nothing is sent while paused");
    h.engine().control(&run, ControlAction::Resume).await.unwrap();
    let status = h.drive(&run).await;
    assert_eq!(status.status, "succeeded");
    h.assert_exactly_once(&run, &users).await;
    h.assert_no_unknown_without_kills(&status);
}

pub async fn dropped_hops_are_recovered_by_the_sweeper(b: Backend) {
    // Step by step: chain 0's hop 2 event is lost. Nothing moves until the chain's heartbeat is
    // stale; then the sweeper restarts it from its checkpoint and the run completes.
    let users = int_users(60);
    let mut job = newsletter_job(10, 1);
    job.newsletter.as_mut().unwrap().send_rate = 100.0; // ~0.6 s of sending: several hops
    let m = Manual::new(b, &users, job, KindRegistry::default()).await;
    let run = m.start().await;
    let hop1 = m.deliver_next().await.unwrap().unwrap();
    assert!(matches!(hop1, Outcome::Hopped { next: HopNext::Continued, .. }), "{hop1:?}");
    let lost = m.next_event().expect("hop 2 was invoked");
    assert!(matches!(lost, Event::Hop { hop: 2, .. }));
    assert_eq!(m.engine.sweep().await.unwrap().restarted, 0, "a live chain is left alone");
    m.expire_leases();
    assert_eq!(m.engine.sweep().await.unwrap().restarted, 1);
    assert_eq!(m.next_event(), Some(lost.clone()), "restarted from its checkpoint: the same hop");
    m.deliver(lost).await.unwrap();
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded");
    assert_eq!(status.chains[0].restarts, 1);
    assert!(duplicates(&m.sent()).is_empty());
    assert_eq!(m.sent().len(), 58);

    // Live, with the fault injector: a seed whose dice surely lose hop 2 of the only chain.
    let seed = (1..)
        .find(|s| baton::adapters::local::faults::dice(*s, &[b"drop", b"hop/0/2", &1u64.to_le_bytes()]) < 0.3)
        .unwrap();
    let users = int_users(300);
    let mut s = setup(10, 1);
    s.seed = seed;
    s.job.newsletter.as_mut().unwrap().send_rate = 300.0;
    s.faults = Faults { drop_hop: 0.3, ..Faults::default() };
    let h = Harness::with_users(b, &users, s).await;
    let run = h.start().await;
    let status = h.drive(&run).await;
    assert_eq!(status.status, "succeeded");
    let counts = h.local.lambda_counts();
    assert!(counts.dropped > 0, "{counts:?} {status:?}");
    assert!(status.chains[0].restarts > 0, "{counts:?} {status:?}");
    h.assert_exactly_once(&run, &users).await;
}

/// A kind whose pages never finish: a wrong end condition.
struct NeverDone;

#[async_trait]
impl RangeJob for NeverDone {
    async fn process(&self, _lo: Option<Value>, _hi: Value, _soft: Instant) -> Result<RangeOutcome, JobError> {
        Ok(RangeOutcome::Incomplete)
    }
}

fn runaway_kinds() -> KindRegistry {
    let mut kinds = KindRegistry::default();
    kinds.register("never-done", Arc::new(|_, _, _| Ok(Job::Ranges(Arc::new(NeverDone)))));
    kinds
}

pub async fn hop_budget_stops_a_runaway(b: Backend) {
    let users = int_users(20);
    let mut job = newsletter_job(10, 1);
    job.kind = "never-done".into();
    job.newsletter = None;
    job.hop_slack = 3;
    let m = Manual::new(b, &users, job, runaway_kinds()).await;
    let run = m.start().await;
    let outcomes = m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, "failed", "{status:?}");
    assert!(status.reason.as_deref().unwrap().contains("budget"), "{status:?}");
    let budget = 2 + 3; // two pages, one hop each, plus slack
    assert_eq!(status.chains[0].hop_budget, budget);
    assert_eq!(status.chains[0].hops, budget, "no hop beyond the budget ran");
    assert_eq!(status.chains[0].status, "failed");
    assert!(matches!(outcomes.last(), Some(Outcome::Hopped { next: HopNext::Failed(_), .. })));
    assert_eq!(m.pending_events(), 0, "the chain stopped invoking itself");
}

pub async fn run_deadline_fails_a_run(b: Backend) {
    let users = int_users(30);
    let m = Manual::new(b, &users, newsletter_job(10, 1), KindRegistry::default()).await;
    let run = m.start().await;
    m.clock.advance_ms(601_000);
    let outcome = m.deliver_next().await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Hopped { next: HopNext::Failed(_), .. }), "{outcome:?}");
    let status = m.status(&run).await;
    assert_eq!(status.status, "failed");
    assert!(status.reason.unwrap().contains("deadline"));
    assert!(m.sent().is_empty());
}

pub async fn failure_threshold_pauses_the_run(b: Backend) {
    let mut users = int_users(300);
    for (i, u) in users.iter_mut().enumerate() {
        if i % 10 == 3 {
            u.1 = Some(format!("user{i}@reject.test"));
        }
    }
    let mut s = slow_setup();
    s.job.max_failures = Some(3);
    s.reject_suffix = Some("@reject.test".into());
    let h = Harness::with_users(b, &users, s).await;
    let run = h.start().await;
    let status = h.drive(&run).await;
    assert_eq!(status.status, "paused", "{status:?}");
    assert!(status.reason.as_deref().unwrap().contains("failure threshold"), "{status:?}");
    assert!(status.failed > 3 && status.failed < 30, "{status:?}");
    let failed = h.engine().items_in_state(&run, "failed", 100).await.unwrap();
    assert!(failed.iter().all(|(_, r)| r.as_deref().unwrap().contains("rejected")));
    assert!(duplicates(&h.sent()).is_empty());
}

pub async fn account_stop_pauses_the_run_without_losing_items(b: Backend) {
    let users = int_users(300);
    let h = Harness::with_users(b, &users, slow_setup()).await;
    let run = h.start().await;
    wait_for_sends(&h, 50).await;
    h.mailer.stopped.store(true, Ordering::SeqCst);
    let status = h.drive(&run).await;
    assert_eq!(status.status, "paused", "{status:?}");
    assert!(status.reason.as_deref().unwrap().contains("quota"), "{status:?}");
    h.mailer.stopped.store(false, Ordering::SeqCst);
    h.engine().control(&run, ControlAction::Resume).await.unwrap();
    let status = h.drive(&run).await;
    assert_eq!(status.status, "succeeded");
    h.assert_exactly_once(&run, &users).await;
    assert_eq!(status.failed, 0, "items refused by the stop were released, not failed");
    h.assert_no_unknown_without_kills(&status);
}

pub async fn zero_users(b: Backend) {
    let status = run_and_check(b, KeyKind::Int, Vec::new(), setup(10, 3)).await;
    assert_eq!((status.total, status.pages_total, status.chains.len()), (0, 0, 1));
}

pub async fn one_user(b: Backend) {
    let users = vec![(Value::Int(42), Some("solo@example.com".to_owned()), "Solo".to_owned())];
    let status = run_and_check(b, KeyKind::Int, users, setup(10, 3)).await;
    assert_eq!((status.total, status.done, status.pages_total), (1, 1, 1));
}

pub async fn exact_multiple_of_page_size(b: Backend) {
    let status = run_and_check(b, KeyKind::Int, int_users(50), setup(10, 2)).await;
    assert_eq!((status.total, status.pages_total), (50, 5));
}

pub async fn more_chains_than_pages(b: Backend) {
    let status = run_and_check(b, KeyKind::Int, int_users(15), setup(10, 8)).await;
    assert_eq!(status.pages_total, 2);
    assert_eq!(status.chains.len(), 2, "chains are capped at the page count");
}

pub async fn text_keys(b: Backend) {
    let users: Vec<User> = (0..57)
        .map(|i| {
            let key = format!("k-{}-{i:03}", ["ä", "b", "Z", "é"][i % 4]);
            (Value::Text(key), Some(format!("t{i}@example.com")), format!("T {i}"))
        })
        .collect();
    let status = run_and_check(b, KeyKind::Text, users, setup(10, 3)).await;
    assert_eq!((status.total, status.done), (57, 57));
}

pub async fn uuid_keys(b: Backend) {
    let users: Vec<User> = (0..45)
        .map(|i| (Value::Uuid(uuid::Uuid::new_v4().to_string()), Some(format!("u{i}@example.com")), format!("U {i}")))
        .collect();
    let status = run_and_check(b, KeyKind::Uuid, users, setup(10, 3)).await;
    assert_eq!((status.total, status.done), (45, 45));
}

pub async fn sparse_and_negative_keys(b: Backend) {
    let ids = [-9_000_000_000_000i64, -5, 0, 1, 2, 1_000, 1_000_001, 77_777_777_777, i64::MAX - 1, i64::MAX];
    let users: Vec<User> = ids
        .iter()
        .map(|id| (Value::Int(*id), Some(format!("s{}@example.com", id.unsigned_abs())), "S".into()))
        .collect();
    let status = run_and_check(b, KeyKind::Int, users, setup(3, 2)).await;
    assert_eq!((status.total, status.done, status.pages_total), (10, 10, 4));
}

pub async fn rate_limited_pages_span_hops(b: Backend) {
    // 150 messages at 200/s over one chain take ~0.75s: pages outlast 300ms hop budgets, are
    // released mid-page and finished by later hops, and nothing becomes unknown on the way.
    let users = int_users(150);
    let mut s = setup(50, 1);
    s.job.newsletter.as_mut().unwrap().send_rate = 200.0;
    let status = run_and_check(b, KeyKind::Int, users, s).await;
    assert!(status.chains[0].hops >= 3, "{status:?}");
}

pub async fn send_window_stays_full_across_pages(b: Backend) {
    // Pages of 20 through a window of 8 sends, each taking 50 ms: while a page's last sends are
    // out, the next page's start in the slots they free, instead of the window draining at every
    // page's end (failed before: a page's sends all ended before the next page's began, at 0 of
    // 9 boundaries). The next page's claim races the tail's last two rounds of sends (100 ms):
    // on a loaded machine a claim can lose that race now and then (with 15 ms sends, CI saw 7 of
    // 9), so a clear majority of boundaries is asked for, not all.
    let users = int_users(200);
    let mut s = setup_with_hops(20, 1, Duration::from_secs(20), Duration::from_secs(2));
    s.job.newsletter.as_mut().unwrap().in_flight = 8;
    s.mail_latency = Duration::from_millis(50);
    let h = Harness::with_source(b, KeyKind::Int, &users, s).await;
    let run = h.start().await;
    let status = h.drive(&run).await;
    assert_eq!(status.status, "succeeded", "{status:?}");
    h.assert_exactly_once(&run, &users).await;
    let page_of = |to: &str| {
        let id: i64 = to.trim_start_matches("user").trim_end_matches("@example.com").parse().unwrap();
        (id - 5) / 13 / 20
    };
    let sends = h.mailer.sends.lock().unwrap().clone();
    let mut overlapped = 0;
    for page in 0..9 {
        let last_end = sends.iter().filter(|s| page_of(&s.0) == page).map(|s| s.2).max().unwrap();
        let next_start = sends.iter().filter(|s| page_of(&s.0) == page + 1).map(|s| s.1).min().unwrap();
        overlapped += (next_start < last_end) as usize;
    }
    assert!(
        overlapped >= 6,
        "the next page's sends began before the page's last one ended at {overlapped} of 9 boundaries"
    );
    // Never more than the window at once, across pages too.
    let most = sends.iter().map(|(_, start, _)| sends.iter().filter(|(_, s, e)| s <= start && start < e).count()).max();
    assert!(most.unwrap() <= 8, "{most:?} sends in flight at once");
}

pub async fn a_page_is_claimed_only_when_a_send_fits_the_hop(b: Backend) {
    // Pages of 1, one send at a time, through hops of 800 ms (1 s less 200 ms of margin). A page
    // claimed when its send could not start within the budget is only released again, and each
    // claim counts toward the page's attempts (past RESEND_CLAIMS, at-least-once stops
    // resending): every page must be claimed once.
    // - At 2 sends a second a hop sends at its start and 500 ms later; the third slot, 1 s in,
    //   is past its budget (failed before: the hop claimed the third page as the second neared
    //   its end, whatever the rate allowed).
    // - At 1 a second each hop has one slot, and the next is past its budget once its page is
    //   closed: with none held, the hop hands over rather than claim (failed before: it
    //   claimed, and the page's send found its slot past the budget).
    // (Three pages at 1/s: hops drift 200 ms a hop against the slots, and a fourth hop's slot
    // would come 600 ms into its 800 ms.)
    for (rate, users, most_per_hop) in [(2.0, 6, 2), (1.0, 3, 1)] {
        let users = int_users(users);
        let mut s = setup_with_hops(1, 1, Duration::from_millis(1000), Duration::from_millis(200));
        s.job.newsletter.as_mut().unwrap().send_rate = rate;
        s.job.newsletter.as_mut().unwrap().in_flight = 1;
        let h = Harness::with_source(b, KeyKind::Int, &users, s).await;
        let run = h.start().await;
        let status = h.drive(&run).await;
        assert_eq!(status.status, "succeeded", "{status:?}");
        h.assert_exactly_once(&run, &users).await;
        let claimed_again = h.count("SELECT COUNT(*) FROM baton_pages WHERE attempts > 1").await;
        if claimed_again > 0 {
            let timeline = h.engine().timeline(Some(&run)).await.unwrap().unwrap();
            let t0 = timeline.hops[0].started_at_ms;
            let hops: Vec<_> =
                timeline.hops.iter().map(|s| (s.hop, s.started_at_ms - t0, s.ended_at_ms.map(|e| e - t0))).collect();
            let pages: Vec<_> =
                timeline.pages.iter().map(|p| (p.page, p.hop, p.attempts, p.claimed_at_ms - t0)).collect();
            panic!(
                "at {rate}/s, pages claimed again: hops (hop, start, end) {hops:?}; pages (page, hop, attempts, last claimed) {pages:?}"
            );
        }
        let hops = status.chains[0].hops as usize;
        assert!(hops >= users.len() / most_per_hop, "at {rate}/s, {most_per_hop} sends per hop at most: {status:?}");
        if most_per_hop == 1 {
            // A send per hop, none skipped, and no hop more at the end.
            assert_eq!(hops, users.len(), "{status:?}");
        }
    }
}

pub async fn sql_kind_runs_one_statement_per_page(b: Backend) {
    let users = int_users(95);
    let mut job = newsletter_job(10, 3);
    job.kind = "sql".into();
    job.newsletter = None;
    job.sql = Some(SqlJobConfig {
        statement: "UPDATE users SET name = 'done:' || name WHERE (:lo IS NULL OR id > :lo) AND id <= :hi".into(),
    });
    let h = Harness::with_users(b, &users, Setup::new(job)).await;
    let run = h.start().await;
    let status = h.drive(&run).await;
    assert_eq!(status.status, "succeeded", "{status:?}");
    assert_eq!(status.pages_done, 10);
    assert_eq!(h.count("SELECT COUNT(*) FROM users WHERE name LIKE 'done:%'").await, 95);
    assert_eq!(h.count("SELECT COUNT(*) FROM users WHERE name LIKE 'done:done:%'").await, 0);
}

pub async fn statements_per_page_are_constant(b: Backend) {
    let mut per_page = Vec::new();
    for (n, page_size) in [(200, 10), (2_000, 100)] {
        let users = int_users(n);
        let m = Manual::new(b, &users, newsletter_job(page_size, 2), KindRegistry::default()).await;
        let run = m.start().await;
        let before = m.counting.statements();
        m.pump().await;
        let status = m.status(&run).await;
        assert_eq!(status.status, "succeeded");
        let statements = m.counting.statements() - before;
        per_page.push(statements as f64 / status.pages_done as f64);
    }
    // 6 per page (claim page, load, claim items, record, finish, heartbeat) plus a few per hop;
    // ten times the items per page must not mean (anywhere near) ten times the statements.
    for p in &per_page {
        assert!(*p <= 12.0, "statements per page: {per_page:?}");
    }
    assert!(per_page[1] < per_page[0] * 2.0, "cost must not grow with page size: {per_page:?}");
}

async fn assert_no_state(m: &Manual) {
    for table in ["baton_runs", "baton_pages", "baton_chains", "baton_ledger"] {
        let rows = m
            .engine
            .store()
            .query(baton::sql::Stmt::new(format!("SELECT COUNT(*) FROM {table}"), Default::default()))
            .await
            .unwrap();
        assert_eq!(rows.rows[0][0].as_i64(), Some(0), "{table} has rows after rejected input");
    }
    assert_eq!(m.pending_events(), 0, "rejected input invoked something");
    assert!(m.sent().is_empty());
}

pub async fn bad_input_changes_nothing(b: Backend) {
    let users = int_users(20);
    type Change = Box<dyn Fn(&mut baton::config::JobConfig)>;
    let variants: Vec<(&str, Change)> = vec![
        ("`recipient.nmae`", Box::new(|j| j.newsletter.as_mut().unwrap().subject = "Hi {{ recipient.nmae }}".into())),
        (
            "undefined variable(s) user",
            Box::new(|j| j.newsletter.as_mut().unwrap().subject = "Hi {{ user.name }}".into()),
        ),
        ("no column `id`", Box::new(|j| j.source = "SELECT email, name FROM users".into())),
        ("no column `mail`", Box::new(|j| j.newsletter.as_mut().unwrap().email_column = "mail".into())),
        ("source query failed", Box::new(|j| j.source = "SELECT id, email FROM no_such_table".into())),
        (
            "not unique",
            Box::new(|j| {
                j.source = "SELECT 1 AS id, email, name FROM users".into();
            }),
        ),
    ];
    for (expect, change) in variants {
        let mut job = newsletter_job(10, 2);
        change(&mut job);
        let m = Manual::new(b, &users, job, KindRegistry::default()).await;
        let err = m.engine.start(JOB, Some("t")).await.unwrap_err().to_string();
        assert!(err.contains(expect), "expected `{expect}` in: {err}");
        assert!(err.starts_with("jobs.news."), "the error names the field: {err}");
        assert_no_state(&m).await;
    }
    let m = Manual::new(b, &users, newsletter_job(10, 2), KindRegistry::default()).await;
    let deadline = Instant::now() + Duration::from_secs(1);
    for payload in [&b"{\"type\":\"hop\",\"run_id\":\"x\"}"[..], b"{\"type\":\"explode\"}", b"\xff\xfe", b"[]"] {
        let err = m.engine.handle_payload(payload, deadline).await.unwrap_err();
        assert!(matches!(err, EngineError::Event(_)), "{err}");
        assert!(err.to_string().contains("malformed event"), "{err}");
    }
    let unknown_job = m.engine.start("no-such-job", None).await.unwrap_err().to_string();
    assert!(unknown_job.contains("no job named `no-such-job`") && unknown_job.contains("news"), "{unknown_job}");
    let bad_key = m.engine.start(JOB, Some("2026/12; DROP")).await.unwrap_err().to_string();
    assert!(bad_key.contains("invalid run key"), "{bad_key}");
    let hop = Event::Hop { run_id: "nope".into(), chain: 0, hop: 1, traceparent: None };
    assert!(matches!(m.deliver(hop).await, Err(EngineError::RunNotFound(_))));
    let control = m.engine.control("nope", ControlAction::Pause).await.unwrap_err();
    assert!(matches!(control, EngineError::RunNotFound(_)));
    assert_no_state(&m).await;

    // Config values: each names its field.
    for (toml, field) in [
        (
            "[jobs.a]\nkind='sql'\nsource='SELECT id FROM t'\npage_size=0\n[jobs.a.sql]\nstatement='SELECT :hi'",
            "jobs.a.page_size",
        ),
        (
            "[jobs.a]\nkind='sql'\nsource='SELECT id FROM t'\nchains=0\n[jobs.a.sql]\nstatement='SELECT :hi'",
            "jobs.a.chains",
        ),
        (
            "[jobs.a]\nkind='sql'\nsource='SELECT id FROM t'\nkey_column='id; DROP'\n[jobs.a.sql]\nstatement='SELECT :hi'",
            "jobs.a.key_column",
        ),
        (
            "[jobs.a]\nkind='sql'\nsource='SELECT id FROM t'\n[jobs.a.sql]\nstatement='SELECT :x'",
            "jobs.a.sql.statement",
        ),
        ("[jobs.a]\nkind='newsletter'\nsource='SELECT id FROM t'", "jobs.a.newsletter"),
        ("[settings]\nhop_timeout='20m'", "settings.hop_timeout"),
        ("[jobs.a]\nkind='sql'\nsource='SELECT id FROM t'\npage_sise=5", "page_sise"),
    ] {
        let err = Config::parse(toml, std::path::Path::new("baton.toml")).unwrap_err().to_string();
        assert!(err.contains(field), "expected {field} in: {err}");
    }
}

pub async fn database_fault_mid_page_is_recovered(b: Backend) {
    // The connection drops while claiming items: nothing was sent, the page is retried later.
    let users = int_users(30);
    let m = Manual::with_settings(b, &users, newsletter_job(10, 1), KindRegistry::default(), one_page_per_hop()).await;
    let run = m.start().await;
    m.store.fail_next("claim_items");
    assert!(m.deliver_next().await.unwrap().is_err());
    assert!(m.sent().is_empty());
    m.expire_leases();
    m.engine.sweep().await.unwrap();
    // And a dropped connection while recording results: sent, not recorded, so `unknown`.
    m.store.fail_next("record_results");
    assert!(m.deliver_next().await.unwrap().is_err());
    m.expire_leases();
    m.engine.sweep().await.unwrap();
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded", "{status:?}");
    assert!(duplicates(&m.sent()).is_empty());
    assert_eq!(status.unknown, 10);
    assert_eq!(status.done + status.skipped + status.unknown, 30);
    assert_eq!(m.sent().len(), 30 - 1, "user 24 has an invalid address; everyone else got one message");
}

/// Sixteen seeded fault schedules per store, each with every fault class at once: duplicate,
/// lost, delayed and crashing hops; transient, throttled and ambiguous sends; SQL statements
/// that fail before commit or commit and lose their response (every statement kind); clocks
/// that disagree between invocations; sandboxes whose deadline outlives the lease; a duplicate
/// key that appears mid-run; and a store migrated by twelve cold starts at once. Every schedule
/// ends with nobody mailed twice, nobody missed outside `unknown`, nothing left `claimed`, and
/// no more `unknown` than the ambiguous outcomes injected.
pub async fn randomized_fault_schedules_keep_exactly_once(b: Backend) {
    let users = int_users(240);
    let mut sql_faults = 0;
    for i in 1..=16u64 {
        let seed = i * 7919 + if b == Backend::Postgres { 1 } else { 0 };
        let mut s = setup(10, 3);
        s.seed = seed;
        s.job.newsletter.as_mut().unwrap().send_rate = 800.0;
        s.job.source = "SELECT id, email, name FROM users UNION ALL SELECT id, email, name FROM late_rows".into();
        s.faults = Faults {
            duplicate_hop: 0.1,
            drop_hop: 0.05,
            crash_hop: 0.05,
            delay_hop: 0.1,
            max_delay: Duration::from_millis(100),
            mail_transient: 0.05,
            mail_throttle: 0.03,
            mail_ambiguous: 0.01,
            sql_fail: 0.01,
            sql_lost: 0.01,
            clock_skew: Duration::from_millis(100),
            long_sandbox: 0.1,
        };
        let dir = tempfile::tempdir().unwrap();
        let store = concurrently_migrated_store(b, dir.path(), 12).await;
        create_users(store.as_ref(), b, KeyKind::Int, &users).await;
        store
            .query(baton::sql::Stmt::new(
                "CREATE TABLE late_rows (id BIGINT, email TEXT, name TEXT)",
                Default::default(),
            ))
            .await
            .unwrap();
        let h = Harness::on_store(b, store, dir, s);
        let run = h.start().await;
        // Mid-run, one user (chosen by the seed) gets a second row with the same key.
        let (twin_key, _, _) = &users[(seed % 240) as usize];
        let twin_key = twin_key.as_i64().unwrap();
        wait_for_sends(&h, 40).await;
        h.store
            .query(baton::sql::Stmt::new(
                "INSERT INTO late_rows (id, email, name) VALUES (:id, :email, 'Twin')",
                baton::sql::Params::new().with("id", twin_key).with("email", format!("twin{twin_key}@example.com")),
            ))
            .await
            .unwrap();
        let status = h.drive(&run).await;
        assert_eq!(status.status, "succeeded", "seed {seed}: {status:?}");
        h.assert_exactly_once(&run, &users).await;
        assert_eq!(status.claimed, 0, "seed {seed}: items left claimed: {status:?}");
        let sent = h.sent();
        let twin_addresses = [format!("user{twin_key}@example.com"), format!("twin{twin_key}@example.com")];
        let twin_mails = sent.iter().filter(|a| twin_addresses.contains(a)).count();
        assert!(twin_mails <= 1, "seed {seed}: key {twin_key} was mailed {twin_mails} times");
        let hops = h.local.lambda_counts();
        // Ambiguous outcomes: sends accepted but reported failed, sends still in flight when a
        // hop stopped waiting (a slow machine), and the two pages a hop may hold for every hop
        // killed or failed.
        let cut_off = h
            .engine()
            .items_in_state(&run, "unknown", 100_000)
            .await
            .unwrap()
            .iter()
            .filter(|(_, r)| r.as_deref() == Some(baton::engine::hop::CUT_OFF_IN_FLIGHT))
            .count() as u64;
        let ambiguous = h.mailer.outbox.ambiguous.load(Ordering::SeqCst)
            + cut_off
            + 2 * 10 * (hops.crashed + hops.timed_out + hops.errors);
        assert!(
            status.unknown as u64 <= ambiguous,
            "seed {seed}: {} unknown, {ambiguous} ambiguous outcomes injected ({hops:?})",
            status.unknown
        );
        let faults = h.faulty.counts();
        sql_faults += faults.failed_before_commit + faults.response_lost;
    }
    assert!(sql_faults > 50, "SQL faults fired: {sql_faults}");
}

pub async fn source_column_types_are_read(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = fresh_store(b, dir.path()).await;
    let sql = "SELECT CAST(12345.678 AS NUMERIC(10,3)) AS a, CAST(-0.05 AS NUMERIC(6,2)) AS b, \
               CAST(100000000 AS NUMERIC) AS c, CAST(7 AS INTEGER) AS d, 'Zoë' AS e, CAST(1.5 AS DOUBLE PRECISION) AS f";
    let rows = store.query(baton::sql::Stmt::new(sql, Default::default())).await.unwrap();
    let r = rows.first().unwrap();
    let text = |c: &str| r.get(c).unwrap().to_string();
    assert_eq!(text("d"), "7");
    assert_eq!(text("e"), "Zoë");
    assert_eq!(text("f"), "1.5");
    if b == Backend::Postgres {
        assert_eq!((text("a"), text("b"), text("c")), ("12345.678".into(), "-0.05".into(), "100000000".into()));
    }
}

pub async fn hung_send_is_cut_off_and_only_it_is_unknown(b: Backend) {
    let users = int_users(20);
    let mut job = newsletter_job(10, 1);
    job.newsletter.as_mut().unwrap().in_flight = 1;
    // Two seconds' budget: the cut-off (halfway from the soft deadline to the hard one) leaves
    // the hop 500 ms to record and hand over (50 ms was not enough on a loaded machine, once,
    // and 125 ms is five slow statements).
    let settings = baton::config::Settings {
        hop_timeout: Duration::from_secs(2),
        hop_margin: Duration::from_millis(1000),
        ..test_settings()
    };
    let m = Manual::with_settings(b, &users, job, KindRegistry::default(), settings).await;
    let run = m.start().await;
    m.mailer.limit.store(4, Ordering::SeqCst);
    // The fifth send hangs. The hop is not killed: at its cut-off it stops waiting, records the
    // four that went out, marks the hung one unknown, releases the rest and hands over.
    let started = Instant::now();
    let outcome = m.deliver_next().await.unwrap().unwrap();
    assert!(started.elapsed() < m.settings.hop_timeout, "the hop ended before its deadline");
    assert!(matches!(outcome, Outcome::Hopped { next: HopNext::Continued, .. }), "{outcome:?}");
    let mid = m.status(&run).await;
    assert_eq!((mid.done, mid.unknown, mid.claimed), (4, 1, 0), "{mid:?}");
    m.mailer.limit.store(u64::MAX, Ordering::SeqCst);
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded");
    assert_eq!((status.done, status.unknown), (19, 1));
    assert!(duplicates(&m.sent()).is_empty());
    assert_eq!(m.sent().len(), 19);
}

pub async fn whole_run_through_the_lambda_invoke_api_with_duplicates(b: Backend) {
    use crate::fakes::{FakeLambda, sdk_config, serve_lambda};
    let users = int_users(600);
    let dir = tempfile::tempdir().unwrap();
    let store = fresh_store(b, dir.path()).await;
    create_users(store.as_ref(), b, KeyKind::Int, &users).await;
    let fake = Arc::new(FakeLambda { duplicate_every: 4, timeout: Duration::from_millis(400), ..Default::default() });
    let endpoint = serve_lambda(fake.clone()).await;
    let client = aws_sdk_lambda::Client::new(&sdk_config(&endpoint));
    let outbox_dir = dir.path().join("outbox");
    let mut settings = test_settings();
    settings.max_pages_per_hop = Some(2);
    let mailer =
        Arc::new(baton::adapters::local::outbox::Outbox::new(&outbox_dir, Faults::default(), 1, None).unwrap());
    let config = Config { settings, jobs: [(JOB.to_owned(), newsletter_job(10, 4))].into() };
    let invoker = Arc::new(baton::adapters::aws::invoke::LambdaInvoker::new(client, "baton"));
    let adapters = baton::compose::Adapters::new(store.clone(), mailer, config);
    let engine = Arc::new(baton::engine::Engine::new(adapters.engine_parts(invoker)));
    assert!(fake.engine.set(engine.clone()).is_ok());
    let Outcome::Started { run_id, .. } = engine.start(JOB, Some("t")).await.unwrap() else { panic!() };
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let p = engine.progress(&run_id).await.unwrap();
        if p.is_settled() {
            break;
        }
        assert!(Instant::now() < until, "run did not finish: {p:?}");
        engine.sweep().await.unwrap(); // the sweep schedule
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // let duplicate deliveries land
    let status = engine.status(Some(&run_id)).await.unwrap().unwrap();
    assert_eq!(status.status, "succeeded", "{status:?}");
    assert!(fake.accepted.load(Ordering::SeqCst) > 20, "chains hopped through Invoke");
    assert!(fake.duplicated.load(Ordering::SeqCst) > 3, "duplicates were delivered");
    assert_eq!(fake.rejected.load(Ordering::SeqCst), 0, "every invoke was an Event invocation");
    let sent = baton::adapters::local::outbox::recipients(&outbox_dir).unwrap();
    assert!(duplicates(&sent).is_empty(), "{:?}", duplicates(&sent));
    assert_eq!(sent.len(), status.done as usize);
    assert_eq!(status.done + status.skipped, 600);
}
