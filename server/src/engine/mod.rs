//! The serving core, with no transport types: admission, the decode budget, preprocessing,
//! the embed/complete queues and the model workers behind the [`Backend`] trait.
//!
//! Data flows one way: a transport calls [`Engine::embed`] / [`Engine::complete`] →
//! validate → admit → preprocess (blocking pool) → queue → batch → model (a worker thread)
//! → postprocess → the transport's response. The request's tracing span is carried with
//! every image, so the worker's `batch` and `model` spans appear under it.

mod admission;
mod backend;
mod candle;
mod queue;
mod startup;
mod stats;
mod types;
mod worker;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate_mae::{Mask, Pooling};
use tokio::sync::{oneshot, watch, Semaphore};
use tracing::Instrument;

// The engine's public face: the engine, its settings and state, what goes in and comes out,
// and the backend seam (with the real backend). Everything else is the engine's own.
pub use backend::{Backend, EmbedOutputs, PixelBatch};
pub use candle::CandleBackend;
pub use queue::Kind;
pub use startup::set_after_warm_up;
pub use stats::{KindStatistics, Totals};
pub(crate) use types::Task;
pub use types::{
    AttentionMap, Call, CompleteRequest, CompleteResult, CompleteTask, Completed, CompletedPixels,
    EmbedRequest, EmbedResult, EmbedTask, Embedding, ImageDiagnostics, ImageInput, MaskSpec,
    ModelFacts, ModelInfo, Priority, Threading, Timing, WhitenedGridFacts,
};

use crate::error::ServeError;
use crate::imaging::{self, Preprocessing, SharedPixels};
use admission::Admission;
use queue::{Item, ItemResult, Output, Queues};
use stats::{RequestTimes, Statistics};
use worker::Workers;

/// The engine's settings (from the server's configuration).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The name clients address the model by.
    pub model_name: String,
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    pub max_queue_images: usize,
    pub max_images_per_request: usize,
    pub max_image_pixels: u64,
    pub max_decode_mib: u32,
    pub complete_cost: f64,
    pub diagnostics_every: u64,
    /// At most one diagnostics sample per this interval.
    pub diagnostics_interval: Duration,
    /// `None`: measured at warm-up.
    pub threading: Option<Threading>,
}

/// Where the engine is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Loading the weights and warming up.
    Loading,
    Serving,
    /// Shutting down: admitted work finishes, new work is refused.
    Draining,
    /// Cannot serve: the model failed to load, the device was lost, or the workers stopped.
    Failed(String),
}

/// Requests admitted, and answered OK or with an error; `admitted − ok − failed` were
/// abandoned by their clients (or are still running).
#[derive(Debug, Default)]
pub struct Ledger {
    pub admitted: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

struct Ready {
    info: ModelInfo,
    prep: Preprocessing,
}

pub struct Engine {
    config: EngineConfig,
    queues: Arc<Queues>,
    admission: Admission,
    /// MiB of image decoding allowed at once (see [`Engine::preprocess`]).
    decode_budget: Arc<Semaphore>,
    ready: OnceLock<Ready>,
    state: watch::Sender<State>,
    ledger: Ledger,
    stats: Arc<Statistics>,
    workers: Mutex<Option<Workers>>,
}

impl Engine {
    /// Starts loading on a thread of its own (the backend is built there, so it owns its
    /// device from the start) and returns at once in [`State::Loading`].
    pub fn start<B, F>(config: EngineConfig, load: F) -> std::io::Result<Arc<Self>>
    where
        B: Backend,
        F: FnOnce() -> Result<B, String> + Send + 'static,
    {
        let engine = Arc::new(Self {
            queues: Arc::new(Queues::new(
                config.max_batch_size,
                config.max_batch_delay,
                config.complete_cost,
            )),
            admission: Admission::new(config.max_queue_images)
                .fitting_requests_of(config.max_images_per_request),
            decode_budget: Arc::new(Semaphore::new(config.max_decode_mib as usize)),
            ready: OnceLock::new(),
            state: watch::Sender::new(State::Loading),
            ledger: Ledger::default(),
            stats: Arc::new(Statistics::default()),
            workers: Mutex::new(None),
            config,
        });
        crate::telemetry::register_kinds(&Kind::ALL.map(Kind::label));
        let weak = Arc::downgrade(&engine);
        std::thread::Builder::new()
            .name("cratemae-loader".into())
            .spawn(move || {
                let outcome =
                    load().and_then(|backend| startup::bring_up(&weak, Arc::new(backend)));
                if let (Err(e), Some(engine)) = (outcome, weak.upgrade()) {
                    tracing::error!(error = %e, "the model cannot serve");
                    engine.fail(e);
                }
            })?;
        Ok(engine)
    }

