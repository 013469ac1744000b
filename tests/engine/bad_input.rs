//! Bad input, as a newcomer or a hostile source would give it, against the real binary: every
//! case must exit with the expected code, print a message naming the problem, and leave the data
//! dir exactly as it was (every table of `baton.db` row by row, every other file byte by byte;
//! a missing data dir stays missing). Lambda events have their own table in `lambda_mode.rs`.
//!
//! The suite writes its table (input | exit | message | state changed) to
//! `target/tmp/bad-input-table.md`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// A config that runs: each config case breaks one thing in it.
const BASE: &str = r#"
[settings]
hop_timeout = "2s"
hop_margin = "500ms"

[jobs.news]
kind = "newsletter"
source = "SELECT id, email, name FROM users"
page_size = 50
chains = 2

[jobs.news.newsletter]
from = "News <news@example.com>"
subject = "Hello {{ recipient.name }}"
text = "Hi {{ recipient.name }}. {{ unsubscribe_url }}"
unsubscribe_url = "https://example.com/u"
unsubscribe_secret = "0123456789abcdef0123"
"#;

/// The data dir a case starts from.
#[derive(Clone, Copy, PartialEq)]
enum Start {
    /// No data dir at all: it must not be created.
    Missing,
    /// What `baton demo --users 300` left (its run succeeded).
    Demo,
    /// The demo's data dir with SQL applied to `baton.db` first.
    DemoWith(&'static str),
    /// The demo's data dir plus a file of the user's.
    DemoWithForeignFile,
}

struct Case {
    what: &'static str,
    start: Start,
    /// The config file's text (written next to the data dir), if the case has one.
    config: Option<String>,
    /// `{data}` and `{config}` are replaced.
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    exit: i32,
    /// Every one must appear in stderr (or stdout).
    says: &'static [&'static str],
}

fn config_with(from: &str, to: &str) -> Option<String> {
    assert!(BASE.contains(from), "the base config has no `{from}`");
    Some(BASE.replacen(from, to, 1))
}

fn run_news() -> &'static [&'static str] {
    &["run", "news", "--data-dir", "{data}", "--config", "{config}"]
}

