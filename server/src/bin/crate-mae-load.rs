//! `crate-mae-load`: a ghz-like load generator for the CRATE-MAE server, gRPC or HTTP.
//!
//! `--concurrency` workers issue `Embed` (or `Complete`) calls back to back, spread round-robin
//! over `--connections` HTTP/2 channels and over the given images, or the same embeddings over
//! HTTP (`--call rest-json`, `rest-binary`, `openai`, with `--addr` the HTTP port's URL; HTTP/1.1
//! keep-alive connections, one per request in flight, bodies built before the run), until `--total` requests
//! have been issued or `--duration` has passed (whichever comes first), optionally capped at
//! `--rps` requests per second overall. Every request's latency goes into an HDR histogram;
//! the report (stdout, and optionally JSON) has ghz's summary, latency percentiles of the OK
//! requests and the status code distribution.
//!
//! Example:
//!
//! ```text
//! crate-mae-load --addr http://127.0.0.1:50051 --call embed --image cat.png --image dog.jpg \
//!     --images-per-request 4 -c 32 -n 2000 --connections 2 --json report.json
//! ```
//!
//! Exit codes: 0 when at least one request succeeded, 1 otherwise (or on a setup error).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use crate_mae_server::pb::crate_mae_client::CrateMaeClient;
use crate_mae_server::{client, pb};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Percentiles reported (of OK requests).
const PERCENTILES: [u32; 7] = [10, 25, 50, 75, 90, 95, 99];
/// Error messages are truncated to this many characters in the error distribution.
const MAX_ERROR_CHARS: usize = 160;

#[derive(Parser, Debug)]
#[command(
    name = "crate-mae-load",
    version,
    about = "ghz-like load generator for the CRATE-MAE gRPC server"
)]
struct Args {
    #[command(flatten)]
    server: client::ServerArgs,
    /// RPC to call.
    #[arg(long, value_enum, default_value_t = CallKind::Embed)]
    call: CallKind,
    /// Image file (PNG/JPEG); repeat for several, used round-robin.
    #[arg(long = "image", required = true)]
    images: Vec<PathBuf>,
    /// Images per Embed request or stream message (ignored for complete).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    images_per_request: u32,
    /// Messages per EmbedStream call (`--call embed-stream`): one "request" is one stream.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    stream_messages: u32,
    /// Number of concurrent workers (requests in flight).
    #[arg(short = 'c', long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,
    /// Total number of requests to issue (0 = no limit, needs --duration).
    #[arg(short = 'n', long = "total", default_value_t = 200)]
    total: u64,
    /// Stop issuing new requests after this many seconds (in-flight ones still finish).
    #[arg(long)]
    duration: Option<f64>,
    /// Overall rate limit in requests per second (0 = unlimited).
    #[arg(long, default_value_t = 0.0)]
    rps: f64,
    /// Per-request deadline in seconds (also sent as grpc-timeout).
    #[arg(long, default_value_t = 20.0)]
    timeout: f64,
    /// Number of separate HTTP/2 connections; requests are spread round-robin.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum CallKind {
    Embed,
    /// Bulk work: each request is one EmbedStream call of `--stream-messages` messages.
    EmbedStream,
    Complete,
    /// OIP REST `infer`, JSON (images as base64), over HTTP/1.1.
    RestJson,
    /// OIP REST `infer` with Triton's binary-data extension both ways.
    RestBinary,
    /// `POST /v1/embeddings` (images as data URIs).
    Openai,
}

impl CallKind {
    fn name(self) -> &'static str {
        match self {
            CallKind::Embed => "embed",
            CallKind::EmbedStream => "embed-stream",
            CallKind::Complete => "complete",
            CallKind::RestJson => "rest-json",
            CallKind::RestBinary => "rest-binary",
            CallKind::Openai => "openai",
        }
    }

    fn http(self) -> bool {
        matches!(
            self,
            CallKind::RestJson | CallKind::RestBinary | CallKind::Openai
        )
    }
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

/// The HTTP calls: one prepared request body per starting image (request `i` starts at image
/// `i × images-per-request`), so the run measures the server, not the client's encoding.
struct HttpTarget {
    client: HttpClient,
    uri: http::Uri,
    bodies: Vec<(bytes::Bytes, Option<usize>)>,
}

