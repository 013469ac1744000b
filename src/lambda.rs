//! Lambda mode: the binary as a Lambda bootstrap (`provided.al2023`). Chosen by `main` when
//! `AWS_LAMBDA_RUNTIME_API` is set. The engine and its SDK clients are built once per sandbox;
//! each invocation decodes the serde-tagged event and routes it. A malformed or unknown event is
//! rejected with a clear error before anything runs.
//!
//! Settings come from the environment only, read by the composition root
//! ([`crate::compose::AdapterSettings::from_env`]; README.md, "Lambda mode"), plus
//! `BATON_CONFIG`, the job file baked into the image (default `/var/task/baton.toml`), with
//! `BATON_CONFIG_OVERRIDES` merged over it, and the unsubscribe key from the Secrets Manager
//! secret `BATON_UNSUBSCRIBE_SECRET_ARN` names.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lambda_runtime::tower::{Layer, Service};
use lambda_runtime::{Diagnostic, LambdaEvent, LambdaInvocation, service_fn};
use opentelemetry::KeyValue;
use tokio::time::Instant;

use crate::adapters::aws::secrets::{self, UNSUBSCRIBE_SECRET_ARN_VAR};
use crate::compose::{self, AdapterSettings, Aws, ComposeError};
use crate::config::{Config, ConfigError};
use crate::engine::event::{Event, EventError};
use crate::engine::metrics::{self, HopMetrics};
use crate::engine::suppression::MailEvent;
use crate::engine::{Engine, EngineError, Outcome};
use crate::inbound::{self, Inbound};
use crate::telemetry::{Telemetry, TelemetryError, TraceSettings};

/// Why a sandbox could not start: its settings name the fix.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Compose(#[from] ComposeError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
}

