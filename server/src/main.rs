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

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
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