impl HttpTarget {
    fn new(call: CallKind, base: &str, files: &[Vec<u8>], n: usize) -> anyhow::Result<Self> {
        use base64::Engine as _;
        let b64 = |f: &Vec<u8>| base64::engine::general_purpose::STANDARD.encode(f);
        let path = match call {
            CallKind::Openai => "/v1/embeddings",
            _ => "/v2/models/crate-mae/infer",
        };
        let uri: http::Uri = format!("{}{path}", base.trim_end_matches('/'))
            .parse()
            .with_context(|| format!("--addr {base} is not an HTTP URL"))?;
        let bodies = (0..files.len())
            .map(|start| {
                let batch: Vec<&Vec<u8>> = (0..n).map(|j| &files[(start + j) % files.len()]).collect();
                match call {
                    CallKind::Openai => {
                        let input: Vec<String> = batch
                            .iter()
                            .map(|f| format!("data:image/png;base64,{}", b64(f)))
                            .collect();
                        let body = json!({"model": "crate-mae", "input": input});
                        (serde_json::to_vec(&body).unwrap().into(), None)
                    }
                    CallKind::RestJson => {
                        let data: Vec<String> = batch.iter().map(|f| b64(f)).collect();
                        let body = json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [n], "data": data}]});
                        (serde_json::to_vec(&body).unwrap().into(), None)
                    }
                    _ => {
                        let mut tensor = Vec::new();
                        for f in &batch {
                            tensor.extend_from_slice(&(f.len() as u32).to_le_bytes());
                            tensor.extend_from_slice(f);
                        }
                        let head = json!({
                            "parameters": {"binary_data_output": true},
                            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [n],
                                        "parameters": {"binary_data_size": tensor.len()}}],
                        });
                        let mut body = serde_json::to_vec(&head).unwrap();
                        let length = body.len();
                        body.extend_from_slice(&tensor);
                        (body.into(), Some(length))
                    }
                }
            })
            .collect();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        Ok(Self {
            client,
            uri,
            bodies,
        })
    }

    /// One call; an answer other than 200 is the gRPC status its HTTP status maps to.
    async fn call(&self, start: usize, auth: Option<&str>) -> Result<(), Status> {
        use http_body_util::BodyExt;
        let (body, json_length) = &self.bodies[start % self.bodies.len()];
        let mut request = http::Request::post(self.uri.clone());
        request = match json_length {
            Some(n) => request
                .header("content-type", "application/octet-stream")
                .header("inference-header-content-length", n.to_string()),
            None => request.header("content-type", "application/json"),
        };
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let request = request
            .body(http_body_util::Full::new(body.clone()))
            .map_err(|e| Status::internal(e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| Status::unavailable(format!("HTTP: {e}")))?;
        let status = response.status();
        let answer = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Status::unavailable(format!("HTTP body: {e}")))?
            .to_bytes();
        if status == http::StatusCode::OK {
            return Ok(());
        }
        let code = match status.as_u16() {
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            404 => Code::NotFound,
            413 | 429 => Code::ResourceExhausted,
            503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            _ => Code::Unknown,
        };
        Err(Status::new(
            code,
            format!("HTTP {status}: {}", String::from_utf8_lossy(&answer)),
        ))
    }
}

/// Latency histogram in microseconds, 1 µs .. 1 h, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// State shared by all workers.
struct Shared {
    call: CallKind,
    images: Vec<pb::Image>,
    images_per_request: usize,
    stream_messages: u64,
    clients: Vec<CrateMaeClient<Channel>>,
    /// The HTTP calls (`--call rest-json`, `rest-binary`, `openai`).
    http: Option<HttpTarget>,
    /// Index of the next request to issue.
    next: AtomicU64,
    /// Request limit (`u64::MAX` when only --duration bounds the run).
    total: u64,
    /// No request is issued after this instant.
    deadline: Option<Instant>,
    /// One tick per request when --rps is set.
    limiter: Option<Mutex<Interval>>,
    timeout: Duration,
    auth: Option<MetadataValue<Ascii>>,
}

