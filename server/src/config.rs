//! Server configuration: one struct, clap flags with `CRATE_MAE_*` environment fallbacks,
//! defaults that run out of the box.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use crate_mae::Precision;

use crate::engine::{EngineConfig, Threading};
use crate::security::Secret;
pub use crate::telemetry::LogFormat;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "crate-mae-server",
    version,
    about = "Serve CRATE-MAE embeddings and masked completion over gRPC"
)]
pub struct Config {
    /// gRPC listen address.
    #[arg(long, env = "CRATE_MAE_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,

    /// HTTP listen address: the Open Inference Protocol's REST form (`/v2/...`) and the
    /// OpenAI-style `POST /v1/embeddings`, HTTP/1.1 and h2c, same engine and limits as gRPC.
    /// `off` serves gRPC only.
    #[arg(long, env = "CRATE_MAE_HTTP_ADDR", default_value = "0.0.0.0:8000", value_parser = parse_optional_addr)]
    pub http_addr: OptionalAddr,

    /// Seconds an HTTP client may take to send a request's headers and then its body; a
    /// slower one is answered 408 and closed (a slow-body client holds a connection slot).
    #[arg(long, env = "CRATE_MAE_HTTP_READ_TIMEOUT_SECS", default_value_t = 30)]
    pub http_read_timeout_secs: u64,

    /// Prometheus `/metrics` listen address.
    #[arg(long, env = "CRATE_MAE_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// Weights (safetensors or PyTorch .pth). Default: the built-in model, a CRATE-MAE
    /// trained on Fashion-MNIST (32×32 px; its model card is in `server/assets/default-model`).
    #[arg(long, env = "CRATE_MAE_WEIGHTS", conflicts_with = "random_weights")]
    pub weights: Option<PathBuf>,

    /// Official preset (tiny, small, base, large): the head count for a checkpoint that does
    /// not carry its configuration, or the size of the random-init model.
    #[arg(long, env = "CRATE_MAE_PRESET")]
    pub preset: Option<String>,

    /// Head count for a checkpoint of non-official width.
    #[arg(long, env = "CRATE_MAE_HEADS")]
    pub heads: Option<usize>,

    /// Serve a seeded random-init model instead of the built-in one (benchmarks, tests).
    #[arg(long, env = "CRATE_MAE_RANDOM_WEIGHTS")]
    pub random_weights: bool,

