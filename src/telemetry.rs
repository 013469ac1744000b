//! Where spans go: the OpenTelemetry SDK and its exporters, set up once per process (the engine
//! only speaks the API, [`crate::engine::trace`]).
//!
//! - OTLP/HTTP (protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, or `--otlp-endpoint` is given; the other
//!   standard `OTEL_EXPORTER_OTLP_*` variables (headers, timeout) apply. Without a timeout
//!   setting, exports give up after [`DEFAULT_EXPORT_TIMEOUT`]: a missing collector costs little
//!   and never fails a hop.
//! - OTLP JSON lines (`--trace-file PATH`): one `ExportTraceServiceRequest` per line, the
//!   OpenTelemetry collector's file format, for looking at a local run without any collector.
//! - Neither: no provider is installed and every span is a no-op.
//!
//! Resource attributes follow `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` (service name
//! `baton` by default). Trace ids start with the time in seconds, as X-Ray's own ids do, and are
//! otherwise random: X-Ray's OTLP endpoint and Tempo both accept them.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_otlp::{RetryPolicy, WithExportConfig, WithHttpConfig};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider, SpanData, SpanExporter};

use crate::engine::Tracing;

/// How long one export may take when no `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT` says otherwise.
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_millis(1000);

/// Where this process sends its spans.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TraceSettings {
    /// An OTLP/HTTP base URL (`http://localhost:4318`; `/v1/traces` is added), from
    /// `--otlp-endpoint`; `None` leaves it to the `OTEL_EXPORTER_OTLP_*` variables.
    pub otlp_endpoint: Option<String>,
    /// Spans as OTLP JSON lines, from `--trace-file`.
    pub trace_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{field}: {why}")]
    Setting { field: &'static str, why: String },
    #[error("--trace-file {path}: {source}")]
    TraceFile { path: String, source: std::io::Error },
}

impl TraceSettings {
    /// Whether the environment asks for OTLP export (`OTEL_SDK_DISABLED=true` or
    /// `OTEL_TRACES_EXPORTER=none` turn it off).
    fn otlp_from_env() -> bool {
        let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
        let off = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
            || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
        !off && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    }

    /// The full URL spans are posted to, when the endpoint is given here.
    fn traces_url(&self) -> Result<Option<String>, TelemetryError> {
        let Some(base) = self.otlp_endpoint.as_deref().map(str::trim).filter(|b| !b.is_empty()) else {
            return Ok(None);
        };
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(TelemetryError::Setting {
                field: "--otlp-endpoint",
                why: format!(
                    "`{}` is not an http(s) URL; give the collector's OTLP/HTTP base URL, e.g. http://localhost:4318",
                    crate::text::printable_short(base)
                ),
            });
        }
        let base = base.trim_end_matches('/');
        Ok(Some(if base.ends_with("/v1/traces") { base.to_owned() } else { format!("{base}/v1/traces") }))
    }
}

/// The installed provider; flush it before an invocation returns, shut it down at exit.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// How long one export may take (the `OTEL_EXPORTER_OTLP_*TIMEOUT` or the default).
    export_timeout: Duration,
}

impl Telemetry {
    /// No export: spans are no-ops.
    pub fn disabled() -> Telemetry {
        Telemetry { provider: None, export_timeout: DEFAULT_EXPORT_TIMEOUT }
    }

    /// Sets up export per `settings` and the environment, and makes it the global tracer
    /// provider (what [`Tracing::default`] uses). Call before the engine is built.
    ///
    /// Settings given on the command line that cannot work are an error (the user asked for
    /// them); settings from the environment that cannot work (a malformed
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, a compression this build lacks) are logged and tracing is
    /// off: tracing must never stop a hop, a sweep, or the operator's brake.
    pub fn install(settings: &TraceSettings) -> Result<Telemetry, TelemetryError> {
        let telemetry = match Telemetry::build(settings) {
            Ok(t) => t,
            Err(e) if settings.otlp_endpoint.is_none() && settings.trace_file.is_none() => {
                tracing::error!(error = %e, "tracing is off: the OTEL_* settings cannot work");
                Telemetry::disabled()
            }
            Err(e) => return Err(e),
        };
        if let Some(provider) = &telemetry.provider {
            opentelemetry::global::set_tracer_provider(provider.clone());
        }
        Ok(telemetry)
    }

    /// [`Self::install`] without making it global: an engine uses it through [`Self::tracing`].
    pub fn build(settings: &TraceSettings) -> Result<Telemetry, TelemetryError> {
        let url = settings.traces_url()?;
        let otlp = url.is_some() || TraceSettings::otlp_from_env();
        if !otlp && settings.trace_file.is_none() {
            return Ok(Telemetry::disabled());
        }
        let mut builder = SdkTracerProvider::builder().with_resource(resource()).with_id_generator(XrayIds);
        if otlp {
            builder = builder.with_batch_exporter(otlp_exporter(url)?);
        }
        if let Some(path) = &settings.trace_file {
            builder = builder.with_batch_exporter(JsonLinesExporter::create(path)?);
        }
        Ok(Telemetry { provider: Some(builder.build()), export_timeout: export_timeout() })
    }

    /// A tracer on this provider (the no-op one when disabled), for an engine of its own.
    pub fn tracing(&self) -> Tracing {
        match &self.provider {
            Some(p) => Tracing::new(opentelemetry::global::BoxedTracer::new(Box::new(p.tracer("baton")))),
            None => Tracing::default(),
        }
    }

    /// How long one export may take.
    pub fn export_timeout(&self) -> Duration {
        self.export_timeout
    }

    /// Exports what is buffered, waiting until `until` at most (the export goes on in the
    /// background past it). Errors are logged, never returned: tracing must not fail a hop.
    pub async fn flush(&self, until: tokio::time::Instant) {
        let Some(provider) = self.provider.clone() else { return };
        let flushed = tokio::task::spawn_blocking(move || provider.force_flush());
        match tokio::time::timeout_at(until, flushed).await {
            Ok(Ok(Err(e))) => tracing::debug!(error = %e, "spans not exported"),
            Err(_) => tracing::debug!("spans still exporting at the invocation's end"),
            _ => {}
        }
    }

    /// Flushes and stops the exporters (at process exit).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else { return };
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::debug!(error = %e, "spans not exported at shutdown");
        }
    }
}