impl Shared {
    /// Waits for a rate-limiter token; false if the deadline passes first.
    async fn acquire_token(&self) -> bool {
        let Some(limiter) = &self.limiter else {
            return true;
        };
        let tick = async {
            limiter.lock().await.tick().await;
        };
        match self.deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, tick).await.is_ok(),
            None => {
                tick.await;
                true
            }
        }
    }

    fn image(&self, k: u64) -> pb::Image {
        self.images[(k % self.images.len() as u64) as usize].clone()
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut req = Request::new(message);
        req.set_timeout(self.timeout);
        if let Some(auth) = &self.auth {
            req.metadata_mut().insert("authorization", auth.clone());
        }
        req
    }

    /// Issues request number `i`; returns the number of images it carried on success.
    async fn issue(&self, i: u64) -> Result<u64, Status> {
        let call = async {
            if let Some(http) = &self.http {
                let n = self.images_per_request as u64;
                let auth = self.auth.as_ref().and_then(|a| a.to_str().ok());
                return http
                    .call(((i * n) % self.images.len() as u64) as usize, auth)
                    .await
                    .map(|_| n);
            }
            let mut client = self.clients[(i % self.clients.len() as u64) as usize].clone();
            match self.call {
                CallKind::RestJson | CallKind::RestBinary | CallKind::Openai => {
                    unreachable!("HTTP calls are issued above")
                }
                CallKind::Embed => {
                    let n = self.images_per_request as u64;
                    let request = pb::EmbedRequest {
                        images: (0..n).map(|j| self.image(i * n + j)).collect(),
                        ..Default::default()
                    };
                    client.embed(self.request(request)).await.map(|_| n)
                }
                CallKind::EmbedStream => {
                    let n = self.images_per_request as u64;
                    let first = i * self.stream_messages * n;
                    let messages: Vec<pb::EmbedRequest> = (0..self.stream_messages)
                        .map(|m| pb::EmbedRequest {
                            images: (0..n).map(|j| self.image(first + m * n + j)).collect(),
                            ..Default::default()
                        })
                        .collect();
                    let mut answers = client
                        .embed_stream(self.request(futures::stream::iter(messages)))
                        .await?
                        .into_inner();
                    let mut images = 0;
                    while let Some(answer) = answers.message().await? {
                        images += answer.embeddings.len() as u64;
                    }
                    Ok(images)
                }
                CallKind::Complete => {
                    let request = pb::CompleteRequest {
                        image: Some(self.image(i)),
                        seed: i,
                        ..Default::default()
                    };
                    client.complete(self.request(request)).await.map(|_| 1)
                }
            }
        };
        let started = Instant::now();
        match tokio::time::timeout(self.timeout, call).await {
            // A server honouring grpc-timeout (tonic's does) answers CANCELLED "Timeout
            // expired" when the deadline passes: from here, the deadline was exceeded.
            Ok(Err(status))
                if status.code() == Code::Cancelled && started.elapsed() >= self.timeout =>
            {
                Err(Status::deadline_exceeded(format!(
                    "deadline exceeded (server: {})",
                    status.message()
                )))
            }
            Ok(r) => r,
            Err(_) => Err(Status::deadline_exceeded("client deadline exceeded")),
        }
    }
}

/// What one worker (and, merged, the whole run) observed.
struct Stats {
    all: Histogram<u64>,
    ok: Histogram<u64>,
    /// Latency of refused/failed requests: how fast load shedding answers.
    failed: Histogram<u64>,
    ok_images: u64,
    status_codes: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

impl Stats {
    fn new() -> Self {
        Stats {
            all: new_histogram(),
            ok: new_histogram(),
            failed: new_histogram(),
            ok_images: 0,
            status_codes: BTreeMap::new(),
            errors: BTreeMap::new(),
        }
    }

    fn record(&mut self, latency: Duration, result: Result<u64, Status>) {
        let us = (latency.as_micros() as u64).max(1);
        self.all.saturating_record(us);
        let code = match result {
            Ok(images) => {
                self.ok.saturating_record(us);
                self.ok_images += images;
                "OK"
            }
            Err(status) => {
                self.failed.saturating_record(us);
                let name = crate_mae_server::client::code_name(status.code());
                let message: String = status.message().chars().take(MAX_ERROR_CHARS).collect();
                *self.errors.entry(format!("{name}: {message}")).or_default() += 1;
                name
            }
        };
        *self.status_codes.entry(code.to_string()).or_default() += 1;
    }