fn config_cases() -> Vec<Case> {
    let c = |what, from: &str, to: &str, says| Case {
        what,
        start: Start::Demo,
        config: config_with(from, to),
        args: run_news(),
        env: &[],
        exit: 2,
        says,
    };
    vec![
        c("page_size 0", "page_size = 50", "page_size = 0", &["jobs.news.page_size", "between 1 and 10000"]),
        c("chains 0", "chains = 2", "chains = 0", &["jobs.news.chains"]),
        c(
            "soft_bounce_limit 0",
            "hop_margin = \"500ms\"",
            "hop_margin = \"500ms\"\nsoft_bounce_limit = 0",
            &["settings.soft_bounce_limit", "at least 1"],
        ),
        c("chains 5000", "chains = 2", "chains = 5000", &["jobs.news.chains", "5000"]),
        c(
            "run_deadline of 300000000 years",
            "chains = 2",
            "chains = 2\nrun_deadline = \"300000000years\"",
            &["jobs.news.run_deadline", "366days"],
        ),
        c("run_deadline 0s", "chains = 2", "chains = 2\nrun_deadline = \"0s\"", &["jobs.news.run_deadline"]),
        c(
            "send_rate 1e-17",
            "unsubscribe_url = ",
            "send_rate = 1e-17\nunsubscribe_url = ",
            &["jobs.news.newsletter.send_rate", "between 0.001 and 1000000"],
        ),
        c(
            "send_rate -1",
            "unsubscribe_url = ",
            "send_rate = -1.0\nunsubscribe_url = ",
            &["jobs.news.newsletter.send_rate"],
        ),
        c(
            "send_rate nan",
            "unsubscribe_url = ",
            "send_rate = nan\nunsubscribe_url = ",
            &["jobs.news.newsletter.send_rate"],
        ),
        c(
            "in_flight 0",
            "unsubscribe_url = ",
            "in_flight = 0\nunsubscribe_url = ",
            &["jobs.news.newsletter.in_flight"],
        ),
        c(
            "max_attempts 0",
            "unsubscribe_url = ",
            "max_attempts = 0\nunsubscribe_url = ",
            &["jobs.news.newsletter.max_attempts"],
        ),
        c(
            "unsubscribe_url not http",
            "\"https://example.com/u\"",
            "\"ftp://example.com/u\"",
            &["jobs.news.newsletter.unsubscribe_url"],
        ),
        c(
            "unsubscribe_url with CRLF",
            "\"https://example.com/u\"",
            "\"https://example.com/u\\r\\nBcc: x@evil.example\"",
            &["jobs.news.newsletter.unsubscribe_url", "List-Unsubscribe"],
        ),
        c(
            "unsubscribe_secret of 5 characters",
            "\"0123456789abcdef0123\"",
            "\"short\"",
            &["jobs.news.newsletter.unsubscribe_secret", "at least 16"],
        ),
        c(
            "unsubscribe_secret_env blank",
            "unsubscribe_secret = \"0123456789abcdef0123\"",
            "unsubscribe_secret_env = \"\"",
            &["jobs.news.newsletter.unsubscribe_secret_env", "environment variable"],
        ),
        c("from not an address", "\"News <news@example.com>\"", "\"News <nobody>\"", &["jobs.news.newsletter.from"]),
        c(
            "from with CRLF in the name",
            "\"News <news@example.com>\"",
            "\"News\\r\\nBcc: x@evil.example <news@example.com>\"",
            &["jobs.news.newsletter.from", "control character"],
        ),
        c(
            "key_column with SQL in it",
            "chains = 2",
            "chains = 2\nkey_column = \"id; DROP TABLE users\"",
            &["jobs.news.key_column", "plain column name"],
        ),
        c(
            "email_column with a space",
            "unsubscribe_url = ",
            "email_column = \"e mail\"\nunsubscribe_url = ",
            &["jobs.news.newsletter.email_column"],
        ),
        c("source empty", "\"SELECT id, email, name FROM users\"", "\"\"", &["jobs.news.source"]),
        c(
            "source with a trailing ;",
            "\"SELECT id, email, name FROM users\"",
            "\"SELECT id, email, name FROM users;\"",
            &["jobs.news.source", "trailing"],
        ),
        c(
            "source that does not parse",
            "\"SELECT id, email, name FROM users\"",
            "\"SELEC id FROM users\"",
            &["jobs.news.source", "the source query failed"],
        ),
        c(
            "key_column not in the source",
            "chains = 2",
            "chains = 2\nkey_column = \"nope\"",
            &["jobs.news.key_column", "no column `nope`"],
        ),
        c("kind empty", "kind = \"newsletter\"", "kind = \"\"", &["jobs.news.kind"]),
        c("kind unknown", "kind = \"newsletter\"", "kind = \"carrier-pigeon\"", &["jobs.news.kind", "carrier-pigeon"]),
        c("misspelt key", "page_size = 50", "pagesize = 50", &["unknown field `pagesize`"]),
        c(
            "time_zone unknown",
            "chains = 2",
            "chains = 2\ntime_zone = \"Mars/Olympus\"",
            &["jobs.news.time_zone", "Mars/Olympus"],
        ),
        c("hop_timeout 1h", "hop_timeout = \"2s\"", "hop_timeout = \"1h\"", &["settings.hop_timeout"]),
        c(
            "hop_margin longer than hop_timeout",
            "hop_margin = \"500ms\"",
            "hop_margin = \"5s\"",
            &["settings.hop_margin"],
        ),
        c(
            "sweep_interval 1ms",
            "hop_margin = \"500ms\"",
            "hop_margin = \"500ms\"\nsweep_interval = \"1ms\"",
            &["settings.sweep_interval"],
        ),
        c(
            "reserved_concurrency 0",
            "hop_margin = \"500ms\"",
            "hop_margin = \"500ms\"\nreserved_concurrency = 0",
            &["settings.reserved_concurrency"],
        ),
        c(
            "max_pages_per_hop 0",
            "hop_margin = \"500ms\"",
            "hop_margin = \"500ms\"\nmax_pages_per_hop = 0",
            &["settings.max_pages_per_hop"],
        ),
        c(
            "max_failure_percent 150",
            "chains = 2",
            "chains = 2\nmax_failure_percent = 150.0",
            &["jobs.news.max_failure_percent"],
        ),
        c(
            "max_failures beyond 10^12",
            "chains = 2",
            "chains = 2\nmax_failures = 9000000000000000000",
            &["jobs.news.max_failures"],
        ),
        c("hop_slack beyond 10^6", "chains = 2", "chains = 2\nhop_slack = 4000000000", &["jobs.news.hop_slack"]),
        c(
            "template that does not parse",
            "\"Hello {{ recipient.name }}\"",
            "\"Hello {{ recipient.name \"",
            &["jobs.news.newsletter.subject", "does not parse"],
        ),
        c(
            "template with an undefined variable",
            "\"Hello {{ recipient.name }}\"",
            "\"Hello {{ nickname }}\"",
            &["jobs.news.newsletter.subject", "nickname"],
        ),
        c(
            "template with a missing column",
            "\"Hello {{ recipient.name }}\"",
            "\"Hello {{ recipient.nickname }}\"",
            &["jobs.news.newsletter.subject", "recipient.nickname", "no column `nickname`"],
        ),
        c(
            "template with an undefined var",
            "\"Hello {{ recipient.name }}\"",
            "\"Hello {{ vars.month }}\"",
            &["jobs.news.newsletter.subject", "vars.month"],
        ),
        c(
            "neither text nor html",
            "text = \"Hi {{ recipient.name }}. {{ unsubscribe_url }}\"",
            "",
            &["jobs.news.newsletter.text"],
        ),
        c(
            "text_file missing",
            "text = \"Hi {{ recipient.name }}. {{ unsubscribe_url }}\"",
            "text_file = \"nope.txt\"",
            &["jobs.news.newsletter.text_file", "nope.txt"],
        ),
        c("TOML that does not parse", "page_size = 50", "page_size = = 50", &["is not valid"]),
        Case {
            what: "job name with a space",
            start: Start::Demo,
            config: Some(BASE.replace("[jobs.news", "[jobs.\"a b\"")),
            args: run_news(),
            env: &[],
            exit: 2,
            says: &["jobs.a b", "letters, digits"],
        },
        Case {
            what: "secret from the environment, 1 character",
            start: Start::Demo,
            config: config_with("unsubscribe_secret = \"0123456789abcdef0123\"", ""),
            args: run_news(),
            env: &[("BATON_UNSUBSCRIBE_SECRET", "x")],
            exit: 2,
            says: &["unsubscribe_secret_env (BATON_UNSUBSCRIBE_SECRET)", "at least 16"],
        },
        Case {
            what: "no secret anywhere",
            start: Start::Demo,
            config: config_with("unsubscribe_secret = \"0123456789abcdef0123\"", ""),
            args: run_news(),
            env: &[],
            exit: 2,
            says: &["jobs.news.newsletter.unsubscribe_secret", "BATON_UNSUBSCRIBE_SECRET"],
        },
    ]
}