/// `service.name` defaults to `baton`; `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` (and
/// Lambda's own variables, read by the SDK's detectors) override it.
fn resource() -> Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let builder = Resource::builder();
    let builder = if named { builder } else { builder.with_service_name("baton") };
    match std::env::var("AWS_LAMBDA_FUNCTION_NAME") {
        Ok(function) => builder
            .with_attributes([
                opentelemetry::KeyValue::new("cloud.provider", "aws"),
                opentelemetry::KeyValue::new("cloud.platform", "aws_lambda"),
                opentelemetry::KeyValue::new("faas.name", function),
                opentelemetry::KeyValue::new("cloud.region", std::env::var("AWS_REGION").unwrap_or_default()),
                opentelemetry::KeyValue::new(
                    "faas.version",
                    std::env::var("AWS_LAMBDA_FUNCTION_VERSION").unwrap_or_default(),
                ),
            ])
            .build(),
        Err(_) => builder.build(),
    }
}

fn otlp_exporter(url: Option<String>) -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    let protocol =
        std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"));
    if let Ok(p) = protocol.as_deref().map(str::trim)
        && !p.is_empty()
        && p != "http/protobuf"
    {
        return Err(TelemetryError::Setting {
            field: "OTEL_EXPORTER_OTLP_PROTOCOL",
            why: format!(
                "baton exports OTLP over HTTP with protobuf only (`http/protobuf`), not `{}`",
                crate::text::printable_short(p)
            ),
        });
    }
    // No retries: Lambda mode flushes before each invocation returns, and a collector that is
    // down would otherwise add the retries' backoff (about 0.8 s) to every hop. A lost batch of
    // spans costs a gap in a trace, never a hop.
    let mut builder =
        opentelemetry_otlp::SpanExporter::builder().with_http().with_retry_policy(RetryPolicy::disabled());
    if let Some(url) = url {
        builder = builder.with_endpoint(url);
    }
    if configured_timeout().is_none() {
        builder = builder.with_timeout(DEFAULT_EXPORT_TIMEOUT);
    }
    builder.build().map_err(|e| TelemetryError::Setting { field: "OTEL_EXPORTER_OTLP_ENDPOINT", why: e.to_string() })
}

/// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` or `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds), when set.
fn configured_timeout() -> Option<Duration> {
    ["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
}

fn export_timeout() -> Duration {
    configured_timeout().unwrap_or(DEFAULT_EXPORT_TIMEOUT)
}

/// Trace ids whose first 32 bits are the Unix time in seconds (X-Ray's format, which Tempo and
/// every OTLP backend take as any other random id), the other 96 random.
#[derive(Debug)]
struct XrayIds;

impl IdGenerator for XrayIds {
    fn new_trace_id(&self) -> TraceId {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as u32;
        let random = u128::from_be_bytes(RandomIdGenerator::default().new_trace_id().to_bytes());
        TraceId::from(((secs as u128) << 96) | (random & ((1u128 << 96) - 1)))
    }

    fn new_span_id(&self) -> SpanId {
        RandomIdGenerator::default().new_span_id()
    }
}

/// Spans as OTLP JSON, one `ExportTraceServiceRequest` per line (what the OpenTelemetry
/// collector's `file` exporter writes and its `otlpjsonfile` receiver reads).
#[derive(Debug)]
pub struct JsonLinesExporter {
    out: Mutex<BufWriter<File>>,
    resource: ResourceAttributesWithSchema,
}

impl JsonLinesExporter {
    pub fn create(path: &Path) -> Result<JsonLinesExporter, TelemetryError> {
        let file = File::create(path)
            .map_err(|source| TelemetryError::TraceFile { path: path.display().to_string(), source })?;
        Ok(JsonLinesExporter {
            out: Mutex::new(BufWriter::new(file)),
            resource: ResourceAttributesWithSchema::from(&Resource::builder_empty().build()),
        })
    }

    fn write(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let request =
            ExportTraceServiceRequest { resource_spans: group_spans_by_resource_and_scope(batch, &self.resource) };
        let line = serde_json::to_string(&request).map_err(|e| OTelSdkError::InternalFailure(e.to_string()))?;
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(out, "{line}").and_then(|()| out.flush()).map_err(|e| OTelSdkError::InternalFailure(e.to_string()))
    }
}

impl SpanExporter for JsonLinesExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.write(batch)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = ResourceAttributesWithSchema::from(resource);
    }
}
