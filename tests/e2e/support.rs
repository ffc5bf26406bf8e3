//! The server under test (started as a child process on free loopback ports) and the
//! fixtures and helpers every area shares.

pub use crate_mae_server::pb::crate_mae_client::CrateMaeClient;
pub use crate_mae_server::pb::{self, CompleteRequest, EmbedRequest, Image, RawTensor};
pub use image::{DynamicImage, ImageFormat, RgbImage};
pub use std::net::SocketAddr;
pub use std::process::Stdio;
pub use std::time::{Duration, Instant};
pub use tokio::io::{AsyncReadExt, AsyncWriteExt};
pub use tokio::process::{Child, Command};
pub use tonic::transport::Channel;
pub use tonic::Code;
pub use tonic_health::pb::health_check_response::ServingStatus;
pub use tonic_health::pb::health_client::HealthClient;
pub use tonic_health::pb::HealthCheckRequest;

pub const IMAGE_SIZE: u32 = 64;

pub const MAX_IMAGES: usize = 8;

/// Held by tests that load both cores for a while (perf_analyzer, floods) and by tests that
/// time something, so the two never overlap when the suite runs tests in parallel.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static CORES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    CORES.lock().await
}

/// Resident memory of a process, in MiB: now (`VmRSS`) or its peak so far (`VmHWM`).
pub fn memory_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

pub fn rss_mib(pid: u32) -> f64 {
    memory_mib(pid, "VmRSS")
}

/// A loopback port nobody listens on, never the same one twice in this process: tests start
/// servers in parallel, and the OS may hand a just-released port to the next caller before
/// the first server has bound it.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Which weights a test server runs.
#[derive(Clone, Copy, PartialEq)]
pub enum Weights {
    /// Seeded random-init at `IMAGE_SIZE`: small, fast and deterministic.
    Random,
    /// The built-in trained model, exactly as `cargo run --release` serves it.
    BuiltIn,
}

pub struct Server {
    pub child: Child,
    pub grpc: String,
    /// The HTTP listener (OIP REST, OpenAI-style embeddings).
    pub http: SocketAddr,
    pub metrics: SocketAddr,
    /// Client TLS settings when the server was started with TLS.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Server {
    /// Starts the server with a small random model; `extra` flags and env are appended.
    pub async fn start(extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(Weights::Random, extra, env).await
    }

    pub async fn launch(weights: Weights, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let (gp, mp, hp) = (free_port(), free_port(), free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crate-mae-server"));
        let size = IMAGE_SIZE.to_string();
        let max_images = MAX_IMAGES.to_string();
        let grpc_addr = format!("127.0.0.1:{gp}");
        let metrics_addr = format!("127.0.0.1:{mp}");
        let http_addr = format!("127.0.0.1:{hp}");
        let defaults = [
            ("--http-addr", http_addr.as_str()),
            ("--image-size", size.as_str()),
            ("--grpc-addr", grpc_addr.as_str()),
            ("--metrics-addr", metrics_addr.as_str()),
            ("--max-images-per-request", max_images.as_str()),
            ("--max-batch-size", "4"),
            ("--diagnostics-every", "1"),
            ("--diagnostics-min-interval-ms", "0"),
            ("--log", "warn"),
        ];
        if weights == Weights::Random {
            cmd.arg("--random-weights");
        }
        for (flag, value) in defaults {
            let random_only = flag == "--image-size" && weights != Weights::Random;
            if !extra.contains(&flag) && !random_only {
                cmd.args([flag, value]);
            }
        }
        cmd.args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let child = cmd.spawn().expect("server binary starts");
        Self {
            child,
            grpc: format!("http://127.0.0.1:{gp}"),
            http: http_addr.parse().unwrap(),
            metrics: format!("127.0.0.1:{mp}").parse().unwrap(),
            tls: None,
        }
    }

    /// An endpoint for this server (TLS if configured).
    pub fn endpoint(
        &self,
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> tonic::transport::Endpoint {
        match tls {
            Some(tls) => Channel::from_shared(self.grpc.replace("http://", "https://"))
                .unwrap()
                .tls_config(tls)
                .unwrap(),
            None => Channel::from_shared(self.grpc.clone()).unwrap(),
        }
    }

    pub async fn channel(&self) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.endpoint(self.tls.clone()).connect().await {
                Ok(c) => return c,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("cannot connect to {}: {e}", self.grpc),
            }
        }
    }

