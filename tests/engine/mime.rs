//! Hostile recipient data cannot add, remove or rewrite a header. Every message is parsed by an
//! independent MIME parser (`mail-parser`), and its header set must be exactly the one baton
//! writes for a benign recipient.

use std::collections::BTreeMap;
use std::path::Path;

use baton::sql::Value;

use crate::support::{Backend, Harness, Rig, Setup, User, newsletter_job};

/// Every `.eml` in `dir`, parsed: (To address, header names in order, subject, the raw text).
pub fn parse_outbox(dir: &Path) -> Vec<(String, Vec<String>, String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "eml") {
            continue;
        }
        let raw = std::fs::read(&path).unwrap();
        let message = mail_parser::MessageParser::default().parse(&raw).expect("parses as MIME");
        let names: Vec<String> = message.headers().iter().map(|h| h.name().to_owned()).collect();
        let to = message.to().and_then(|a| a.first()).and_then(|a| a.address()).unwrap_or_default().to_owned();
        let subject = message.subject().unwrap_or_default().to_owned();
        let text = message.body_text(0).map(|t| t.into_owned()).unwrap_or_default();
        out.push((to, names, subject, text));
    }
    out
}

/// The header set every message must have: exactly these, each once.
pub fn assert_exact_headers(messages: &[(String, Vec<String>, String, String)]) {
    let expected = [
        "From",
        "To",
        "Subject",
        "Message-ID",
        "Date",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
    ];
    for (to, names, ..) in messages {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for n in names {
            *counts.entry(n.to_ascii_lowercase()).or_default() += 1;
        }
        for (name, n) in &counts {
            assert!(
                expected.iter().any(|e| e.eq_ignore_ascii_case(name)),
                "message to {to} has an unexpected header {name}: {names:?}"
            );
            assert_eq!(*n, 1, "message to {to} has {name} {n} times: {names:?}");
        }
        for e in ["From", "To", "Subject", "List-Unsubscribe", "List-Unsubscribe-Post"] {
            assert!(counts.contains_key(&e.to_ascii_lowercase()), "message to {to} lacks {e}: {names:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_cannot_inject_headers() {
    let mut names = baton::cli::demo::hostile_names();
    names.push("Zoë O'Brien".into());
    let mut users: Vec<User> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (Value::Int(i as i64 + 1), Some(format!("user{}@example.com", i + 1)), n.clone()))
        .collect();
    // Addresses that try the same, and one that needs IDNA.
    users.push((Value::Int(100), Some("a@example.com\r\nBcc: bcc@evil.example".into()), "Addr".into()));
    users.push((Value::Int(101), Some("zoë@example.com".into()), "Utf8 local part".into()));
    users.push((Value::Int(102), Some("idna@bücher.example".into()), "Idna".into()));
    let mut job = newsletter_job(5, 2);
    job.newsletter.as_mut().unwrap().subject = "Hi {{ recipient.name }}!".into();
    let h = Harness::with_users(Backend::Sqlite, &users, Setup::new(job)).await;
    let run_id = h.start().await;
    let status = h.drive(&run_id).await;
    assert_eq!(status.status, baton::engine::state::RunState::Succeeded, "{status:?}");
    assert_eq!((status.done, status.skipped), (names.len() as i64 + 1, 2), "{status:?}");

    let messages = parse_outbox(&h.outbox_dir);
    assert_eq!(messages.len(), names.len() + 1);
    assert_exact_headers(&messages);
    for (i, name) in names.iter().enumerate() {
        let to = format!("user{}@example.com", i + 1);
        let (_, _, subject, text) = messages.iter().find(|m| m.0 == to).unwrap_or_else(|| panic!("no mail to {to}"));
        // The subject is the name with its control characters folded into spaces; the body
        // carries the name as it is (a body cannot inject headers).
        let expected = baton::mail::header_text(&format!("Hi {name}!"));
        assert_eq!(subject, &expected, "subject for {name:?}");
        let flat = |s: &str| s.replace(['\r', '\n'], "");
        assert!(flat(text).contains(&flat(name)), "the body carries {name:?} as data: {text:?}");
        assert!(!subject.contains(['\r', '\n', '\0']), "{subject:?}");
    }
    assert!(messages.iter().any(|m| m.0 == "idna@xn--bcher-kva.example"), "the IDNA domain goes out as punycode");
    let skipped = h.engine().items_in_state(&run_id, "skipped", 10).await.unwrap();
    assert!(
        skipped.iter().any(|(k, r)| k == "101" && r.as_deref().unwrap_or_default().contains("SMTPUTF8")),
        "{skipped:?}"
    );
    assert!(
        skipped.iter().any(|(k, r)| k == "100" && r.as_deref().unwrap_or_default().contains("white space")),
        "{skipped:?}"
    );
}

#[test]
fn every_message_of_a_demo_run_has_exactly_the_intended_headers() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["demo", "--users", "3000", "--json", "--data-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let messages = parse_outbox(&dir.path().join("outbox"));
    assert!(messages.len() > 2900, "{}", messages.len());
    assert_exact_headers(&messages);
    let hostile = baton::cli::demo::hostile_names();
    for name in &hostile[..hostile.len() - 1] {
        let subject = baton::mail::header_text(&format!("{name}, your December update"));
        assert!(messages.iter().any(|m| m.2 == subject), "no message with the subject {subject:?}");
    }
}
