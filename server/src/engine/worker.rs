//! The model workers: threads that take batches from the queues and run them through the
//! backend, each inside its own compute thread pool.
//!
//! A panic inside the model fails only its batch (the model is immutable, so nothing is left
//! half-updated). A batch that runs out of device memory is retried in halves down to single
//! images; only what still does not fit fails, with RESOURCE_EXHAUSTED. A lost device is
//! reported once to the engine, which stops serving.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::engine::backend::{Backend, PixelBatch};
use crate::engine::queue::{Batch, Item, Kind, Output, Queues};
use crate::engine::stats::Statistics;
use crate::engine::types::{Task, Threading, Timing};
use crate::error::ServeError;
use crate::telemetry;

/// Told when the device is lost for good.
pub type OnDeviceLost = Arc<dyn Fn(&ServeError) + Send + Sync>;

pub struct Workers {
    threads: Vec<JoinHandle<()>>,
    alive: Arc<AtomicUsize>,
}

struct Runner<B> {
    backend: Arc<B>,
    stats: Arc<Statistics>,
    sampler: Arc<Sampler>,
    on_device_lost: OnDeviceLost,
}

/// When an embedding batch also feeds the diagnostics gauges: every `every`-th batch, and at
/// most once per `interval` (a scrape reads them every 15–30 s; sampling hundreds of batches
/// a second would only cost throughput).
pub struct Sampler {
    every: u64,
    interval: std::time::Duration,
    batches: AtomicU64,
    last: std::sync::Mutex<Option<Instant>>,
}

impl Sampler {
    pub fn new(every: u64, interval: std::time::Duration) -> Self {
        Self {
            every,
            interval,
            batches: AtomicU64::new(0),
            last: std::sync::Mutex::new(None),
        }
    }

    fn due(&self) -> bool {
        let n = self.batches.fetch_add(1, Ordering::Relaxed);
        if self.every == 0 || !n.is_multiple_of(self.every) {
            return false;
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let due = last.is_none_or(|t| t.elapsed() >= self.interval);
        if due {
            *last = Some(Instant::now());
        }
        due
    }
}

impl Workers {
    /// Starts `threading.workers` threads, each owning a pool of `threading.threads` compute
    /// threads (or all sharing one), all taking batches from `queues` until it is closed and
    /// empty.
    pub fn start<B: Backend>(
        backend: Arc<B>,
        queues: Arc<Queues>,
        threading: Threading,
        sampler: Sampler,
        stats: Arc<Statistics>,
        on_device_lost: OnDeviceLost,
    ) -> std::io::Result<Self> {
        let alive = Arc::new(AtomicUsize::new(threading.workers));
        let sampler = Arc::new(sampler);
        let mut threads = Vec::with_capacity(threading.workers);
        // Adaptive: a pool of every core for a batch that starts alone, each worker's own
        // core for one that starts beside others.
        let (wide, own_threads) = if threading.adaptive {
            (
                Some(Arc::new(compute_pool(threading.threads, usize::MAX)?)),
                1,
            )
        } else {
            (None, threading.threads)
        };
        for w in 0..threading.workers {
            let own = compute_pool(own_threads, w)?;
            let wide = wide.clone();
            let runner = Runner {
                backend: Arc::clone(&backend),
                stats: Arc::clone(&stats),
                sampler: Arc::clone(&sampler),
                on_device_lost: Arc::clone(&on_device_lost),
            };
            let (queues, alive) = (Arc::clone(&queues), Arc::clone(&alive));
            threads.push(
                std::thread::Builder::new()
                    .name(format!("cratemae-model-{w}"))
                    .spawn(move || {
                        while let Some(batch) = queues.next_batch() {
                            let priority = batch.priority;
                            match &wide {
                                Some(wide) if batch.alone => wide.install(|| runner.run(batch)),
                                _ => own.install(|| runner.run(batch)),
                            }
                            queues.batch_done(priority);
                        }
                        alive.fetch_sub(1, Ordering::AcqRel);
                    })?,
            );
        }
        Ok(Self { threads, alive })
    }

    /// Model threads still running (for the health watchdog).
    pub fn alive(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.alive)
    }

    /// Waits for every thread, after the queues were closed and drained.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// A compute pool for one worker; CPU kernels inside it use exactly its threads.
pub fn compute_pool(threads: usize, worker: usize) -> std::io::Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(move |i| match worker {
            usize::MAX => format!("cratemae-compute-all.{i}"),
            w => format!("cratemae-compute-{w}.{i}"),
        })
        .build()
        .map_err(std::io::Error::other)
}

impl<B: Backend> Runner<B> {
    /// Images that ask for per-layer traces (diagnostics, attention) take candle's traced
    /// pass, several times slower: they run as a batch of their own after the others, which
    /// are answered first, so one such request does not slow the batch it lands in.
    fn run(&self, mut batch: Batch) {
        if !batch.prune() {
            return;
        }
        let kind = batch.kind;
        let (traced, plain): (Vec<Item>, Vec<Item>) = batch
            .items
            .into_iter()
            .partition(|item| item.task.needs_trace());
        for items in [plain, traced] {
            if !items.is_empty() {
                self.serve(kind, items);
            }
        }
    }