    /// Follows the engine's state (health reporting).
    pub fn state(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    /// The loaded model (also while draining, for the answers still going out).
    pub fn info(&self) -> Result<&ModelInfo, ServeError> {
        match self.ready.get() {
            Some(ready) => Ok(&ready.info),
            None => Err(ServeError::Unavailable(
                "model is still loading; retry shortly".into(),
            )),
        }
    }

    /// Whether new work is accepted now.
    pub fn serving(&self) -> bool {
        *self.state.borrow() == State::Serving
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Counters since start for one kind of work (the Open Inference Protocol's statistics).
    pub fn statistics(&self, kind: Kind) -> KindStatistics {
        self.stats.read(kind)
    }

    /// Runs one request and counts it in the statistics, OK (with where its time went) or not.
    async fn accounted<R>(
        &self,
        kind: Kind,
        work: impl Future<Output = Result<R, ServeError>>,
        timing: fn(&R) -> &Timing,
    ) -> Result<R, ServeError> {
        let started = Instant::now();
        let result = work.await;
        let total = started.elapsed();
        let times = match &result {
            Ok(r) => {
                let t = timing(r);
                RequestTimes {
                    total,
                    input: t.preprocess,
                    queue: t.queue,
                    infer: t.inference,
                    output: total.saturating_sub(t.preprocess + t.queue + t.inference),
                }
            }
            Err(_) => RequestTimes {
                total,
                ..Default::default()
            },
        };
        self.stats.request(kind, result.is_ok(), times);
        result
    }

    /// Images admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.admission.in_flight()
    }

    fn ready(&self) -> Result<&Ready, ServeError> {
        match &*self.state.borrow() {
            State::Serving => {}
            State::Loading => {
                return Err(ServeError::Unavailable(
                    "model is still loading; retry shortly".into(),
                ))
            }
            State::Draining => {
                return Err(ServeError::Unavailable("server is shutting down".into()))
            }
            State::Failed(why) => {
                return Err(ServeError::Unavailable(format!(
                    "server cannot serve: {why}"
                )))
            }
        }
        self.ready
            .get()
            .ok_or_else(|| ServeError::Internal("serving without a model".into()))
    }

    fn fail(&self, why: String) {
        self.state.send_if_modified(|s| {
            let change = !matches!(s, State::Failed(_) | State::Draining);
            if change {
                *s = State::Failed(why.clone());
            }
            change
        });
        let error = ServeError::Unavailable(format!("server cannot serve: {why}"));
        self.queues.fail_all(&error);
    }

    /// Refuses new work from now on; what was admitted still finishes.
    pub fn begin_drain(&self) {
        self.state.send_if_modified(|s| {
            let change = *s != State::Draining;
            *s = State::Draining;
            change
        });
    }

    /// After the transports have finished: stops the workers once the queues are empty,
    /// waiting at most `timeout` for them.
    pub fn shutdown(&self, timeout: Duration) {
        self.begin_drain();
        self.admission.close();
        self.queues.close();
        if let Some(workers) = self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            // A plain thread: joining must not hold up the async runtime's own shutdown.
            let (joined_tx, joined_rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                workers.join();
                let _ = joined_tx.send(());
            });
            let _ = joined_rx.recv_timeout(timeout);
        }
    }

