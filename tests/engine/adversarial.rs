//! The faults real AWS produces, each driven step by step on both stores: statements that
//! commit and lose their response (or fail before committing), a hop whose environment gives it
//! more time than its lease covers, a writer that lost its lease, duplicate keys that appear
//! mid-run, a resume racing a chain's parking, concurrent cold-start migrations, NULL keys, sends
//! in flight at the cut-off under at-least-once, and chains that never ran. Each case failed
//! before the change that closed it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use baton::config::Ambiguity;
use baton::engine::event::{ControlAction, Event};
use baton::engine::state::{ChainState, RunState, State};
use baton::engine::{HopNext, Outcome};
use baton::jobs::KindRegistry;
use baton::ports::Clock;
use baton::sql::{Params, SqlStore, Stmt, migrations, statements as st};
use tokio::time::Instant;

use crate::support::*;
use baton::compose::Adapters;

/// Every statement a run issues, from start to completion (one chain, no re-offered page).
const RUN_STATEMENTS: [&str; 16] = [
    "run_by_key",
    "source_sample",
    "plan_run",
    "run_by_id",
    "chains_of",
    "start_hop",
    "claim_page",
    "load_page",
    "claim_items",
    "record_results",
    "finish_page",
    "heartbeat",
    "page_summary",
    "set_chain_status",
    "complete_run",
    "end_chains",
];

/// Pages of 10 through one chain, one send at a time: a hanging mailer stops a hop at a known
/// item.
fn one_send_at_a_time(ambiguity: Ambiguity) -> baton::config::JobConfig {
    let mut job = newsletter_job(10, 1);
    job.ambiguity = ambiguity;
    job.newsletter.as_mut().unwrap().in_flight = 1;
    job
}

/// As [`one_send_at_a_time`], under settings for a hop the test kills ([`killable`]).
async fn killable_one_send_at_a_time(b: Backend, users: &[User], ambiguity: Ambiguity) -> Manual {
    Manual::with_settings(b, users, one_send_at_a_time(ambiguity), KindRegistry::default(), killable()).await
}

async fn raw(m: &Manual, sql: &str) -> baton::sql::Rows {
    m.counting.query(Stmt::new(sql, Params::new())).await.unwrap()
}

/// One run of 30 users (one invalid address) in pages of 10 through one chain, a page per hop
/// (so that every hop hands over, heartbeat included), with `statement` struck once as
/// `strike`: the engine re-runs it, and the run must end exactly as without the fault, with no
/// sweep, nothing `unknown` and nothing left `claimed`.
pub async fn every_statement_is_safe_when_it_fails_or_its_response_is_lost(b: Backend) {
    let users = int_users(30);
    for statement in RUN_STATEMENTS {
        for strike in [Strike::BeforeCommit, Strike::ResponseLost] {
            let m =
                Manual::with_settings(b, &users, newsletter_job(10, 1), KindRegistry::default(), one_page_per_hop())
                    .await;
            m.store.strike(statement, strike, 1);
            let run = m.start().await;
            m.pump().await;
            let what = format!("{b:?}: {statement} {strike:?}");
            assert_eq!(m.store.struck.load(Ordering::SeqCst), 1, "{what}: the statement was never issued");
            let status = m.status(&run).await;
            assert_eq!(status.status, "succeeded", "{what}: {status:?}");
            assert_eq!(
                (status.done, status.skipped, status.unknown, status.claimed),
                (29, 1, 0, 0),
                "{what}: {status:?}"
            );
            let sent = m.sent();
            assert!(duplicates(&sent).is_empty(), "{what}: mailed twice: {:?}", duplicates(&sent));
            assert_eq!(sent.len(), 29, "{what}");
        }
    }
}

/// A hop dies mid-page under at-least-once; the hop that takes the page over loses the response
/// of its takeover statement. Its re-run must return the same claims, or they would stay
/// `claimed`, never sent, under a page marked done.
pub async fn a_lost_response_while_taking_over_claims_loses_nobody(b: Backend) {
    let users = int_users(20);
    let m = killable_one_send_at_a_time(b, &users, Ambiguity::AtLeastOnce).await;
    let run = m.start().await;
    m.mailer.limit.store(4, Ordering::SeqCst);
    let hop1 = m.next_event().unwrap();
    m.kill_after_sends(hop1, 4).await; // killed mid-page
    m.mailer.limit.store(u64::MAX, Ordering::SeqCst);
    m.expire_leases();
    m.store.strike("settle_stale_claims", Strike::ResponseLost, 1);
    assert_eq!(m.engine.sweep().await.unwrap().restarted, 1);
    m.pump().await;
    assert_eq!(m.store.struck.load(Ordering::SeqCst), 1);
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded", "{status:?}");
    assert_eq!((status.done, status.unknown, status.claimed), (20, 0, 0), "{status:?}");
    let sent = m.sent();
    // At-least-once: only the 4 that went out before the crash went out twice; nobody missed.
    assert_eq!(duplicates(&sent).len(), 4, "{:?}", duplicates(&sent));
    assert_eq!(sent.len(), 24);
}

/// Key uniqueness is checked at start only. A row that arrives mid-run with a key already on a
/// page (here through a join-like UNION) must not get that key mailed twice.
pub async fn a_duplicate_key_that_appears_mid_run_is_failed_and_never_sent_twice(b: Backend) {
    let users = int_users(30);
    let mut job = newsletter_job(10, 1);
    job.source = "SELECT id, email, name FROM users UNION ALL SELECT id, email, name FROM late_rows".into();
    let m = Manual::new(b, &users, job, KindRegistry::default()).await;
    raw(&m, "CREATE TABLE late_rows (id BIGINT, email TEXT, name TEXT)").await;
    let run = m.start().await;
    // User 18 (on page 1) gets a twin after the run started.
    raw(&m, "INSERT INTO late_rows (id, email, name) VALUES (18, 'twin@example.com', 'Twin')").await;
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded", "{status:?}");
    let failed = m.engine.items_in_state(&run, "failed", 10).await.unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "18");
    let reason = failed[0].1.clone().unwrap_or_default();
    assert!(reason.contains("duplicate key") && reason.contains("id = 18"), "{reason}");
    let sent = m.sent();
    assert!(duplicates(&sent).is_empty());
    assert!(!sent.iter().any(|a| a == "twin@example.com" || a == "user18@example.com"), "{sent:?}");
    assert_eq!(sent.len(), 29 - 1);
    assert!(status.accounted(), "{status:?}");
}