/// Lambda mode's entry: logs to stdout without timestamps (CloudWatch adds them), then the
/// runtime loop until the sandbox ends.
pub fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).without_time().with_ansi(false).try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(serve()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the engine from the environment: every setting is checked here, at sandbox start,
/// and an error names the variable.
pub async fn engine_from_env() -> Result<Arc<Engine>, StartupError> {
    let config_path = std::env::var("BATON_CONFIG").unwrap_or_else(|_| "/var/task/baton.toml".into());
    let mut config = Config::load(std::path::Path::new(&config_path))?;
    let aws = Aws::default();
    if let Some(id) = std::env::var(UNSUBSCRIBE_SECRET_ARN_VAR).ok().filter(|v| !v.is_empty()) {
        let client = aws_sdk_secretsmanager::Client::new(aws.config().await);
        let secret = secrets::secret_string(&client, &id).await?;
        config.provide_unsubscribe_secret(&secret, UNSUBSCRIBE_SECRET_ARN_VAR)?;
    }
    let runtime = compose::build(&AdapterSettings::from_env()?, config, true, &aws).await?;
    Ok(runtime.engine().clone())
}

/// The invocation's deadline as an `Instant`: the earlier of Lambda's and now + `hop_timeout`
/// (leases derive from `hop_timeout`, so no hop may outlive it even when the function timeout
/// is longer); the configured budget alone when the context has no deadline or one already past.
pub fn deadline_from(lambda_deadline: Option<SystemTime>, hop_timeout: Duration) -> Instant {
    let left = lambda_deadline
        .and_then(|d| d.duration_since(SystemTime::now()).ok())
        .filter(|left| !left.is_zero())
        .map_or(hop_timeout, |left| left.min(hop_timeout));
    Instant::now() + left
}

/// Said once per sandbox: a function timeout shorter than `hop_timeout` is safe (hops end
/// sooner) but makes the run's hop budget, derived from `hop_timeout`, too small.
fn check_function_timeout(lambda_deadline: Option<SystemTime>, hop_timeout: Duration) -> Option<String> {
    let left = lambda_deadline?.duration_since(SystemTime::now()).ok()?;
    (left + Duration::from_secs(1) < hop_timeout).then(|| {
        format!(
            "the function timeout (about {}s) is shorter than settings.hop_timeout ({}s): hops end early and \
             hop budgets are too small; set hop_timeout to the function timeout",
            left.as_secs(),
            hop_timeout.as_secs()
        )
    })
}

/// Time kept between the end of a span flush and the invocation's deadline.
const FLUSH_MARGIN: Duration = Duration::from_millis(100);

/// The key under which [`RawPayload`] hands over a payload that is not JSON at all.
const UNPARSABLE: &str = "__baton_unparsable_payload";

/// Handles one invocation's payload; `invocation` holds the attributes of its trace's root
/// span that only Lambda knows ([`faas_attributes`]).
pub async fn handle(
    engine: &Engine,
    payload: serde_json::Value,
    deadline: Instant,
    mut invocation: Vec<KeyValue>,
) -> Result<serde_json::Value, EngineError> {
    if let Some(why) = payload.get(UNPARSABLE).and_then(|v| v.as_str()) {
        return Err(EventError::Malformed(why.to_owned()).into());
    }
    match Inbound::classify(&payload) {
        Inbound::FunctionUrl(request) => return Ok(function_url_answer(engine, request, invocation).await),
        Inbound::Ses(event) => return ses_event(engine, event, invocation).await,
        Inbound::Baton => {}
    }
    let bytes = serde_json::to_vec(&payload).expect("JSON values serialise");
    let event = Event::parse(&bytes)?;
    let hop = match &event {
        Event::Hop { run_id, chain, hop, .. } => Some((run_id.clone(), *chain, *hop)),
        _ => None,
    };
    // Schedules fire `start` and `sweep`; hops and control come from Invoke.
    let trigger = if matches!(event, Event::Start { .. } | Event::Sweep {}) { "timer" } else { "other" };
    invocation.push(KeyValue::new("faas.trigger", trigger));
    let started = Instant::now();
    let (outcome, metrics) = metrics::measured(engine.handle_traced(event, deadline, invocation)).await;
    if let Ok(Outcome::Swept(report)) = &outcome {
        println!("{}", sweep_emf_line(report));
    }
    if let Some((run_id, chain, hop)) = hop {
        let took = started.elapsed();
        let duplicate = matches!(outcome, Ok(Outcome::Duplicate));
        println!(
            "{}",
            emf_line(&HopFigures {
                run_id: &run_id,
                chain,
                hop,
                metrics: &metrics,
                took,
                duplicate,
                failed: outcome.is_err()
            })
        );
    }
    Ok(serde_json::to_value(outcome?).expect("outcomes serialise"))
}

/// A Function URL request: the one-click unsubscribe endpoint. Always an HTTP answer (a
/// Lambda error would show the caller a bare 502).
async fn function_url_answer(
    engine: &Engine,
    request: Result<inbound::HttpRequest, String>,
    mut invocation: Vec<KeyValue>,
) -> serde_json::Value {
    let request = match request {
        Ok(r) => r,
        Err(why) => return inbound::function_url::bad_request(&why),
    };
    invocation.push(KeyValue::new("faas.trigger", "http"));
    invocation.push(KeyValue::new("http.request.method", crate::engine::trace::bounded(&request.method, 16)));
    let answer = engine
        .in_root("unsubscribe", invocation, None, async {
            Ok::<_, EngineError>(inbound::unsubscribe::handle(engine, &request).await)
        })
        .await;
    let response = answer.unwrap_or_else(|_| unreachable!("the handler answers every request"));
    inbound::function_url::response(&response)
}

/// An SES event from EventBridge: recorded (and applied) once per recipient; a malformed one
/// fails the invocation with the reason (it goes to the on-failure destination) and changes
/// nothing.
async fn ses_event(
    engine: &Engine,
    event: Result<Option<MailEvent>, String>,
    mut invocation: Vec<KeyValue>,
) -> Result<serde_json::Value, EngineError> {
    let event = event.map_err(|why| EventError::Malformed(format!("SES event: {why}")))?;
    let Some(event) = event else {
        return Ok(serde_json::json!({ "outcome": "ignored", "why": "an SES event type baton does not act on" }));
    };
    invocation.push(KeyValue::new("faas.trigger", "pubsub"));
    invocation.push(KeyValue::new("baton.mail_event", event.kind.as_str()));
    let report = engine.in_root("mail_event", invocation, None, engine.record_mail_event(&event)).await?;
    tracing::info!(kind = event.kind.as_str(), key = event.key, ?report, "SES event recorded");
    let mut answer = serde_json::to_value(&report).expect("reports serialise");
    answer["outcome"] = "mail_event".into();
    Ok(answer)
}

/// The FaaS attributes of an invocation's root span: its request id, whether it is the
/// sandbox's first (a cold start) and the function's ARN.
pub fn faas_attributes(context: &lambda_runtime::Context, cold_start: bool) -> Vec<KeyValue> {
    vec![
        KeyValue::new("faas.invocation_id", context.request_id.clone()),
        KeyValue::new("faas.coldstart", cold_start),
        KeyValue::new("cloud.resource_id", context.invoked_function_arn.clone()),
    ]
}

/// One hop's figures for [`emf_line`].
pub struct HopFigures<'a> {
    pub run_id: &'a str,
    pub chain: u32,
    pub hop: u64,
    pub metrics: &'a HopMetrics,
    pub took: Duration,
    /// Another delivery already ran this hop.
    pub duplicate: bool,
    /// The invocation failed with an error.
    pub failed: bool,
}