    /// One embedding per image, in request order.
    pub async fn embed(&self, req: EmbedRequest, call: Call) -> Result<EmbedResult, ServeError> {
        self.accounted(Kind::Embed, self.embed_images(req, call), |r| &r.timing)
            .await
    }

    /// Masked completion of each image with its own mask.
    pub async fn complete(
        &self,
        req: CompleteRequest,
        call: Call,
    ) -> Result<CompleteResult, ServeError> {
        self.accounted(Kind::Complete, self.complete_images(req, call), |r| {
            &r.timing
        })
        .await
    }

    async fn embed_images(&self, req: EmbedRequest, call: Call) -> Result<EmbedResult, ServeError> {
        let ready = self.ready()?;
        let cfg = ready.info.config();
        let n = req.images.len();
        self.check_count(n)?;
        let layer = |what: &str, l: Option<u32>| -> Result<Option<usize>, ServeError> {
            match l {
                Some(l) if l as usize >= cfg.depth => Err(ServeError::invalid(format!(
                    "{what} {l} does not exist: the encoder's layers are 0 to {} inclusive",
                    cfg.depth - 1
                ))),
                other => Ok(other.map(|l| l as usize)),
            }
        };
        let facts = &ready.info.facts;
        let pooling = req.pooling.unwrap_or(facts.recommended_pooling);
        let source = layer("layer", req.layer)?;
        let mut pooled_from = source;
        // The whitened grid reads its own blocks' output, whatever `layer` says of the rest.
        if pooling == Pooling::WhitenedGrid {
            let Some(w) = facts.whitened_grid else {
                return Err(ServeError::invalid(
                    "pooling whitened-grid: this model's weights carry no whitened grid readout; use cls or mean",
                ));
            };
            if let Some(l) = source.filter(|&l| l != w.spec.layer) {
                return Err(ServeError::invalid(format!(
                    "pooling whitened-grid reads {}'s output; leave `layer` unset (or send {}, its deepest) to use it, or pick cls or mean pooling for layer {l}",
                    w.spec.describe_layers(),
                    w.spec.layer
                )));
            }
            pooled_from = Some(w.spec.layer);
        }
        let task = Arc::new(EmbedTask {
            pooling,
            layer: source,
            pooled_from,
            normalize: req.normalize,
            patch_tokens: req.patch_tokens,
            diagnostics: req.diagnostics,
            attention_layer: layer("attention_layer", req.attention_layer)?,
        });
        let work = req
            .images
            .into_iter()
            .map(|image| (image, Task::Embed(Arc::clone(&task))))
            .collect();
        let (outputs, timing) = self.run(ready, work, call).await?;
        let embeddings = outputs
            .into_iter()
            .map(|(_, out)| match out {
                Output::Embed(e) => Ok(e),
                Output::Complete(_) => Err(ServeError::internal("completion for an embedding")),
            })
            .collect::<Result<_, _>>()?;
        Ok(EmbedResult { embeddings, timing })
    }