    /// Seed of the random-init model.
    #[arg(
        long,
        env = "CRATE_MAE_SEED",
        default_value_t = 0,
        requires = "random_weights"
    )]
    pub seed: u64,

    /// Image size of the random-init model (overrides the preset's 224).
    #[arg(long, env = "CRATE_MAE_IMAGE_SIZE", requires = "random_weights")]
    pub image_size: Option<usize>,

    /// cpu, cuda[:N] or metal[:N] (the GPU ones need the matching cargo feature).
    #[arg(long, env = "CRATE_MAE_DEVICE", default_value = "cpu")]
    pub device: String,

    /// Precision the model computes in: f32 (the reference), bf16 (CPUs with AVX512-BF16,
    /// GPUs) or f16 (GPUs). Weights are converted once at load; outputs are always f32.
    /// `auto`: bf16 where this machine computes it decisively faster than f32 (measured once at
    /// load: at least 1.25×) with embeddings within cosine 0.999 of f32's, else f32.
    #[arg(long, env = "CRATE_MAE_DTYPE", default_value = "f32", value_parser = parse_dtype)]
    pub dtype: DtypeChoice,

    /// Most images in one model batch (default: 8 on a CPU, 64 on a GPU).
    #[arg(long, env = "CRATE_MAE_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,

    /// Model workers × compute threads each, e.g. `2x1` (two batches at once, one thread
    /// each) or `1x2`. `auto`: on a CPU, one worker per core sharing one pool of every core
    /// (a lone batch uses every core, concurrent batches share them); on a GPU, one worker.
    #[arg(long, env = "CRATE_MAE_THREADING", default_value = "auto", value_parser = parse_threading)]
    pub threading: ThreadingChoice,

    /// Threads for gRPC and request handling (default: 2 on a CPU, where the model needs the
    /// cores; half the cores on a GPU, where decoding and transport are the CPU's work).
    #[arg(long, env = "CRATE_MAE_IO_THREADS")]
    pub io_threads: Option<usize>,

    /// The name clients address the model by (Open Inference Protocol `model_name`; the
    /// completion model is `<name>-complete`).
    #[arg(long, env = "CRATE_MAE_MODEL_NAME", default_value = "crate-mae")]
    pub model_name: String,

    /// Export traces over OTLP/gRPC to this collector (e.g. `http://otel-collector:4317`);
    /// W3C `traceparent` from request metadata continues the caller's trace. Off when unset.
    #[arg(long, env = "CRATE_MAE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// How long a batch may wait for more work once the worker is free (0: never wait).
    #[arg(long, env = "CRATE_MAE_MAX_BATCH_DELAY_MS", default_value_t = 0)]
    pub max_batch_delay_ms: u64,

    /// Images admitted but not yet finished, across both queues; more is RESOURCE_EXHAUSTED.
    #[arg(long, env = "CRATE_MAE_MAX_QUEUE_IMAGES", default_value_t = 256)]
    pub max_queue_images: usize,

    /// Most images in one request.
    #[arg(long, env = "CRATE_MAE_MAX_IMAGES_PER_REQUEST", default_value_t = 64)]
    pub max_images_per_request: usize,

    /// Largest decoded image, in pixels (width × height); guards against decompression bombs.
    #[arg(long, env = "CRATE_MAE_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,

    /// Memory that image decoding may use at once, in MiB; each image reserves its worst
    /// case (14 bytes a pixel) before decoding, so concurrent large images wait their turn.
    #[arg(long, env = "CRATE_MAE_MAX_DECODE_MIB", default_value_t = 1024)]
    pub max_decode_mib: u32,

    /// Largest gRPC message, in MiB.
    #[arg(long, env = "CRATE_MAE_MAX_MESSAGE_MIB", default_value_t = 64)]
    pub max_message_mib: usize,

    #[command(flatten)]
    pub connections: ConnectionLimits,

    /// Relative cost of one completion image against one embedding image, for fair sharing
    /// of the worker between the two queues.
    #[arg(long, env = "CRATE_MAE_COMPLETE_COST", default_value_t = 2.0)]
    pub complete_cost: f64,

    /// Compute rate-reduction diagnostics for Prometheus on every Nth embedding batch
    /// (0: never). Requests asking for diagnostics always get them.
    #[arg(long, env = "CRATE_MAE_DIAGNOSTICS_EVERY", default_value_t = 10)]
    pub diagnostics_every: u64,

    /// At most one diagnostics sample per this many milliseconds (Prometheus scrapes every
    /// few seconds; more samples only cost throughput).
    #[arg(
        long,
        env = "CRATE_MAE_DIAGNOSTICS_MIN_INTERVAL_MS",
        default_value_t = 1000
    )]
    pub diagnostics_min_interval_ms: u64,

    /// On SIGTERM/SIGINT, how long to let accepted requests finish before exiting anyway.
    #[arg(long, env = "CRATE_MAE_DRAIN_TIMEOUT_SECS", default_value_t = 25)]
    pub drain_timeout_secs: u64,

    /// TLS certificate chain (PEM). With `--tls-key`, gRPC and HTTP are served over TLS only.
    #[arg(long, env = "CRATE_MAE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM).
    #[arg(long, env = "CRATE_MAE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA (PEM) whose client certificates are required: mutual TLS.
    #[arg(long, env = "CRATE_MAE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Bearer token required on the model services, gRPC and HTTP (environment only, so it stays out of
    /// process listings; or use --auth-token-file).
    #[arg(
        long = "auth-token",
        env = "CRATE_MAE_AUTH_TOKEN",
        hide_env_values = true,
        hide = true
    )]
    pub auth_token: Option<Secret>,

    /// File holding the bearer token (e.g. a mounted Kubernetes Secret).
    #[arg(long, env = "CRATE_MAE_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// Also require the token on health and reflection (default: open, for probes and tools).
    #[arg(long, env = "CRATE_MAE_AUTH_HEALTH_AND_REFLECTION")]
    pub auth_health_and_reflection: bool,

    /// Log format.
    #[arg(long, env = "CRATE_MAE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter (`RUST_LOG` syntax), e.g. `info,crate_mae_server=debug`.
    #[arg(long, env = "CRATE_MAE_LOG", default_value = "info")]
    pub log: String,
}

