//! The protocols in front of the engine: [`cratemae`] (this project's `cratemae.v1`) and
//! [`oip`] (KServe's Open Inference Protocol v2) on the gRPC port, and [`http`] (the Open
//! Inference Protocol's REST form and OpenAI-style embeddings) on the HTTP port; same queues.
//!
//! What all share lives here: the request id, the client's deadline, the request span,
//! the request metrics, the model's identity on every response, and the mapping from engine
//! errors to gRPC status codes.

pub mod connections;
pub mod cratemae;
pub mod http;
pub mod oip;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::engine::{self, Call, Engine, Priority};
use crate::error::ServeError;
use crate::telemetry;

/// The gRPC status for an engine error: the code a client can act on, the message as is.
pub fn status(e: ServeError) -> Status {
    Status::new(code(&e), e.to_string())
}

/// The gRPC code of an engine error (also the `code` label of every protocol's metrics).
pub fn code(e: &ServeError) -> Code {
    match e {
        ServeError::InvalidArgument(_) => Code::InvalidArgument,
        ServeError::OutOfRange(_) => Code::OutOfRange,
        ServeError::NotFound(_) => Code::NotFound,
        ServeError::ResourceExhausted(_)
        | ServeError::QueueFull(_)
        | ServeError::OutOfMemory(_) => Code::ResourceExhausted,
        ServeError::Unavailable(_) | ServeError::DeviceLost(_) => Code::Unavailable,
        ServeError::DeadlineExceeded(_) => Code::DeadlineExceeded,
        ServeError::Cancelled(_) => Code::Cancelled,
        ServeError::Internal(_) => Code::Internal,
    }
}

const DEADLINE_SLACK: Duration = Duration::from_millis(2);

/// Decrements the in-flight gauge and records the outcome even if the call is dropped.
/// A call that ends unanswered (client cancelled, or tonic's deadline layer gave up) or
/// answered DEADLINE_EXCEEDED counts once in `cratemae_dropped_requests_total`.
pub struct CallGuard {
    protocol: &'static str,
    method: &'static str,
    started: Instant,
    deadline: Option<Instant>,
    pub code: Option<Code>,
}