/// The CloudWatch namespace of baton's metrics (`BATON_METRICS_NAMESPACE`, default `baton`).
fn metrics_namespace() -> String {
    std::env::var("BATON_METRICS_NAMESPACE").ok().filter(|n| !n.is_empty()).unwrap_or_else(|| "baton".into())
}

/// The names, units and values of a hop's metrics, in the order dashboards list them.
pub fn hop_metric_values(f: &HopFigures<'_>) -> Vec<(&'static str, &'static str, f64)> {
    let m = f.metrics;
    let secs = f.took.as_secs_f64().max(1e-3);
    let sent = (m.items_done + m.items_failed + m.items_unknown) as f64;
    vec![
        ("ItemsDone", "Count", m.items_done as f64),
        ("ItemsFailed", "Count", m.items_failed as f64),
        ("ItemsSkipped", "Count", m.items_skipped as f64),
        ("ItemsUnknown", "Count", m.items_unknown as f64),
        ("Pages", "Count", m.pages as f64),
        ("HopDuration", "Milliseconds", f.took.as_secs_f64() * 1000.0),
        ("SendsPerSecond", "Count/Second", sent / secs),
        ("Throttles", "Count", m.throttles as f64),
        ("SqlStatements", "Count", m.sql_statements as f64),
        ("DuplicateHops", "Count", f.duplicate as u8 as f64),
        ("HopErrors", "Count", f.failed as u8 as f64),
    ]
}

/// One CloudWatch Embedded Metric Format line: `values` (name, unit, value) under
/// `dimensions`, with `properties` (the dimensions' values and searchable context) beside them.
fn emf(values: &[(&str, &str, f64)], dimensions: serde_json::Value, properties: serde_json::Value) -> String {
    let mut line = serde_json::json!({
        "_aws": {
            "Timestamp": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            "CloudWatchMetrics": [{
                "Namespace": metrics_namespace(),
                "Dimensions": dimensions,
                "Metrics": values.iter().map(|(name, unit, _)| serde_json::json!({"Name": name, "Unit": unit})).collect::<Vec<_>>(),
            }],
        },
    });
    for (name, value) in properties.as_object().into_iter().flatten() {
        line[name] = value.clone();
    }
    for (name, _, value) in values {
        line[*name] = serde_json::json!(value);
    }
    line.to_string()
}

/// One CloudWatch Embedded Metric Format line for a hop: dimensions `job` and `job, chain`
/// (few values each); the run id and hop number are properties, searchable in Logs Insights but
/// never dimensions (a dimension per run would be a new metric every month).
pub fn emf_line(f: &HopFigures<'_>) -> String {
    let properties = serde_json::json!({
        "job": f.metrics.job.as_deref().unwrap_or("unknown"),
        "chain": f.chain.to_string(),
        "run_id": f.run_id,
        "hop": f.hop,
    });
    emf(&hop_metric_values(f), serde_json::json!([["job"], ["job", "chain"]]), properties)
}

