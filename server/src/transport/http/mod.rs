//! HTTP for the rest of the ecosystem, on a port of its own (`--http-addr`, default 8000, as
//! Triton and KServe's runtimes put REST beside gRPC): [`rest`] (the Open Inference Protocol's
//! REST form, `/v2/...`) and [`openai`] (`POST /v1/embeddings`). HTTP/1.1 and h2c (or h2 over
//! TLS) on one listener.
//!
//! A port of its own because the gRPC port is HTTP/2 only with limits tuned for gRPC clients,
//! and Kubernetes probes, KServe's HTTP-only components and `curl` speak HTTP/1.1; one port
//! would make every gRPC connection pay for HTTP/1 detection.
//!
//! The same engine, admission, limits, bearer token, TLS/mTLS, request ids, deadlines,
//! metrics (`protocol` label `oip.v2.rest` or `openai`) and tracing as gRPC. Bodies are
//! bounded by `--max-message-mib` (413) and must arrive within `--http-read-timeout-secs`
//! (408); connections count against `--max-connections` like gRPC's.

pub mod openai;
pub mod rest;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tonic::Code;
use tracing::Instrument;

use crate::config::Config;
use crate::engine::{self, Call, Engine, Priority};
use crate::error::ServeError;
use crate::security::BearerAuth;
use crate::transport::{self, connections, CallGuard};

/// What every HTTP handler shares.
pub struct Http {
    pub engine: Arc<Engine>,
    /// Guards the model routes.
    auth: BearerAuth,
    /// Guards health and metadata (open unless `--auth-health-and-reflection`).
    auth_ops: BearerAuth,
    body_limit: usize,
    read_timeout: Duration,
}

/// Which token a route needs.
#[derive(Debug, Clone, Copy)]
pub enum Guard {
    Model,
    Ops,
}

/// Why an HTTP call was refused: an engine error (mapped as gRPC maps it), or a refusal that
/// only HTTP has (a body that is too slow, of the wrong type, not JSON).
#[derive(Debug)]
pub enum Refusal {
    Serve(ServeError),
    Http(StatusCode, String),
}

impl From<ServeError> for Refusal {
    fn from(e: ServeError) -> Self {
        Refusal::Serve(e)
    }
}

impl Refusal {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Refusal::Http(StatusCode::BAD_REQUEST, message.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Http(status, _) => *status,
            Refusal::Serve(e) => match e {
                ServeError::InvalidArgument(_) | ServeError::OutOfRange(_) => {
                    StatusCode::BAD_REQUEST
                }
                ServeError::NotFound(_) => StatusCode::NOT_FOUND,
                // A request over a limit (images, pixels) will never fit; a full queue will.
                ServeError::ResourceExhausted(_) => StatusCode::PAYLOAD_TOO_LARGE,
                ServeError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
                ServeError::OutOfMemory(_)
                | ServeError::Unavailable(_)
                | ServeError::DeviceLost(_) => StatusCode::SERVICE_UNAVAILABLE,
                ServeError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
                // nginx's "client closed request": nobody reads it, the logs and metrics do.
                ServeError::Cancelled(_) => StatusCode::from_u16(499).expect("499 is valid"),
                ServeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// The gRPC code the metrics label the outcome with, so dashboards read both alike.
    fn code(&self) -> Code {
        match self {
            Refusal::Serve(e) => transport::code(e),
            Refusal::Http(StatusCode::UNAUTHORIZED, _) => Code::Unauthenticated,
            Refusal::Http(StatusCode::PAYLOAD_TOO_LARGE, _) => Code::ResourceExhausted,
            Refusal::Http(StatusCode::REQUEST_TIMEOUT, _) => Code::DeadlineExceeded,
            Refusal::Http(_, _) => Code::InvalidArgument,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Refusal::Serve(e) => e.to_string(),
            Refusal::Http(_, m) => m.clone(),
        }
    }
}

/// How a protocol writes its errors.
pub type ErrorBody = fn(&Refusal) -> serde_json::Value;

pub fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    let body = serde_json::to_vec(value).expect("JSON values serialise");
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// A client's deadline for an HTTP call: `X-Request-Timeout-Ms` (HTTP has no standard one;
/// the OIP `timeout` parameter applies too, the earlier winning).
fn deadline(headers: &HeaderMap) -> Result<Option<Instant>, Refusal> {
    let Some(v) = headers.get("x-request-timeout-ms") else {
        return Ok(None);
    };
    let ms: u64 = v
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            Refusal::bad_request("`X-Request-Timeout-Ms` must be a whole number of milliseconds")
        })?;
    Ok(Instant::now().checked_add(Duration::from_millis(ms)))
}

