//! Bringing a loaded model into service, on the loader thread, step by step: choose the
//! threading, warm up, run the binary's after-warm-up hook, start the workers, declare the
//! model ready, then stay as the watchdog.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::backend::Backend;
use super::types::{ModelFacts, ModelInfo, Threading};
use super::worker::{self, Workers};
use super::{Engine, EngineConfig, Ready, State};
use crate::error::ServeError;
use crate::imaging::Preprocessing;

static AFTER_WARM_UP: OnceLock<fn()> = OnceLock::new();

/// Something the binary runs once the model is loaded and warmed up, before serving: the
/// server gives the memory that loading and warm-up freed back to the OS (its allocator's
/// business, so the binary, which chose the allocator, sets it). Only the first call counts.
pub fn set_after_warm_up(hook: fn()) {
    let _ = AFTER_WARM_UP.set(hook);
}

pub(super) fn bring_up<B: Backend>(engine: &Weak<Engine>, backend: Arc<B>) -> Result<(), String> {
    let Some(e) = engine.upgrade() else {
        return Ok(());
    };
    let (threading, reason) = choose_threading(&e.config, backend.as_ref());
    warm_up(&e.config, backend.as_ref(), threading)?;
    if let Some(hook) = AFTER_WARM_UP.get() {
        hook();
    }
    let alive = start_workers(&e, Arc::clone(&backend), threading)?;
    declare_ready(&e, backend.facts().clone(), threading, reason);
    drop(e);
    watch(engine, &alive);
    Ok(())
}

/// `--threading` as given; else on a CPU one worker per core where a lone batch spreads over
/// every core, and on a GPU one stream of batches.
fn choose_threading(config: &EngineConfig, backend: &impl Backend) -> (Threading, String) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match config.threading {
        Some(t) => (t, "--threading".to_string()),
        None if backend.parallel_batches() => (
            Threading::adaptive(cores),
            "a lone batch on every core, concurrent batches a core each".to_string(),
        ),
        None => (
            Threading {
                workers: 1,
                threads: cores,
                adaptive: false,
            },
            "one stream of batches on this device".to_string(),
        ),
    }
}

/// Every batch size on a GPU (kernel selection is per shape); on a CPU one image through
/// encoder and decoder (nothing there depends on the batch size), then a batch that spreads
/// over every compute thread, so each thread's buffers exist before traffic.
fn warm_up(
    config: &EngineConfig,
    backend: &impl Backend,
    threading: Threading,
) -> Result<(), String> {
    let started = Instant::now();
    let sizes: Vec<usize> = if backend.parallel_batches() {
        vec![1, threading.threads.min(config.max_batch_size)]
    } else {
        (1..=config.max_batch_size).collect()
    };
    let pool = worker::compute_pool(threading.threads, 0).map_err(|e| e.to_string())?;
    for &b in &sizes {
        pool.install(|| backend.warm_up(b, true))
            .map_err(|err| format!("warm-up at batch {b} failed: {err}"))?;
    }
    tracing::info!(
        batch_sizes = ?sizes,
        threading = %threading,
        seconds = started.elapsed().as_secs_f64(),
        "warmed up"
    );
    Ok(())
}

/// The model workers, with a lost device taking the engine out of service. Returns the
/// count of live model threads, for the watchdog.
fn start_workers<B: Backend>(
    e: &Arc<Engine>,
    backend: Arc<B>,
    threading: Threading,
) -> Result<Arc<AtomicUsize>, String> {
    let lost = Arc::downgrade(e);
    let on_device_lost: worker::OnDeviceLost = Arc::new(move |err: &ServeError| {
        if let Some(engine) = lost.upgrade() {
            tracing::error!(error = %err, "the device is lost: NOT_SERVING; restart this server");
            engine.fail(format!("device lost: {err}"));
        }
    });
    e.queues.set_compute_threads(threading.threads);
    let workers = Workers::start(
        backend,
        Arc::clone(&e.queues),
        threading,
        worker::Sampler::new(e.config.diagnostics_every, e.config.diagnostics_interval),
        Arc::clone(&e.stats),
        on_device_lost,
    )
    .map_err(|err| err.to_string())?;
    let alive = workers.alive();
    *e.workers.lock().unwrap_or_else(|p| p.into_inner()) = Some(workers);
    Ok(alive)
}

/// What is served, then SERVING.
fn declare_ready(e: &Engine, facts: ModelFacts, threading: Threading, reason: String) {
    let config = &e.config;
    let cfg = &facts.config;
    let prep = Preprocessing {
        image_size: cfg.img_size as u32,
        mean: cfg.mean,
        std: cfg.std,
        max_pixels: config.max_image_pixels,
        small_image_fit: facts.small_image_fit,
    };
    tracing::info!(threading = %threading, reason = %reason, "threading");
    let info = ModelInfo {
        name: config.model_name.clone(),
        threading,
        threading_reason: reason,
        max_batch_size: config.max_batch_size,
        max_images_per_request: config.max_images_per_request,
        max_batch_delay: config.max_batch_delay,
        max_queue_images: config.max_queue_images,
        facts,
    };
    let _ = e.ready.set(Ready { info, prep });
    e.state.send_if_modified(|s| {
        let change = *s == State::Loading;
        if change {
            *s = State::Serving;
        }
        change
    });
}

/// Health stays honest if every model thread stops outside a drain.
fn watch(engine: &Weak<Engine>, alive: &AtomicUsize) {
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let Some(e) = engine.upgrade() else {
            return;
        };
        if *e.state.borrow() != State::Serving {
            return;
        }
        if alive.load(Ordering::Acquire) == 0 {
            e.fail("the model threads stopped".into());
            return;
        }
    }
}
