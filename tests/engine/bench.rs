//! `baton bench` end to end, shrunk (`--quick`): every path runs through the real binary (the
//! SES fake in the parent, each scenario in a child), and its figures hold together. The
//! figures themselves are for `baton bench` at full size; here only what must hold at any size.

use std::process::Command;

use serde_json::Value;

fn bench(dir: &std::path::Path, args: &[&str]) -> (std::process::Output, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["bench", "--quick", "--json", "--out"])
        .arg(dir)
        .args(args)
        .output()
        .expect("baton runs");
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out, json)
}

#[test]
fn every_path_mails_each_deliverable_user_once_and_reports_its_figures() {
    let dir = tempfile::tempdir().unwrap();
    let scenarios = ["baseline", "bare-ses", "one-chain", "rate-14", "embedded-p100", "chaos"];
    let args: Vec<&str> = scenarios.iter().flat_map(|s| ["--scenario", s]).collect();
    let (out, json) = bench(dir.path(), &args);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), json);
    let rows = json["scenarios"].as_array().expect("scenarios");
    assert_eq!(rows.len(), scenarios.len(), "{json}");
    for row in rows {
        let name = row["scenario"].as_str().unwrap();
        assert_eq!(row["duplicated"], 0, "{name}: {row}");
        assert_eq!(row["missed"], 0, "{name}: {row}");
        assert!(row["sent"].as_u64().unwrap() > 0, "{name}: {row}");
        assert!(row["cpu_us_per_item"].as_f64().unwrap() > 0.0, "{name}: {row}");
        assert!(row["peak_rss_mb"].as_f64().unwrap() > 1.0, "{name}: {row}");
        assert!(row["dollars_per_million"]["ses"].as_f64().unwrap() == 100.0, "{name}: {row}");
        if name != "chaos" {
            assert_eq!(row["unknown"], 0, "{name}: {row}");
        }
        let series: u64 = row["series"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c.as_array().unwrap())
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(series, row["sent"].as_u64().unwrap(), "{name}: the plot's series count every accepted send");
    }
    let row = |name: &str| rows.iter().find(|r| r["scenario"] == name).unwrap();
    // The engine's SQL stays O(1) statements per page; the baseline's is two per user.
    assert!(row("baseline")["sql_statements_per_1000"].as_f64().unwrap() >= 2000.0);
    assert!(row("embedded-p100")["sql_statements_per_1000"].as_f64().unwrap() < 100.0, "{}", row("embedded-p100"));
    // The rate-limited run is held to its rate: never above it by more than the first second's
    // burst.
    let rate = row("rate-14");
    assert!(rate["rate_vs_limit"].as_f64().unwrap() <= 1.1, "{rate}");
    assert!(rate["billed_gb_seconds_per_1000"].as_f64().unwrap() > 0.0, "{rate}");
    assert!(json["targets"].as_array().unwrap().iter().any(|t| t["target"].as_str().unwrap().contains("baseline")));
    let svg = std::fs::read_to_string(dir.path().join("send-rate.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>") && svg.matches("<polyline").count() >= 6);
}

#[test]
fn bad_flags_are_refused_with_the_flag_named() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = bench(dir.path(), &["--scenario", "warp-speed"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--scenario warp-speed") && err.contains("one-chain"), "{err}");
    let (out, _) = bench(dir.path(), &["--jitter", "1.5"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--jitter"), "{out:?}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "a refused bench writes nothing");
}

#[test]
fn scenarios_sharing_a_postgresql_database_each_run_and_count_their_own() {
    // On one database, each scenario's run needs a key of its own: with one key for all, the
    // second scenario started nothing (its run was the first's, finished), sent nothing and
    // was reported missing every user.
    let url = tokio::runtime::Runtime::new().unwrap().block_on(crate::support::fresh_database_url());
    let dir = tempfile::tempdir().unwrap();
    let (out, json) =
        bench(dir.path(), &["--database-url", &url, "--scenario", "one-chain", "--scenario", "embedded-p100"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), json);
    let rows = json["scenarios"].as_array().expect("scenarios");
    assert_eq!(rows.len(), 2, "{json}");
    for row in rows {
        assert!(row["sent"].as_u64().unwrap() > 0, "{row}");
        assert_eq!((&row["duplicated"], &row["missed"]), (&Value::from(0), &Value::from(0)), "{row}");
    }
}