/// What one client connection may hold open (RELIABILITY.md, "HTTP/2"). Every limit is a
/// flag; the defaults keep a pod's memory bounded under a flood of open streams or idle
/// connections and stay far above what a gRPC client uses.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionLimits {
    /// Open client connections; one more is accepted and closed at once (the client sees
    /// UNAVAILABLE and its balancer tries another replica).
    #[arg(long, env = "CRATE_MAE_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,

    /// Streams (calls) one HTTP/2 connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS);
    /// clients queue calls beyond it, and a stream opened past it is refused.
    #[arg(long, env = "CRATE_MAE_MAX_CONCURRENT_STREAMS", default_value_t = 128)]
    pub max_concurrent_streams: u32,

    /// Largest header block of one call (request metadata), in KiB.
    #[arg(long, env = "CRATE_MAE_MAX_HEADER_LIST_KIB", default_value_t = 16)]
    pub max_header_list_kib: u32,

    /// Largest HTTP/2 frame the server accepts, in KiB (16 to 16,384). Messages span frames:
    /// this bounds one read, not a message (`--max-message-mib` does).
    #[arg(long, env = "CRATE_MAE_MAX_FRAME_KIB", default_value_t = 16)]
    pub max_frame_kib: u32,

    /// Data a client may send ahead on one stream before the server reads it, in KiB.
    #[arg(long, env = "CRATE_MAE_STREAM_WINDOW_KIB", default_value_t = 1024)]
    pub stream_window_kib: u32,

    /// Data a client may send ahead on one connection, all streams together, in KiB.
    #[arg(long, env = "CRATE_MAE_CONNECTION_WINDOW_KIB", default_value_t = 4096)]
    pub connection_window_kib: u32,

    /// Seconds between HTTP/2 PINGs on a quiet connection.
    #[arg(long, env = "CRATE_MAE_KEEPALIVE_INTERVAL_SECS", default_value_t = 30)]
    pub keepalive_interval_secs: u64,

    /// Seconds a PING may go unanswered before the connection is closed (a dead peer or a
    /// reader that stopped reading).
    #[arg(long, env = "CRATE_MAE_KEEPALIVE_TIMEOUT_SECS", default_value_t = 20)]
    pub keepalive_timeout_secs: u64,

    /// Close connections older than this many seconds (after a grace of the drain timeout),
    /// so clients rebalance across replicas; 0: never.
    #[arg(long, env = "CRATE_MAE_MAX_CONNECTION_AGE_SECS", default_value_t = 0)]
    pub max_connection_age_secs: u64,
}

/// A listen address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

fn parse_optional_addr(s: &str) -> Result<OptionalAddr, String> {
    if s == "off" {
        return Ok(OptionalAddr(None));
    }
    s.parse()
        .map(|a| OptionalAddr(Some(a)))
        .map_err(|e| format!("`{s}`: {e} (an address such as 0.0.0.0:8000, or off)"))
}

/// `--dtype`: a precision, or `auto` (`None`: chosen at load).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtypeChoice(pub Option<Precision>);

fn parse_dtype(s: &str) -> Result<DtypeChoice, String> {
    if s == "auto" {
        return Ok(DtypeChoice(None));
    }
    s.parse()
        .map(|p| DtypeChoice(Some(p)))
        .map_err(|e: crate_mae::ModelError| format!("{e} (or auto)"))
}

/// `--threading`: measured (`auto`) or fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadingChoice(pub Option<Threading>);

fn parse_threading(s: &str) -> Result<ThreadingChoice, String> {
    if s == "auto" {
        return Ok(ThreadingChoice(None));
    }
    let parsed = s
        .split_once('x')
        .and_then(|(w, t)| Some((w.parse().ok()?, t.parse().ok()?)));
    match parsed {
        Some((workers, threads)) if workers >= 1 && threads >= 1 => {
            Ok(ThreadingChoice(Some(Threading {
                workers,
                threads,
                adaptive: false,
            })))
        }
        _ => Err(format!(
            "`{s}`: expected auto or WORKERSxTHREADS with both at least 1, e.g. 2x1"
        )),
    }
}

impl Config {
    pub fn max_batch_delay(&self) -> Duration {
        Duration::from_millis(self.max_batch_delay_ms)
    }

    pub fn io_threads(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        self.io_threads
            .unwrap_or(if self.device.starts_with("cpu") {
                2
            } else {
                cores / 2
            })
            .max(1)
    }