fn data_cases() -> Vec<Case> {
    let d = |what, setup: &'static str, source: &str, says| Case {
        what,
        start: Start::DemoWith(setup),
        config: config_with("\"SELECT id, email, name FROM users\"", &format!("\"{source}\"")),
        args: run_news(),
        env: &[],
        exit: 2,
        says,
    };
    vec![
        d(
            "duplicate keys",
            "",
            "SELECT id, email, name FROM users UNION ALL SELECT id, email, name FROM users",
            &["jobs.news.key_column", "not unique"],
        ),
        d(
            "NUMERIC keys 1, 1.5, 2, 2.5, 3.5",
            "CREATE TABLE mixed (id NUMERIC, email TEXT, name TEXT); INSERT INTO mixed VALUES (1, 'a@example.com', 'a'), \
             (1.5, 'b@example.com', 'b'), (2, 'c@example.com', 'c'), (2.5, 'd@example.com', 'd'), (3.5, 'e@example.com', 'e')",
            "SELECT id, email, name FROM mixed",
            &["jobs.news.key_column", "more than one type", "real"],
        ),
        d(
            "integer 2 and text '2'",
            "CREATE TABLE twos (id, email TEXT, name TEXT); INSERT INTO twos VALUES (1, 'a@example.com', 'a'), \
             (2, 'b@example.com', 'b'), ('2', 'c@example.com', 'c')",
            "SELECT id, email, name FROM twos",
            &["jobs.news.key_column", "integer", "text"],
        ),
        d(
            "BLOB keys",
            "CREATE TABLE blobs (id BLOB, email TEXT, name TEXT); INSERT INTO blobs VALUES (x'01', 'a@example.com', 'a'), \
             (x'02', 'b@example.com', 'b')",
            "SELECT id, email, name FROM blobs",
            &["jobs.news.key_column", "blob"],
        ),
        d(
            "real keys",
            "CREATE TABLE reals (id REAL, email TEXT, name TEXT); INSERT INTO reals VALUES (0.5, 'a@example.com', 'a')",
            "SELECT id, email, name FROM reals",
            &["jobs.news.key_column", "real"],
        ),
        d(
            "email column missing",
            "",
            "SELECT id, name FROM users",
            &["jobs.news.newsletter.email_column", "no column `email`"],
        ),
    ]
}

