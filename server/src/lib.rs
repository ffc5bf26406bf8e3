//! CRATE-MAE over gRPC.
//!
//! Data flows one way: [`service`] (transport: validate, preprocess via [`imaging`]) →
//! [`batching`] (admission, queues, batch formation) → [`worker`] (the model thread) → back
//! through [`service`]. [`telemetry`] holds logs and metrics; [`config`] the one config struct.

pub mod batching;
pub mod client;
pub mod config;
pub mod error;
pub mod imaging;
pub mod model_source;
pub mod security;
pub mod service;
pub mod telemetry;
pub mod worker;

pub mod pb {
    tonic::include_proto!("cratemae.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/cratemae_descriptor.bin"));
}

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic_health::ServingStatus;

use crate::batching::{Admission, Queues};
use crate::config::Config;
use crate::imaging::Preprocessing;
use crate::service::{AppState, CrateMaeService, Ready};
use crate::worker::{Worker, WorkerOptions};

/// The model service's name for health checks.
pub const SERVICE_NAME: &str = "cratemae.v1.CrateMae";

/// Runs until `shutdown` resolves, then drains: NOT_SERVING, stop accepting, finish what
/// was accepted (bounded by the drain timeout), stop the worker.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    config.validate()?;
    telemetry::init_metrics(
        config.metrics_addr,
        &[
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("device", config.device.clone()),
        ],
    )
    .context("starting the metrics listener")?;

    let (health, health_service) = tonic_health::server::health_reporter();
    let set_health = |status: ServingStatus| {
        let health = health.clone();
        async move {
            health.set_service_status("", status).await;
            health.set_service_status(SERVICE_NAME, status).await;
        }
    };
    set_health(ServingStatus::NotServing).await;

    let queues = Queues::new(
        config.max_batch_size,
        config.max_batch_delay(),
        config.complete_cost,
    );
    let state = Arc::new(AppState {
        queues: Arc::clone(&queues),
        admission: Admission::new(config.max_queue_images),
        max_images_per_request: config.max_images_per_request,
        decode_budget: Arc::new(tokio::sync::Semaphore::new(config.max_decode_mib as usize)),
        decode_budget_mib: config.max_decode_mib,
        ready: OnceLock::new(),
        draining: Default::default(),
        ledger: Default::default(),
    });

    // The model loads on its own thread (it owns the device) while gRPC already answers
    // health checks with NOT_SERVING.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let load_config = config.clone();
    let (loaded_tx, loaded_rx) = std::sync::mpsc::channel();
    let worker = Worker::start(
        Arc::clone(&queues),
        WorkerOptions {
            diagnostics_every: config.diagnostics_every,
            panic_trigger: std::env::var("CRATE_MAE_FAULT_INJECTION_VALUE")
                .ok()
                .and_then(|v| v.parse().ok()),
        },
        move || {
            let loaded = model_source::load(&load_config)?;
            let info = model_source::model_info(&loaded, &load_config);
            let _ = loaded_tx.send((info, loaded.info.clone()));
            Ok(loaded.model)
        },
        ready_tx,
    )?;

    let listener = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("binding gRPC on {}", config.grpc_addr))?;
    tracing::info!(grpc = %listener.local_addr()?, metrics = %config.metrics_addr, "listening");

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let limit = config.max_message_mib << 20;
    let service =
        pb::crate_mae_server::CrateMaeServer::new(CrateMaeService::new(Arc::clone(&state)))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
    let token = security::load_token(config.auth_token.as_ref(), config.auth_token_file.as_ref())?;
    let auth = security::BearerAuth::new(token.as_ref());
    // Probes and tools stay open unless asked otherwise; the model service is guarded.
    let guard_ops = if config.auth_health_and_reflection {
        auth.clone()
    } else {
        security::BearerAuth::new(None)
    };
    let mut builder = tonic::transport::Server::builder()
        .layer(tower::util::MapRequestLayer::new(service::stamp_arrival));
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        builder = builder.tls_config(security::tls_config(
            cert,
            key,
            config.tls_client_ca.as_deref(),
        )?)?;
    }
    tracing::info!(
        tls = config.tls_cert.is_some(),
        mutual_tls = config.tls_client_ca.is_some(),
        bearer_auth = auth.enabled(),
        "transport security"
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        builder
            .add_service(InterceptedService::new(health_service, guard_ops.clone()))
            .add_service(InterceptedService::new(reflection_v1, guard_ops.clone()))
            .add_service(InterceptedService::new(reflection_v1alpha, guard_ops))
            .add_service(InterceptedService::new(service, auth))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stop_rx.await;
            }),
    );

    tokio::pin!(shutdown);
    tokio::select! {
        loaded = ready_rx => match loaded {
            Ok(Ok(model)) => {
                let (info, weights) = loaded_rx.recv().context("model info")?;
                telemetry::register_layers(model.config().depth, &weights.source);
                tracing::info!(model = %info.name, weights = %weights.source, sha256 = %weights.sha256, device = %info.device, "model ready");
                let cfg = model.config();
                let _ = state.ready.set(Ready {
                    prep: Preprocessing {
                        image_size: cfg.img_size as u32,
                        mean: cfg.mean,
                        std: cfg.std,
                        max_pixels: config.max_image_pixels,
                    },
                    info,
                    model,
                });
                set_health(ServingStatus::Serving).await;
                // Health stays honest if the model thread ever stops outside a drain.
                let (alive, watched, health) = (worker.alive(), Arc::clone(&state), health.clone());
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                    loop {
                        tick.tick().await;
                        if watched.draining.load(Ordering::Acquire) {
                            break;
                        }
                        if !alive.load(Ordering::Acquire) {
                            tracing::error!("the model thread stopped: NOT_SERVING");
                            health.set_service_status(SERVICE_NAME, ServingStatus::NotServing).await;
                            break;
                        }
                    }
                });
            }
            Ok(Err(e)) => {
                queues.close();
                anyhow::bail!("loading the model failed: {e}");
            }
            Err(_) => anyhow::bail!("the model thread exited during loading"),
        },
        _ = &mut shutdown => {
            tracing::info!("shutdown requested while loading");
        }
    }
    if state.ready.get().is_some() {
        shutdown.await;
    }

    tracing::info!(
        in_flight_images = state.admission.in_flight(),
        "shutting down: NOT_SERVING, draining"
    );
    state.draining.store(true, Ordering::Release);
    set_health(ServingStatus::NotServing).await;
    let _ = stop_tx.send(());
    let drained = tokio::time::timeout(config.drain_timeout(), server).await;
    queues.close();
    match drained {
        Ok(result) => {
            result.context("gRPC server task")?.context("gRPC server")?;
            // A plain thread: a blocking-pool task would hold up the runtime's own shutdown
            // (e.g. when SIGTERM arrives while the model is still loading).
            let (joined_tx, joined_rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                worker.join();
                let _ = joined_tx.send(());
            });
            let _ = joined_rx.recv_timeout(std::time::Duration::from_secs(5));
            let l = &state.ledger;
            tracing::info!(
                admitted = l.admitted.load(Ordering::Relaxed),
                answered_ok = l.ok.load(Ordering::Relaxed),
                answered_error = l.failed.load(Ordering::Relaxed),
                "drained; exiting"
            );
        }
        Err(_) => tracing::warn!(
            timeout_secs = config.drain_timeout_secs,
            left = state.admission.in_flight(),
            "drain timeout reached; exiting with requests unfinished"
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// ghz needs a protoset when reflection is not used; the committed one must match the
    /// proto. Regenerate: `UPDATE_PROTOSET=1 cargo test -p crate-mae-server protoset`.
    #[test]
    fn ghz_protoset_is_current() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/ghz/cratemae.protoset"
        );
        if std::env::var_os("UPDATE_PROTOSET").is_some() {
            std::fs::write(path, super::pb::FILE_DESCRIPTOR_SET).unwrap();
        }
        let committed = std::fs::read(path).expect("deploy/ghz/cratemae.protoset is missing");
        assert!(
            committed == super::pb::FILE_DESCRIPTOR_SET,
            "deploy/ghz/cratemae.protoset is stale: UPDATE_PROTOSET=1 cargo test -p crate-mae-server protoset"
        );
    }
}