/// A writer whose lease expired (by its own clock) claims nothing; one whose page was taken
/// over records, releases and finishes nothing; one that holds its lease records nothing for
/// items it does not hold.
pub async fn a_writer_that_lost_its_lease_changes_nothing(b: Backend) {
    let m = Manual::new(b, &int_users(20), newsletter_job(10, 1), KindRegistry::default()).await;
    let run = m.start().await;
    let _hop1 = m.next_event();
    let store = m.counting.clone();
    let lease = m.settings.lease().as_millis() as i64;
    let now = m.clock.now_ms();
    assert_eq!(store.query(st::start_hop(&run, 0, 1, "token-a", now, None)).await.unwrap().rows.len(), 1);
    let page = store.query(st::claim_page(&run, 0, 1, 1, "A", now, lease)).await.unwrap();
    let page_no = page.first().unwrap().int("page_no").unwrap();
    let keys = |ks: &[&str]| ks.iter().map(|k| k.to_string()).collect::<Vec<_>>();
    let claimed = store.query(st::claim_items(&run, page_no, "A", now, &keys(&["5", "18"]))).await.unwrap();
    assert_eq!(claimed.rows.len(), 2);
    // Holding the lease, A can record results only for items it holds as claimed: a result for
    // one it never claimed (or released) is no insert (failed before the upsert's SELECT was
    // fenced like its conflict: the item, on no page's claim, was recorded `done`).
    let unclaimed = [("7".to_string(), baton::engine::state::ItemState::Done, None)];
    store.query(st::record_results(&run, page_no, "A", now, &unclaimed)).await.unwrap();

    // A stalls past its lease. Its next claim, by its own clock, takes nothing.
    m.expire_leases();
    let late = m.clock.now_ms();
    let claimed = store.query(st::claim_items(&run, page_no, "A", late, &keys(&["31"]))).await.unwrap();
    assert!(claimed.rows.is_empty(), "a writer past its lease claimed {:?}", claimed.rows);

    // B (the restarted chain's next hop) takes the page over.
    assert_eq!(store.query(st::start_hop(&run, 0, 2, "token-b", late, None)).await.unwrap().rows.len(), 1);
    let taken = store.query(st::claim_page(&run, 0, 2, 1, "B", late, lease)).await.unwrap();
    assert_eq!(taken.first().unwrap().int("page_no").unwrap(), page_no);

    // A's late writes change nothing.
    store
        .query(st::record_results(
            &run,
            page_no,
            "A",
            late,
            &[("5".into(), baton::engine::state::ItemState::Done, None)],
        ))
        .await
        .unwrap();
    store.query(st::release_claims(&run, page_no, "A", &keys(&["18"]))).await.unwrap();
    assert!(store.query(st::finish_page(&run, page_no, "A", true, 0)).await.unwrap().rows.is_empty());
    assert!(store.query(st::settle_stale_claims(&run, page_no, "A", true, late)).await.unwrap().rows.is_empty());
    let ledger = raw(&m, "SELECT item_key, state, claimed_by FROM baton_ledger ORDER BY item_key").await;
    let rows: Vec<(String, String, String)> = ledger
        .records()
        .map(|r| {
            (
                r.text("item_key").unwrap().unwrap(),
                r.text("state").unwrap().unwrap(),
                r.text("claimed_by").unwrap().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![("18".into(), "claimed".into(), "A".into()), ("5".into(), "claimed".into(), "A".into())],
        "{b:?}"
    );
    let pages = raw(&m, &format!("SELECT status, lease_owner FROM baton_pages WHERE page_no = {page_no}")).await;
    let p = pages.first().unwrap();
    assert_eq!(
        (p.text("status").unwrap().unwrap(), p.text("lease_owner").unwrap().unwrap()),
        ("leased".into(), "B".into())
    );
}

/// Lambda may give a hop up to 15 minutes while leases derive from `hop_timeout`: the hop must
/// keep to `hop_timeout` itself, or it would send after another hop took its page over.
pub async fn a_hop_keeps_to_hop_timeout_whatever_deadline_it_is_given(b: Backend) {
    let users = int_users(20);
    // 1.5 s: the four sends before the hung one need their six statements done within the
    // second before the soft deadline, even on a loaded machine (400 ms left ~150 ms).
    let settings = baton::config::Settings {
        hop_timeout: Duration::from_millis(1500),
        hop_margin: Duration::from_millis(500),
        ..test_settings()
    };
    let job = one_send_at_a_time(Ambiguity::AtMostOnce);
    let m = Manual::with_settings(b, &users, job, KindRegistry::default(), settings).await;
    let run = m.start().await;
    m.mailer.limit.store(4, Ordering::SeqCst); // the fifth send hangs
    let hop1 = m.next_event().unwrap();
    let started = Instant::now();
    let generous = started + m.settings.hop_timeout * 20;
    let outcome = tokio::time::timeout(Duration::from_secs(30), m.engine.handle(hop1, generous))
        .await
        .expect("the hop returned")
        .unwrap();
    let took = started.elapsed();
    assert!(took < m.settings.hop_timeout * 2, "the hop ran {took:?}, past hop_timeout {:?}", m.settings.hop_timeout);
    assert!(matches!(outcome, Outcome::Hopped { next: HopNext::Continued, .. }), "{outcome:?}");
    let mid = m.status(&run).await;
    assert_eq!((mid.done, mid.unknown, mid.claimed), (4, 1, 0), "{mid:?}");
}

/// Pause, then a resume that lands while a hop is between reading `pausing` and parking its
/// chain: the chain must not park under a running run.
pub async fn a_resume_between_pausing_and_parking_keeps_the_chain_going(b: Backend) {
    let users = int_users(60);
    let m = Manual::new(b, &users, newsletter_job(10, 1), KindRegistry::default()).await;
    let run = m.start().await;
    m.engine.control(&run, ControlAction::Pause).await.unwrap();
    let (reached, release) = m.store.hold_before("park_chain");
    let hop1 = m.next_event().unwrap();
    let (outcome, ()) = tokio::join!(m.deliver(hop1), async {
        reached.await.expect("the hop reached the parking step");
        m.engine.control(&run, ControlAction::Resume).await.unwrap();
        release.send(()).unwrap();
    });
    let outcome = outcome.unwrap();
    assert!(!matches!(outcome, Outcome::Hopped { next: HopNext::Parked, .. }), "parked after resume: {outcome:?}");
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded", "{status:?}");
    assert!(duplicates(&m.sent()).is_empty());
    assert_eq!(m.sent().len(), 58);
}

/// A chain left parked under a running run (however it happened) is picked up by the sweeper.
pub async fn the_sweeper_unparks_chains_of_a_running_run(b: Backend) {
    let users = int_users(30);
    let m = Manual::new(b, &users, newsletter_job(10, 1), KindRegistry::default()).await;
    let run = m.start().await;
    let _lost = m.next_event();
    raw(&m, "UPDATE baton_chains SET status = 'paused'").await;
    let report = m.engine.sweep().await.unwrap();
    assert_eq!(report.unparked, 1, "{report:?}");
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded", "{status:?}");
    assert_eq!(m.sent().len(), 29);
}

/// Lambda migrates at every cold start, so a fan-out migrates one fresh database from many
/// sandboxes at once. (On PostgreSQL, failed before the fix with `23505` on
/// `pg_type_typname_nsp_index`.)
pub async fn concurrent_cold_start_migrations_on_a_fresh_database(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let stores = stores_on_a_fresh_database(b, dir.path(), 12).await;
    let results = futures::future::join_all(stores.iter().map(|s| migrations::migrate(s.as_ref(), 0))).await;
    let mut applied = Vec::new();
    for r in results {
        applied.extend(r.unwrap_or_else(|e| panic!("{b:?}: a concurrent migration failed: {e}")));
    }
    applied.sort();
    let all: Vec<i64> = (1..=migrations::MIGRATIONS.len() as i64).collect();
    assert_eq!(applied, all, "each version applied exactly once");
    let versions =
        stores[0].query(Stmt::new("SELECT COUNT(*) AS n FROM baton_schema_migrations", Params::new())).await.unwrap();
    assert_eq!(versions.first().unwrap().int("n").unwrap(), migrations::MIGRATIONS.len() as i64);
}

/// Rows whose key is NULL are left out of the run, as README says, and counted, not refused as
/// "not unique" (as before the fix).
pub async fn null_keys_are_left_out_and_counted(b: Backend) {
    // NULL keys last, then first: the run's key type comes from a row that has a key (failed
    // before the fix with the NULLs first: the type was taken from a NULL, every integer key
    // looked mistyped and nobody was mailed).
    let nulls = "SELECT CAST(NULL AS BIGINT) AS id, 'nokey1@example.com' AS email, 'No key' AS name \
                 UNION ALL SELECT NULL, 'nokey2@example.com', 'No key'";
    for source in [
        format!("SELECT id, email, name FROM users UNION ALL {nulls}"),
        format!("{nulls} UNION ALL SELECT id, email, name FROM users"),
    ] {
        null_keys_case(b, &source).await;
    }
}

async fn null_keys_case(b: Backend, source: &str) {
    let users = int_users(30);
    let mut job = newsletter_job(10, 2);
    job.source = source.into();
    let m = Manual::new(b, &users, job, KindRegistry::default()).await;
    let run = m.start().await;
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded", "{status:?}");
    assert_eq!((status.total, status.null_keys), (30, 2), "{status:?}");
    assert!(status.accounted());
    assert!(!m.sent().iter().any(|a| a.starts_with("nokey")));
    // Listed too (`baton status --list null-keys`), never silently dropped.
    let left_out = m.engine.null_key_rows(&run, 10).await.unwrap();
    let emails: Vec<&str> =
        left_out.iter().filter_map(|row| row.iter().find(|(c, _)| c == "email").map(|(_, v)| v.as_str())).collect();
    assert_eq!(emails, vec!["nokey1@example.com", "nokey2@example.com"], "{left_out:?}");
}

/// Under at-least-once, a send still in flight at the hop's cut-off is sent again by a later
/// hop, never parked as `unknown` (which only at-most-once reports).
pub async fn at_least_once_resends_what_was_in_flight_at_the_cut_off(b: Backend) {
    let users = int_users(20);
    let m = Manual::new(b, &users, one_send_at_a_time(Ambiguity::AtLeastOnce), KindRegistry::default()).await;
    let run = m.start().await;
    m.mailer.limit.store(4, Ordering::SeqCst); // the fifth send hangs until the cut-off
    let outcome = m.deliver_next().await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Hopped { next: HopNext::Continued, .. }), "{outcome:?}");
    m.mailer.limit.store(u64::MAX, Ordering::SeqCst);
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded");
    assert_eq!((status.done, status.unknown, status.claimed), (20, 0, 0), "{status:?}");
    assert_eq!(m.sent().len(), 20, "the hung send never reached the outbox; a later hop sent it");
}

