//! The protocols in front of the engine: [`cratemae`] (this project's `cratemae.v1`) and
//! [`oip`] (KServe's Open Inference Protocol v2), on the same port, same queues.
//!
//! What both share lives here: the request id, the client's deadline, the request span,
//! the request metrics, the model's identity on every response, and the mapping from engine
//! errors to gRPC status codes.

pub mod cratemae;
pub mod oip;

use std::time::{Duration, Instant};

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::engine::{Admit, Call, Engine};
use crate::error::ServeError;
use crate::telemetry;

/// The gRPC status for an engine error: the code a client can act on, the message as is.
pub fn status(e: ServeError) -> Status {
    let code = match &e {
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
    };
    Status::new(code, e.to_string())
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
    request
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// When the request reached the server, stamped by [`stamp_arrival`] in the same call chain
/// as tonic's own deadline timer, so both measure the client's deadline from one instant.
#[derive(Debug, Clone, Copy)]
pub struct ArrivedAt(pub Instant);

/// Tower request mapper for `Server::builder().layer(MapRequestLayer::new(stamp_arrival))`.
pub fn stamp_arrival<B>(mut request: http::Request<B>) -> http::Request<B> {
    request.extensions_mut().insert(ArrivedAt(Instant::now()));
    request
}

/// The client's deadline from `grpc-timeout` (`<digits><unit>`, unit one of H M S m u n),
/// counted from arrival.
pub fn deadline<T>(request: &Request<T>) -> Option<Instant> {
    let raw = request.metadata().get("grpc-timeout")?.to_str().ok()?;
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
    let arrived = request
        .extensions()
        .get::<ArrivedAt>()
        .map_or_else(Instant::now, |a| a.0);
    arrived.checked_add(d)
}

/// The span of one call, a child of the caller's trace when it sent `traceparent`.
pub fn request_span(
    protocol: &'static str,
    method: &'static str,
    id: &str,
    metadata: &MetadataMap,
) -> tracing::Span {
    let span = tracing::info_span!("request", protocol, method, request_id = %id);
    crate::otel::continue_trace(&span, metadata);
    span
}

/// Adds the request id and the model's identity (name, version, weights SHA-256) to response
/// metadata, so a client can tell which model answered, even mid-rollout.
pub fn identify(engine: &Engine, id: &str, metadata: &mut MetadataMap) {
    if let Ok(v) = MetadataValue::try_from(id) {
        metadata.insert("x-request-id", v);
    }
    if let Ok(info) = engine.info() {
        let identity = [
            ("x-model-name", info.name.clone()),
            ("x-model-version", info.version()),
            // Empty (and so left out) for a random-init model.
            ("x-model-sha256", info.facts.weights.sha256.clone()),
        ];
        for (key, value) in identity {
            if value.is_empty() {
                continue;
            }
            if let Ok(v) = MetadataValue::try_from(value) {
                metadata.insert(key, v);
            }
        }
    }
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
        admit: Admit::Try,
    };
    let span = request_span(protocol, method, &id, request.metadata());
    let mut guard = CallGuard::new(protocol, method, call.deadline);
    let result = handler(request.into_inner(), call)
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
