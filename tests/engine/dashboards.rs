//! The dashboards in `dashboards/` ask only for what baton emits: every metric they chart is
//! one a hop writes (or Lambda's and SQS's own), and every SQL query of the Grafana dashboard
//! runs on a real PostgreSQL server against baton's migrated tables.

use std::collections::HashSet;
use std::time::Duration;

use baton::engine::metrics::HopMetrics;
use baton::lambda::{HopFigures, hop_metric_values};
use baton::sql::{Params, Stmt};
use serde_json::Value;

use crate::support::{Backend, Harness, Rig, Setup, int_users, newsletter_job};

fn load(path: &str) -> Value {
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not valid JSON: {e}"))
}

/// The metric names a hop's EMF line carries.
fn emitted() -> HashSet<String> {
    let metrics = HopMetrics::default();
    let figures = HopFigures {
        run_id: "r",
        chain: 0,
        hop: 1,
        metrics: &metrics,
        took: Duration::from_millis(1),
        duplicate: false,
        failed: false,
    };
    hop_metric_values(&figures).into_iter().map(|(name, _, _)| name.to_owned()).collect()
}

const LAMBDA_METRICS: [&str; 7] =
    ["Invocations", "Errors", "Throttles", "Duration", "ConcurrentExecutions", "AsyncEventAge", "AsyncEventsDropped"];

#[test]
fn the_cloudwatch_dashboard_charts_only_metrics_baton_and_lambda_emit() {
    let dashboard = load("dashboards/cloudwatch/baton.json");
    let emitted = emitted();
    let widgets = dashboard["widgets"].as_array().expect("a dashboard body has widgets");
    let mut charted = HashSet::new();
    for w in widgets {
        for key in ["x", "y", "width", "height"] {
            assert!(w[key].is_u64(), "widget without {key}: {w}");
        }
        let Some(rows) = w["properties"]["metrics"].as_array() else { continue };
        let (mut namespace, mut name) = (String::new(), String::new());
        for row in rows {
            // `"."` repeats the previous row's value, as CloudWatch reads it.
            let at = |i: usize, prev: &str| match row[i].as_str() {
                Some(".") | None => prev.to_owned(),
                Some(v) => v.to_owned(),
            };
            namespace = at(0, &namespace);
            name = at(1, &name);
            match namespace.as_str() {
                "${MetricsNamespace}" => assert!(emitted.contains(&name), "{name} is not a metric baton emits"),
                "AWS/Lambda" => assert!(LAMBDA_METRICS.contains(&name.as_str()), "{name}"),
                "AWS/SQS" => assert_eq!(name, "ApproximateNumberOfMessagesVisible"),
                other => panic!("unexpected namespace {other}"),
            }
            charted.insert(name.clone());
        }
    }
    for name in LAMBDA_METRICS.iter().map(|n| n.to_string()).chain(emitted) {
        assert!(charted.contains(&name), "the dashboard does not chart {name}");
    }
    // The log widget's query reads properties every EMF line has.
    let query = widgets.iter().find_map(|w| w["properties"]["query"].as_str()).expect("a Logs Insights widget");
    for field in ["run_id", "chain", "hop", "HopErrors"] {
        assert!(query.contains(field), "{query}");
    }
}