/// One CloudWatch EMF line per sweep, without dimensions: `StuckChains` (chains the sweep found
/// silent past the stale threshold and restarted), `RevivedChains` (chains that had ended while
/// pages were left, a lease having run out, started again) and `OpenRuns`. An alarm on
/// `StuckChains` says a chain stalled even though the sweeper recovered it: hops are dying
/// (timeouts, crashes, lost events).
pub fn sweep_emf_line(report: &crate::engine::sweep::SweepReport) -> String {
    let values = [
        ("StuckChains", "Count", report.restarted as f64),
        ("RevivedChains", "Count", report.revived as f64),
        ("OpenRuns", "Count", report.runs as f64),
    ];
    emf(&values, serde_json::json!([[]]), serde_json::json!({ "event": "sweep" }))
}

/// The error Lambda reports: a stable `errorType` (`baton.BadEvent`, `baton.RunNotFound`, ...)
/// and the message, instead of a Rust type name.
pub fn diagnostic(e: &EngineError) -> Diagnostic {
    Diagnostic { error_type: e.error_type().to_owned(), error_message: e.to_string() }
}

/// Sits before the runtime's own JSON decoding: a payload that is not JSON (or is empty) is
/// handed on as a JSON object saying why, so baton rejects it with its own error and the
/// expected shape, not the runtime's "failed to deserialize".
#[derive(Clone)]
struct RawPayload<S>(S);

impl<S> Service<LambdaInvocation> for RawPayload<S>
where
    S: Service<LambdaInvocation>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: LambdaInvocation) -> Self::Future {
        let why = if req.body.iter().all(u8::is_ascii_whitespace) {
            Some("the payload is empty".to_owned())
        } else {
            serde_json::from_slice::<serde::de::IgnoredAny>(&req.body).err().map(|e| format!("not JSON: {e}"))
        };
        if let Some(why) = why {
            req.body = serde_json::to_vec(&serde_json::json!({ UNPARSABLE: why })).expect("serialises").into();
        }
        self.0.call(req)
    }
}

struct RawPayloadLayer;

impl<S> Layer<S> for RawPayloadLayer {
    type Service = RawPayload<S>;
    fn layer(&self, inner: S) -> RawPayload<S> {
        RawPayload(inner)
    }
}

