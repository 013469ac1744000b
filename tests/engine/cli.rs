//! The `baton` binary as a user meets it: the demo, `status --json`, and bad input.

use std::process::Command;

fn baton(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_baton")).args(args).env("NO_COLOR", "1").output().expect("baton runs")
}

#[test]
fn demo_with_chaos_succeeds_and_status_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let out =
        baton(&["demo", "--users", "1500", "--chains", "3", "--chaos", "--seed", "5", "--json", "--data-dir", data]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    assert_eq!(summary["run"]["status"], "succeeded");
    assert_eq!(summary["checks_passed"], true);
    assert_eq!(summary["duplicated_addresses"].as_array().unwrap().len(), 0);
    assert_eq!(summary["missed_users"], 0);
    // The chaos classes fired, and the checks held under them.
    let injected = &summary["injected"];
    assert_eq!(injected["concurrent_migrations"], 8, "{injected}");
    assert_eq!(injected["duplicate_keys"].as_array().unwrap().len(), 1, "{injected}");
    assert_eq!(summary["run"]["claimed"], 0);
    assert!(summary["run"]["unknown"].as_u64().unwrap() <= injected["ambiguous_outcomes"].as_u64().unwrap());
    assert!(summary["hops"]["delivered"].as_u64().unwrap() > 3, "chains made many hops: {summary}");
    let eml = std::fs::read_dir(dir.path().join("outbox")).unwrap().count() as u64;
    assert_eq!(eml, summary["outbox_files"].as_u64().unwrap());

    let out = baton(&["status", "--json", "--data-dir", data]);
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in ["status", "total", "done", "failed", "skipped", "unknown", "pages_done", "pages_total", "chains"] {
        assert!(status.get(field).is_some(), "status --json lacks {field}: {status}");
    }
    assert_eq!(status["total"], 1500);
    let sum: i64 = ["done", "failed", "skipped", "unknown"].iter().map(|f| status[f].as_i64().unwrap()).sum();
    assert_eq!(sum, 1500);
    for chain in status["chains"].as_array().unwrap() {
        assert!(chain["hops"].as_i64().unwrap() <= chain["hop_budget"].as_i64().unwrap());
    }
}

#[test]
fn bad_config_is_rejected_with_the_field_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::write(&config, "[jobs.news]\nkind = 'sql'\nsource = 'SELECT id FROM t'\npage_size = 0\n[jobs.news.sql]\nstatement = 'SELECT :hi'\n").unwrap();
    let out = baton(&["run", "news", "--config", config.to_str().unwrap(), "--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("jobs.news.page_size: must be between 1 and 10000, got 0"), "{stderr}");

    let out = baton(&["pause", "--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no runs yet"));
}

#[test]
fn demo_runs_against_a_real_postgresql_with_store_postgres() {
    let admin = std::env::var("BATON_TEST_PG_URL")
        .expect("BATON_TEST_PG_URL is not set: run the suite with `scripts/test` (it starts a throwaway PostgreSQL)");
    let name = format!("demo_{}", uuid::Uuid::new_v4().simple());
    let ok = Command::new("psql").args([admin.as_str(), "-qc", &format!("CREATE DATABASE {name}")]).status().unwrap();
    assert!(ok.success());
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    for _ in 0..2 {
        let out = baton(&[
            "demo",
            "--users",
            "1200",
            "--chaos",
            "--store",
            "postgres",
            "--database-url",
            &url,
            "--json",
            "--data-dir",
            data,
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(summary["checks_passed"], true);
        assert_eq!(summary["run"]["total"], 1200);
    }
    let out = baton(&["status", "--json", "--database-url", &url]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["status"], "succeeded");
    assert!(
        status["run_key"].as_str().unwrap().starts_with("demo-"),
        "each demo on a shared database is a run of its own"
    );
}

/// `baton start` with the local invoker used to return 50 ms after starting hops, killing them
/// mid-page (hundreds of items left `claimed`). It is refused now, before anything is created.
#[test]
fn start_with_the_local_invoker_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("baton.toml");
    std::fs::write(&config, "[jobs.a]\nkind='sql'\nsource='SELECT 1 AS id'\n[jobs.a.sql]\nstatement='SELECT :hi'\n")
        .unwrap();
    let out = baton(&["start", "a", "--config", config.to_str().unwrap(), "--data-dir", data.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("baton run a") && err.contains("--invoker lambda"), "{err}");
    assert!(!data.exists(), "a refused start created {}", data.display());
}