impl CallGuard {
    pub fn new(protocol: &'static str, method: &'static str, deadline: Option<Instant>) -> Self {
        telemetry::inflight(1.0);
        Self {
            protocol,
            method,
            started: Instant::now(),
            deadline,
            code: None,
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        telemetry::inflight(-1.0);
        // A client that enforces its own deadline (tonic, grpc-go) starts its timer before
        // the request reaches us and resets the stream a little *before* our deadline: a
        // drop in the last fifth of the allowed time is counted as the deadline.
        let expired = self.deadline.is_some_and(|d| {
            let allowed = d.saturating_duration_since(self.started);
            d <= Instant::now() + allowed / 5 + DEADLINE_SLACK
        });
        let code = match self.code {
            Some(code) => code,
            None if expired => Code::DeadlineExceeded,
            None => Code::Cancelled,
        };
        match code {
            Code::DeadlineExceeded => telemetry::dropped("deadline"),
            Code::Cancelled => telemetry::dropped("cancelled"),
            _ => {}
        }
        telemetry::request_finished(self.protocol, self.method, code, self.started.elapsed());
    }
}

/// The request id from `x-request-id` (if sane), or a new one.
pub fn request_id<T>(request: &Request<T>) -> String {
    request_id_of(request.metadata().get("x-request-id").map(|v| v.as_bytes()))
}

/// The request id a client sent (if sane), or a new one.
pub fn request_id_of(sent: Option<&[u8]>) -> String {
    sent.and_then(|v| std::str::from_utf8(v).ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// A call's deadline as [`DeadlineLayer`] read it (from `grpc-timeout`, counted from an
/// instant taken before tonic starts its own timer, so it ends no later than tonic's), and
/// whether a handler has taken charge of the call (its [`CallGuard`] then counts the outcome,
/// so the layer counts a deadline only for calls that never got that far).
#[derive(Debug, Clone)]
struct CallDeadline {
    at: Option<Instant>,
    handled: Arc<AtomicBool>,
}

/// Every gRPC call's deadline, answered as DEADLINE_EXCEEDED. tonic enforces `grpc-timeout`
/// itself, outside every layer, and answers an expired call CANCELLED ("Timeout expired"),
/// whatever stage the call is in. This layer sits inside that timer: it stamps the arrival
/// (before tonic's timer starts) and, when the deadline passes before the handler answers,
/// answers DEADLINE_EXCEEDED itself. tonic polls it before its own timer, and it checks the
/// clock before waiting on its own timer, so it answers first even when both fire at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadlines<S>;

    fn layer(&self, inner: S) -> Deadlines<S> {
        Deadlines { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Deadlines<S> {
    inner: S,
}

impl<S, B> tower::Service<::http::Request<B>> for Deadlines<S>
where
    S: tower::Service<::http::Request<B>, Response = ::http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = ::http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: ::http::Request<B>) -> Self::Future {
        let arrived = Instant::now();
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_timeout)
            .and_then(|d| arrived.checked_add(d));
        let handled = Arc::new(AtomicBool::new(false));
        request.extensions_mut().insert(CallDeadline {
            at: deadline,
            handled: Arc::clone(&handled),
        });
        let inner = self.inner.call(request);
        Box::pin(async move {
            let Some(deadline) = deadline else {
                return inner.await;
            };
            match engine::within(Some(deadline), async { Ok(inner.await) }).await {
                Ok(answer) => answer,
                Err(e) => {
                    if !handled.load(Ordering::Acquire) {
                        telemetry::dropped("deadline");
                    }
                    Ok(status(e).into_http())
                }
            }
        })
    }
}

/// Compressed answers for compressed asks: a request sent with `grpc-encoding` gzip or zstd
/// gets its response compressed the same way; any other keeps identity, even when the client
/// advertises more (Python's grpcio advertises gzip on every call, and compressing each
/// response would cost the model's cores for nothing on a fast network).
pub fn mirror_compression<B>(mut request: ::http::Request<B>) -> ::http::Request<B> {
    let compressed = request
        .headers()
        .get("grpc-encoding")
        .is_some_and(|e| e != "identity");
    if !compressed {
        request.headers_mut().remove("grpc-accept-encoding");
    }
    request
}

/// A `grpc-timeout` value (`<digits><unit>`, unit one of H M S m u n).
fn parse_timeout(raw: &str) -> Option<Duration> {
    let (digits, unit) = raw.split_at(raw.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(d)
}

/// The client's deadline (`grpc-timeout`), as [`DeadlineLayer`], which every served call
/// passes, read it on arrival.
pub fn deadline<T>(request: &Request<T>) -> Option<Instant> {
    request.extensions().get::<CallDeadline>()?.at
}

/// The span of one call, a child of the caller's trace when it sent `traceparent` (request
/// headers: gRPC metadata is HTTP/2 headers).
pub fn request_span(
    protocol: &'static str,
    method: &'static str,
    id: &str,
    headers: &::http::HeaderMap,
) -> tracing::Span {
    let span = tracing::info_span!("request", protocol, method, request_id = %id);
    crate::otel::continue_trace(&span, headers);
    span
}

/// Adds the request id and the model's identity (name, version, weights SHA-256) to response
/// metadata, so a client can tell which model answered, even mid-rollout.
pub fn identify(engine: &Engine, id: &str, metadata: &mut MetadataMap) {
    for (key, value) in identity(engine, id) {
        if let Ok(v) = MetadataValue::try_from(value) {
            metadata.insert(key, v);
        }
    }
}

/// The request id and the model's identity, as header names and values (the HTTP
/// transports send the same headers as gRPC's metadata).
pub fn identity(engine: &Engine, id: &str) -> Vec<(&'static str, String)> {
    let mut headers = vec![("x-request-id", id.to_string())];
    if let Ok(info) = engine.info() {
        headers.extend([
            ("x-model-name", info.name.clone()),
            ("x-model-version", info.version()),
            // Empty (and so left out) for a random-init model.
            ("x-model-sha256", info.facts.weights.sha256.clone()),
        ]);
    }
    headers.retain(|(_, value)| !value.is_empty());
    headers
}

/// Runs one unary call: span, metrics, deadline, request id and model identity.
pub async fn observe<T, R, F, Fut>(
    engine: &Engine,
    protocol: &'static str,
    method: &'static str,
    request: Request<T>,
    handler: F,
) -> Result<Response<R>, Status>
where
    F: FnOnce(T, Call) -> Fut,
    Fut: std::future::Future<Output = Result<R, ServeError>>,
{
    let id = request_id(&request);
    let call = Call {
        deadline: deadline(&request),
        priority: Priority::Online,
    };
    if let Some(d) = request.extensions().get::<CallDeadline>() {
        d.handled.store(true, Ordering::Release);
    }
    let span = request_span(protocol, method, &id, request.metadata().as_ref());
    let mut guard = CallGuard::new(protocol, method, call.deadline);
    // The deadline as an answer, not only as a check before compute: a call still waiting
    // when it passes is answered DEADLINE_EXCEEDED here, with its request id.
    let result = engine::within(call.deadline, handler(request.into_inner(), call))
        .instrument(span.clone())
        .await;
    let _enter = span.enter();
    match result {
        Ok(body) => {
            guard.code = Some(Code::Ok);
            tracing::debug!(
                elapsed_ms = guard.started.elapsed().as_secs_f64() * 1e3,
                "ok"
            );
            let mut response = Response::new(body);
            identify(engine, &id, response.metadata_mut());
            Ok(response)
        }
        Err(e) => {
            let status = status(e);
            guard.code = Some(status.code());
            match status.code() {
                Code::Internal => tracing::error!(error = %status.message(), "failed"),
                code => tracing::info!(?code, error = %status.message(), "refused"),
            }
            let mut status = status;
            identify(engine, &id, status.metadata_mut());
            Err(status)
        }
    }
}