/// A start whose hop events were all lost (or whose plan's answer was lost before it invoked
/// anything) is picked up by the sweeper once its chains look silent.
pub async fn the_sweeper_starts_chains_that_never_ran(b: Backend) {
    let users = int_users(40);
    let m = Manual::new(b, &users, newsletter_job(10, 3), KindRegistry::default()).await;
    let run = m.start().await;
    let lost: Vec<Event> = std::iter::from_fn(|| m.next_event()).collect();
    assert_eq!(lost.len(), 3);
    assert_eq!(m.engine.sweep().await.unwrap().restarted, 0, "fresh chains are not stale");
    m.expire_leases();
    assert_eq!(m.engine.sweep().await.unwrap().restarted, 3);
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded", "{status:?}");
    assert_eq!(m.sent().len(), 39);
}

/// Without `RecursiveLoop: Allow`, Lambda silently drops about every 17th hop of a chain. The
/// sweeper restarts the chain each time; `status` must tell that pattern from bad luck.
pub async fn a_chain_losing_hops_at_a_fixed_stride_is_flagged(b: Backend) {
    let users = int_users(40);
    let mut settings = test_settings();
    settings.max_pages_per_hop = Some(1);
    let m = Manual::with_settings(b, &users, newsletter_job(1, 1), KindRegistry::default(), settings).await;
    let run = m.start().await;
    let mut dropped = Vec::new();
    while let Some(event) = m.next_event() {
        if let Event::Hop { hop, .. } = event
            && (hop == 17 || hop == 33)
            && !dropped.contains(&hop)
        {
            dropped.push(hop); // Lambda stops the "loop" here
            m.expire_leases();
            assert_eq!(m.engine.sweep().await.unwrap().restarted, 1);
            continue;
        }
        m.deliver(event).await.unwrap();
    }
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded", "{status:?}");
    let chain = &status.chains[0];
    assert_eq!(chain.lost_at_hops, vec![17, 33], "{chain:?}");
    let warning = chain.warning.as_deref().unwrap_or_default();
    assert!(warning.contains("every 16 hops") && warning.contains("RecursiveLoop: Allow"), "{chain:?}");
    assert_eq!(m.sent().len(), 39);
}