    fn merge(&mut self, other: Stats) {
        self.all.add(&other.all).expect("same histogram bounds");
        self.ok.add(&other.ok).expect("same histogram bounds");
        self.failed
            .add(&other.failed)
            .expect("same histogram bounds");
        self.ok_images += other.ok_images;
        for (k, v) in other.status_codes {
            *self.status_codes.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

async fn worker(shared: Arc<Shared>) -> Stats {
    let mut stats = Stats::new();
    loop {
        if shared.deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if i >= shared.total {
            break;
        }
        if !shared.acquire_token().await {
            break;
        }
        let started = Instant::now();
        let result = shared.issue(i).await;
        stats.record(started.elapsed(), result);
    }
    stats
}

fn ms(us: u64) -> f64 {
    us as f64 / 1e3
}

/// The run's results, in ghz's vocabulary.
struct Report {
    call: CallKind,
    addr: String,
    concurrency: u32,
    connections: u32,
    images_per_request: u32,
    total: Duration,
    stats: Stats,
}

impl Report {
    fn count(&self) -> u64 {
        self.stats.all.len()
    }

    fn ok_count(&self) -> u64 {
        self.stats.ok.len()
    }

    fn per_second(&self, n: u64) -> f64 {
        let secs = self.total.as_secs_f64();
        if secs > 0.0 {
            n as f64 / secs
        } else {
            0.0
        }
    }

    fn print(&self) {
        let all = &self.stats.all;
        println!();
        println!("Summary:");
        println!("  Call:\t\t{} ({})", self.call.name(), self.addr);
        println!(
            "  Workers:\t{} concurrent, {} connection(s)",
            self.concurrency, self.connections
        );
        println!("  Count:\t{}", self.count());
        println!("  Total:\t{:.2} s", self.total.as_secs_f64());
        if !all.is_empty() {
            println!("  Slowest:\t{:.2} ms", ms(all.max()));
            println!("  Fastest:\t{:.2} ms", ms(all.min()));
            println!("  Average:\t{:.2} ms", all.mean() / 1e3);
        }
        println!("  Requests/sec:\t{:.2}", self.per_second(self.count()));
        println!(
            "  Requests/sec (OK):\t{:.2}",
            self.per_second(self.ok_count())
        );
        println!(
            "  Images/sec (OK):\t{:.2}",
            self.per_second(self.stats.ok_images)
        );
        println!();
        println!("Latency distribution (OK requests):");
        if self.stats.ok.is_empty() {
            println!("  no successful requests");
        } else {
            for p in PERCENTILES {
                let v = self.stats.ok.value_at_quantile(p as f64 / 100.0);
                println!("  {p} % in {:.2} ms", ms(v));
            }
        }
        if !self.stats.failed.is_empty() {
            println!();
            println!("Latency of failed/refused requests:");
            for p in [50, 90, 99] {
                let v = self.stats.failed.value_at_quantile(p as f64 / 100.0);
                println!("  {p} % in {:.2} ms", ms(v));
            }
        }
        println!();
        println!("Status code distribution:");
        for (code, n) in &self.stats.status_codes {
            println!("  [{code}]\t{n} responses");
        }
        if !self.stats.errors.is_empty() {
            println!();
            println!("Error distribution:");
            for (message, n) in &self.stats.errors {
                println!("  [{n}]\t{message}");
            }
        }
        println!();
    }

    fn to_json(&self) -> Value {
        let all = &self.stats.all;
        let ok = &self.stats.ok;
        let stat = |h: &Histogram<u64>, f: fn(&Histogram<u64>) -> f64| {
            if h.is_empty() {
                Value::Null
            } else {
                json!(f(h))
            }
        };
        let mut percentiles = Map::new();
        if !ok.is_empty() {
            for p in PERCENTILES {
                percentiles.insert(
                    format!("p{p}"),
                    json!(ms(ok.value_at_quantile(p as f64 / 100.0))),
                );
            }
        }
        let mut failed_percentiles = Map::new();
        if !self.stats.failed.is_empty() {
            for p in PERCENTILES {
                failed_percentiles.insert(
                    format!("p{p}"),
                    json!(ms(self.stats.failed.value_at_quantile(p as f64 / 100.0))),
                );
            }
        }
        json!({
            "call": self.call.name(),
            "addr": self.addr,
            "concurrency": self.concurrency,
            "connections": self.connections,
            "images_per_request": if self.call == CallKind::Complete { 1 } else { self.images_per_request },
            "count": self.count(),
            "ok_count": self.ok_count(),
            "total_seconds": self.total.as_secs_f64(),
            "average_ms": stat(all, |h| h.mean() / 1e3),
            "fastest_ms": stat(all, |h| ms(h.min())),
            "slowest_ms": stat(all, |h| ms(h.max())),
            "ok_average_ms": stat(ok, |h| h.mean() / 1e3),
            "rps": self.per_second(self.count()),
            "rps_ok": self.per_second(self.ok_count()),
            "images_per_sec": self.per_second(self.stats.ok_images),
            "latency_percentiles": percentiles,
            "failed_latency_percentiles": failed_percentiles,
            "status_codes": self.stats.status_codes,
            "errors": self.stats.errors,
        })
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let timeout = client::positive_seconds("--timeout", args.timeout)?;
    let duration = args
        .duration
        .map(|d| client::positive_seconds("--duration", d))
        .transpose()?;
    if args.total == 0 && duration.is_none() {
        anyhow::bail!("-n 0 (no request limit) needs --duration");
    }
    if !(args.rps.is_finite() && args.rps >= 0.0) {
        anyhow::bail!("--rps must be >= 0, got {}", args.rps);
    }
    if args.call == CallKind::Complete && args.images_per_request != 1 {
        eprintln!("note: --images-per-request is ignored for --call complete");
    }
    let images = args
        .images
        .iter()
        .map(|p| {
            std::fs::read(p)
                .with_context(|| format!("cannot read {}", p.display()))
                .map(|encoded| pb::Image {
                    encoded,
                    tensor: None,
                })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let auth = args.server.bearer()?;
    let http = if args.call.http() {
        let files: Vec<Vec<u8>> = images.iter().map(|i| i.encoded.clone()).collect();
        let n = args.images_per_request as usize;
        Some(HttpTarget::new(args.call, &args.server.addr, &files, n)?)
    } else {
        None
    };
    let endpoint = args.server.endpoint(Duration::from_secs(10))?;
    let mut clients = Vec::with_capacity(args.connections as usize);
    for _ in 0..if http.is_some() { 0 } else { args.connections } {
        // Each `connect` opens its own HTTP/2 connection.
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", args.server.addr))?;
        clients.push(client::crate_mae(channel));
    }

    let limiter = (args.rps > 0.0).then(|| {
        let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rps));
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        Mutex::new(interval)
    });
    let start = Instant::now();
    let shared = Arc::new(Shared {
        call: args.call,
        images,
        images_per_request: args.images_per_request as usize,
        stream_messages: u64::from(args.stream_messages),
        clients,
        http,
        next: AtomicU64::new(0),
        total: if args.total == 0 {
            u64::MAX
        } else {
            args.total
        },
        deadline: duration.map(|d| start + d),
        limiter,
        timeout,
        auth,
    });
    eprintln!(
        "crate-mae-load: {} on {} with {} workers, {} connection(s), {}{}{}",
        args.call.name(),
        args.server.addr,
        args.concurrency,
        args.connections,
        if args.total == 0 {
            "no request limit".to_string()
        } else {
            format!("{} requests", args.total)
        },
        duration
            .map(|d| format!(", at most {:.1} s", d.as_secs_f64()))
            .unwrap_or_default(),
        if args.rps > 0.0 {
            format!(", {} req/s", args.rps)
        } else {
            String::new()
        },
    );

    let handles: Vec<_> = (0..args.concurrency)
        .map(|_| tokio::spawn(worker(shared.clone())))
        .collect();
    let mut stats = Stats::new();
    for h in handles {
        stats.merge(h.await.context("worker task failed")?);
    }
    let report = Report {
        call: args.call,
        addr: args.server.addr.clone(),
        concurrency: args.concurrency,
        connections: args.connections,
        images_per_request: args.images_per_request,
        total: start.elapsed(),
        stats,
    };
    report.print();
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report.to_json())?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if report.ok_count() > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
