//! The `baton` binary as a user meets it: the demo, `status --json`, and bad input.

use std::process::Command;

fn baton(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_baton")).args(args).env("NO_COLOR", "1").output().expect("baton runs")
}

#[test]
fn demo_with_chaos_succeeds_and_status_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let spans_dir = tempfile::tempdir().unwrap();
    let trace_file = spans_dir.path().join("spans.jsonl");
    let out = baton(&[
        "demo",
        "--users",
        "1500",
        "--chains",
        "3",
        "--chaos",
        "--seed",
        "5",
        "--json",
        "--data-dir",
        data,
        "--trace-file",
        trace_file.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    assert_eq!(summary["run"]["status"], "succeeded");
    assert_eq!(summary["checks_passed"], true);
    assert_eq!(summary["duplicated_addresses"].as_array().unwrap().len(), 0);
    assert_eq!(summary["missed_users"], 0);
    // Users who unsubscribed (one-click) or complained (SES) before the run were skipped.
    assert!(summary["suppressed_users"].as_u64().unwrap() >= 15, "{summary}");
    assert_eq!(summary["suppressed_mailed"].as_array().unwrap().len(), 0);
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

    // --trace-file: OTLP JSON lines, one export request per line, holding every hop's trace;
    // `status` names each chain's last one.
    let traces = traces_in(&trace_file);
    // Every delivered hop event is a trace, killed hops included (their spans end as they are
    // dropped), and exported before the process exits.
    let hops = traces.iter().filter(|(name, _)| name.starts_with("hop")).count() as u64;
    assert_eq!(hops, summary["hops"]["delivered"].as_u64().unwrap(), "{summary}");
    for chain in status["chains"].as_array().unwrap() {
        let id = chain["last_trace_id"].as_str().unwrap_or_else(|| panic!("no last_trace_id: {chain}"));
        assert!(traces.iter().any(|(name, trace)| name == "hop" && trace == id), "{id} is not in the trace file");
    }
}

/// `(span name, trace id)` of every span in an OTLP JSON lines file, read with the official
/// schema's types.
fn traces_in(path: &std::path::Path) -> Vec<(String, String)> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    let text = std::fs::read_to_string(path).expect("--trace-file was written");
    let mut spans = Vec::new();
    for line in text.lines() {
        let request: ExportTraceServiceRequest = serde_json::from_str(line).expect("an OTLP JSON export request");
        let raw: serde_json::Value = serde_json::from_str(line).unwrap();
        // OTLP JSON spells ids in hex, as X-Ray and Tempo search for them.
        let first = &raw["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"];
        assert!(first.as_str().is_some_and(|t| t.len() == 32), "{first}");
        for span in request.resource_spans.iter().flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans) {
            let id: String = span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
            spans.push((span.name.clone(), id));
        }
    }
    spans
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
    assert!(String::from_utf8_lossy(&out.stderr).contains("no baton state"));
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

/// README.md's "Your own job" block, run line by line as written (with `baton` on PATH), from a
/// folder holding the repository's `examples/`: the path from the demo to a job of one's own.
/// Failed before the fix: the first `baton run` stopped at the missing unsubscribe secret.
#[test]
fn the_readme_path_from_demo_to_your_own_job_works_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("## Your own job").nth(1).expect("README has a 'Your own job' section");
    let block = section.split("```sh\n").nth(1).and_then(|b| b.split("```").next()).expect("a sh block");
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_baton"), bin.join("baton")).unwrap();
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let status = Command::new("cp").args(["-r", examples, dir.path().to_str().unwrap()]).status().unwrap();
    assert!(status.success());
    let script = format!("set -eu\n{block}");
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the README's commands failed:\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(stdout.contains("To: "), "preview shows the To address: {stdout}");
    assert!(
        stderr.contains("one .eml file per message in baton-data/outbox"),
        "run says where the mail went: {stderr}"
    );
    assert!(stderr.contains("already succeeded"), "the second run is the same run: {stderr}");
    let status =
        Command::new(env!("CARGO_BIN_EXE_baton")).args(["status", "--json"]).current_dir(dir.path()).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["job"], "monthly-newsletter");
    assert_eq!(status["status"], "succeeded");
    assert_eq!(status["total"], 2000);
}

