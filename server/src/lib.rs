//! CRATE-MAE over gRPC and HTTP.
//!
//! Data flows one way: a [`transport`] (`cratemae.v1`, the Open Inference Protocol over gRPC
//! or REST, OpenAI-style embeddings)
//! validates and maps a request → the [`engine`] admits it, preprocesses it ([`imaging`]),
//! queues and batches it → a model worker runs it on the [`engine::Backend`] → the engine
//! postprocesses → the transport answers. [`telemetry`] holds logs and metrics, [`otel`]
//! the optional trace export, [`config`] the one config struct.

pub mod client;
pub mod config;
pub mod engine;
pub mod error;
pub mod imaging;
#[cfg(test)]
mod layering;
pub mod model_source;
pub mod otel;
pub mod security;
pub mod telemetry;
pub mod transport;

pub mod pb {
    tonic::include_proto!("cratemae.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/cratemae_descriptor.bin"));
}

/// The Open Inference Protocol v2 (`inference.GRPCInferenceService`).
pub mod oip_pb {
    tonic::include_proto!("inference");
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/inference_descriptor.bin"));
}

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::engine::{Engine, State};

/// The model service's name for health checks (readiness).
pub const SERVICE_NAME: &str = "cratemae.v1.CrateMae";

/// Runs until `shutdown` resolves, then drains: NOT_SERVING, stop accepting, finish what
/// was accepted (bounded by the drain timeout), stop the workers.
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
    #[cfg(feature = "cuda")]
    telemetry::watch_gpu(&config.device);

    let (health, health_service) = tonic_health::server::health_reporter();
    report(&health, ServingStatus::NotServing).await;
    let load_config = config.clone();
    let engine = Engine::start(config.engine(), move || model_source::load(&load_config))?;
    let mut state = engine.state();

    let listener = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("binding gRPC on {}", config.grpc_addr))?;
    tracing::info!(grpc = %listener.local_addr()?, metrics = %config.metrics_addr, "listening");
    // tonic sets TCP options only on listeners it binds itself: without TCP_NODELAY on the
    // accepted sockets every unary response waits ~40 ms for the client's delayed ACK.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let server = tokio::spawn(serve(
        &config,
        &engine,
        health_service,
        incoming,
        stopped(stop_rx.clone()),
    )?);
    let http = match config.http_addr.0 {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding HTTP on {addr}"))?;
            tracing::info!(http = %listener.local_addr()?, "listening");
            let (auth, auth_ops) = guards(&config)?;
            let state = Arc::new(transport::http::Http::new(
                Arc::clone(&engine),
                &config,
                auth,
                auth_ops,
            ));
            let router = transport::http::router(state);
            let serving = transport::http::serve(&config, listener, router, stopped(stop_rx))?;
            Some(tokio::spawn(serving))
        }
        None => None,
    };

    // Serve until asked to stop; a model that never loads ends the server with its reason.
    tokio::pin!(shutdown);
    loop {
        let now = state.borrow_and_update().clone();
        match now {
            State::Serving => {
                let info = engine.info()?;
                telemetry::register_layers(info.config().depth, &info.facts.weights.source);
                telemetry::model_kernel(&info.facts.kernel, info.facts.precision.name());
                tracing::info!(model = %info.description(), name = %info.name, version = %info.version(), threading = %info.threading, kernel = %info.facts.kernel, precision = info.facts.precision.name(), precision_reason = %info.facts.precision_reason, "SERVING");
                report(&health, ServingStatus::Serving).await;
            }
            State::Failed(why) if engine.info().is_err() => {
                anyhow::bail!("loading the model failed: {why}")
            }
            State::Failed(why) => {
                tracing::error!(reason = %why, "NOT_SERVING: restart this server");
                report(&health, ServingStatus::NotServing).await;
            }
            State::Loading | State::Draining => {}
        }
        tokio::select! {
            changed = state.changed() => if changed.is_err() { break },
            _ = &mut shutdown => break,
        }
    }

    tracing::info!(
        in_flight_images = engine.in_flight(),
        "shutting down: NOT_SERVING, draining"
    );
    engine.begin_drain();
    report(&health, ServingStatus::NotServing).await;
    let _ = stop_tx.send(true);
    let both = async {
        if let Some(http) = http {
            let _ = http.await;
        }
        server.await
    };
    let drained = tokio::time::timeout(config.drain_timeout(), both).await;
    engine.shutdown(Duration::from_secs(5));
    otel::shutdown();
    match drained {
        Ok(result) => {
            result.context("gRPC server task")?.context("gRPC server")?;
            let l = engine.ledger();
            tracing::info!(
                admitted = l.admitted.load(std::sync::atomic::Ordering::Relaxed),
                answered_ok = l.ok.load(std::sync::atomic::Ordering::Relaxed),
                answered_error = l.failed.load(std::sync::atomic::Ordering::Relaxed),
                "drained; exiting"
            );
        }
        Err(_) => tracing::warn!(
            timeout_secs = config.drain_timeout_secs,
            left = engine.in_flight(),
            "drain timeout reached; exiting with requests unfinished"
        ),
    }
    Ok(())
}