    fn serve(&self, kind: Kind, mut items: Vec<Item>) {
        let size = items.len();
        let started = Instant::now();
        // The images stop waiting; each request's trace gets this batch, and the model's
        // work is one span, linked to every request it serves.
        let batch_spans: Vec<tracing::Span> = items
            .iter_mut()
            .map(|item| {
                item.waiting = tracing::Span::none();
                tracing::info_span!(parent: &item.span, "batch", kind = kind.label(), size)
            })
            .collect();
        let model_span =
            tracing::info_span!(parent: &batch_spans[0], "model", kind = kind.label(), size);
        for span in &batch_spans[1..] {
            model_span.follows_from(span);
        }
        let outcomes = model_span.in_scope(|| self.compute(kind, &items));
        let inference = started.elapsed();
        telemetry::batch(kind.label(), size, inference);
        self.stats.batch(kind, size, inference);
        drop(model_span);
        let mut lost = None;
        for ((item, outcome), _span) in items.into_iter().zip(outcomes).zip(batch_spans) {
            let queue = started.saturating_duration_since(item.admitted_at);
            telemetry::queue_time(kind.label(), queue);
            let timing = Timing {
                queue,
                inference,
                batch_size: size,
                ..Timing::default()
            };
            if let Err(e @ ServeError::DeviceLost(_)) = &outcome {
                lost = Some(e.clone());
            }
            // The slot is free before the answer goes out, so a client that sends its next
            // request the moment it hears back is not refused for its own finished image.
            let Item { reply, permit, .. } = item;
            drop(permit);
            let _ = reply.send(outcome.map(|o| (o, timing)));
        }
        if let Some(e) = lost {
            (self.on_device_lost)(&e);
        }
    }

    /// One result per item; a batch out of memory is retried in halves.
    fn compute(&self, kind: Kind, items: &[Item]) -> Vec<Result<Output, ServeError>> {
        match self.call(kind, items) {
            Ok(outputs) => outputs.into_iter().map(Ok).collect(),
            Err(ServeError::OutOfMemory(e)) if items.len() > 1 => {
                tracing::warn!(batch = items.len(), error = %e, "device out of memory: retrying the batch in halves");
                telemetry::out_of_memory_split();
                let (a, b) = items.split_at(items.len() / 2);
                let mut out = self.compute(kind, a);
                out.extend(self.compute(kind, b));
                out
            }
            Err(e) => {
                if !matches!(e, ServeError::InvalidArgument(_)) {
                    telemetry::worker_fault();
                    tracing::error!(kind = kind.label(), batch = items.len(), error = %e, "batch failed");
                }
                let e = match e {
                    ServeError::OutOfMemory(m) => ServeError::ResourceExhausted(format!(
                        "the device has no memory left for this image: {m}"
                    )),
                    other => other,
                };
                items.iter().map(|_| Err(e.clone())).collect()
            }
        }
    }

    fn call(&self, kind: Kind, items: &[Item]) -> Result<Vec<Output>, ServeError> {
        // One contiguous batch: a lone image is used in place, a batch is gathered once.
        let gathered: Vec<f32>;
        let data: &[f32] = match items {
            [one] => &one.pixels,
            _ => {
                gathered = items
                    .iter()
                    .flat_map(|i| i.pixels.iter().copied())
                    .collect();
                &gathered
            }
        };
        let pixels = PixelBatch {
            data,
            batch: items.len(),
        };
        std::panic::catch_unwind(AssertUnwindSafe(|| match kind {
            Kind::Embed => self.embed(pixels, items),
            Kind::Complete => {
                let tasks = tasks(items, |t| match t {
                    Task::Complete(c) => Some(c),
                    Task::Embed(_) => None,
                })?;
                Ok(self
                    .backend
                    .complete(pixels, &tasks)?
                    .into_iter()
                    .map(Output::Complete)
                    .collect())
            }
        }))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(kind = kind.label(), batch = items.len(), panic = %what, "model worker panicked; failing this batch only");
            Err(ServeError::Internal(format!(
                "the model failed on this batch: {what}"
            )))
        })
    }

    fn embed(&self, pixels: PixelBatch<'_>, items: &[Item]) -> Result<Vec<Output>, ServeError> {
        let tasks = tasks(items, |t| match t {
            Task::Embed(e) => Some(e.as_ref()),
            Task::Complete(_) => None,
        })?;
        let sample = self.sampler.due();
        let out = self.backend.embed(pixels, &tasks, sample)?;
        if let Some(layers) = &out.sampled {
            telemetry::diagnostics(layers);
        }
        Ok(out.embeddings.into_iter().map(Output::Embed).collect())
    }
}

/// Every item's task for this batch's kind; a mixed batch is a bug.
fn tasks<'a, T: ?Sized>(
    items: &'a [Item],
    get: impl Fn(&'a Task) -> Option<&'a T>,
) -> Result<Vec<&'a T>, ServeError> {
    items
        .iter()
        .map(|i| {
            get(&i.task)
                .ok_or_else(|| ServeError::Internal("item of the other kind in a batch".into()))
        })
        .collect()
}