/// Every SQL query of the Grafana dashboard (panels and template variables) runs on baton's
/// tables after a real run, on PostgreSQL (the database its data source points at); its
/// CloudWatch panels ask for metrics baton emits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_asks_only_for_what_baton_has() {
    let b = Backend::Postgres;
    let dashboard = load("dashboards/grafana/baton.json");
    let variables: Vec<&str> =
        dashboard["templating"]["list"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
    for needed in ["cloudwatch", "postgres", "tempo", "xray", "region", "function", "job", "run", "chain"] {
        assert!(variables.contains(&needed), "no `{needed}` variable: {variables:?}");
    }
    let emitted = emitted();
    let (tracing, exporter, _provider) = crate::traces::collected();
    let mut setup = Setup::new(newsletter_job(10, 2));
    setup.tracing = tracing;
    let h = Harness::with_users(b, &int_users(30), setup).await;
    let run = h.start().await;
    h.drive(&run).await;
    let fill = |sql: &str| {
        sql.replace("$run", &run)
            .replace("$job", crate::support::JOB)
            .replace("$stale_after_s", "300")
            .replace("$chain", "0")
    };
    let mut queries: Vec<(String, String)> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| (v["name"].as_str().unwrap().to_owned(), fill(v["query"].as_str().unwrap())))
        .collect();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(sql) = target["rawSql"].as_str() {
                queries.push((panel["title"].as_str().unwrap().to_owned(), fill(sql)));
            }
            if target["namespace"] == "$namespace" {
                let name = target["metricName"].as_str().unwrap();
                assert!(emitted.contains(name), "{name} is not a metric baton emits");
            }
        }
    }
    check_trace_searches(&dashboard, &exporter.get_finished_spans().unwrap());
    assert!(queries.len() >= 5, "{queries:?}");
    for (title, sql) in queries {
        let rows = h.store.query(Stmt::new(sql.clone(), Params::new())).await;
        let rows = rows.unwrap_or_else(|e| panic!("{title}: {e}\n{sql}"));
        assert!(!rows.columns.is_empty(), "{title}: {sql}");
        // The figures are the run's, not only well-formed SQL.
        let count = rows.rows.len();
        match title.as_str() {
            "job" | "run" => assert_eq!(count, 1, "{title}: {rows:?}"),
            "Run progress" => {
                let progress = rows.first().unwrap();
                assert_eq!(progress.text("status").unwrap().as_deref(), Some("succeeded"), "{rows:?}");
                let settled: i64 =
                    ["done", "failed", "skipped", "unknown"].iter().map(|c| progress.int(c).unwrap()).sum();
                assert_eq!(settled, 30, "every item counted once: {rows:?}");
                assert!(progress.int("done").unwrap() >= 29, "{rows:?}");
                assert_eq!(progress.int("total").unwrap(), 30, "{rows:?}");
            }
            "Heartbeat age per chain (seconds)" => assert_eq!(count, 2, "one row per chain: {rows:?}"),
            // A finished run has no active chain, so none is stuck.
            t if t.starts_with("Stuck chains") => {
                assert_eq!(count, 0, "{rows:?}");
                assert!(rows.columns.contains(&"last_trace_id".to_owned()), "{rows:?}");
            }
            other => panic!("a query this test does not know: {other}"),
        }
    }
}

/// The trace searches (Tempo's TraceQL, X-Ray's filter expressions) ask only for attributes the
/// hop spans of a real run carry, and X-Ray's only for those the spans list as annotations.
fn check_trace_searches(dashboard: &Value, spans: &[opentelemetry_sdk::trace::SpanData]) {
    let hop = spans.iter().find(|s| s.name == "hop").expect("the run's hop spans were collected");
    let has = |key: &str| hop.attributes.iter().any(|kv| kv.key.as_str() == key);
    let annotations = crate::traces::attr(hop, "aws.xray.annotations").map(|v| v.to_string()).unwrap_or_default();
    let (mut tempo, mut xray) = (0, 0);
    for target in
        dashboard["panels"].as_array().unwrap().iter().flat_map(|p| p["targets"].as_array().into_iter().flatten())
    {
        let query = target["query"].as_str().unwrap_or_default();
        match target["datasource"]["type"].as_str() {
            Some("tempo") => {
                tempo += 1;
                for word in query.split(|c: char| !(c.is_alphanumeric() || c == '.' || c == '_')) {
                    if let Some(attribute) = word.strip_prefix("span.") {
                        assert!(has(attribute), "{attribute} is not an attribute of a hop span: {query}");
                    }
                }
            }
            Some("grafana-x-ray-datasource") => {
                xray += 1;
                for word in query.split_whitespace() {
                    if let Some(annotation) = word.strip_prefix("annotation.") {
                        let attribute = annotation.replacen('_', ".", 1);
                        assert!(has(&attribute), "{attribute} is not an attribute of a hop span");
                        assert!(annotations.contains(&attribute), "{attribute} is not indexed by X-Ray: {annotations}");
                    }
                }
            }
            _ => {}
        }
    }
    assert!(tempo >= 1 && xray >= 1, "a trace search in Tempo and in X-Ray");
}