    async fn complete_images(
        &self,
        req: CompleteRequest,
        call: Call,
    ) -> Result<CompleteResult, ServeError> {
        let ready = self.ready()?;
        let patches = ready.info.config().num_patches();
        let n = req.images.len();
        self.check_count(n)?;
        let work = req
            .images
            .into_iter()
            .enumerate()
            .map(|(i, (image, spec))| {
                let mask = build_mask(&spec, patches).map_err(|e| prefix(i, n, e))?;
                Ok((
                    image,
                    Task::Complete(CompleteTask {
                        mask,
                        diagnostics: req.diagnostics,
                    }),
                ))
            })
            .collect::<Result<Vec<_>, ServeError>>()?;
        let (outputs, timing) = self.run(ready, work, call).await?;
        let prep = ready.prep.clone();
        let patch = ready.info.config().patch_size as u32;
        // PNG encoding is CPU work: the blocking pool, not the async threads.
        let images = tokio::task::spawn_blocking(move || {
            outputs
                .into_iter()
                .map(|((pixels, task), out)| {
                    let (Task::Complete(task), Output::Complete(out)) = (task, out) else {
                        return Err(ServeError::internal("embedding for a completion"));
                    };
                    let masked = &task.mask.rows()[0];
                    Ok(Completed {
                        reconstruction_png: imaging::png(&prep.to_rgb(&out.reconstruction))?,
                        composite_png: imaging::png(&prep.to_rgb(&out.composite))?,
                        masked_input_png: imaging::png(&prep.masked_view(&pixels, masked, patch))?,
                        masked_patches: (0..masked.len() as u32)
                            .filter(|&i| masked[i as usize])
                            .collect(),
                        masked_patch_mse: out.masked_patch_mse,
                        diagnostics: out.diagnostics,
                    })
                })
                .collect::<Result<Vec<_>, ServeError>>()
        })
        .await
        .map_err(|e| ServeError::Internal(format!("PNG task failed: {e}")))??;
        Ok(CompleteResult { images, timing })
    }

    fn check_count(&self, n: usize) -> Result<(), ServeError> {
        if n == 0 {
            return Err(ServeError::invalid("no images: send at least one"));
        }
        let limit = self.config.max_images_per_request;
        if n > limit {
            return Err(ServeError::ResourceExhausted(format!(
                "{n} images in one request, the limit is {limit}; split the request or use a stream"
            )));
        }
        Ok(())
    }

    /// Admit → preprocess → queue → await every image's result. Returns each image's pixels
    /// and task with its output, and the request's timing.
    #[allow(clippy::type_complexity)]
    async fn run(
        &self,
        ready: &Ready,
        work: Vec<(ImageInput, Task)>,
        call: Call,
    ) -> Result<(Vec<((SharedPixels, Task), Output)>, Timing), ServeError> {
        let n = work.len();
        // Admission before decoding: under overload, refuse before spending CPU on it.
        let permits = self
            .admission
            .admit(n, call.priority, call.deadline)
            .await?;
        let (images, tasks): (Vec<ImageInput>, Vec<Task>) = work.into_iter().unzip();
        let preprocessing = Instant::now();
        let pixels = futures::future::join_all(
            images
                .into_iter()
                .map(|image| self.preprocess(&ready.prep, image)),
        )
        .instrument(tracing::info_span!("preprocess", images = n))
        .await
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.map_err(|e| prefix(i, n, e)))
        .collect::<Result<Vec<_>, _>>()?;

        let now = Instant::now();
        let preprocess = now - preprocessing;
        let request_span = tracing::Span::current();
        let mut receivers: Vec<oneshot::Receiver<ItemResult>> = Vec::with_capacity(n);
        let mut items = Vec::with_capacity(n);
        for ((pixels, task), permit) in pixels.iter().zip(&tasks).zip(permits) {
            let (reply, rx) = oneshot::channel();
            receivers.push(rx);
            items.push(Item {
                pixels: Arc::clone(pixels),
                task: task.clone(),
                priority: call.priority,
                deadline: call.deadline,
                admitted_at: now,
                reply,
                permit,
                span: request_span.clone(),
                waiting: tracing::info_span!("queue"),
            });
        }
        self.queues.push(items)?;
        self.ledger.admitted.fetch_add(1, Ordering::Relaxed);
        let mut outputs = Vec::with_capacity(n);
        let mut timing = Timing::default();
        let mut failure = None;
        for rx in receivers {
            match rx.await {
                Ok(Ok((output, t))) => {
                    timing = timing.max(t);
                    outputs.push(output);
                }
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(_) => {
                    failure = failure.or(Some(ServeError::Unavailable(
                        "the model worker stopped before answering".into(),
                    )))
                }
            }
        }
        let counter = match failure {
            Some(_) => &self.ledger.failed,
            None => &self.ledger.ok,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(e) = failure {
            return Err(e);
        }
        timing.preprocess = preprocess;
        Ok((pixels.into_iter().zip(tasks).zip(outputs).collect(), timing))
    }

