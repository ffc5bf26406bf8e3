//! Logs and metrics. Every Prometheus series is registered at start (so `/metrics` is
//! complete before the first request); names follow Prometheus conventions: base units,
//! `_total` counters, `_seconds` histograms with explicit buckets, low-cardinality labels.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tracing_subscriber::EnvFilter;

/// Log format (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The methods of each protocol, as `(protocol, method)` label pairs.
pub const METHODS: &[(&str, &[&str])] = &[
    (
        "cratemae.v1",
        &["Embed", "EmbedStream", "Complete", "GetModelInfo"],
    ),
    (
        "oip.v2",
        &[
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelInfer",
            "ModelConfig",
            "ModelStatistics",
        ],
    ),
];
const CODES: [&str; 9] = [
    "OK",
    "InvalidArgument",
    "OutOfRange",
    "NotFound",
    "ResourceExhausted",
    "Unavailable",
    "DeadlineExceeded",
    "Cancelled",
    "Internal",
];
const DROP_REASONS: [&str; 3] = ["queue_full", "deadline", "cancelled"];

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Logs (text or JSON) and, with `otlp_endpoint`, trace export. Call inside the runtime.
pub fn init_logging(
    format: LogFormat,
    filter: &str,
    otlp_endpoint: Option<&str>,
) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: escapes in a file or a container log are noise.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(colour);
    let fmt = match format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    // The log filter is for logs only: traces keep this server's spans whatever the log level.
    let spans = tracing_subscriber::filter::Targets::new()
        .with_target("crate_mae_server", tracing::Level::INFO)
        .with_target("crate_mae", tracing::Level::INFO);
    let otel = otlp_endpoint
        .map(crate::otel::layer)
        .transpose()?
        .map(|layer| layer.with_filter(spans));
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    Ok(())
}