/// The schedule passes the time it fired for; the run key is that time's month in the job's
/// time zone. A start delivered hours late (async events can be) finds the same run, even
/// across a month boundary in UTC; a Lambda start with neither time nor key is refused.
pub async fn a_late_scheduled_start_opens_no_second_run(b: Backend) {
    let mut job = newsletter_job(10, 1);
    job.time_zone = "Asia/Tokyo".into();
    let m = Manual::new(b, &int_users(20), job, KindRegistry::default()).await;
    // 08:00 on 1 December in Tokyo.
    let scheduled =
        Event::Start { job: JOB.into(), run_key: None, scheduled_time: Some("2026-11-30T23:00:00Z".into()) };
    let Outcome::Started { run_id, existing: false, .. } = m.deliver(scheduled.clone()).await.unwrap() else {
        panic!("the first start opens the run")
    };
    assert_eq!(m.status(&run_id).await.run_key, "2026-12");
    m.clock.advance_ms(6 * 3_600_000); // delivered six hours late, on another UTC day
    let again = m.deliver(scheduled).await.unwrap();
    assert!(
        matches!(again, Outcome::Started { ref run_id, existing: true, .. } if *run_id == m.status(run_id).await.run_id),
        "{again:?}"
    );
    let runs = raw(&m, "SELECT COUNT(*) AS n FROM baton_runs").await;
    assert_eq!(runs.first().unwrap().int("n").unwrap(), 1);
    for (event, expect) in [
        (Event::Start { job: JOB.into(), run_key: None, scheduled_time: None }, "scheduled_time"),
        (Event::Start { job: JOB.into(), run_key: None, scheduled_time: Some("yesterday".into()) }, "RFC 3339"),
    ] {
        let err = m.deliver(event).await.unwrap_err().to_string();
        assert!(err.contains(expect), "expected `{expect}` in: {err}");
    }
    let runs = raw(&m, "SELECT COUNT(*) AS n FROM baton_runs").await;
    assert_eq!(runs.first().unwrap().int("n").unwrap(), 1, "a refused start created nothing");
}

/// One transition table decides every status change; before it, `fail_run` accepted `paused`
/// while the sweeper's deadline check did not look at paused runs at all, so a paused run
/// outlived its deadline for ever.
pub async fn a_paused_run_past_its_deadline_fails(b: Backend) {
    let m = Manual::new(b, &int_users(30), newsletter_job(10, 1), KindRegistry::default()).await;
    let run = m.start().await;
    m.engine.control(&run, ControlAction::Pause).await.unwrap();
    m.pump().await; // the chain parks
    assert_eq!(m.status(&run).await.status, "paused");
    m.clock.advance_ms(601_000); // past run_deadline (600 s)
    assert_eq!(m.engine.sweep().await.unwrap().failed, 1);
    let status = m.status(&run).await;
    assert_eq!(status.status, "failed", "{status:?}");
    assert!(status.reason.as_deref().unwrap_or_default().contains("deadline"), "{status:?}");
}

/// A hop whose page load stalls past its lease (a resuming database) must not claim, and must
/// not finish the page: before the fix its claim came back empty (fenced) and the page was
/// marked done with nobody on it mailed or reported.
pub async fn a_page_load_that_outlasts_the_lease_releases_the_page(b: Backend) {
    let users = int_users(30);
    let m = Manual::new(b, &users, newsletter_job(10, 1), KindRegistry::default()).await;
    let run = m.start().await;
    let (reached, release) = m.store.hold_before("load_page");
    let hop1 = m.next_event().unwrap();
    let (outcome, ()) = tokio::join!(m.deliver(hop1), async {
        reached.await.unwrap();
        m.expire_leases(); // the load took longer than the lease
        release.send(()).unwrap();
    });
    outcome.unwrap();
    assert!(m.sent().is_empty(), "nothing may be sent past the lease");
    let mid = m.status(&run).await;
    assert_eq!((mid.pages_done, mid.done, mid.claimed), (0, 0, 0), "{mid:?}");
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded", "{status:?}");
    assert_eq!((status.done, status.skipped, status.unknown), (29, 1, 0), "{status:?}");
    assert_eq!(m.sent().len(), 29);
}

/// The claim of a hop's second page fails for good while the first page's sends are out: the
/// hop fails, but only once the first page is settled (its results recorded), and the retried
/// hop finishes the run. Before the fix the hop failed at once, dropping the page being sent:
/// its sends were cut off and its claims, sent or not, were left for the sweeper to call
/// `unknown`.
pub async fn a_claim_that_fails_for_good_waits_for_the_page_being_sent(b: Backend) {
    let users = int_users(20);
    let mut job = newsletter_job(10, 1);
    job.newsletter.as_mut().unwrap().in_flight = 2;
    let settings = baton::config::Settings { hop_timeout: Duration::from_secs(10), ..test_settings() };
    let m = Manual::with_settings(b, &users, job, KindRegistry::default(), settings).await;
    let run = m.start().await;
    m.store.strike_after("claim_page", 1, Strike::BeforeCommit, baton::engine::SQL_ATTEMPTS);
    let (reached, release) = m.store.hold_before("record_results");
    let hop1 = m.next_event().unwrap();
    let (outcome, reached) = tokio::join!(m.deliver(hop1.clone()), async {
        // The first page's results wait until the second page's claim has failed for good.
        let reached = tokio::time::timeout(Duration::from_secs(5), reached).await.is_ok();
        let claim_failed = async {
            while m.store.struck.load(Ordering::SeqCst) < baton::engine::SQL_ATTEMPTS as u64 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), claim_failed).await.expect("the second claim was made");
        let _ = release.send(());
        reached
    });
    assert!(outcome.is_err(), "the hop fails with its claim: {outcome:?}");
    assert!(reached, "the page being sent was dropped before recording its results");
    let mid = m.status(&run).await;
    assert_eq!((mid.done, mid.claimed, mid.unknown, mid.pages_done), (10, 0, 0, 1), "{mid:?}");
    assert_eq!(m.sent().len(), 10);
    // Lambda's retry of the failed event is a second delivery of the hop, refused at the fork
    // guard; the sweeper restarts the silent chain, and nothing is sent twice.
    assert_eq!(m.deliver(hop1).await.unwrap(), Outcome::Duplicate);
    m.expire_leases();
    assert_eq!(m.engine.sweep().await.unwrap().restarted, 1);
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded", "{status:?}");
    assert_eq!((status.done, status.unknown), (20, 0), "{status:?}");
    assert!(duplicates(&m.sent()).is_empty(), "{:?}", duplicates(&m.sent()));
    assert_eq!(m.sent().len(), 20);
}

