//! The model worker: one thread that owns the device and the model, runs batches, and
//! answers each item. A batcher thread in front of it forms (and uploads) the next batch
//! while the current one runs.
//!
//! A panic or error inside a batch fails that batch's items with INTERNAL; the thread
//! carries on with the next batch (the model is immutable, so nothing is left half-updated).

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::{Device, Tensor, D};
use crate_mae::{diagnostics, mae, CrateMae, Mask, Taps};

use crate::batching::{
    prune, Batch, CompleteOutput, EmbedOutput, ImageDiagnostics, Item, Kind, Output, Queues, Task,
    Timing,
};
use crate::error::ServeError;
use crate::telemetry;

pub struct WorkerOptions {
    /// Sample diagnostics for Prometheus on every Nth embedding batch (0: never).
    pub diagnostics_every: u64,
    /// Test hook: an embedding batch containing an image whose first value is exactly this
    /// panics inside the worker (env `CRATE_MAE_FAULT_INJECTION_VALUE`). `None` in production.
    pub panic_trigger: Option<f32>,
}

pub struct Worker {
    batcher: JoinHandle<()>,
    model: JoinHandle<()>,
    alive: Arc<AtomicBool>,
}

impl Worker {
    /// Starts the batcher and model threads. `model` is built on the model thread (it owns
    /// the device); `ready` hears the outcome of loading and warm-up.
    pub fn start<F>(
        queues: Arc<Queues>,
        options: WorkerOptions,
        build: F,
        ready: tokio::sync::oneshot::Sender<Result<Arc<CrateMae>, String>>,
    ) -> std::io::Result<Self>
    where
        F: FnOnce() -> Result<CrateMae, String> + Send + 'static,
    {
        let alive = Arc::new(AtomicBool::new(true));
        // Depth 1: one batch waits, formed and on the device, while the other runs.
        let (tx, rx) = mpsc::sync_channel::<(Batch, Tensor)>(1);
        let (device_tx, device_rx) = mpsc::channel::<(Device, usize)>();
        let batcher_queues = Arc::clone(&queues);
        let batcher = std::thread::Builder::new()
            .name("cratemae-batcher".into())
            .spawn(move || {
                let Ok((device, pixels_per_image)) = device_rx.recv() else {
                    return; // model failed to load
                };
                while let Some(batch) = batcher_queues.next_batch() {
                    match stack(&batch.items, pixels_per_image, &device) {
                        Ok(input) => {
                            if tx.send((batch, input)).is_err() {
                                break;
                            }
                        }
                        Err(e) => fail(batch.items, &e),
                    }
                }
            })?;
        let model_alive = Arc::clone(&alive);
        let model = std::thread::Builder::new()
            .name("cratemae-model".into())
            .spawn(move || {
                let model = match build() {
                    Ok(m) => Arc::new(m),
                    Err(e) => {
                        model_alive.store(false, Ordering::Release);
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let cfg = model.config();
                let _ = device_tx.send((
                    model.device().clone(),
                    cfg.in_chans * cfg.img_size * cfg.img_size,
                ));
                let _ = ready.send(Ok(Arc::clone(&model)));
                let runner = Runner {
                    model,
                    options,
                    embed_batches: AtomicU64::new(0),
                };
                loop {
                    // A full batch may already be waiting; otherwise ask for one, so a partial
                    // batch is formed now rather than earlier with fewer requests in it.
                    let next = match rx.try_recv() {
                        Ok(next) => next,
                        Err(mpsc::TryRecvError::Disconnected) => break,
                        Err(mpsc::TryRecvError::Empty) => {
                            queues.set_demand(true);
                            let next = rx.recv();
                            queues.set_demand(false);
                            match next {
                                Ok(next) => next,
                                Err(_) => break,
                            }
                        }
                    };
                    let (mut batch, input) = next;
                    runner.run(&mut batch, input);
                }
                model_alive.store(false, Ordering::Release);
            })?;
        Ok(Self {
            batcher,
            model,
            alive,
        })
    }

    /// True while the model thread runs (false after a load failure, a crash, or the end),
    /// for the health watchdog.
    pub fn alive(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.alive)
    }

    /// Waits for both threads after the queues were closed and drained.
    pub fn join(self) {
        let _ = self.batcher.join();
        let _ = self.model.join();
    }
}

/// Concatenates the items' pixels into `[B, C, S, S]` on the model's device.
fn stack(items: &[Item], pixels_per_image: usize, device: &Device) -> Result<Tensor, ServeError> {
    let mut flat = Vec::with_capacity(items.len() * pixels_per_image);
    for item in items {
        flat.extend_from_slice(&item.pixels);
    }
    let side = ((pixels_per_image / 3) as f64).sqrt() as usize;
    Tensor::from_vec(flat, (items.len(), 3, side, side), device)
        .map_err(|e| ServeError::Internal(format!("cannot build the batch tensor: {e}")))
}

fn fail(items: Vec<Item>, error: &ServeError) {
    for item in items {
        let _ = item
            .reply
            .send(Err(ServeError::Internal(error.to_string())));
    }
}

struct Runner {
    model: Arc<CrateMae>,
    options: WorkerOptions,
    embed_batches: AtomicU64,
}

impl Runner {
    fn run(&self, batch: &mut Batch, input: Tensor) {
        let before = batch.items.len();
        if !prune(batch) {
            return;
        }
        // Items dropped since the batch was formed: compute only the survivors' rows.
        let input = if batch.items.len() == before {
            Ok(input)
        } else {
            let pixels = input.elem_count() / before;
            stack(&batch.items, pixels, self.model.device())
        };
        let started = Instant::now();
        let kind = batch.kind;
        let outcome = input.and_then(|input| {
            std::panic::catch_unwind(AssertUnwindSafe(|| match kind {
                Kind::Embed => self.embed(&batch.items, &input),
                Kind::Complete => self.complete(&batch.items, &input),
            }))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(kind = kind.label(), batch = batch.items.len(), panic = %what, "model worker panicked; failing this batch only");
                telemetry::worker_fault();
                Err(ServeError::Internal(format!("the model failed on this batch: {what}")))
            })
        });
        let inference = started.elapsed();
        telemetry::batch(kind, batch.items.len(), inference);
        let items = std::mem::take(&mut batch.items);
        let size = items.len();
        match outcome {
            Ok(outputs) => {
                for (item, output) in items.into_iter().zip(outputs) {
                    let queue = started.saturating_duration_since(item.admitted_at);
                    telemetry::queue_time(kind, queue);
                    let timing = Timing {
                        queue,
                        inference,
                        batch_size: size,
                    };
                    let _ = item.reply.send(Ok((output, timing)));
                }
            }
            Err(e) => {
                if !matches!(e, ServeError::Internal(_)) {
                    tracing::warn!(error = %e, "batch failed");
                }
                for item in items {
                    let _ = item.reply.send(Err(ServeError::Internal(e.to_string())));
                }
            }
        }
    }

    fn embed(&self, items: &[Item], input: &Tensor) -> Result<Vec<Output>, ServeError> {
        let params = batch_params(items, Task::embed_params)?;
        if let Some(trigger) = self.options.panic_trigger {
            if items.iter().any(|i| i.pixels.first() == Some(&trigger)) {
                panic!("fault injection: trigger value seen");
            }
        }
        let cfg = self.model.config();
        let n = self.embed_batches.fetch_add(1, Ordering::Relaxed);
        let sampled =
            self.options.diagnostics_every > 0 && n.is_multiple_of(self.options.diagnostics_every);
        let want_diag = sampled || params.iter().any(|p| p.diagnostics);
        let mut names: BTreeSet<String> = BTreeSet::new();
        for p in &params {
            if let Some(l) = p.layer {
                names.insert(format!("enc.{l}.out"));
            }
            if let Some(l) = p.attention_layer {
                names.insert(format!("enc.{l}.attn"));
            }
        }
        if want_diag {
            names.extend(diagnostics::tap_names(cfg));
        }
        let mut taps = if names.is_empty() {
            Taps::none()
        } else {
            Taps::only(names)
        };
        let latent = self.model.encode(input, None, &mut taps)?;
        let requested = params.iter().any(|p| p.diagnostics);
        let diag = match want_diag.then(|| diagnostics::compute(&taps, cfg)) {
            Some(Ok(d)) => {
                if sampled {
                    telemetry::diagnostics(&d);
                }
                Some(d)
            }
            // Sampled for Prometheus only: nobody asked, so a failure must not fail the batch.
            Some(Err(e)) if !requested => {
                tracing::warn!(error = %e, "skipping a diagnostics sample");
                None
            }
            Some(Err(e)) => return Err(e.into()),
            None => None,
        };
        // Only what each item asked for comes to the host: its pooled vector (the model's
        // own `pool`), and its patch tokens if requested.
        let host = |t: &Tensor| -> Result<Vec<f32>, ServeError> {
            t.flatten_all().and_then(|t| t.to_vec1()).map_err(internal)
        };
        let ntok = cfg.seq_len();
        let mut outputs = Vec::with_capacity(items.len());
        for (b, p) in params.iter().enumerate() {
            let source = match p.layer {
                None => &latent,
                Some(l) => taps
                    .get(&format!("enc.{l}.out"))
                    .ok_or_else(|| internal("layer tokens missing"))?,
            };
            let tokens = source.narrow(0, b, 1).map_err(internal)?;
            let mut values = host(&mae::pool(&tokens, p.pooling)?)?;
            if p.normalize {
                let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                values.iter_mut().for_each(|v| *v /= norm);
            }
            let attention = match p.attention_layer {
                None => None,
                Some(l) => {
                    let a = taps
                        .get(&format!("enc.{l}.attn"))
                        .ok_or_else(|| internal("attention missing"))?;
                    // [H, N, N] of image b → row 0 (cls), columns 1.. (patches).
                    let row = a
                        .narrow(0, b, 1)
                        .and_then(|a| a.narrow(2, 0, 1))
                        .and_then(|a| a.narrow(D::Minus1, 1, ntok - 1))
                        .map_err(internal)?;
                    Some((cfg.heads, host(&row)?))
                }
            };
            outputs.push(Output::Embed(EmbedOutput {
                values,
                patch_tokens: if p.patch_tokens {
                    host(&tokens.narrow(1, 1, ntok - 1).map_err(internal)?)?
                } else {
                    vec![]
                },
                diagnostics: if p.diagnostics {
                    per_image(diag.as_deref(), b)
                } else {
                    vec![]
                },
                attention,
            }));
        }
        Ok(outputs)
    }

    fn complete(&self, items: &[Item], input: &Tensor) -> Result<Vec<Output>, ServeError> {
        let params = batch_params(items, Task::complete_params)?;
        let cfg = self.model.config();
        let mask = Mask::stack(params.iter().map(|p| &p.mask));
        let want_diag = params.iter().any(|p| p.diagnostics);
        let mut taps = if want_diag {
            diagnostics::taps(cfg)
        } else {
            Taps::none()
        };
        let out = self.model.complete(input, &mask, &mut taps)?;
        let diag = if want_diag {
            Some(diagnostics::compute(&taps, cfg)?)
        } else {
            None
        };
        let target = self.model.patchify(input)?;
        let mut outputs = Vec::with_capacity(items.len());
        for (b, p) in params.iter().enumerate() {
            let row =
                |t: &Tensor| -> Result<Tensor, ServeError> { t.narrow(0, b, 1).map_err(internal) };
            let mse = mae::masked_mse(&row(&out.pred)?, &row(&target)?, &row(&out.mask)?)?;
            let host = |t: Tensor| -> Result<Vec<f32>, ServeError> {
                t.flatten_all().and_then(|t| t.to_vec1()).map_err(internal)
            };
            outputs.push(Output::Complete(CompleteOutput {
                reconstruction: host(row(&out.reconstruction)?)?,
                composite: host(row(&out.composite)?)?,
                masked_patch_mse: mse.to_scalar::<f32>().map_err(internal)?,
                diagnostics: if p.diagnostics {
                    per_image(diag.as_deref(), b)
                } else {
                    vec![]
                },
            }));
        }
        Ok(outputs)
    }
}

/// Every item's parameters for this batch's kind; a mixed batch is a bug.
fn batch_params<'a, T>(
    items: &'a [Item],
    get: fn(&'a Task) -> Option<&'a T>,
) -> Result<Vec<&'a T>, ServeError> {
    items
        .iter()
        .map(|i| {
            get(&i.task)
                .ok_or_else(|| ServeError::Internal("item of the other kind in a batch".into()))
        })
        .collect()
}

fn internal(e: impl std::fmt::Display) -> ServeError {
    ServeError::Internal(e.to_string())
}

fn per_image(diag: Option<&[crate_mae::LayerDiagnostics]>, b: usize) -> Vec<ImageDiagnostics> {
    diag.unwrap_or_default()
        .iter()
        .map(|l| ImageDiagnostics {
            layer: l.layer,
            coding_rate: l.coding_rate[b],
            expansion_rate: l.expansion_rate[b],
            sparsity: l.sparsity[b],
        })
        .collect()
}
