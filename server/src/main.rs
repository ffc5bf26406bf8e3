//! `crate-mae-server`: see `--help` for every flag (each has a `CRATE_MAE_*` env fallback).

use clap::Parser;
use crate_mae_server::config::Config;
use crate_mae_server::telemetry;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// `mi_option_arena_eager_commit` in mimalloc.h's `mi_option_e` (not exported by the crate).
#[cfg(target_os = "linux")]
const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;

/// On Linux mimalloc commits its arenas eagerly, and then purges freed memory by resetting
/// it, which leaves it counted as resident: what loading freed (the checkpoint's copies, the
/// f64 work of precomputing ISTA's M, ~40 % of Base's weights) stayed in RSS for good.
/// Committing on demand keeps memory at rest at about the model's weights. It must be set
/// before the first arena is reserved, which Rust's runtime does before `main`: hence a
/// constructor.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static COMMIT_ON_DEMAND: extern "C" fn() = {
    extern "C" fn commit_on_demand() {
        // SAFETY: sets one option; mimalloc keeps a value set before it reads the environment.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
    }
    commit_on_demand
};

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    // The allocator keeps what loading and warm-up freed for reuse; give it back once the
    // model is warm, so the memory at rest is the model's.
    crate_mae_server::engine::set_after_warm_up(|| {
        // SAFETY: mi_collect only releases memory mimalloc holds free.
        unsafe { libmimalloc_sys::mi_collect(true) }
    });
    // On a CPU, gRPC and preprocessing share the cores with the model threads' matmuls: the
    // async runtime stays small there (see `--io-threads`).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.io_threads())
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        telemetry::init_logging(
            config.log_format,
            &config.log,
            config.otlp_endpoint.as_deref(),
        )?;
        crate_mae_server::run(config, termination()).await
    });
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "exiting");
    }
    result
}
