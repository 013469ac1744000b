//! The built binary in Lambda mode, against the loopback emulator of `emulator.rs`: the Lambda
//! Runtime API (it polls `/next`, posts responses and errors), Lambda `Invoke` (each hop the
//! binary invokes is queued back into the runtime, as Lambda's async queue would), and SES v2
//! (`SendEmail`, `GetAccount`). State lives in the test PostgreSQL server.

use std::sync::Arc;
use std::time::Duration;

use baton::sql::{Params, Stmt};
use opentelemetry_proto::tonic::trace::v1::Span;

use crate::emulator::{self, Emulator};
use crate::fakes::FakeSes;
use crate::support::{int_users, pg_with_users};

/// A string, int or bool attribute of a span, as text.
pub fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let value = span.attributes.iter().find(|a| a.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match value {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_lambda_events_start_hops_and_malformed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _name, database_url) = pg_with_users(dir.path(), &int_users(120)).await;
    let config = dir.path().join("baton.toml");
    std::fs::write(
        &config,
        r#"
[settings]
hop_timeout = "2s"
hop_margin = "800ms"
max_pages_per_hop = 1

[jobs.news]
kind = "newsletter"
source = "SELECT id, email, name FROM users"
page_size = 20
chains = 2

[jobs.news.newsletter]
from = "News <news@example.com>"
subject = "Hello {{ recipient.name }}"
text = "Hi. {{ unsubscribe_url }}"
unsubscribe_url = "https://example.com/u"
"#,
    )
    .unwrap();

    let ses = Arc::new(FakeSes { max_send_rate: 2000.0, ..Default::default() });
    let (em, addr) = emulator::serve(ses.clone()).await;
    let lambda = emulator::launch(
        std::path::Path::new(env!("CARGO_BIN_EXE_baton")),
        addr,
        &[
            ("BATON_CONFIG", config.display().to_string()),
            ("BATON_STORE", "postgres".into()),
            ("BATON_DATABASE_URL", database_url.clone()),
            ("BATON_UNSUBSCRIBE_SECRET", "0123456789abcdef-lambda".into()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
        ],
    );
    let stdout_lines = lambda.stdout.clone();

    // Malformed and unknown events are answered with baton's own error (a stable errorType and
    // a message naming the problem) and change nothing. Failed before the fix: `not json` and
    // an empty payload got the runtime's own deserialisation error, errorType a Rust type name,
    // and a 100 KB run key was blamed on the job's source.
    let long_key = format!(r#"{{"type":"start","job":"news","run_key":"{}"}}"#, "k".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("not JSON", b"not json".to_vec(), "baton.BadEvent", "not JSON"),
        ("empty payload", Vec::new(), "baton.BadEvent", "the payload is empty"),
        ("JSON array", b"[]".to_vec(), "baton.BadEvent", "malformed event"),
        ("unknown type", br#"{"type":"explode"}"#.to_vec(), "baton.BadEvent", "malformed event"),
        (
            "start without a time or key",
            br#"{"type":"start","job":"news"}"#.to_vec(),
            "baton.BadEvent",
            "scheduled_time",
        ),
        (
            "start with a bad scheduled_time",
            br#"{"type":"start","job":"news","scheduled_time":"yesterday"}"#.to_vec(),
            "baton.BadEvent",
            "RFC 3339",
        ),
        ("run key of 100 KB", long_key.into_bytes(), "baton.BadEvent", "at most 64"),
        (
            "run key with CRLF",
            br#"{"type":"start","job":"news","run_key":"a\r\nb"}"#.to_vec(),
            "baton.BadEvent",
            "run_key",
        ),
        (
            "start of an unknown job",
            br#"{"type":"start","job":"nope","run_key":"x"}"#.to_vec(),
            "baton.BadConfig",
            "no job named `nope`",
        ),
        (
            "hop of an unknown run",
            br#"{"type":"hop","run_id":"nope","chain":0,"hop":1}"#.to_vec(),
            "baton.RunNotFound",
            "no run with id",
        ),
        (
            "hop with a negative chain",
            br#"{"type":"hop","run_id":"x","chain":-1,"hop":1}"#.to_vec(),
            "baton.BadEvent",
            "integer `-1`, expected u32",
        ),
        (
            "hop with an extra field",
            br#"{"type":"hop","run_id":"x","chain":0,"hop":1,"x":1}"#.to_vec(),
            "baton.BadEvent",
            "unknown field",
        ),
        (
            "control with an unknown action",
            br#"{"type":"control","run_id":"x","action":"explode"}"#.to_vec(),
            "baton.BadEvent",
            "explode",
        ),
        (
            "control of an unknown run",
            br#"{"type":"control","run_id":"nope","action":"pause"}"#.to_vec(),
            "baton.RunNotFound",
            "no run with id",
        ),
    ];
    let mut table =
        vec!["| class | input | exit | message | state changed |".to_owned(), "|---|---|---|---|---|".to_owned()];
    for (what, payload, error_type, says) in &cases {
        let id = em.enqueue(payload);
        let (ok, body) = em.result(&id).await;
        let error: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
        let mut changed = false;
        for table in ["baton_runs", "baton_pages", "baton_chains", "baton_ledger"] {
            let rows =
                store.query(Stmt::new(format!("SELECT COUNT(*) AS n FROM {table}"), Params::new())).await.unwrap();
            changed |= rows.first().unwrap().int("n").unwrap() != 0;
        }
        let message = error["errorMessage"].as_str().unwrap_or_default();
        table.push(format!(
            "| lambda | {what} | {} | {} | {} |",
            error["errorType"].as_str().unwrap_or_default(),
            message.chars().take(150).collect::<String>().replace('|', "\\|"),
            if changed { "YES" } else { "no" }
        ));
        assert!(!ok, "{what}: accepted");
        assert_eq!(error["errorType"], *error_type, "{what}: {body}");
        assert!(message.contains(says), "{what}: `{says}` not in {message}");
        assert!(!changed, "{what} changed state");
    }
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bad-input-lambda.md");
    std::fs::write(path, table.join("\n") + "\n").unwrap();

    // A start plans the run and invokes hop 1 of each chain through Invoke; the hops run in the
    // binary through the runtime API until the run is done.
    let start = em.enqueue(br#"{"type":"start","job":"news","run_key":"2026-12"}"#);
    let (ok, body) = em.result(&start).await;
    assert!(ok, "{body}");
    let started: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(started["outcome"], "started");
    assert_eq!(started["items"], 120);
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let rows = store.query(Stmt::new("SELECT status FROM baton_runs", Params::new())).await.unwrap();
        if rows.first().and_then(|r| r.text("status").unwrap()).as_deref() == Some("succeeded") {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "the run did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = ses.sent.lock().unwrap().clone();
    let unique: std::collections::HashSet<_> = sent.iter().collect();
    assert_eq!(sent.len(), 120 - 4, "every valid user once (every 25th address is invalid)");
    assert_eq!(unique.len(), sent.len());
    assert!(*em.invokes.lock().unwrap() >= 6, "chains hopped through Invoke, one page per hop");
    // Every hop is its own trace: no Invoke carried the invocation's X-Ray header, which would
    // feed Lambda's recursive-loop detection (failed before the fix: every Invoke carried it).
    let traced = em.trace_headers.lock().unwrap().clone();
    assert!(traced.is_empty(), "Invoke requests carried X-Amzn-Trace-Id: {traced:?}");
    // ... and the hop's W3C trace context travels in the payload instead.
    let invoked = em.invoked.lock().unwrap().clone();
    for event in &invoked {
        let traceparent = event["traceparent"].as_str().unwrap_or_else(|| panic!("no traceparent: {event}"));
        assert!(baton::engine::trace::parse(traceparent).is_some(), "not a W3C traceparent: {traceparent}");
    }
    check_exported_spans(&em, &invoked).await;

    // One CloudWatch EMF line per hop, whose figures add up to the run.
    let lines = stdout_lines.lock().unwrap().clone();
    let emf: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("_aws").is_some())
        .collect();
    assert!(emf.iter().all(|v| v["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "baton"), "{emf:?}");
    // Hops of the malformed cases above have a line too (`HopErrors`), under job `unknown`.
    let emf: Vec<_> = emf.into_iter().filter(|v| v["job"] == "news").collect();
    assert!(emf.len() >= 6, "one metric line per hop: {lines:?}");
    let sum = |name: &str| emf.iter().map(|v| v[name].as_f64().unwrap()).sum::<f64>();
    assert_eq!(sum("ItemsDone"), 116.0, "{emf:?}");
    assert_eq!(sum("ItemsSkipped"), 4.0, "{emf:?}");

    // The same binary answers the unsubscribe link (a Function URL request: an HTTP answer,
    // never a Lambda error) and SES events from EventBridge (a malformed one is an error).
    use crate::suppression::{complaint, link_query, one_click};
    let query = link_query("user18@example.com", "0123456789abcdef-lambda", "news");
    let (ok, body) = em.result(&em.enqueue(one_click(&query).to_string().as_bytes())).await;
    assert!(ok, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["statusCode"], 200, "{answer}");
    let forged = query.replace("sig=", "sig=x");
    let (ok, body) = em.result(&em.enqueue(one_click(&forged).to_string().as_bytes())).await;
    assert!(ok && body.contains("\"statusCode\":400"), "{body}");
    let run_id = started["run_id"].as_str().unwrap();
    let (ok, body) =
        em.result(&em.enqueue(complaint("user31@example.com", "f-1", Some(run_id)).to_string().as_bytes())).await;
    assert!(ok, "{body}");
    let mut broken = complaint("user44@example.com", "f-2", Some(run_id));
    broken["detail"].as_object_mut().unwrap().remove("complaint");
    let (ok, body) = em.result(&em.enqueue(broken.to_string().as_bytes())).await;
    assert!(!ok && body.contains("baton.BadEvent"), "{body}");
    let rows = store
        .query(Stmt::new("SELECT address, scope, reason FROM baton_suppressions ORDER BY address", Params::new()))
        .await
        .unwrap();
    let rows: Vec<String> = rows.records().map(|r| r.text("address").unwrap().unwrap()).collect();
    assert_eq!(rows, vec!["user18@example.com", "user31@example.com"]);
    // SES events map back to the run through the message tags baton sets.
    let tags = ses.tags.lock().unwrap().clone();
    let expected = serde_json::json!({"Name": "run_id", "Value": run_id});
    assert!(tags.iter().all(|t| t.as_array().is_some_and(|t| t.contains(&expected))), "{tags:?}");
    let counted = store
        .query(Stmt::new(
            "SELECT COUNT(*) AS n FROM baton_mail_events WHERE run_id = :r",
            Params::new().with("r", run_id),
        ))
        .await
        .unwrap();
    assert_eq!(counted.first().unwrap().int("n").unwrap(), 1);
}

/// The spans the binary exported over OTLP/HTTP (flushed before each invocation returned): one
/// trace per invocation, whose root carries the FaaS attributes and links to the hop that
/// invoked it, and per-statement spans by name.
async fn check_exported_spans(em: &Emulator, invoked: &[serde_json::Value]) {
    // The last hop's flush may land just after the run's row says `succeeded`.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let hop_spans = || em.spans.lock().unwrap().iter().filter(|s| s.name == "hop").count();
    while hop_spans() < invoked.len() && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spans = em.spans.lock().unwrap().clone();
    let roots: Vec<&Span> = spans.iter().filter(|s| s.parent_span_id.is_empty()).collect();
    let hops: Vec<&Span> = roots.iter().copied().filter(|s| s.name == "hop").collect();
    let failed = |s: &Span| s.status.as_ref().is_some_and(|st| st.code == 2);
    let start = roots.iter().find(|s| s.name == "start" && !failed(s)).expect("the start's span was exported");
    assert!(hops.len() >= invoked.len(), "{} hop spans for {} invokes", hops.len(), invoked.len());
    for root in &roots {
        for key in ["faas.invocation_id", "faas.trigger", "cloud.resource_id", "faas.coldstart"] {
            assert!(attribute(root, key).is_some(), "root span {} has no {key}", root.name);
        }
        assert_eq!(
            attribute(root, "cloud.resource_id").unwrap(),
            "arn:aws:lambda:eu-west-1:123456789012:function:baton"
        );
    }
    // Every hop that ran is linked to the span whose traceparent its event carried, and to the
    // run's start; its trace is its own.
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    for hop in hops.iter().filter(|h| attribute(h, "baton.job").is_some()) {
        let linked: Vec<String> = hop.links.iter().map(|l| hex(&l.span_id)).collect();
        assert!(linked.contains(&hex(&start.span_id)), "hop {:?} not linked to the start", attribute(hop, "baton.hop"));
        assert_ne!(hop.trace_id, start.trace_id, "a hop is its own trace");
        let number: i64 = attribute(hop, "baton.hop").unwrap().parse().unwrap();
        let chain = attribute(hop, "baton.chain").unwrap();
        let previous = invoked
            .iter()
            .find(|e| e["hop"] == number && e["chain"].as_i64() == chain.parse::<i64>().ok())
            .and_then(|e| e["traceparent"].as_str())
            .expect("an Invoke for every hop");
        let previous = baton::engine::trace::parse(previous).unwrap().span_id().to_string();
        assert!(linked.contains(&previous), "hop {number} of chain {chain}: {linked:?} lacks {previous}");
    }
    // Statements are child spans, by name.
    for name in ["start_hop", "claim_page", "record_results"] {
        assert!(spans.iter().any(|s| s.name == name && !s.parent_span_id.is_empty()), "no `{name}` span");
    }
    assert!(spans.iter().any(|s| s.name == "mail batch" && attribute(s, "baton.items.done").is_some()));
}