/// Runs the Lambda runtime loop until the sandbox ends.
pub async fn serve() -> Result<(), lambda_runtime::Error> {
    // Spans per the standard `OTEL_*` variables (none set: no export); before the engine, whose
    // tracer is the global one.
    let telemetry = Arc::new(Telemetry::install(&TraceSettings::default())?);
    let engine = engine_from_env().await?;
    let budget = engine.config().settings.hop_timeout;
    let checked = Arc::new(std::sync::Once::new());
    let handler = service_fn(move |event: LambdaEvent<serde_json::Value>| {
        let (engine, checked, telemetry) = (engine.clone(), checked.clone(), telemetry.clone());
        async move {
            let context_deadline = (event.context.deadline > 0).then(|| event.context.deadline());
            let mut cold_start = false;
            checked.call_once(|| {
                cold_start = true;
                if let Some(warning) = check_function_timeout(context_deadline, budget) {
                    tracing::warn!("{warning}");
                }
            });
            let deadline = deadline_from(context_deadline, budget);
            let invocation = faas_attributes(&event.context, cold_start);
            let result = handle(&engine, event.payload, deadline, invocation).await.map_err(|e| {
                // Always at error level: a retryable failure of a scheduled `start` is retried by
                // nobody (the on-failure queue keeps it), so it must reach the alarms too.
                tracing::error!(error = %e, error_type = e.error_type(), class = ?e.class(), "invocation failed");
                diagnostic(&e)
            });
            // Before the response goes back: Lambda may freeze the sandbox right after it, with
            // spans still buffered. Never an error, and never past the invocation's deadline
            // (less a safety margin), nor longer than one export's timeout.
            let until =
                deadline.checked_sub(FLUSH_MARGIN).unwrap_or(deadline).min(Instant::now() + telemetry.export_timeout());
            telemetry.flush(until.max(Instant::now())).await;
            result
        }
    });
    lambda_runtime::Runtime::new(handler)
        .layer(RawPayloadLayer)
        .layer(lambda_runtime::layers::TracingLayer::new())
        .run()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_becomes_one_emf_line_without_dimensions() {
        let report = crate::engine::sweep::SweepReport { runs: 2, restarted: 3, revived: 1, ..Default::default() };
        let line: serde_json::Value = serde_json::from_str(&super::sweep_emf_line(&report)).unwrap();
        let directive = &line["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Dimensions"], serde_json::json!([[]]), "one metric per account, for one alarm");
        let names: Vec<&str> =
            directive["Metrics"].as_array().unwrap().iter().map(|m| m["Name"].as_str().unwrap()).collect();
        assert_eq!(names, ["StuckChains", "RevivedChains", "OpenRuns"]);
        assert_eq!(
            (line["StuckChains"].as_f64(), line["RevivedChains"].as_f64(), line["OpenRuns"].as_f64()),
            (Some(3.0), Some(1.0), Some(2.0))
        );
    }

    #[test]
    fn a_hop_becomes_one_emf_line_with_low_cardinality_dimensions() {
        let metrics = HopMetrics {
            job: Some("monthly-newsletter".into()),
            pages: 2,
            items_done: 180,
            items_failed: 1,
            items_skipped: 19,
            throttles: 3,
            sql_statements: 14,
            ..Default::default()
        };
        let figures = HopFigures {
            run_id: "0123456789abcdef",
            chain: 3,
            hop: 7,
            metrics: &metrics,
            took: Duration::from_millis(500),
            duplicate: false,
            failed: false,
        };
        let line: serde_json::Value = serde_json::from_str(&emf_line(&figures)).unwrap();
        let directive = &line["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Dimensions"], serde_json::json!([["job"], ["job", "chain"]]));
        assert!(!directive["Dimensions"].to_string().contains("run_id"), "the run id is never a dimension");
        assert_eq!((line["job"].as_str(), line["chain"].as_str()), (Some("monthly-newsletter"), Some("3")));
        assert_eq!((line["run_id"].as_str(), line["hop"].as_u64()), (Some("0123456789abcdef"), Some(7)));
        // Every declared metric has a numeric value of the same name at the top level.
        for m in directive["Metrics"].as_array().unwrap() {
            let name = m["Name"].as_str().unwrap();
            assert!(line[name].is_number(), "{name} has no value: {line}");
        }
        assert_eq!(line["ItemsDone"], 180.0);
        assert_eq!(line["SendsPerSecond"], 362.0, "(done + failed + unknown) per second");
        assert!(line["_aws"]["Timestamp"].as_u64().unwrap() > 1_700_000_000_000);
    }

    #[test]
    fn deadline_falls_back_to_the_configured_budget() {
        let budget = Duration::from_secs(60);
        let past = deadline_from(Some(SystemTime::now() - Duration::from_secs(5)), budget);
        assert!(past > Instant::now() + Duration::from_secs(59));
        let none = deadline_from(None, budget);
        assert!(none > Instant::now() + Duration::from_secs(59));
        let soon = deadline_from(Some(SystemTime::now() + Duration::from_secs(10)), budget);
        assert!(soon < Instant::now() + Duration::from_secs(11));
    }

    #[test]
    fn a_function_timeout_longer_than_hop_timeout_is_cut_to_hop_timeout() {
        // Failed before the fix: the hop got Lambda's 15 minutes and outlived its lease.
        let budget = Duration::from_secs(60);
        let long = deadline_from(Some(SystemTime::now() + Duration::from_secs(900)), budget);
        assert!(long <= Instant::now() + budget);
        assert!(check_function_timeout(Some(SystemTime::now() + Duration::from_secs(900)), budget).is_none());
        let short = check_function_timeout(Some(SystemTime::now() + Duration::from_secs(30)), budget).unwrap();
        assert!(short.contains("hop_timeout"), "{short}");
    }
}
