//! The gRPC surface: validate → preprocess (blocking pool) → admit and queue → await the
//! worker → postprocess → respond. Every handler runs inside a span carrying the request id
//! and is counted in the request metrics, including when the client goes away mid-call.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate_mae::{CrateMae, Mask, Pooling};
use futures::{Stream, StreamExt};
use tokio::sync::oneshot;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::batching::{
    Admission, CompleteParams, EmbedParams, Item, ItemResult, Output, Permit, Queues, Task, Timing,
};
use crate::error::ServeError;
use crate::imaging::{self, Pixels, Preprocessing};
use crate::pb;
use crate::telemetry;

/// What the handlers share.
pub struct AppState {
    pub queues: Arc<Queues>,
    pub admission: Arc<Admission>,
    pub max_images_per_request: usize,
    /// MiB of image decoding allowed at once (see `preprocess`).
    pub decode_budget: Arc<tokio::sync::Semaphore>,
    pub decode_budget_mib: u32,
    pub ready: OnceLock<Ready>,
    pub draining: AtomicBool,
    /// Requests past admission, and how they ended: the shutdown log's "zero lost" check.
    pub ledger: Ledger,
}

/// Requests admitted, and answered OK or with an error; `admitted − ok − failed` were
/// abandoned by their clients (or are still running).
#[derive(Debug, Default)]
pub struct Ledger {
    pub admitted: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

/// Set once the model is loaded and warmed up.
pub struct Ready {
    pub model: Arc<CrateMae>,
    pub info: pb::ModelInfo,
    pub prep: Preprocessing,
}

impl AppState {
    fn ready(&self) -> Result<&Ready, ServeError> {
        if self.draining.load(Ordering::Acquire) {
            return Err(ServeError::Unavailable("server is shutting down".into()));
        }
        self.ready
            .get()
            .ok_or_else(|| ServeError::Unavailable("model is still loading; retry shortly".into()))
    }
}

#[derive(Clone)]
pub struct CrateMaeService {
    state: Arc<AppState>,
}

impl CrateMaeService {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

const DEADLINE_SLACK: Duration = Duration::from_millis(2);

/// Decrements the in-flight gauge and records the outcome even if the call is dropped.
/// A call that ends unanswered (client cancelled, or tonic's deadline layer gave up) or
/// answered DEADLINE_EXCEEDED counts once in `cratemae_dropped_requests_total`.
struct CallGuard {
    method: &'static str,
    started: Instant,
    deadline: Option<Instant>,
    code: Option<tonic::Code>,
}

impl CallGuard {
    fn new(method: &'static str, deadline: Option<Instant>) -> Self {
        telemetry::inflight(1.0);
        Self {
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
            None if expired => tonic::Code::DeadlineExceeded,
            None => tonic::Code::Cancelled,
        };
        match code {
            tonic::Code::DeadlineExceeded => telemetry::dropped("deadline"),
            tonic::Code::Cancelled => telemetry::dropped("cancelled"),
            _ => {}
        }
        telemetry::request_finished(self.method, code, self.started.elapsed());
    }
}

fn request_id<T>(request: &Request<T>) -> String {
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
fn deadline<T>(request: &Request<T>) -> Option<Instant> {
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

/// Runs one unary call with its span, metrics and request id.
async fn observe<T, R, F, Fut>(
    method: &'static str,
    request: Request<T>,
    handler: F,
) -> Result<Response<R>, Status>
where
    F: FnOnce(T, Option<Instant>) -> Fut,
    Fut: std::future::Future<Output = Result<R, ServeError>>,
{
    let id = request_id(&request);
    let deadline = deadline(&request);
    let span = tracing::info_span!("request", method, request_id = %id);
    let mut guard = CallGuard::new(method, deadline);
    let result = handler(request.into_inner(), deadline)
        .instrument(span.clone())
        .await;
    let _enter = span.enter();
    match result {
        Ok(body) => {
            guard.code = Some(tonic::Code::Ok);
            tracing::debug!(
                elapsed_ms = guard.started.elapsed().as_secs_f64() * 1e3,
                "ok"
            );
            let mut response = Response::new(body);
            if let Ok(v) = MetadataValue::try_from(id.as_str()) {
                response.metadata_mut().insert("x-request-id", v);
            }
            Ok(response)
        }
        Err(e) => {
            guard.code = Some(e.code());
            match &e {
                ServeError::Internal(_) => tracing::error!(error = %e, "failed"),
                _ => tracing::info!(code = ?e.code(), error = %e, "refused"),
            }
            let mut status = Status::from(e);
            if let Ok(v) = MetadataValue::try_from(id.as_str()) {
                status.metadata_mut().insert("x-request-id", v);
            }
            Err(status)
        }
    }
}

fn timing_pb(t: &Timing) -> pb::Timing {
    pb::Timing {
        queue_seconds: t.queue.as_secs_f64(),
        inference_seconds: t.inference.as_secs_f64(),
        batch_size: t.batch_size as u32,
    }
}

fn diagnostics_pb(d: &[crate::batching::ImageDiagnostics]) -> Vec<pb::LayerDiagnostics> {
    d.iter()
        .map(|l| pb::LayerDiagnostics {
            layer: l.layer as u32,
            coding_rate: l.coding_rate,
            expansion_rate: l.expansion_rate,
            rate_reduction: l.expansion_rate - l.coding_rate,
            sparsity: l.sparsity,
        })
        .collect()
}

impl AppState {
    /// Decodes/validates one image on the blocking pool.
    async fn preprocess(&self, ready: &Ready, image: pb::Image) -> Result<Pixels, ServeError> {
        let prep = ready.prep.clone();
        // Decoding is the one step whose memory a client controls (a small, highly
        // compressible PNG can declare 40 M pixels): reserve its worst case from a global
        // budget first, so concurrent decodes cannot take the process past its limit.
        let _reserved = if image.tensor.is_none() && !image.encoded.is_empty() {
            let (_, w, h) = prep.header(&image.encoded)?;
            let mib = Preprocessing::decode_mib(w, h);
            if mib > self.decode_budget_mib {
                return Err(ServeError::ResourceExhausted(format!(
                    "a {w}×{h} image needs about {mib} MiB to decode, above the decode budget of {} MiB",
                    self.decode_budget_mib
                )));
            }
            let permit = Arc::clone(&self.decode_budget)
                .acquire_many_owned(mib)
                .await
                .map_err(|_| ServeError::Unavailable("server is shutting down".into()))?;
            Some(permit)
        } else {
            None
        };
        tokio::task::spawn_blocking(move || match (image.encoded.is_empty(), image.tensor) {
            (false, None) => prep.encoded(&image.encoded),
            (true, Some(t)) => prep.raw(&t.shape, t.data),
            (false, Some(_)) => Err(ServeError::invalid(
                "set either `encoded` or `tensor`, not both",
            )),
            (true, None) => Err(ServeError::invalid(
                "image is empty: set `encoded` (PNG/JPEG bytes) or `tensor`",
            )),
        })
        .await
        .map_err(|e| ServeError::Internal(format!("preprocessing task failed: {e}")))?
    }

    /// Admits, queues and awaits one request's images.
    async fn submit(
        &self,
        work: Vec<(Pixels, Task)>,
        permits: Vec<Permit>,
        deadline: Option<Instant>,
    ) -> Result<Vec<(Output, Timing)>, ServeError> {
        let now = Instant::now();
        let (items, receivers): (Vec<Item>, Vec<oneshot::Receiver<ItemResult>>) = work
            .into_iter()
            .zip(permits)
            .map(|((pixels, task), permit)| {
                let (reply, rx) = oneshot::channel();
                (
                    Item {
                        pixels,
                        task,
                        deadline,
                        admitted_at: now,
                        reply,
                        permit,
                    },
                    rx,
                )
            })
            .unzip();
        self.queues.push(items)?;
        self.ledger.admitted.fetch_add(1, Ordering::Relaxed);
        let mut outputs = Vec::with_capacity(receivers.len());
        let mut failure = None;
        for rx in receivers {
            match rx.await {
                Ok(Ok(output)) => outputs.push(output),
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(_) => {
                    failure = failure.or(Some(ServeError::Unavailable(
                        "the model worker stopped before answering".into(),
                    )))
                }
            }
        }
        let counter = if failure.is_some() {
            &self.ledger.failed
        } else {
            &self.ledger.ok
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match failure {
            Some(e) => Err(e),
            None => Ok(outputs),
        }
    }

    async fn embed(
        &self,
        req: pb::EmbedRequest,
        deadline: Option<Instant>,
    ) -> Result<pb::EmbedResponse, ServeError> {
        let ready = self.ready()?;
        let cfg = ready.model.config();
        let n = req.images.len();
        if n == 0 {
            return Err(ServeError::invalid(
                "no images: send at least one in `images`",
            ));
        }
        if n > self.max_images_per_request {
            return Err(ServeError::ResourceExhausted(format!(
                "{n} images in one request, the limit is {}; split the request or use EmbedStream",
                self.max_images_per_request
            )));
        }
        let check_layer = |what: &str, l: Option<u32>| -> Result<Option<usize>, ServeError> {
            match l {
                Some(l) if l as usize >= cfg.depth => Err(ServeError::invalid(format!(
                    "{what} {l} does not exist: the encoder has layers 0..{}",
                    cfg.depth - 1
                ))),
                other => Ok(other.map(|l| l as usize)),
            }
        };
        let pooling = match pb::Pooling::try_from(req.pooling) {
            Ok(pb::Pooling::Unspecified | pb::Pooling::Cls) => Pooling::Cls,
            Ok(pb::Pooling::Mean) => Pooling::Mean,
            Err(_) => {
                return Err(ServeError::invalid(format!(
                    "unknown pooling value {}",
                    req.pooling
                )))
            }
        };
        let params = EmbedParams {
            pooling,
            layer: check_layer("layer", req.layer)?,
            normalize: req.normalize,
            patch_tokens: req.include_patch_tokens,
            diagnostics: req.include_diagnostics,
            attention_layer: check_layer("attention_layer", req.attention_layer)?,
        };
        // Admission before decoding: under overload, refuse before spending CPU on it.
        let permits = self.admission.try_admit(n)?;
        let pixels = futures::future::join_all(
            req.images
                .into_iter()
                .map(|img| self.preprocess(ready, img)),
        )
        .await
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.map_err(|e| prefix_image(i, n, e)))
        .collect::<Result<Vec<_>, _>>()?;
        let work = pixels
            .into_iter()
            .map(|p| (p, Task::Embed(params.clone())))
            .collect();
        let outputs = self.submit(work, permits, deadline).await?;
        let mut timing = Timing::default();
        let embeddings = outputs
            .into_iter()
            .map(|(out, t)| {
                timing.queue = timing.queue.max(t.queue);
                timing.inference = timing.inference.max(t.inference);
                timing.batch_size = timing.batch_size.max(t.batch_size);
                match out {
                    Output::Embed(e) => Ok(pb::Embedding {
                        values: e.values,
                        patch_tokens: e.patch_tokens,
                        diagnostics: diagnostics_pb(&e.diagnostics),
                        attention: e.attention.map(|(heads, cls)| pb::AttentionMap {
                            layer: params.attention_layer.unwrap_or(0) as u32,
                            heads: heads as u32,
                            grid_size: cfg.grid_size() as u32,
                            cls_to_patches: cls,
                        }),
                    }),
                    Output::Complete(_) => Err(ServeError::Internal(
                        "completion output for an embed request".into(),
                    )),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(pb::EmbedResponse {
            embeddings,
            dim: cfg.dim as u32,
            timing: Some(timing_pb(&timing)),
        })
    }

    /// `embed` for streams: an error status would end the whole stream, so a full queue is
    /// waited out (with backoff, until the stream's deadline) instead of refused. The
    /// stream's own flow control then paces the client.
    async fn embed_when_admitted(
        &self,
        req: pb::EmbedRequest,
        deadline: Option<Instant>,
    ) -> Result<pb::EmbedResponse, ServeError> {
        let mut pause = Duration::from_millis(2);
        loop {
            match self.embed(req.clone(), deadline).await {
                Err(ServeError::QueueFull(_))
                    if deadline.is_none_or(|d| Instant::now() + pause < d) =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }

    async fn complete(
        &self,
        req: pb::CompleteRequest,
        deadline: Option<Instant>,
    ) -> Result<pb::CompleteResponse, ServeError> {
        let ready = self.ready()?;
        let cfg = ready.model.config();
        let l = cfg.num_patches();
        let mask = if req.masked_patches.is_empty() {
            let ratio = if req.mask_ratio == 0.0 {
                0.75
            } else {
                req.mask_ratio
            };
            Mask::check_ratio(ratio)?;
            Mask::random(1, l, ratio, req.seed)?
        } else {
            let indices: Vec<usize> = req.masked_patches.iter().map(|&i| i as usize).collect();
            Mask::from_indices(&[indices], l)?
        };
        if mask.masked_count(0) == 0 {
            return Err(ServeError::invalid(format!(
                "the mask hides no patch (ratio {} of {l} patches rounds down to none): raise mask_ratio",
                req.mask_ratio
            )));
        }
        let image = req
            .image
            .ok_or_else(|| ServeError::invalid("no image: set `image`"))?;
        let permits = self.admission.try_admit(1)?;
        let pixels = self.preprocess(ready, image).await?;
        let task = Task::Complete(CompleteParams {
            mask: mask.clone(),
            diagnostics: req.include_diagnostics,
        });
        let mut outputs = self
            .submit(vec![(pixels.clone(), task)], permits, deadline)
            .await?;
        let (out, timing) = outputs
            .pop()
            .ok_or_else(|| ServeError::Internal("no output".into()))?;
        let Output::Complete(out) = out else {
            return Err(ServeError::Internal(
                "embedding output for a completion request".into(),
            ));
        };
        let prep = ready.prep.clone();
        let patch = cfg.patch_size as u32;
        let masked = mask.rows()[0].clone();
        let (reconstruction, composite, masked_input) = tokio::task::spawn_blocking(move || {
            Ok::<_, ServeError>((
                imaging::png(&prep.to_rgb(&out.reconstruction))?,
                imaging::png(&prep.to_rgb(&out.composite))?,
                imaging::png(&prep.masked_view(&pixels, &masked, patch))?,
            ))
        })
        .await
        .map_err(|e| ServeError::Internal(format!("PNG task failed: {e}")))??;
        Ok(pb::CompleteResponse {
            reconstruction,
            composite,
            masked_input,
            masked_patches: (0..l as u32)
                .filter(|&i| mask.rows()[0][i as usize])
                .collect(),
            grid_size: cfg.grid_size() as u32,
            masked_patch_mse: out.masked_patch_mse,
            timing: Some(timing_pb(&timing)),
            diagnostics: diagnostics_pb(&out.diagnostics),
        })
    }
}

fn prefix_image(index: usize, count: usize, e: ServeError) -> ServeError {
    if count == 1 {
        return e;
    }
    let msg = format!("image {index}: {e}");
    match e {
        ServeError::InvalidArgument(_) => ServeError::InvalidArgument(msg),
        ServeError::ResourceExhausted(_) => ServeError::ResourceExhausted(msg),
        other => other,
    }
}

type EmbedStream = Pin<Box<dyn Stream<Item = Result<pb::EmbedResponse, Status>> + Send>>;

/// Requests of one stream kept in flight at once.
const STREAM_WINDOW: usize = 8;

#[tonic::async_trait]
impl pb::crate_mae_server::CrateMae for CrateMaeService {
    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let state = Arc::clone(&self.state);
        observe("Embed", request, |req, deadline| async move {
            state.embed(req, deadline).await
        })
        .await
    }

    type EmbedStreamStream = EmbedStream;

    async fn embed_stream(
        &self,
        request: Request<Streaming<pb::EmbedRequest>>,
    ) -> Result<Response<EmbedStream>, Status> {
        self.state.ready()?;
        let state = Arc::clone(&self.state);
        let id = request_id(&request);
        let deadline = deadline(&request);
        let inbound = request.into_inner();
        let out = inbound
            .map(move |msg| {
                let state = Arc::clone(&state);
                async move {
                    let mut guard = CallGuard::new("EmbedStream", deadline);
                    let result = match msg {
                        Ok(req) => state
                            .embed_when_admitted(req, deadline)
                            .await
                            .map_err(Status::from),
                        Err(status) => Err(status),
                    };
                    guard.code = Some(
                        result
                            .as_ref()
                            .map_or_else(|s| s.code(), |_| tonic::Code::Ok),
                    );
                    result
                }
            })
            .buffered(STREAM_WINDOW);
        let mut response = Response::new(Box::pin(out) as EmbedStream);
        if let Ok(v) = MetadataValue::try_from(id.as_str()) {
            response.metadata_mut().insert("x-request-id", v);
        }
        Ok(response)
    }

    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        let state = Arc::clone(&self.state);
        observe("Complete", request, |req, deadline| async move {
            state.complete(req, deadline).await
        })
        .await
    }

    async fn get_model_info(
        &self,
        request: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let state = Arc::clone(&self.state);
        observe("GetModelInfo", request, |_, _| async move {
            state
                .ready
                .get()
                .map(|r| r.info.clone())
                .ok_or_else(|| ServeError::Unavailable("model is still loading".into()))
        })
        .await
    }
}
