//! `baton report`: the timeline a run leaves (hops, pages, items over time) adds up under chaos,
//! and its page is self-contained and renders in a real browser (headless Chromium).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::{Backend, Harness, Rig, Setup, hop_chaos, int_users, newsletter_job};

pub async fn the_timeline_of_a_chaotic_run_adds_up(b: Backend) {
    let users = int_users(240);
    let mut s = Setup::new(newsletter_job(10, 3));
    s.seed = 3;
    s.settings.max_pages_per_hop = Some(1);
    s.faults = hop_chaos();
    let h = Harness::with_users(b, &users, s).await;
    let run = h.start().await;
    let status = h.drive(&run).await;
    assert_eq!(status.status, "succeeded");
    h.local.drain(Duration::from_secs(5)).await;
    let t = h.engine().timeline(Some(&run)).await.unwrap().unwrap();
    let counts = h.local.lambda_counts();

    // One row per hop that won its number, one per duplicate turned away.
    let winners: Vec<_> = t.hops.iter().filter(|h| h.outcome.as_deref() != Some("duplicate")).collect();
    let mut numbers: Vec<(i64, i64)> = winners.iter().map(|h| (h.chain, h.hop)).collect();
    numbers.sort();
    numbers.dedup();
    assert_eq!(numbers.len(), winners.len(), "one winner per chain and hop number");
    // A row for every hop the chains counted, but for a hop killed between its fork guard and
    // its row (the row is a diagnostic, written after).
    let chain_hops: i64 = t.status.chains.iter().map(|c| c.hops).sum();
    let killed = (counts.crashed + counts.timed_out) as i64;
    let rows = winners.len() as i64;
    assert!(rows <= chain_hops && rows >= chain_hops - killed, "{rows} rows, {chain_hops} hops, {counts:?}");
    // A duplicate row is a delivery that lost the fork guard: an injected duplicate, or a late
    // original that a sweeper restart overtook.
    let duplicates = t.hops.len() - winners.len();
    let restarted: i64 = t.status.chains.iter().map(|c| c.restarts).sum();
    assert!(duplicates as u64 <= counts.duplicated + restarted as u64, "{duplicates} {counts:?}");
    assert!(winners.iter().any(|h| h.outcome.as_deref() == Some("completed")), "the hop that completed the run");
    for hop in &winners {
        if let Some(end) = hop.ended_at_ms {
            assert!(end >= hop.started_at_ms);
        }
    }
    // Restarts show as a rise of the chain's restart count at the hop the sweeper started.
    let rises = t.status.chains.iter().map(|c| {
        let mut of_chain: Vec<_> = winners.iter().filter(|h| h.chain == c.chain).collect();
        of_chain.sort_by_key(|h| h.hop);
        of_chain.last().map_or(0, |h| h.restarts)
    });
    // (A restart the run's end overtook started no hop, so it is counted but not drawn.)
    assert!(rises.sum::<i64>() <= restarted, "a hop's restart count is its chain's when it started");
    // Every page was claimed, by a hop of a known chain, and finished.
    assert_eq!(t.pages.len() as i64, t.status.pages_total);
    assert!(t.pages.iter().all(|p| p.chain.is_some() && p.finished_at_ms.is_some() && p.status == "done"));
    // Items settled over time add up to the run.
    let settled: i64 = t.settled.iter().map(|b| b.done + b.failed + b.skipped + b.unknown).sum();
    assert_eq!(settled, t.status.total);

    let page = baton::report::html(&t);
    check_self_contained(&page);

    // A long run is read in pages of rows (one Data API answer stays under its 1 MiB): 4,100
    // more hop rows come back whole, in order.
    let extra = format!(
        "WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < 4100)
         INSERT INTO baton_hops (run_id, chain_no, hop, token, started_at, restarts)
         SELECT '{run}', 99, n, 'synthetic', n, 0 FROM seq"
    );
    h.store.query(baton::sql::Stmt::new(extra, Default::default())).await.unwrap();
    let longer = h.engine().timeline(Some(&run)).await.unwrap().unwrap();
    assert_eq!(longer.hops.len(), t.hops.len() + 4100);
    let synthetic: Vec<i64> = longer.hops.iter().filter(|h| h.chain == 99).map(|h| h.hop).collect();
    assert_eq!(synthetic, (1..=4100).collect::<Vec<_>>());
    for c in &t.status.chains {
        assert!(page.contains(&format!(">chain {}", c.chain)), "a lane per chain");
    }
}

/// Nothing is fetched from anywhere: no script, no external reference.
fn check_self_contained(page: &str) {
    assert!(page.starts_with("<!DOCTYPE html>") && page.contains("<svg"));
    assert!(!page.contains("<script"), "no script");
    let without_ns = page.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    for needle in ["http:", "https:", "src=", "href=", "url(", "@import"] {
        assert!(!without_ns.contains(needle), "the page references something outside it: {needle}");
    }
}

/// Debian's Chromium, which `scripts/test` installs when it is missing.
fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| dirs.iter().map(move |d| d.join(name)))
        .find(|p| p.is_file())
        .expect("no chromium on PATH: `apt-get install chromium` (scripts/test does this)")
}

/// Renders `html` headless to a PNG and returns its width and height.
pub fn screenshot(html: &Path, png: &Path) -> (u32, u32) {
    let profile = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--disable-dev-shm-usage",
            "--window-size=1300,1100",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromium runs");
    // A hung browser fails the test instead of stalling the suite.
    let until = std::time::Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > until {
            let _ = child.kill();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(png.is_file(), "chromium wrote no screenshot");
    let bytes = std::fs::read(png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

/// `baton report` after a `--chaos` demo: the page renders in headless Chromium, and is big
/// enough to be a picture rather than an error page. The PNG is kept in the target directory.
#[test]
fn the_report_of_a_chaos_demo_renders_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let baton = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton")).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    };
    let data_dir = data.to_str().unwrap();
    baton(&["demo", "--users", "3000", "--chains", "4", "--chaos", "--seed", "2", "--data-dir", data_dir]);
    let html = dir.path().join("report.html");
    let out = baton(&["report", "--data-dir", data_dir, "--out", html.to_str().unwrap(), "--json"]);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(summary["hops"].as_u64().unwrap() > 8, "{summary}");
    let page = std::fs::read_to_string(&html).unwrap();
    check_self_contained(&page);
    let png = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-chaos-demo.png");
    let _ = std::fs::remove_file(&png);
    let (width, height) = screenshot(&html, &png);
    assert_eq!((width, height), (1300, 1100));
    assert!(std::fs::metadata(&png).unwrap().len() > 20_000, "a blank page compresses to almost nothing");
}