/// Starts the `/metrics` listener (on the current tokio runtime) and registers every series.
pub fn init_metrics(addr: SocketAddr, build: &[(&'static str, String)]) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("cratemae_batch_size".into()), BATCH_BUCKETS)?
        .install()?;
    register(build);
    Ok(())
}

fn register(build: &[(&'static str, String)]) {
    describe_counter!(
        "cratemae_requests_total",
        "gRPC requests finished, by protocol, method and status code."
    );
    describe_histogram!(
        "cratemae_request_duration_seconds",
        Unit::Seconds,
        "gRPC request latency, end to end in the server, by protocol and method."
    );
    describe_histogram!(
        "cratemae_queue_duration_seconds",
        Unit::Seconds,
        "Time an image waited from admission to the start of its batch."
    );
    describe_histogram!(
        "cratemae_inference_duration_seconds",
        Unit::Seconds,
        "Model time per batch."
    );
    describe_histogram!(
        "cratemae_batch_size",
        Unit::Count,
        "Images per model batch."
    );
    describe_gauge!(
        "cratemae_queue_depth",
        Unit::Count,
        "Images waiting for a batch."
    );
    describe_gauge!(
        "cratemae_inflight_requests",
        Unit::Count,
        "gRPC requests being served."
    );
    describe_counter!(
        "cratemae_dropped_requests_total",
        "Images refused or dropped before compute, by reason."
    );
    describe_counter!(
        "cratemae_worker_faults_total",
        "Batches failed by a panic or error inside the model worker."
    );
    describe_counter!(
        "cratemae_out_of_memory_splits_total",
        "Batches that ran out of device memory and were retried in halves."
    );
    describe_gauge!("cratemae_build_info", "Build information (value 1).");
    describe_gauge!("cratemae_model_info", "The served weights (value 1).");
    describe_gauge!(
        "cratemae_coding_rate",
        "Official compression term R^c per encoder layer (batch mean of the last sampled batch)."
    );
    describe_gauge!(
        "cratemae_expansion_rate",
        "Expansion term R of the MSSA input tokens per encoder layer (last sampled batch)."
    );
    describe_gauge!(
        "cratemae_rate_reduction",
        "R - R^c per encoder layer (last sampled batch). R and R^c are on different scales, so the sign means nothing: compare with the in-domain reference."
    );
    describe_gauge!(
        "cratemae_sparsity",
        "Fraction of exact zeros in the ISTA output per encoder layer (last sampled batch)."
    );
    describe_counter!(
        "cratemae_diagnostics_samples_total",
        "Batches whose diagnostics were computed for these gauges."
    );
    describe_counter!(
        "cratemae_auth_failures_total",
        "Calls refused for a missing or wrong bearer token."
    );
    describe_gauge!(
        "cratemae_connections_open",
        "Client connections open on the gRPC port."
    );
    describe_counter!(
        "cratemae_connections_refused_total",
        "Connections closed on arrival because --max-connections were open."
    );

    for (protocol, methods) in METHODS {
        for method in methods.iter() {
            for code in CODES {
                counter!("cratemae_requests_total", "protocol" => *protocol, "method" => *method, "code" => code)
                    .absolute(0);
            }
            let _ = histogram!("cratemae_request_duration_seconds", "protocol" => *protocol, "method" => *method);
        }
    }
    gauge!("cratemae_inflight_requests").set(0.0);
    for reason in DROP_REASONS {
        counter!("cratemae_dropped_requests_total", "reason" => reason).absolute(0);
    }
    counter!("cratemae_worker_faults_total").absolute(0);
    counter!("cratemae_out_of_memory_splits_total").absolute(0);
    counter!("cratemae_diagnostics_samples_total").absolute(0);
    counter!("cratemae_auth_failures_total").absolute(0);
    gauge!("cratemae_connections_open").set(0.0);
    counter!("cratemae_connections_refused_total").absolute(0);
    let labels: Vec<(&'static str, String)> = build.to_vec();
    gauge!("cratemae_build_info", &labels).set(1.0);
}

/// Per-layer diagnostics series, once the model (and so its depth) is known; also labels
/// the build info with the weights source.
pub fn register_layers(depth: usize, weights: &str) {
    gauge!("cratemae_model_info", "weights" => weights.to_string()).set(1.0);
    for layer in 0..depth {
        let l = layer.to_string();
        // NaN until the first sample: "no data yet" rather than a fake zero.
        for name in [
            "cratemae_coding_rate",
            "cratemae_expansion_rate",
            "cratemae_rate_reduction",
            "cratemae_sparsity",
        ] {
            gauge!(name, "layer" => l.clone()).set(f64::NAN);
        }
    }
}

pub fn request_finished(
    protocol: &'static str,
    method: &'static str,
    code: tonic::Code,
    elapsed: Duration,
) {
    counter!("cratemae_requests_total", "protocol" => protocol, "method" => method, "code" => code_label(code))
        .increment(1);
    histogram!("cratemae_request_duration_seconds", "protocol" => protocol, "method" => method)
        .record(elapsed.as_secs_f64());
}

fn code_label(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::OutOfRange => "OutOfRange",
        tonic::Code::NotFound => "NotFound",
        tonic::Code::ResourceExhausted => "ResourceExhausted",
        tonic::Code::Unavailable => "Unavailable",
        tonic::Code::DeadlineExceeded => "DeadlineExceeded",
        tonic::Code::Cancelled => "Cancelled",
        tonic::Code::Internal => "Internal",
        tonic::Code::Unauthenticated => "Unauthenticated",
        tonic::Code::PermissionDenied => "PermissionDenied",
        _ => "Unknown",
    }
}

pub fn inflight(delta: f64) {
    gauge!("cratemae_inflight_requests").increment(delta);
}

pub fn dropped(reason: &'static str) {
    counter!("cratemae_dropped_requests_total", "reason" => reason).increment(1);
}

pub fn connections_open(delta: f64) {
    gauge!("cratemae_connections_open").increment(delta);
}

pub fn connection_refused() {
    counter!("cratemae_connections_refused_total").increment(1);
}

pub fn worker_fault() {
    counter!("cratemae_worker_faults_total").increment(1);
}

pub fn out_of_memory_split() {
    counter!("cratemae_out_of_memory_splits_total").increment(1);
}

/// Registers the per-kind series (the engine's kinds of work, by label) at zero, so
/// dashboards see every series before the first request.
pub fn register_kinds(kinds: &[&'static str]) {
    for &k in kinds {
        let _ = histogram!("cratemae_queue_duration_seconds", "kind" => k);
        let _ = histogram!("cratemae_inference_duration_seconds", "kind" => k);
        let _ = histogram!("cratemae_batch_size", "kind" => k);
        gauge!("cratemae_queue_depth", "kind" => k).set(0.0);
    }
}

pub fn queue_depth(kind: &'static str, depth: usize) {
    gauge!("cratemae_queue_depth", "kind" => kind).set(depth as f64);
}

pub fn queue_time(kind: &'static str, waited: Duration) {
    histogram!("cratemae_queue_duration_seconds", "kind" => kind).record(waited.as_secs_f64());
}

pub fn batch(kind: &'static str, size: usize, took: Duration) {
    histogram!("cratemae_inference_duration_seconds", "kind" => kind).record(took.as_secs_f64());
    histogram!("cratemae_batch_size", "kind" => kind).record(size as f64);
}

pub fn diagnostics(layers: &[crate_mae::LayerDiagnostics]) {
    counter!("cratemae_diagnostics_samples_total").increment(1);
    for layer in layers {
        let l = layer.layer.to_string();
        let mean = |v: &[f64]| crate_mae::diagnostics::mean_std(v).0;
        gauge!("cratemae_coding_rate", "layer" => l.clone()).set(mean(&layer.coding_rate));
        gauge!("cratemae_expansion_rate", "layer" => l.clone()).set(mean(&layer.expansion_rate));
        gauge!("cratemae_rate_reduction", "layer" => l.clone()).set(mean(&layer.rate_reduction()));
        gauge!("cratemae_sparsity", "layer" => l).set(mean(&layer.sparsity));
    }
}

/// `cratemae_model_kernel_info{kernel, precision} 1`: which kernel computes the model (chosen
/// at run time per CPU), so a fleet of mixed CPUs shows what each pod runs.
pub fn model_kernel(kernel: &str, precision: &'static str) {
    describe_gauge!(
        "cratemae_model_kernel_info",
        "1, labelled with the kernel computing the model's products and its precision."
    );
    gauge!("cratemae_model_kernel_info", "kernel" => kernel.to_string(), "precision" => precision)
        .set(1.0);
}

pub fn auth_failure() {
    counter!("cratemae_auth_failures_total").increment(1);
}

/// The GPU's memory and utilisation as gauges, from the driver's NVML (loaded at run time;
/// without it, a warning and no GPU gauges). Polled every few seconds on a thread of its own.
#[cfg(feature = "cuda")]
pub fn watch_gpu(device: &str) {
    let Some(ordinal) = device
        .strip_prefix("cuda")
        .map(|rest| rest.trim_start_matches(':').parse::<u32>().unwrap_or(0))
    else {
        return;
    };
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(nvml) => nvml,
        Err(e) => {
            tracing::warn!(error = %e, "NVML is not available: no GPU gauges in /metrics");
            return;
        }
    };
    describe_gauge!(
        "cratemae_gpu_memory_used_bytes",
        Unit::Bytes,
        "GPU memory in use (all processes), from NVML."
    );
    describe_gauge!(
        "cratemae_gpu_memory_total_bytes",
        Unit::Bytes,
        "GPU memory in all, from NVML."
    );
    describe_gauge!(
        "cratemae_gpu_utilization_ratio",
        "Fraction of the last sample period in which a kernel ran on the GPU, from NVML."
    );
    let gpu = ordinal.to_string();
    let spawned = std::thread::Builder::new()
        .name("cratemae-nvml".into())
        .spawn(move || loop {
            match nvml.device_by_index(ordinal) {
                Ok(dev) => {
                    if let Ok(m) = dev.memory_info() {
                        gauge!("cratemae_gpu_memory_used_bytes", "gpu" => gpu.clone())
                            .set(m.used as f64);
                        gauge!("cratemae_gpu_memory_total_bytes", "gpu" => gpu.clone())
                            .set(m.total as f64);
                    }
                    if let Ok(u) = dev.utilization_rates() {
                        gauge!("cratemae_gpu_utilization_ratio", "gpu" => gpu.clone())
                            .set(f64::from(u.gpu) / 100.0);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "NVML lost the GPU");
                    return;
                }
            }
            std::thread::sleep(Duration::from_secs(5));
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the GPU gauges");
    }
}