/// The sweeper's and resume's statements, and a hop's parking, re-run after a lost answer must
/// still hand their chains on; before the fix the re-run matched nothing and the chain sat idle
/// until the next stale sweep (about 2 × hop_timeout).
pub async fn restarts_resumes_and_parking_survive_a_lost_answer(b: Backend) {
    let users = int_users(30);
    // A restart whose answer is lost.
    let m = Manual::new(b, &users, newsletter_job(10, 1), KindRegistry::default()).await;
    let run = m.start().await;
    let _lost = m.next_event();
    m.expire_leases();
    m.store.strike("claim_stale_chains", Strike::ResponseLost, 1);
    assert_eq!(m.engine.sweep().await.unwrap().restarted, 1, "the restarted chain was invoked");
    m.pump().await;
    assert_eq!(m.status(&run).await.status, "succeeded");
    assert_eq!(m.status(&run).await.chains[0].restarts, 1, "the restart counted once");

    // Parking and unparking whose answers are lost.
    let m = Manual::new(b, &users, newsletter_job(10, 1), KindRegistry::default()).await;
    let run = m.start().await;
    m.engine.control(&run, ControlAction::Pause).await.unwrap();
    m.store.strike("park_chain", Strike::ResponseLost, 1);
    let parked = m.deliver_next().await.unwrap().unwrap();
    assert!(matches!(parked, Outcome::Hopped { next: HopNext::Parked, .. }), "{parked:?}");
    assert_eq!(m.status(&run).await.status, "paused");
    m.store.strike("unpark_chains", Strike::ResponseLost, 1);
    m.engine.control(&run, ControlAction::Resume).await.unwrap();
    assert_eq!(m.pending_events(), 1, "the resumed chain was invoked");
    m.pump().await;
    assert_eq!(m.status(&run).await.status, "succeeded");

    // A revival whose answer is lost.
    let m = Manual::new(b, &users, newsletter_job(10, 1), KindRegistry::default()).await;
    let run = m.start().await;
    let _lost = m.next_event();
    raw(&m, "UPDATE baton_chains SET status = 'ended'").await;
    m.store.strike("revive_chain", Strike::ResponseLost, 1);
    assert_eq!(m.engine.sweep().await.unwrap().revived, 1, "the revived chain was invoked");
    m.pump().await;
    assert_eq!(m.status(&run).await.status, "succeeded");
    assert_eq!(m.sent().len(), 29);
}

/// A run cancelled while a hop is mid-page, and that hop then dies: its claims are settled as
/// `unknown` by the sweeper (they may have gone out), not left `claimed` for ever.
pub async fn claims_of_a_hop_that_died_after_its_run_ended_become_unknown(b: Backend) {
    let users = int_users(20);
    let m = killable_one_send_at_a_time(b, &users, Ambiguity::AtMostOnce).await;
    let run = m.start().await;
    m.mailer.limit.store(4, Ordering::SeqCst);
    let hop1 = m.next_event().unwrap();
    m.kill_after_sends(hop1, 4).await; // killed mid-page
    m.engine.control(&run, ControlAction::Cancel).await.unwrap();
    assert_eq!(m.status(&run).await.claimed, 10);
    assert_eq!(m.engine.sweep().await.unwrap().settled, 0, "a lease still running is left alone");
    m.expire_leases();
    assert_eq!(m.engine.sweep().await.unwrap().settled, 10);
    let status = m.status(&run).await;
    assert_eq!((status.status.as_str(), status.claimed, status.unknown), ("cancelled", 0, 10), "{status:?}");
    assert!(status.chains.iter().all(|c| c.status != "active"), "{status:?}");
    assert_eq!(m.engine.sweep().await.unwrap().settled, 0, "settled once");
}

/// Under at-least-once, a recipient whose every send ends ambiguously is sent again on a few
/// later claims of its page, then recorded `unknown`; before the bound the run resent it on
/// every hop until the hop budget failed the whole run.
pub async fn at_least_once_gives_up_on_a_recipient_that_is_always_ambiguous(b: Backend) {
    let users = int_users(30);
    let mut s = Setup::new(newsletter_job(10, 1));
    s.job.ambiguity = Ambiguity::AtLeastOnce;
    s.job.newsletter.as_mut().unwrap().max_attempts = 2;
    s.ambiguous_suffix = Some("user18@example.com".into());
    let h = Harness::with_users(b, &users, s).await;
    let run = h.start().await;
    let status = h.drive(&run).await;
    assert_eq!(status.status, "succeeded", "{status:?}");
    assert_eq!((status.done, status.skipped, status.unknown), (28, 1, 1), "{status:?}");
    let to_18 = h.sent().iter().filter(|a| *a == "user18@example.com").count();
    assert!((2..=8).contains(&to_18), "user 18 was mailed {to_18} times");
}

/// Keys are unique by their text (the ledger's key): SQLite columns may mix storage classes,
/// and an integer 5 and a text '5' would share one ledger row, the second never mailed.
pub async fn keys_equal_as_text_are_not_unique(b: Backend) {
    if b == Backend::Postgres {
        return; // a PostgreSQL column has one type: its values cannot mix integer and text
    }
    let users = int_users(10);
    let mut job = newsletter_job(10, 1);
    job.source = "SELECT id, email, name FROM users UNION ALL SELECT '5', 'twin@example.com', 'Twin'".into();
    let m = Manual::new(b, &users, job, KindRegistry::default()).await;
    let err = m.engine.start(JOB, Some("t")).await.unwrap_err().to_string();
    // The key-type census finds it first, and names both types.
    assert!(err.contains("more than one type") && err.contains("integer") && err.contains("text"), "{err}");
}

/// Large pages go through the Data API's 64 KiB limit on SQL text in a few statements each.
pub async fn large_pages_keep_every_statement_under_64_kib(b: Backend) {
    let users = int_users(5_000);
    let mut settings = test_settings();
    settings.hop_timeout = Duration::from_secs(10);
    settings.hop_margin = Duration::from_secs(2);
    let m = Manual::with_settings(b, &users, newsletter_job(5_000, 1), KindRegistry::default(), settings).await;
    let run = m.start().await;
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, "succeeded", "{status:?}");
    assert_eq!(status.done + status.skipped, 5_000);
    let longest = m.store.longest_sql.load(Ordering::SeqCst);
    assert!(longest < 65_536, "a statement of {longest} characters");
}

/// One run the sweeper cannot read (say, written by a newer baton) must not stop it from
/// sweeping every other run.
pub async fn the_sweeper_skips_a_run_it_cannot_read(b: Backend) {
    let users = int_users(30);
    let m = Manual::new(b, &users, newsletter_job(10, 1), KindRegistry::default()).await;
    let run = m.start().await;
    let _lost = m.next_event();
    raw(
        &m,
        "INSERT INTO baton_runs (run_id, job, run_key, status, job_config, key_type, deadline_at, created_at, updated_at)
         VALUES ('zzz', 'news', 'other', 'running', '{\"from_the_future\": true}', 'int', 0, 0, 0)",
    )
    .await;
    m.expire_leases();
    assert_eq!(m.engine.sweep().await.unwrap().restarted, 1);
    m.pump().await;
    assert_eq!(m.status(&run).await.status, "succeeded");
}