fn cli_cases() -> Vec<Case> {
    let base = || Some(BASE.to_owned());
    let cli = |what, start, args, exit, says| Case { what, start, config: base(), args, env: &[], exit, says };
    vec![
        cli(
            "run of an unknown job",
            Start::Demo,
            &["run", "nope", "--data-dir", "{data}", "--config", "{config}"],
            2,
            &["no job named `nope`", "news"],
        ),
        cli(
            "run key with a space",
            Start::Demo,
            &["run", "news", "--run-key", "a b", "--data-dir", "{data}", "--config", "{config}"],
            2,
            &["invalid run key", "not allowed"],
        ),
        cli(
            "run key of 200 characters",
            Start::Demo,
            &[
                "run",
                "news",
                "--run-key",
                "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk",
                "--data-dir",
                "{data}",
                "--config",
                "{config}",
            ],
            2,
            &["invalid run key", "at most 64"],
        ),
        cli("status with no data dir", Start::Missing, &["status", "--data-dir", "{data}"], 2, &["no baton state"]),
        cli("pause with no data dir", Start::Missing, &["pause", "--data-dir", "{data}"], 2, &["no baton state"]),
        cli("cancel with no data dir", Start::Missing, &["cancel", "--data-dir", "{data}"], 2, &["no baton state"]),
        cli("resume with no data dir", Start::Missing, &["resume", "--data-dir", "{data}"], 2, &["no baton state"]),
        cli("sweep with no data dir", Start::Missing, &["sweep", "--data-dir", "{data}"], 2, &["no baton state"]),
        cli(
            "preview with no data dir",
            Start::Missing,
            &["preview", "news", "--data-dir", "{data}", "--config", "{config}"],
            2,
            &["no baton state"],
        ),
        cli(
            "status of an unknown run",
            Start::Demo,
            &["status", "nope", "--data-dir", "{data}"],
            2,
            &["no run with id `nope`"],
        ),
        cli(
            "pause of an unknown run",
            Start::Demo,
            &["pause", "nope", "--data-dir", "{data}"],
            2,
            &["no run with id `nope`"],
        ),
        cli(
            "resume of a succeeded run",
            Start::Demo,
            &["resume", "--data-dir", "{data}"],
            2,
            &["is succeeded", "cannot resume"],
        ),
        cli(
            "resume of a cancelled run",
            Start::DemoWith("UPDATE baton_runs SET status = 'cancelled'"),
            &["resume", "--data-dir", "{data}"],
            2,
            &["is cancelled", "cannot resume"],
        ),
        cli("cancel of a succeeded run", Start::Demo, &["cancel", "--data-dir", "{data}"], 2, &["cannot cancel"]),
        cli("pause of a succeeded run", Start::Demo, &["pause", "--data-dir", "{data}"], 2, &["cannot pause"]),
        cli(
            "status --list of an unknown state",
            Start::Demo,
            &["status", "--list", "bogus", "--data-dir", "{data}"],
            2,
            &["invalid value 'bogus'"],
        ),
        cli(
            "demo --page-size 0",
            Start::Demo,
            &["demo", "--page-size", "0", "--data-dir", "{data}"],
            2,
            &["--page-size"],
        ),
        cli("demo --chains 0", Start::Demo, &["demo", "--chains", "0", "--data-dir", "{data}"], 2, &["--chains"]),
        cli("demo --users 0", Start::Demo, &["demo", "--users", "0", "--data-dir", "{data}"], 2, &["--users"]),
        cli(
            "demo --hop-timeout 1h",
            Start::Demo,
            &["demo", "--hop-timeout", "1h", "--data-dir", "{data}"],
            2,
            &["--hop-timeout"],
        ),
        cli(
            "demo --send-rate 1e-9",
            Start::Demo,
            &["demo", "--send-rate", "1e-9", "--data-dir", "{data}"],
            2,
            &["--send-rate"],
        ),
        cli(
            "demo over files it did not create",
            Start::DemoWithForeignFile,
            &["demo", "--data-dir", "{data}"],
            2,
            &["did not create", "notes.txt", "--force"],
        ),
        cli(
            "demo over a baton.db it did not create",
            Start::DemoWith("-- no marker"),
            &["demo", "--data-dir", "{data}"],
            2,
            &["a demo did not create", "--force"],
        ),
        cli(
            "demo over a data dir where a job of yours ran",
            Start::DemoWith("UPDATE baton_runs SET job = 'mine', run_key = '2026-11'"),
            &["demo", "--data-dir", "{data}"],
            2,
            &["a run of `mine` (2026-11)", "--force"],
        ),
        cli(
            "demo over a data dir holding a table of yours",
            Start::DemoWith("CREATE TABLE customers (id INTEGER)"),
            &["demo", "--data-dir", "{data}"],
            2,
            &["a table `customers`", "--force"],
        ),
        cli(
            "demo with --invoker lambda",
            Start::Demo,
            &["demo", "--invoker", "lambda", "--data-dir", "{data}"],
            2,
            &["--invoker local"],
        ),
        cli(
            "start with the local invoker",
            Start::Demo,
            &["start", "news", "--data-dir", "{data}", "--config", "{config}"],
            2,
            &["baton run news", "--invoker lambda"],
        ),
        cli(
            "--store postgres without a URL",
            Start::Demo,
            &["run", "news", "--store", "postgres", "--data-dir", "{data}", "--config", "{config}"],
            2,
            &["--database-url"],
        ),
        cli(
            "--store data-api without ARNs",
            Start::Demo,
            &["run", "news", "--store", "data-api", "--data-dir", "{data}", "--config", "{config}"],
            2,
            &["--db-cluster-arn"],
        ),
        cli(
            "--invoker lambda without a function",
            Start::Demo,
            &["run", "news", "--invoker", "lambda", "--data-dir", "{data}", "--config", "{config}"],
            2,
            &["--function"],
        ),
        cli("brake without a function", Start::Demo, &["brake", "--data-dir", "{data}"], 2, &["--function"]),
        cli(
            "preview of an unknown key",
            Start::Demo,
            &["preview", "news", "--key=-1", "--data-dir", "{data}", "--config", "{config}"],
            2,
            &["no recipient found with key -1"],
        ),
        cli(
            "suppress add with a header injection",
            Start::Demo,
            &["suppress", "add", "ok@example.com", "x@example.com\r\nBcc: all@example.com", "--data-dir", "{data}"],
            2,
            &["control characters"],
        ),
        cli(
            "suppress add for a scope that is no job name",
            Start::Demo,
            &["suppress", "add", "ok@example.com", "--job", "news; DROP TABLE users", "--data-dir", "{data}"],
            2,
            &["--job", "job name"],
        ),
        cli(
            "suppress add with an unknown reason",
            Start::Demo,
            &["suppress", "add", "ok@example.com", "--reason", "bored", "--data-dir", "{data}"],
            2,
            &["bored", "manual"],
        ),
        cli(
            "suppress import of a missing file",
            Start::Demo,
            &["suppress", "import", "{data}/nope.csv", "--data-dir", "{data}"],
            2,
            &["nope.csv"],
        ),
        cli(
            "run with no config file",
            Start::Demo,
            &["run", "news", "--data-dir", "{data}", "--config", "{data}/nope.toml"],
            2,
            &["nope.toml", "not found"],
        ),
        Case {
            what: "resume of a paused run without its secret",
            start: Start::DemoWith(
                "UPDATE baton_runs SET status = 'paused'; UPDATE baton_chains SET status = 'paused'; \
                 UPDATE baton_pages SET status = 'pending' WHERE page_no = 1",
            ),
            config: config_with("unsubscribe_secret = \"0123456789abcdef0123\"", ""),
            args: &["resume", "--data-dir", "{data}", "--config", "{config}"],
            env: &[],
            exit: 2,
            says: &["unsubscribe_secret", "not set"],
        },
    ]
}