/// `""` (liveness) and the model service (readiness) move together: a server that cannot
/// serve (a lost device, stopped model threads) only recovers by a restart.
async fn report(health: &HealthReporter, status: ServingStatus) {
    for name in ["", SERVICE_NAME] {
        health.set_service_status(name, status).await;
    }
}

/// The bearer-token checks: the model services', and the probes' and tools' (open unless
/// asked otherwise), for both listeners.
fn guards(config: &Config) -> anyhow::Result<(security::BearerAuth, security::BearerAuth)> {
    let token = security::load_token(config.auth_token.as_ref(), config.auth_token_file.as_ref())?;
    let auth = security::BearerAuth::new(token.as_ref());
    let ops = if config.auth_health_and_reflection {
        auth.clone()
    } else {
        security::BearerAuth::new(None)
    };
    Ok((auth, ops))
}

/// Every gRPC service on the one port: health, reflection, cratemae.v1 and the Open
/// Inference Protocol, behind TLS and the bearer token as configured.
fn serve(
    config: &Config,
    engine: &Arc<Engine>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    incoming: TcpIncoming,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<impl Future<Output = Result<(), tonic::transport::Error>>> {
    let sets = [
        pb::FILE_DESCRIPTOR_SET,
        oip_pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ];
    let mut v1 = tonic_reflection::server::Builder::configure();
    let mut v1alpha = tonic_reflection::server::Builder::configure();
    for set in sets {
        v1 = v1.register_encoded_file_descriptor_set(set);
        v1alpha = v1alpha.register_encoded_file_descriptor_set(set);
    }
    use tonic::codec::CompressionEncoding::{Gzip, Zstd};
    let limit = config.max_message_mib << 20;
    let cratemae = pb::crate_mae_server::CrateMaeServer::new(
        transport::cratemae::CrateMaeService::new(Arc::clone(engine)),
    )
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit)
    .accept_compressed(Gzip)
    .accept_compressed(Zstd)
    .send_compressed(Gzip)
    .send_compressed(Zstd);
    let oip = oip_pb::grpc_inference_service_server::GrpcInferenceServiceServer::new(
        transport::oip::InferenceService::new(Arc::clone(engine)),
    )
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit)
    .accept_compressed(Gzip)
    .accept_compressed(Zstd)
    .send_compressed(Gzip)
    .send_compressed(Zstd);
    let (auth, guard_ops) = guards(config)?;
    let c = &config.connections;
    let secs = Duration::from_secs;
    let mirror: fn(http::Request<tonic::body::Body>) -> http::Request<tonic::body::Body> =
        transport::mirror_compression;
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(c.max_concurrent_streams)
        .http2_max_header_list_size(c.max_header_list_kib << 10)
        .max_frame_size(c.max_frame_kib << 10)
        .initial_stream_window_size(c.stream_window_kib << 10)
        .initial_connection_window_size(c.connection_window_kib << 10)
        .http2_keepalive_interval(Some(secs(c.keepalive_interval_secs)))
        .http2_keepalive_timeout(Some(secs(c.keepalive_timeout_secs)));
    if c.max_connection_age_secs > 0 {
        builder = builder
            .max_connection_age(secs(c.max_connection_age_secs))
            .max_connection_age_grace(config.drain_timeout());
    }
    let mut builder = builder
        .layer(transport::DeadlineLayer)
        .layer(tower::util::MapRequestLayer::new(mirror));
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
    Ok(builder
        .add_service(InterceptedService::new(health, guard_ops.clone()))
        .add_service(InterceptedService::new(v1.build_v1()?, guard_ops.clone()))
        .add_service(InterceptedService::new(v1alpha.build_v1alpha()?, guard_ops))
        .add_service(InterceptedService::new(cratemae, auth.clone()))
        .add_service(InterceptedService::new(oip, auth))
        .serve_with_incoming_shutdown(
            transport::connections::limit(incoming, c.max_connections),
            stop,
        ))
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
