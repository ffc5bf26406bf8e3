//! OpenTelemetry traces, off by default (`--otlp-endpoint`): every request's span tree
//! (request → preprocess, queue → batch → model) is exported over OTLP/gRPC, continuing the
//! caller's trace when the request carries a W3C `traceparent`.

use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// A tracing layer that exports spans to the OTLP collector at `endpoint`.
pub fn layer<S>(
    endpoint: &str,
) -> anyhow::Result<tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let exporter = SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name("crate-mae-serve")
                .build(),
        )
        .build();
    let tracer = provider.tracer("crate-mae-serve");
    let _ = PROVIDER.set(provider);
    Ok(tracing_opentelemetry::layer().with_tracer(tracer))
}

/// Request headers (gRPC metadata is HTTP/2 headers) as OpenTelemetry reads them.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` a child of the caller's span named by `traceparent` (W3C Trace Context),
/// when export is on and the request carries one.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if PROVIDER.get().is_none() || headers.get("traceparent").is_none() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    let _ = span.set_parent(parent);
}

/// Flushes what is buffered (at exit).
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        if let Err(e) = provider.shutdown() {
            tracing::warn!(error = %e, "flushing traces failed");
        }
    }
}