/// The binary, killed after [`CASE_LIMIT`]: bad input must be refused at once, and a case that
/// hangs (as `resume` without a secret, or a run at 1e-17 messages per second, once did) is a
/// failure of its own, not a suite that never ends. Its exit code is then `None` (-1 in the table).
fn baton(args: &[String], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton"));
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).env("NO_COLOR", "1").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child =
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("baton runs");
    let until = std::time::Instant::now() + CASE_LIMIT;
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

/// How long one case may take (the demo that seeds the suite's data dir is the longest).
const CASE_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A demo's data dir, made once and copied for each case.
fn demo_template() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep().join("demo");
        let out = baton(
            &["demo".into(), "--users".into(), "300".into(), "--data-dir".into(), dir.display().to_string()],
            &[],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        dir
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Everything in a data dir: `baton.db`'s tables row by row (WAL and shared-memory files are
/// the database's own business), every other file's bytes; `None` when the dir is missing.
fn snapshot(dir: &Path) -> Option<BTreeMap<String, String>> {
    if !dir.exists() {
        return None;
    }
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let name = path.strip_prefix(dir).unwrap().display().to_string();
            if path.is_dir() {
                out.insert(format!("{name}/"), String::new());
                stack.push(path);
            } else if name == "baton.db" {
                out.insert(name, dump(&path));
            } else if !name.starts_with("baton.db-") {
                out.insert(name, format!("{:?}", std::fs::read(&path).unwrap()));
            }
        }
    }
    Some(out)
}