/// A demo paused from a second terminal exits 3 and says how to go on; `baton resume` with no
/// config file continues it (the demo left its config in the data dir) and nobody is mailed
/// twice. Failed before the fix: the demo printed "FAIL ... missed" and exited 1, and resume
/// wanted a config file it could not have.
#[test]
fn a_paused_demo_exits_3_and_resumes_from_its_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_owned();
    let demo = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["demo", "--users", "600", "--send-rate", "100", "--data-dir", &data_s])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = baton(&["status", "--json", "--data-dir", &data_s]);
        if out.status.success() {
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if s["done"].as_i64().unwrap_or(0) > 20 {
                break;
            }
        }
        assert!(std::time::Instant::now() < until, "the demo did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let paused = baton(&["pause", "--data-dir", &data_s]);
    assert!(paused.status.success(), "{paused:?}");
    let out = demo.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "a paused demo exits 3: {stderr}");
    assert!(stderr.contains("baton resume --data-dir"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("FAIL"), "a pause is not a failed check");

    let resumed = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["resume", "--data-dir", &data_s])
        .current_dir(dir.path())
        .env_remove("BATON_CONFIG")
        .output()
        .unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let sent = baton::adapters::local::outbox::recipients(&data.join("outbox")).unwrap();
    let unique: std::collections::HashSet<_> = sent.iter().collect();
    assert_eq!(unique.len(), sent.len(), "nobody twice");
    let status: serde_json::Value =
        serde_json::from_slice(&baton(&["status", "--json", "--data-dir", &data_s]).stdout).unwrap();
    assert_eq!(status["status"], "succeeded");
    assert_eq!(status["done"].as_i64().unwrap() as usize, sent.len());
}

/// `baton status | head -1` ends quietly when the reader goes. Failed before the fix: a
/// broken-pipe panic, exit 101.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    assert!(baton(&["demo", "--users", "200", "--json", "--data-dir", data]).status.success());
    // `true` is gone before baton writes a byte: every write meets a closed pipe. (Failed
    // before the fix, exit 101: "failed printing to stdout: Broken pipe".)
    let script = format!("'{}' status --list skipped --data-dir . 2>err | true; cat err", env!("CARGO_BIN_EXE_baton"));
    for _ in 0..3 {
        let out = Command::new("sh").arg("-c").arg(&script).current_dir(data).output().unwrap();
        let err = String::from_utf8_lossy(&out.stdout);
        assert!(err.is_empty(), "baton wrote to stderr: {err}");
    }
}

/// Ctrl-C without a terminal (a CI job, `nohup`): the first pauses the run and says so; a second
/// quits at once with exit 130 and says what that leaves behind. Failed before the fix: both
/// were silent (the message went to a hidden progress bar).
#[test]
fn ctrl_c_without_a_terminal_says_what_it_does() {
    for presses in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let child = Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(["demo", "--users", "2000", "--send-rate", "200", "--data-dir", data.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !data.join("outbox").exists() {
            assert!(std::time::Instant::now() < until, "the demo did not start sending");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        for _ in 0..presses {
            let pid = child.id().to_string();
            assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("Pausing: chains stop after their current page"), "{stderr}");
        match (presses, out.status.code()) {
            (1, Some(3)) => assert!(stderr.contains("baton resume"), "{stderr}"),
            (2, Some(130)) => assert!(stderr.contains("Quit with the run still pausing"), "{stderr}"),
            // The pause may settle before the second press lands: then it is an ordinary pause.
            (2, Some(3)) => {}
            (_, code) => panic!("{presses} Ctrl-C: exit {code:?}\n{stderr}"),
        }
    }
}

#[test]
fn migrate_creates_the_tables_once_and_says_which_versions_it_applied() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    let data = data.to_str().unwrap();
    let first = baton(&["migrate", "--data-dir", data, "--json"]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let first: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    let latest = baton::sql::migrations::latest_version();
    assert_eq!(first["schema_version"], latest);
    assert!(
        first["store"].as_str().unwrap().starts_with("SQLite ")
            && first["store"].as_str().unwrap().ends_with("baton.db"),
        "{first}"
    );
    assert_eq!(first["applied"], serde_json::json!((1..=latest).collect::<Vec<_>>()));
    // Again: nothing to apply; and status finds baton's state there (no runs yet, not no state).
    let again = baton(&["migrate", "--data-dir", data]);
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success() && text.contains(&format!("schema version {latest}: nothing to apply")), "{text}");
    let status = baton(&["status", "--data-dir", data]);
    assert!(String::from_utf8_lossy(&status.stderr).contains("no runs yet"), "{status:?}");
}