    /// Decodes/validates one image on the blocking pool.
    async fn preprocess(
        &self,
        prep: &Preprocessing,
        image: ImageInput,
    ) -> Result<SharedPixels, ServeError> {
        let prep = prep.clone();
        // Decoding is the one step whose memory a client controls (a small, highly
        // compressible PNG can declare 40 M pixels): reserve its worst case from a global
        // budget first, so concurrent decodes cannot take the process past its limit.
        let _reserved = match &image {
            ImageInput::Encoded(bytes) => {
                let (_, w, h) = prep.header(bytes)?;
                let mib = Preprocessing::decode_mib(w, h);
                let budget = self.config.max_decode_mib;
                if mib > budget {
                    return Err(ServeError::ResourceExhausted(format!(
                        "a {w}×{h} image needs about {mib} MiB to decode, above the decode budget of {budget} MiB"
                    )));
                }
                Some(
                    Arc::clone(&self.decode_budget)
                        .acquire_many_owned(mib)
                        .await
                        .map_err(|_| ServeError::Unavailable("server is shutting down".into()))?,
                )
            }
            ImageInput::Pixels { .. } => None,
        };
        tokio::task::spawn_blocking(move || match image {
            ImageInput::Encoded(bytes) => prep.encoded(&bytes),
            ImageInput::Pixels { shape, data } => prep.raw(&shape, data),
        })
        .await
        .map_err(|e| ServeError::Internal(format!("preprocessing task failed: {e}")))?
        .map(Arc::new)
    }
}

/// Runs `work` until `deadline`, then answers DEADLINE_EXCEEDED. The clock is read before the
/// timer is polled, so a caller whose own timer fired at the same deadline sees this answer.
pub async fn within<T, E: From<ServeError>>(
    deadline: Option<Instant>,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let Some(deadline) = deadline else {
        return work.await;
    };
    let mut work = std::pin::pin!(work);
    let mut timer = std::pin::pin!(tokio::time::sleep_until(deadline.into()));
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(done) = work.as_mut().poll(cx) {
            return std::task::Poll::Ready(done);
        }
        if Instant::now() >= deadline || timer.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Err(ServeError::DeadlineExceeded(
                "deadline expired before the answer was ready".into(),
            )
            .into()));
        }
        std::task::Poll::Pending
    })
    .await
}

fn prefix(index: usize, count: usize, e: ServeError) -> ServeError {
    if count == 1 {
        e
    } else {
        e.prefixed(&format!("image {index}"))
    }
}

fn build_mask(spec: &MaskSpec, patches: usize) -> Result<Mask, ServeError> {
    let mask = match spec {
        MaskSpec::Random { ratio, seed } => {
            Mask::check_ratio(*ratio)?;
            let mask = Mask::random(1, patches, *ratio, *seed)?;
            if mask.masked_count(0) == 0 {
                return Err(ServeError::invalid(format!(
                    "the mask hides no patch (ratio {ratio} of {patches} patches rounds down to none): raise the mask ratio"
                )));
            }
            mask
        }
        MaskSpec::Patches(indices) => {
            if indices.is_empty() {
                return Err(ServeError::invalid(
                    "the mask hides no patch: list at least one",
                ));
            }
            let indices: Vec<usize> = indices.iter().map(|&i| i as usize).collect();
            Mask::from_indices(&[indices], patches)?
        }
    };
    Ok(mask)
}
