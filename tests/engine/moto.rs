//! SES v2 against moto, an independent implementation of the API (started by
//! `scripts/with-moto`, which `scripts/test` uses): messages land in moto's store, exactly once
//! each, and an unverified sender is a clear, permanent error.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use baton::adapters::aws::ses::SesMailer;
use baton::adapters::local::faults::Faults;
use baton::compose::Adapters;
use baton::config::Config;
use baton::engine::Outcome;
use baton::ports::{MailError, Mailer, OutgoingMail};
use baton::runtime::LocalRuntime;

use crate::fakes::sdk_config;
use crate::support::{
    Backend, JOB, KeyKind, create_users, fake_aws_env, fresh_store, int_users, newsletter_job, test_settings,
};

pub fn moto_url() -> String {
    std::env::var("BATON_TEST_MOTO_URL")
        .expect("BATON_TEST_MOTO_URL is not set: run the suite with `scripts/test` (it starts a throwaway moto)")
}

pub async fn verify_sender(url: &str, address: &str) {
    let client = aws_sdk_sesv2::Client::new(&sdk_config(url));
    client.create_email_identity().email_identity(address).send().await.expect("moto creates the identity");
}

/// Recipients of the messages moto accepted from `source`, from `/moto-api/data.json`.
pub async fn moto_sent_from(url: &str, source: &str) -> Vec<String> {
    let body = tokio::task::spawn_blocking({
        let url = format!("{url}/moto-api/data.json");
        move || {
            let out = Command::new("python3")
                .args(["-c", &format!("import urllib.request; print(urllib.request.urlopen('{url}').read().decode())")])
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap()
        }
    })
    .await
    .unwrap();
    let data: serde_json::Value = serde_json::from_str(&body).expect("moto's data.json");
    data["ses"]["RawMessage"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|m| m["source"] == source)
        .map(|m| m["destinations"][0].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_delivers_every_message_into_moto_exactly_once() {
    let url = moto_url();
    verify_sender(&url, "news@example.com").await;
    let dir = tempfile::tempdir().unwrap();
    let store = fresh_store(Backend::Sqlite, dir.path()).await;
    let users = int_users(300);
    create_users(store.as_ref(), Backend::Sqlite, KeyKind::Int, &users).await;
    let mailer = SesMailer::new(SesMailer::client_from(&sdk_config(&url)), None);
    // moto is a Python server: give hops a budget a real SES call would also need.
    let mut settings = test_settings();
    settings.hop_timeout = Duration::from_secs(3);
    settings.hop_margin = Duration::from_secs(1);
    let config = Config { settings, jobs: [(JOB.to_owned(), newsletter_job(25, 3))].into() };
    let local = LocalRuntime::start(Adapters {
        faults: Faults { duplicate_hop: 0.2, ..Faults::default() },
        seed: 3,
        ..Adapters::new(store, Arc::new(mailer), config)
    });
    let Outcome::Started { run_id, .. } = local.engine.start(JOB, Some("moto")).await.unwrap() else { panic!() };
    let status = tokio::time::timeout(Duration::from_secs(60), local.drive(&run_id, false)).await.unwrap().unwrap();
    assert_eq!(status.status, "succeeded", "{status:?}");
    let sent = moto_sent_from(&url, "news@example.com").await;
    let mut per: HashMap<&str, usize> = HashMap::new();
    for a in &sent {
        *per.entry(a.as_str()).or_default() += 1;
    }
    for (_, email, _) in &users {
        let email = email.as_deref().unwrap();
        let expected = usize::from(baton::mail::check_address(email).is_ok());
        assert_eq!(per.get(email).copied().unwrap_or(0), expected, "{email}");
    }
    // Sends still in flight at a hop's cut-off are `unknown`: delivered at most once.
    let (done, unknown) = (status.done as usize, status.unknown as usize);
    assert!(
        done <= sent.len() && sent.len() <= done + unknown,
        "{done} done, {unknown} unknown, {} in moto",
        sent.len()
    );
}

#[tokio::test]
async fn an_unverified_sender_is_a_clear_permanent_error() {
    let url = moto_url();
    let mailer = SesMailer::new(SesMailer::client_from(&sdk_config(&url)), None);
    let mail = OutgoingMail {
        from: "nobody@unverified.example".into(),
        to: "a@example.com".into(),
        message_id: "x@unverified.example".into(),
        raw: b"From: nobody@unverified.example\r\nTo: a@example.com\r\nSubject: hi\r\n\r\nhello".to_vec(),
        tags: vec![],
    };
    match mailer.send(&mail).await {
        Err(MailError::Permanent(message)) => {
            assert!(message.contains("MessageRejected") && message.to_lowercase().contains("verified"), "{message}")
        }
        other => panic!("expected a permanent rejection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baton_demo_with_the_ses_mailer_delivers_into_moto() {
    let url = moto_url();
    verify_sender(&url, "news@baton.example").await;
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking({
        let (url, data) = (url.clone(), dir.path().to_str().unwrap().to_owned());
        move || {
            fake_aws_env(&mut Command::new(env!("CARGO_BIN_EXE_baton")))
                .args(["demo", "--users", "400", "--chains", "3", "--mailer", "ses", "--hop-timeout", "5s", "--json"])
                .args(["--data-dir", &data])
                .env("AWS_ENDPOINT_URL_SESV2", &url)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let done = summary["run"]["done"].as_u64().unwrap() as usize;
    let unknown = summary["run"]["unknown"].as_u64().unwrap() as usize;
    let sent = moto_sent_from(&url, "news@baton.example").await;
    let unique: std::collections::HashSet<_> = sent.iter().collect();
    assert_eq!(unique.len(), sent.len(), "nobody twice");
    // Every demo user but those the demo suppressed first (the first invalid synthetic address
    // is user 997).
    let suppressed = summary["suppressed_users"].as_u64().unwrap() as usize;
    assert!(suppressed > 0, "{summary}");
    assert_eq!(sent.len(), 400 - suppressed, "every demo user not suppressed is in moto");
    assert!(done <= sent.len() && sent.len() <= done + unknown, "{done} done, {unknown} unknown");
}