/// The send rate holds over any window, across hops and chains: hops far shorter than a send's
/// period each start where their chain's last hop left its pacing. Failed before the fix (a
/// token bucket built afresh every hop): every 300 ms hop of every chain sent at once, about
/// 3× the rate.
pub async fn the_send_rate_holds_across_short_hops_and_chains(b: Backend) {
    let users = int_users(14);
    let mut job = newsletter_job(2, 2);
    job.newsletter.as_mut().unwrap().send_rate = 4.0;
    job.hop_slack = 200;
    let h = Harness::with_users(b, &users, Setup::new(job)).await;
    let run = h.start().await;
    let status = h.drive(&run).await;
    assert_eq!(status.status, RunState::Succeeded, "{status:?}");
    let mut at = h.mailer.sent_at.lock().unwrap().clone();
    at.sort();
    assert_eq!(at.len(), 14, "every user once");
    let window = Duration::from_millis(1500);
    // 4/s over 1.5 s is 6, plus one send per chain that may fall on the window's edge.
    for (i, start) in at.iter().enumerate() {
        let inside = at[i..].iter().take_while(|t| **t < *start + window).count();
        assert!(
            inside <= 6 + 2,
            "{inside} sends within 1.5 s at 4/s: {:?}",
            at.iter().map(|t| t.duration_since(at[0]).as_millis()).collect::<Vec<_>>()
        );
    }
    let hops: i64 = status.chains.iter().map(|c| c.hops).sum();
    assert!(hops > 8, "the run spanned many short hops: {status:?}");
}

/// `tune` changes a live run: more chains and a higher rate mid-run, then fewer chains; the
/// new chains take pages, the extra ones end after their page, and everyone gets exactly one
/// message. A finished run cannot be tuned.
pub async fn tune_changes_a_live_runs_rate_and_chains(b: Backend) {
    let users = int_users(60);
    let mut job = newsletter_job(5, 2);
    job.newsletter.as_mut().unwrap().send_rate = 20.0;
    let h = Harness::with_users(b, &users, Setup::new(job)).await;
    let run = h.start().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = h.engine().tune(&run, Some(400.0), Some(4), true).await.unwrap();
    assert_eq!((t.chains, t.chains_added, t.send_rate.1), ((2, 4), 2, Some(400.0)), "{t:?}");
    let status = h.drive(&run).await;
    assert_eq!(status.status, RunState::Succeeded, "{status:?}");
    assert_eq!(status.chains.len(), 4);
    assert!(status.chains[2].hops + status.chains[3].hops > 0, "the new chains ran: {status:?}");
    h.assert_exactly_once(&run, &users).await;
    let refused = h.engine().tune(&run, Some(1.0), None, true).await.unwrap_err().to_string();
    assert!(refused.contains("is succeeded"), "{refused}");

    let mut job = newsletter_job(5, 4);
    job.newsletter.as_mut().unwrap().send_rate = 40.0;
    let h = Harness::with_users(b, &users, Setup::new(job)).await;
    let run = h.start().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.engine().tune(&run, Some(400.0), Some(1), true).await.unwrap();
    let status = h.drive(&run).await;
    assert_eq!(status.status, RunState::Succeeded, "{status:?}");
    h.assert_exactly_once(&run, &users).await;
    let bad = h.engine().tune(&run, Some(-1.0), None, true).await.unwrap_err().to_string();
    assert!(bad.contains("is succeeded"), "{bad}");
}

/// Bad tune values are refused by name and change nothing.
pub async fn tune_refuses_bad_values(b: Backend) {
    let users = int_users(20);
    let mut job = newsletter_job(5, 2);
    job.newsletter.as_mut().unwrap().send_rate = 2.0;
    let m = Manual::new(b, &users, job, KindRegistry::default()).await;
    let run = m.start().await;
    for (rate, chains, says) in [
        (Some(-1.0), None, "--send-rate"),
        (Some(1e-9), None, "--send-rate"),
        (None, Some(0), "--chains"),
        (None, Some(5000), "--chains"),
    ] {
        let err = m.engine.tune(&run, rate, chains, false).await.unwrap_err().to_string();
        assert!(err.starts_with(says), "{err}");
    }
    let status = m.status(&run).await;
    assert_eq!(status.chains.len(), 2);
}

/// A row whose key is not of the run's key type appears mid-run (SQLite: a column of mixed
/// types): it is `failed` with the reason, never sent, and the rest of its page goes out.
/// Before the fix a real-valued key had the ledger key "" and was silently lost.
pub async fn a_mistyped_key_that_appears_mid_run_is_failed_and_never_sent(b: Backend) {
    if b == Backend::Postgres {
        return; // a PostgreSQL column has one type
    }
    let users = int_users(20);
    let mut job = newsletter_job(50, 1);
    job.source = "SELECT id, email, name FROM users UNION ALL SELECT id, email, name FROM late".into();
    let m = Manual::new(b, &users, job, KindRegistry::default()).await;
    m.counting.query(Stmt::new("CREATE TABLE late (id, email TEXT, name TEXT)", Params::new())).await.unwrap();
    let run = m.start().await;
    m.counting
        .query(Stmt::new("INSERT INTO late VALUES (7.5, 'real@example.com', 'Real')", Params::new()))
        .await
        .unwrap();
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, RunState::Succeeded, "{status:?}");
    let failed = m.engine.items_in_state(&run, "failed", 10).await.unwrap();
    assert!(
        failed
            .iter()
            .any(|(k, r)| k == "7.5 (real)" && r.as_deref().unwrap_or_default().contains("not this run's key type")),
        "{failed:?}"
    );
    assert!(!m.sent().contains(&"real@example.com".to_owned()));
    assert_eq!(m.sent().len(), 20, "everyone else once");
}

/// An item kind is counted from its ledger only: a page marked done with nothing recorded is
/// not mail sent. Failed before the fix: `status` fell back to the pages' item counts.
pub async fn status_counts_item_kinds_from_the_ledger_only(b: Backend) {
    let users = int_users(10);
    let m = Manual::new(b, &users, newsletter_job(5, 1), KindRegistry::default()).await;
    let run = m.start().await;
    let done = Stmt::new("UPDATE baton_pages SET status = 'done'", Params::new());
    m.counting.query(done).await.unwrap();
    let status = m.status(&run).await;
    assert_eq!((status.done, status.pending, status.pages_done), (0, 10, 2), "{status:?}");
}