    /// The batch limit: as given, or the device's default.
    pub fn max_batch_size(&self) -> usize {
        self.max_batch_size
            .unwrap_or(if self.device.starts_with("cpu") {
                8
            } else {
                64
            })
    }

    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            model_name: self.model_name.clone(),
            max_batch_size: self.max_batch_size(),
            max_batch_delay: self.max_batch_delay(),
            max_queue_images: self.max_queue_images,
            max_images_per_request: self.max_images_per_request,
            max_image_pixels: self.max_image_pixels,
            max_decode_mib: self.max_decode_mib,
            complete_cost: self.complete_cost,
            diagnostics_every: self.diagnostics_every,
            diagnostics_interval: Duration::from_millis(self.diagnostics_min_interval_ms),
            threading: self.threading.0,
        }
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_batch_size() >= 1,
            "--max-batch-size must be at least 1"
        );
        anyhow::ensure!(
            !self.model_name.is_empty()
                && self
                    .model_name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "--model-name must be non-empty letters, digits, '-', '_' or '.'"
        );
        anyhow::ensure!(
            self.max_queue_images >= self.max_images_per_request,
            "--max-queue-images ({}) must be at least --max-images-per-request ({})",
            self.max_queue_images,
            self.max_images_per_request
        );
        let c = &self.connections;
        anyhow::ensure!(
            c.max_connections >= 1 && c.max_concurrent_streams >= 1,
            "--max-connections and --max-concurrent-streams must be at least 1"
        );
        anyhow::ensure!(
            (16..=16_384).contains(&c.max_frame_kib),
            "--max-frame-kib must be 16 to 16384 (HTTP/2's range)"
        );
        anyhow::ensure!(
            c.max_header_list_kib >= 1
                && (64..=2_097_151).contains(&c.stream_window_kib)
                && c.connection_window_kib >= c.stream_window_kib
                && c.connection_window_kib <= 2_097_151,
            "--max-header-list-kib must be at least 1, --stream-window-kib 64 to 2097151, and --connection-window-kib at least the stream window and at most 2097151"
        );
        anyhow::ensure!(
            c.keepalive_interval_secs >= 1 && c.keepalive_timeout_secs >= 1,
            "--keepalive-interval-secs and --keepalive-timeout-secs must be at least 1"
        );
        anyhow::ensure!(
            self.max_images_per_request >= 1,
            "--max-images-per-request must be at least 1"
        );
        anyhow::ensure!(
            self.complete_cost.is_finite() && self.complete_cost > 0.0,
            "--complete-cost must be positive"
        );
        anyhow::ensure!(
            self.preset.is_none() || self.weights.is_some() || self.random_weights,
            "--preset sets the head count of --weights or the size of --random-weights; the built-in model carries its own configuration"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("crate-mae-server").chain(args.iter().copied()))
    }

    #[test]
    fn model_source_flags_combine_only_in_meaningful_ways() {
        let plain = parse(&[]).unwrap();
        assert!(plain.weights.is_none() && !plain.random_weights);
        plain.validate().unwrap();
        parse(&[
            "--random-weights",
            "--preset",
            "small",
            "--image-size",
            "64",
            "--seed",
            "3",
        ])
        .unwrap()
        .validate()
        .unwrap();
        parse(&["--weights", "w.pth", "--preset", "base"])
            .unwrap()
            .validate()
            .unwrap();
        // Random-init settings without --random-weights, or two sources at once: refused.
        assert!(parse(&["--image-size", "64"]).is_err());
        assert!(parse(&["--seed", "3"]).is_err());
        assert!(parse(&["--weights", "w.pth", "--random-weights"]).is_err());
        let err = parse(&["--preset", "base"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("built-in model"), "{err}");
    }

    #[test]
    fn precision_threading_and_batch_defaults_parse() {
        let plain = parse(&[]).unwrap();
        assert_eq!(
            (plain.dtype.0, plain.threading.0, plain.max_batch_size()),
            (Some(Precision::F32), None, 8)
        );
        assert_eq!(plain.http_addr.0, Some("0.0.0.0:8000".parse().unwrap()));
        assert_eq!(parse(&["--http-addr", "off"]).unwrap().http_addr.0, None);
        assert!(parse(&["--http-addr", "8000"]).is_err());
        let gpu = parse(&["--device", "cuda", "--dtype", "bf16", "--threading", "1x4"]).unwrap();
        assert_eq!(gpu.dtype.0, Some(Precision::Bf16));
        assert_eq!(parse(&["--dtype", "auto"]).unwrap().dtype.0, None);
        assert_eq!(gpu.max_batch_size(), 64);
        assert_eq!(
            gpu.threading.0,
            Some(Threading {
                workers: 1,
                threads: 4,
                adaptive: false
            })
        );
        for bad in [
            ["--dtype", "f64"],
            ["--threading", "0x2"],
            ["--threading", "two"],
        ] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
        assert!(parse(&["--model-name", "a b"]).unwrap().validate().is_err());
    }
}