impl Http {
    pub fn new(
        engine: Arc<Engine>,
        config: &Config,
        auth: BearerAuth,
        auth_ops: BearerAuth,
    ) -> Self {
        Self {
            engine,
            auth,
            auth_ops,
            body_limit: config.max_message_mib << 20,
            read_timeout: Duration::from_secs(config.http_read_timeout_secs),
        }
    }

    /// Runs one call as gRPC's `observe` does: the token, the request id, the span, the
    /// metrics, the deadline (answered 504 when it passes), and the model's identity on the
    /// response headers; errors written in the protocol's shape.
    pub async fn observe<F, Fut>(
        &self,
        (protocol, method): (&'static str, &'static str),
        guard: Guard,
        headers: &HeaderMap,
        error_body: ErrorBody,
        handler: F,
    ) -> Response
    where
        F: FnOnce(Call) -> Fut,
        Fut: Future<Output = Result<Response, Refusal>>,
    {
        let id = transport::request_id_of(headers.get("x-request-id").map(|v| v.as_bytes()));
        let auth = match guard {
            Guard::Model => &self.auth,
            Guard::Ops => &self.auth_ops,
        };
        let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
        let result = match (auth.check(authorization), deadline(headers)) {
            (Err(why), _) => Err(Refusal::Http(StatusCode::UNAUTHORIZED, why.into())),
            (Ok(()), Err(refusal)) => Err(refusal),
            (Ok(()), Ok(deadline)) => {
                let call = Call {
                    deadline,
                    priority: Priority::Online,
                };
                let span = transport::request_span(protocol, method, &id, headers);
                let mut guard = CallGuard::new(protocol, method, deadline);
                let r = engine::within(deadline, handler(call))
                    .instrument(span.clone())
                    .await;
                let _enter = span.enter();
                guard.code = Some(r.as_ref().map_or_else(Refusal::code, |_| Code::Ok));
                if let Err(refusal) = &r {
                    match refusal.code() {
                        Code::Internal => tracing::error!(error = %refusal.message(), "failed"),
                        code => tracing::info!(?code, error = %refusal.message(), "refused"),
                    }
                }
                r
            }
        };
        let mut response = match result {
            Ok(response) => response,
            Err(refusal) => {
                let mut response = json(refusal.status(), &error_body(&refusal));
                if refusal.status() == StatusCode::UNAUTHORIZED {
                    response
                        .headers_mut()
                        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                }
                if refusal.status() == StatusCode::TOO_MANY_REQUESTS {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                }
                response
            }
        };
        for (key, value) in transport::identity(&self.engine, &id) {
            if let Ok(v) = HeaderValue::try_from(value) {
                response.headers_mut().insert(key, v);
            }
        }
        response
    }

    /// The request body, whole: at most `--max-message-mib` (413), within the read timeout
    /// (408), without a `Content-Encoding` (415: none is supported).
    pub async fn body(&self, headers: &HeaderMap, body: Body) -> Result<bytes::Bytes, Refusal> {
        if let Some(encoding) = headers.get(header::CONTENT_ENCODING) {
            if encoding != "identity" {
                return Err(Refusal::Http(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("Content-Encoding {encoding:?} is not supported: send the body uncompressed"),
                ));
            }
        }
        let too_large = || {
            Refusal::Http(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body is larger than {} MiB (--max-message-mib)",
                    self.body_limit >> 20
                ),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.body_limit) {
            return Err(too_large());
        }
        let limited = http_body_util::Limited::new(body, self.body_limit);
        match tokio::time::timeout(self.read_timeout, limited.collect()).await {
            Err(_) => Err(Refusal::Http(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the body did not arrive within {} s (--http-read-timeout-secs)",
                    self.read_timeout.as_secs()
                ),
            )),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
            Ok(Err(e)) => Err(Refusal::bad_request(format!("reading the body: {e}"))),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    }
}