/// A hop whose environment cannot build the job (its unsubscribe secret missing) pauses the run
/// with the reason instead of failing every hop and every restart without end.
pub async fn a_hop_that_cannot_build_its_job_pauses_the_run(b: Backend) {
    let users = int_users(10);
    let m = Manual::new(b, &users, newsletter_job(5, 1), KindRegistry::default()).await;
    let run = m.start().await;
    let mut no_secret = newsletter_job(5, 1);
    no_secret.newsletter.as_mut().unwrap().unsubscribe_secret = None;
    let config = baton::config::Config { settings: m.settings.clone(), jobs: [(JOB.to_owned(), no_secret)].into() };
    let adapters =
        Adapters { clock: Arc::new(m.clock.clone()), ..Adapters::new(m.store.clone(), m.mailer.clone(), config) };
    let other = baton::engine::Engine::new(adapters.engine_parts(m.invoker.clone()));
    let hop = m.next_event().expect("hop 1 was invoked");
    let outcome = other.handle(hop, Instant::now() + Duration::from_secs(5)).await.unwrap();
    assert_eq!(outcome, Outcome::Hopped { pages: 0, next: HopNext::Parked });
    let status = m.status(&run).await;
    assert_eq!(status.status, RunState::Paused, "{status:?}");
    assert!(status.reason.as_deref().unwrap_or_default().contains("unsubscribe_secret"), "{status:?}");
    assert_eq!(m.pending_events(), 0, "no next hop");
    assert!(m.sent().is_empty());
    // With the secret back, resume finishes the run.
    m.engine.control(&run, ControlAction::Resume).await.unwrap();
    m.pump().await;
    assert_eq!(m.status(&run).await.status, RunState::Succeeded);
}

/// Template builtins (`range`, `loop`, filters) are accepted; only names that are really
/// undefined are refused. Failed before the fix: `range` and `loop` were "undefined".
pub async fn template_builtins_are_not_undefined(b: Backend) {
    let users = int_users(3);
    let mut job = newsletter_job(5, 1);
    job.newsletter.as_mut().unwrap().text = Some(
        "{% for i in range(2) %}{{ loop.index }}{% endfor %} {{ recipient.name|upper }} {{ unsubscribe_url }}".into(),
    );
    let m = Manual::new(b, &users, job, KindRegistry::default()).await;
    let run = m.start().await;
    m.pump().await;
    assert_eq!(m.status(&run).await.status, RunState::Succeeded);
}

/// Lowering the chain count and raising it again brings the ended chains back (failed before
/// the fix: only numbers above the old count were added, so the run kept 2 chains each pacing
/// at a quarter of the rate); the same tune twice changes nothing more.
pub async fn tune_down_then_up_brings_ended_chains_back(b: Backend) {
    let users = int_users(60);
    let settings = baton::config::Settings { max_pages_per_hop: Some(1), ..test_settings() };
    let m = Manual::with_settings(b, &users, newsletter_job(5, 4), KindRegistry::default(), settings).await;
    let run = m.start().await;
    m.engine.tune(&run, None, Some(2), false).await.unwrap();
    for _ in 0..4 {
        m.deliver_next().await.unwrap().unwrap();
    }
    let ended: Vec<_> = m.status(&run).await.chains.iter().map(|c| c.status).collect();
    assert_eq!(&ended[2..], &[ChainState::Ended, ChainState::Ended], "{ended:?}");
    let t = m.engine.tune(&run, None, Some(4), true).await.unwrap();
    assert_eq!((t.chains, t.chains_added), ((2, 4), 2), "{t:?}");
    let again = m.engine.tune(&run, None, Some(4), true).await.unwrap();
    assert_eq!(again.chains_added, 0, "{again:?}");
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, RunState::Succeeded, "{status:?}");
    assert!(status.chains[2].hops > 1 && status.chains[3].hops > 1, "{status:?}");
    let sent = m.sent();
    assert_eq!(duplicates(&sent), Vec::<String>::new());
    assert_eq!(sent.len(), 58, "every valid user (every 25th address is invalid)");
}

/// A chain's stored pacing is bounded by its current period: after `tune` raises a very low
/// rate, the chains go at the new pace at once instead of waiting out the old slot (100 s
/// here; failed before the fix, the run sat idle past the harness's minute).
pub async fn a_raised_rate_takes_effect_without_waiting_out_the_old_pace(b: Backend) {
    let users = int_users(20);
    let mut job = newsletter_job(5, 2);
    job.newsletter.as_mut().unwrap().send_rate = 0.02;
    job.hop_slack = 1000;
    let h = Harness::with_users(b, &users, Setup::new(job)).await;
    let run = h.start().await;
    // One send is enough to set a chain's pacing 100 s ahead. The wait sweeps as the driver
    // would: on a busy machine a 400 ms hop can be killed before its first send, and only the
    // sweeper restarts its chain (without it, this wait failed once in a loaded CI run).
    let until = Instant::now() + Duration::from_secs(30);
    while h.mailer.accepted.load(Ordering::SeqCst) < 1 {
        if Instant::now() >= until {
            panic!("no first send: {:?} {:?}", h.status(&run).await, h.local.lambda_counts());
        }
        h.engine().sweep().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    h.engine().tune(&run, Some(500.0), None, true).await.unwrap();
    let status = h.drive(&run).await;
    assert_eq!(status.status, RunState::Succeeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    h.assert_exactly_once(&run, &users).await;
}

/// Failed before: with the email column of a `SELECT *` source renamed mid-run, every remaining
/// recipient was recorded `skipped` ("no address") for good and the run ended `succeeded`; with
/// a source that names the column, every hop and restart failed until the run's deadline.
pub async fn a_source_column_that_disappears_mid_run_pauses_the_run(b: Backend) {
    for (source, says) in
        // A newsletter's page load reads the email column itself (the suppression check), so
        // both say the source query fails, naming the column.
        [("SELECT * FROM users", "src.email"), ("SELECT id, email, name FROM users", "source query fails")]
    {
        let mut job = newsletter_job(5, 1);
        job.source = source.into();
        renamed_mid_run(b, job, says).await;
    }
}

async fn renamed_mid_run(b: Backend, job: baton::config::JobConfig, says: &str) {
    let users = int_users(10);
    let m = Manual::new(b, &users, job, KindRegistry::default()).await;
    let run = m.start().await;
    raw(&m, "ALTER TABLE users RENAME COLUMN email TO mail").await;
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, RunState::Paused, "{status:?}");
    assert!(status.reason.as_deref().unwrap_or_default().contains(says), "{says}: {status:?}");
    assert_eq!((status.done, status.skipped, status.failed), (0, 0, 0), "nothing recorded: {status:?}");
    assert!(m.sent().is_empty());
    // With the column back, resume finishes the run, everyone once.
    raw(&m, "ALTER TABLE users RENAME COLUMN mail TO email").await;
    m.engine.control(&run, ControlAction::Resume).await.unwrap();
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, RunState::Succeeded, "{status:?}");
    assert!(duplicates(&m.sent()).is_empty());
    assert_eq!(m.sent().len() as i64, status.done);
}