fn dump(db: &Path) -> String {
    let conn = rusqlite::Connection::open(db).unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut out = String::new();
    for t in tables {
        let mut stmt = conn.prepare(&format!("SELECT * FROM \"{t}\"")).unwrap();
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |r| Ok((0..n).map(|i| format!("{:?}", r.get_ref(i).unwrap())).collect::<Vec<_>>().join("|")))
            .unwrap();
        let mut rows: Vec<String> = rows.map(Result::unwrap).collect();
        rows.sort();
        out.push_str(&format!("## {t}\n{}\n", rows.join("\n")));
    }
    out
}

fn prepare(start: Start, root: &Path) -> PathBuf {
    let data = root.join("data");
    match start {
        Start::Missing => {}
        Start::Demo => copy_dir(demo_template(), &data),
        Start::DemoWithForeignFile => {
            copy_dir(demo_template(), &data);
            std::fs::write(data.join("notes.txt"), "mine").unwrap();
        }
        Start::DemoWith(sql) => {
            copy_dir(demo_template(), &data);
            if sql == "-- no marker" {
                std::fs::remove_file(data.join(".baton-demo")).unwrap();
            } else if !sql.is_empty() {
                rusqlite::Connection::open(data.join("baton.db")).unwrap().execute_batch(sql).unwrap();
            }
        }
    }
    data
}

fn one_line(s: &str) -> String {
    let line = s.lines().find(|l| l.starts_with("error")).or_else(|| s.lines().next()).unwrap_or_default();
    let short: String = line.chars().take(150).collect();
    short.replace('|', "\\|")
}

#[test]
fn every_bad_input_gets_a_clear_error_and_changes_nothing() {
    let cases: Vec<(&str, Case)> = config_cases()
        .into_iter()
        .map(|c| ("config", c))
        .chain(data_cases().into_iter().map(|c| ("data", c)))
        .chain(cli_cases().into_iter().map(|c| ("cli", c)))
        .collect();
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let mut table =
        vec!["| class | input | exit | message | state changed |".to_owned(), "|---|---|---|---|---|".to_owned()];
    let mut failures = Vec::new();
    for (class, case) in &cases {
        let root = tempfile::tempdir().unwrap();
        let data = prepare(case.start, root.path());
        let config = root.path().join("baton.toml");
        if let Some(text) = &case.config {
            std::fs::write(&config, text).unwrap();
        }
        let args: Vec<String> = case
            .args
            .iter()
            .map(|a| {
                a.replace("{data}", &data.display().to_string()).replace("{config}", &config.display().to_string())
            })
            .collect();
        let before = snapshot(&data);
        let out = baton(&args, case.env);
        let after = snapshot(&data);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
        let changed = before != after;
        let code = out.status.code().unwrap_or(-1);
        table.push(format!(
            "| {class} | {} | {code} | {} | {} |",
            case.what,
            one_line(&text),
            if changed { "YES" } else { "no" }
        ));
        let missing: Vec<_> = case.says.iter().filter(|s| !text.contains(**s)).collect();
        if code != case.exit || !missing.is_empty() || changed || text.contains("panicked") {
            failures.push(format!(
                "{}: exit {code} (want {}), missing {missing:?}, state changed: {changed}\n{text}",
                case.what, case.exit
            ));
        }
    }
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bad-input-table.md");
    std::fs::File::create(&path).unwrap().write_all((table.join("\n") + "\n").as_bytes()).unwrap();
    assert!(failures.is_empty(), "{} of {} cases failed:\n\n{}", failures.len(), cases.len(), failures.join("\n\n"));

    // The base config is good: the cases fail for the reason they name, not another.
    let root = tempfile::tempdir().unwrap();
    let data = prepare(Start::Demo, root.path());
    let config = root.path().join("baton.toml");
    std::fs::write(&config, BASE).unwrap();
    let out = baton(
        &[
            "run",
            "news",
            "--run-key",
            "base",
            "--data-dir",
            data.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ]
        .map(String::from),
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
