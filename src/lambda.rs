//! Lambda mode: the binary as a Lambda bootstrap (`provided.al2023`). Chosen by `main` when
//! `AWS_LAMBDA_RUNTIME_API` is set. The engine and its SDK clients are built once per sandbox;
//! each invocation decodes the serde-tagged event and routes it. A malformed or unknown event is
//! rejected with a clear error before anything runs.
//!
//! Settings come from the environment only, read by the composition root
//! ([`crate::compose::AdapterSettings::from_env`]; README.md, "Lambda mode"), plus
//! `BATON_CONFIG`, the job file baked into the image (default `/var/task/baton.toml`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lambda_runtime::tower::{Layer, Service};
use lambda_runtime::{Diagnostic, LambdaEvent, LambdaInvocation, service_fn};
use tokio::time::Instant;

use crate::compose::{self, AdapterSettings, Aws, ComposeError};
use crate::config::{Config, ConfigError};
use crate::engine::{Engine, EngineError};

/// Why a sandbox could not start: its settings name the fix.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Compose(#[from] ComposeError),
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
    let config = Config::load(std::path::Path::new(&config_path))?;
    let runtime = compose::build(&AdapterSettings::from_env()?, config, true, &Aws::default()).await?;
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

/// The key under which [`RawPayload`] hands over a payload that is not JSON at all.
const UNPARSABLE: &str = "__baton_unparsable_payload";

/// Handles one invocation's payload.
pub async fn handle(
    engine: &Engine,
    payload: serde_json::Value,
    deadline: Instant,
) -> Result<serde_json::Value, EngineError> {
    if let Some(why) = payload.get(UNPARSABLE).and_then(|v| v.as_str()) {
        return Err(crate::engine::event::EventError::Malformed(why.to_owned()).into());
    }
    let bytes = serde_json::to_vec(&payload).expect("JSON values serialise");
    let outcome = engine.handle_payload(&bytes, deadline).await?;
    Ok(serde_json::to_value(outcome).expect("outcomes serialise"))
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
    let engine = engine_from_env().await?;
    let budget = engine.config().settings.hop_timeout;
    let checked = Arc::new(std::sync::Once::new());
    let handler = service_fn(move |event: LambdaEvent<serde_json::Value>| {
        let (engine, checked) = (engine.clone(), checked.clone());
        async move {
            let context_deadline = (event.context.deadline > 0).then(|| event.context.deadline());
            checked.call_once(|| {
                if let Some(warning) = check_function_timeout(context_deadline, budget) {
                    tracing::warn!("{warning}");
                }
            });
            let deadline = deadline_from(context_deadline, budget);
            handle(&engine, event.payload, deadline).await.map_err(|e| {
                // Always at error level: a retryable failure of a scheduled `start` is retried by
                // nobody (the on-failure queue keeps it), so it must reach the alarms too.
                tracing::error!(error = %e, error_type = e.error_type(), class = ?e.class(), "invocation failed");
                diagnostic(&e)
            })
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