/// `baton status` points at a stuck chain: silent past the stale threshold while active, with
/// what last went wrong (a hop's error, a restart by the sweeper), in text and in `--json`.
pub async fn status_flags_a_stuck_chain_and_its_last_error(b: Backend) {
    let users = int_users(10);
    let m = Manual::new(b, &users, newsletter_job(5, 1), KindRegistry::default()).await;
    let run = m.start().await;
    // Hop 1's event is lost: nothing runs, and the chain falls silent.
    let lost = m.next_event().expect("hop 1 was invoked");
    let chain = &m.status(&run).await.chains[0];
    assert!(!chain.stuck && chain.last_error.is_none(), "{chain:?}");
    m.expire_leases();
    let chain = &m.status(&run).await.chains[0];
    assert!(chain.stuck, "silent past the stale threshold: {chain:?}");
    assert!(chain.heartbeat_age_ms > m.settings.stale_after().as_millis() as i64, "{chain:?}");
    // The sweep restarts it and says so.
    m.engine.sweep().await.unwrap();
    let chain = &m.status(&run).await.chains[0];
    assert!(!chain.stuck && chain.restarts == 1, "{chain:?}");
    assert!(chain.last_error.as_deref().unwrap_or_default().contains("sweeper restarted"), "{chain:?}");
    drop(lost);
    // A hop that fails with an error leaves the error.
    m.store.fail_next("load_page");
    let failed = m.deliver_next().await.expect("the restart was invoked");
    assert!(failed.is_err(), "{failed:?}");
    let chain = &m.status(&run).await.chains[0];
    let error = chain.last_error.as_deref().unwrap_or_default();
    assert!(error.starts_with("hop 1 failed:") && error.contains("temporarily unavailable"), "{chain:?}");
    let json = serde_json::to_value(m.status(&run).await).unwrap();
    assert_eq!(json["chains"][0]["last_error"], error);
    assert_eq!(json["chains"][0]["stuck"], false);
}

/// The per-hop figures Lambda mode writes as CloudWatch metrics add up to the run's own counts.
pub async fn hop_metrics_add_up_to_the_run(b: Backend) {
    use baton::engine::metrics::{HopMetrics, measured};
    let users = int_users(30);
    let m = Manual::new(b, &users, newsletter_job(10, 2), KindRegistry::default()).await;
    let run = m.start().await;
    let mut sum = HopMetrics::default();
    while let Some(event) = m.next_event() {
        let (outcome, metrics) = measured(m.deliver(event)).await;
        outcome.unwrap();
        assert_eq!(metrics.job.as_deref(), Some(JOB));
        assert!(metrics.sql_statements > 0, "{metrics:?}");
        sum.pages += metrics.pages;
        sum.items_done += metrics.items_done;
        sum.items_skipped += metrics.items_skipped;
        sum.items_failed += metrics.items_failed;
        sum.items_unknown += metrics.items_unknown;
        sum.sql_statements += metrics.sql_statements;
    }
    let status = m.status(&run).await;
    assert_eq!(status.status, RunState::Succeeded, "{status:?}");
    assert_eq!(sum.pages as i64, status.pages_total);
    assert_eq!(
        (sum.items_done, sum.items_skipped, sum.items_failed, sum.items_unknown),
        (status.done as u64, status.skipped as u64, status.failed as u64, status.unknown as u64)
    );
    // Claim page, load rows, claim items, record results, finish page, heartbeat: six a page.
    assert!(sum.sql_statements >= 6 * sum.pages, "{sum:?}");
    // Outside `measured`, nothing is counted and nothing breaks.
    assert!(m.engine.status(Some(&run)).await.unwrap().is_some());
}

/// Failed before: an Invoke that can never succeed (the role not allowed to invoke the function,
/// Lambda's recursion stop) failed the run for good, so finishing it meant a new run key and
/// mailing everyone again. Now the run pauses with the fix, and resumes where it stopped.
pub async fn an_invoke_that_cannot_succeed_pauses_the_run(b: Backend) {
    use baton::ports::InvokeError;
    let users = int_users(20);
    let mut settings = test_settings();
    settings.max_pages_per_hop = Some(1);
    let m = Manual::with_settings(b, &users, newsletter_job(5, 1), KindRegistry::default(), settings).await;
    let run = m.start().await;
    let denied = InvokeError::Fatal("AccessDeniedException: not authorized to perform lambda:InvokeFunction".into());
    *m.invoker.failing.lock().unwrap() = Some(denied);
    let outcome = m.deliver_next().await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Hopped { next: HopNext::Parked, .. }), "{outcome:?}");
    let status = m.status(&run).await;
    assert_eq!(status.status, RunState::Paused, "{status:?}");
    assert!(status.reason.as_deref().unwrap_or_default().contains("lambda:InvokeFunction"), "{status:?}");
    let sent_before = m.sent().len();
    assert!(sent_before > 0, "hop 1 sent its page before the hand-over failed");
    // Fixed: resume finishes the run, nobody twice.
    *m.invoker.failing.lock().unwrap() = None;
    m.engine.control(&run, ControlAction::Resume).await.unwrap();
    m.pump().await;
    let status = m.status(&run).await;
    assert_eq!(status.status, RunState::Succeeded, "{status:?}");
    assert!(duplicates(&m.sent()).is_empty());
    // A start that cannot invoke its chains pauses too (the sweeper parks them), instead of
    // retrying until the run's deadline.
    *m.invoker.failing.lock().unwrap() = Some(InvokeError::Fatal("recursion stopped".into()));
    let Outcome::Started { run_id: again, .. } = m.engine.start(JOB, Some("t2")).await.unwrap() else { panic!() };
    let status = m.status(&again).await;
    assert_eq!(status.status, RunState::Pausing, "{status:?}");
    assert!(status.reason.as_deref().unwrap_or_default().contains("recursion stopped"), "{status:?}");
    m.expire_leases();
    m.engine.sweep().await.unwrap();
    assert_eq!(m.status(&again).await.status, RunState::Paused);
}