/// `Content-Type` must be JSON (or absent, as some clients send it): anything else is 415.
pub fn expect_json(headers: &HeaderMap) -> Result<(), Refusal> {
    match headers.get(header::CONTENT_TYPE) {
        None => Ok(()),
        Some(v) if is_json(v) => Ok(()),
        Some(v) => Err(Refusal::Http(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type {v:?} is not supported: send application/json"),
        )),
    }
}

pub fn is_json(v: &HeaderValue) -> bool {
    v.to_str().is_ok_and(|v| {
        v.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    })
}

/// The HTTP routes of both protocols, with JSON answers for unknown routes and methods.
pub fn router(http: Arc<Http>) -> axum::Router {
    let not_found = || async {
        json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "no such route: the routes are /v2/... (Open Inference Protocol) and /v1/embeddings, /v1/models"}),
        )
    };
    let wrong_method = || async {
        json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "method not allowed on this route"}),
        )
    };
    rest::routes()
        .merge(openai::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method)
        .with_state(http)
}

/// Serves `router` on `listener` until `stop`, then lets open calls finish (the caller bounds
/// that by the drain timeout): the connection cap, the HTTP/2 limits and keepalive of the gRPC
/// port, the header and body read timeouts, and TLS when configured.
pub fn serve(
    config: &Config,
    listener: tokio::net::TcpListener,
    router: axum::Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(
            crate::security::rustls_server_config(cert, key, config.tls_client_ca.as_deref())?,
        )),
        _ => None,
    };
    let c = &config.connections;
    let read_timeout = Duration::from_secs(config.http_read_timeout_secs);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        .max_buf_size((c.max_header_list_kib as usize).max(8) << 10);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(c.max_concurrent_streams)
        .max_header_list_size(c.max_header_list_kib << 10)
        .max_frame_size(c.max_frame_kib << 10)
        .initial_stream_window_size(c.stream_window_kib << 10)
        .initial_connection_window_size(c.connection_window_kib << 10)
        .keep_alive_interval(Some(Duration::from_secs(c.keepalive_interval_secs)))
        .keep_alive_timeout(Duration::from_secs(c.keepalive_timeout_secs));
    let max_connections = c.max_connections;
    Ok(async move {
        let accepted = futures::stream::unfold(listener, |listener| async move {
            let next = listener.accept().await.map(|(socket, _)| {
                let _ = socket.set_nodelay(true);
                socket
            });
            Some((next, listener))
        });
        let incoming = connections::limit(accepted, max_connections);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        tokio::pin!(incoming, stop);
        loop {
            let socket = tokio::select! {
                next = incoming.next() => match next {
                    Some(Ok(socket)) => socket,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "HTTP accept failed");
                        continue;
                    }
                    None => break,
                },
                _ = &mut stop => break,
            };
            let service = TowerToHyperService::new(router.clone());
            let builder = builder.clone();
            let watcher = graceful.watcher();
            let tls = tls.clone();
            tokio::spawn(async move {
                let served = match tls {
                    None => {
                        let conn = builder.serve_connection(TokioIo::new(socket), service);
                        watcher.watch(conn.into_owned()).await
                    }
                    Some(acceptor) => {
                        let Ok(Ok(stream)) =
                            tokio::time::timeout(read_timeout, acceptor.accept(socket)).await
                        else {
                            tracing::debug!("HTTP TLS handshake failed or timed out");
                            return;
                        };
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        watcher.watch(conn.into_owned()).await
                    }
                };
                if let Err(e) = served {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
            });
        }
        graceful.shutdown().await;
    })
}