    pub async fn health(&self, service: &str) -> Result<ServingStatus, tonic::Status> {
        let mut client = HealthClient::new(self.channel().await);
        let r = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?;
        Ok(ServingStatus::try_from(r.into_inner().status).unwrap())
    }

    /// Starts and waits until the model service is SERVING.
    pub async fn ready(extra: &[&str], env: &[(&str, &str)]) -> (Self, CrateMaeClient<Channel>) {
        Self::ready_with(Weights::Random, extra, env, None).await
    }

    pub async fn ready_tls(
        extra: &[&str],
        env: &[(&str, &str)],
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> (Self, CrateMaeClient<Channel>) {
        Self::ready_with(Weights::Random, extra, env, tls).await
    }

    pub async fn ready_with(
        weights: Weights,
        extra: &[&str],
        env: &[(&str, &str)],
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> (Self, CrateMaeClient<Channel>) {
        let mut server = Self::launch(weights, extra, env).await;
        server.tls = tls;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match server.health("cratemae.v1.CrateMae").await {
                Ok(ServingStatus::Serving) => break,
                other => assert!(
                    Instant::now() < deadline,
                    "server never became SERVING: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let client =
            CrateMaeClient::new(server.channel().await).max_decoding_message_size(64 << 20);
        (server, client)
    }

    /// Sends `n` single-image embeds of `image` and returns once all `n` are in flight.
    pub async fn embeds_in_flight(
        &self,
        client: &CrateMaeClient<Channel>,
        image: &[u8],
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<Result<tonic::Response<pb::EmbedResponse>, tonic::Status>>>
    {
        let calls = (0..n)
            .map(|_| {
                let mut c = client.clone();
                let req = embed_request(vec![encoded(image.to_vec())]);
                tokio::spawn(async move { c.embed(req).await })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while metric(&self.scrape().await, "cratemae_inflight_requests").unwrap_or(0.0) < n as f64 {
            assert!(Instant::now() < deadline, "requests never became in flight");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        calls
    }

    pub async fn scrape(&self) -> String {
        let mut s = tokio::net::TcpStream::connect(self.metrics).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }

    pub fn terminate(&self) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

/// An HTTP/1.1 answer, read whole.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}), status {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// One HTTP/1.1 request on a connection of its own (`Connection: close`), as raw bytes: the
/// tests need clients that send what real clients would not.
pub async fn http_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpReply {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    // A server may answer (413) and close before reading a body it refuses: the write then
    // fails, and the answer is still there to read.
    let _ = s.write_all(body).await;
    read_reply(&mut s).await
}

/// A JSON POST.
pub async fn http_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> HttpReply {
    let body = serde_json::to_vec(body).unwrap();
    http_call(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        &body,
    )
    .await
}

/// Reads an HTTP/1.1 answer until the server closes the connection.
pub async fn read_reply(s: &mut tokio::net::TcpStream) -> HttpReply {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 65536];
    // Until the server closes; a reset after the answer (an unread body) ends it too.
    while let Ok(n) = s.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    HttpReply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// A series' value from a Prometheus text exposition (exact label string).
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub fn picture(seed: u32, w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let v = x.wrapping_mul(31 + seed) ^ y.wrapping_mul(17 + 3 * seed);
        image::Rgb([
            (v % 251) as u8,
            ((x + y + seed) * 3 % 256) as u8,
            ((x * y) % 199) as u8,
        ])
    })
}

pub fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img.clone())
        .write_to(&mut out, format)
        .unwrap();
    out.into_inner()
}

pub fn png(seed: u32) -> Vec<u8> {
    encode(&picture(seed, 96, 80), ImageFormat::Png)
}

pub fn encoded(bytes: Vec<u8>) -> Image {
    Image {
        encoded: bytes,
        tensor: None,
    }
}

pub fn embed_request(images: Vec<Image>) -> EmbedRequest {
    EmbedRequest {
        images,
        ..Default::default()
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
