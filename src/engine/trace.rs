//! Spans of a run, through the OpenTelemetry API (the SDK, exporters and ids belong to the outer
//! layer, [`crate::telemetry`]; without it every call here is a no-op).
//!
//! Each invocation is its own trace: a chain of thousands of hops in one trace would break
//! X-Ray's and Tempo's per-trace limits. The hop's root span links to the previous hop of its
//! chain (the event's W3C `traceparent`) and to the run's start span (`baton_runs.start_trace`);
//! `start_hop` stores each hop's `traceparent` as the chain's `last_trace`, so a sweeper restart,
//! a resume or a `tune` invokes the next hop with a link to the chain's last known hop, and
//! `baton status` shows its trace id. Below the root: a span per page, per SQL statement (by
//! name), the page's mail batch (counts as attributes, failures as span events) and the
//! next-hop invoke.

use std::collections::HashMap;
use std::future::Future;

use opentelemetry::context::FutureExt;
use opentelemetry::global::BoxedTracer;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Link, SpanContext, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The engine's tracer: the global one unless a caller (a test) gives its own.
pub struct Tracing {
    tracer: BoxedTracer,
}

impl Default for Tracing {
    fn default() -> Self {
        Tracing { tracer: opentelemetry::global::tracer("baton") }
    }
}

impl Tracing {
    pub fn new(tracer: BoxedTracer) -> Self {
        Tracing { tracer }
    }

    /// A new trace for one invocation, linked to `links` (W3C `traceparent`s; unreadable ones
    /// are skipped: a link is a hint, never a reason to refuse work).
    pub(crate) fn root(&self, name: &'static str, attributes: Vec<KeyValue>, links: &[Option<&str>]) -> Context {
        let links = links.iter().flatten().filter_map(|t| parse(t)).map(Link::with_context).collect();
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes)
            .with_links(links)
            .start_with_context(&self.tracer, &Context::new());
        Context::new().with_span(span)
    }

    /// Runs `work` in a child span of the current one named `name`; an error sets the span's
    /// status. The span ends when `work` does (or is dropped with it).
    pub(crate) async fn in_span<T, E, F>(&self, name: &'static str, attributes: Vec<KeyValue>, work: F) -> Result<T, E>
    where
        E: std::fmt::Display,
        F: Future<Output = Result<T, E>>,
    {
        let Some(cx) = self.child(name, attributes) else {
            return work.await;
        };
        let out = within(cx.clone(), work).await;
        if let Err(e) = &out {
            cx.span().set_status(Status::error(bounded(&e.to_string(), 500)));
        }
        cx.span().end();
        out
    }

    /// A child span of the current one (none outside a trace): the caller runs work
    /// [`within`] it and ends it.
    pub(crate) fn child(&self, name: &'static str, attributes: Vec<KeyValue>) -> Option<Context> {
        let parent = Context::current();
        if !parent.has_active_span() {
            return None;
        }
        let span = self.tracer.span_builder(name).with_attributes(attributes).start_with_context(&self.tracer, &parent);
        Some(parent.with_span(span))
    }
}

/// X-Ray indexes the attributes this lists as annotations (as `baton_run_id`, ...), so its
/// console and Grafana's X-Ray data source can search hops by run, chain and hop; Tempo indexes
/// every attribute anyway.
pub(crate) fn xray_annotations() -> KeyValue {
    let keys: Vec<opentelemetry::StringValue> =
        ["baton.run_id", "baton.chain", "baton.hop", "baton.job"].into_iter().map(Into::into).collect();
    KeyValue::new("aws.xray.annotations", opentelemetry::Value::Array(keys.into()))
}

/// The current span's W3C `traceparent`, if it is a sampled, valid span.
pub(crate) fn current_traceparent() -> Option<String> {
    traceparent_of(&Context::current())
}

/// `cx`'s W3C `traceparent`.
pub(crate) fn traceparent_of(cx: &Context) -> Option<String> {
    // An unsampled span is never exported: a link or a trace id to it would lead nowhere.
    if !cx.span().span_context().is_valid() || !cx.span().span_context().is_sampled() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.remove("traceparent")
}

/// The span context a W3C `traceparent` names, if it is well formed.
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let span_context = cx.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

/// `text` for a span attribute: at most `max` characters, control characters escaped. Spans are
/// structured, but values from data (provider messages, keys) must not make them grow without
/// bound.
pub(crate) fn bounded(text: &str, max: usize) -> String {
    crate::text::printable_at_most(text, max)
}

/// The trace id of a `traceparent`, as X-Ray and Tempo search for it (32 hex digits).
pub fn trace_id(traceparent: &str) -> Option<String> {
    parse(traceparent).map(|c| c.trace_id().to_string())
}

/// Sets attributes on the current span.
pub(crate) fn annotate(attributes: impl IntoIterator<Item = KeyValue>) {
    Context::current().span().set_attributes(attributes);
}

/// Adds a link from the current span.
pub(crate) fn link(traceparent: Option<&str>, attributes: Vec<KeyValue>) {
    if let Some(span_context) = traceparent.and_then(parse) {
        Context::current().span().add_link(span_context, attributes);
    }
}

/// Runs `work` with `cx` current (its span stays open).
pub(crate) async fn within<F: Future>(cx: Context, work: F) -> F::Output {
    work.with_context(cx).await
}
