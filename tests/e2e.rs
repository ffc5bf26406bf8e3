//! End to end: the real `crate-mae-server` binary on a loopback port, driven by a real tonic
//! client. Fixtures (PNG, JPEG) are generated here; nothing comes from the network.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate_mae_server::pb::crate_mae_client::CrateMaeClient;
use crate_mae_server::pb::{self, CompleteRequest, EmbedRequest, Image, RawTensor};
use image::{DynamicImage, ImageFormat, RgbImage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const IMAGE_SIZE: u32 = 64;
const MAX_IMAGES: usize = 8;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server {
    child: Child,
    grpc: String,
    metrics: SocketAddr,
    /// Client TLS settings when the server was started with TLS.
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Server {
    /// Starts the server with a small random model; `extra` flags and env are appended.
    async fn start(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let (gp, mp) = (free_port(), free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crate-mae-server"));
        let size = IMAGE_SIZE.to_string();
        let max_images = MAX_IMAGES.to_string();
        let grpc_addr = format!("127.0.0.1:{gp}");
        let metrics_addr = format!("127.0.0.1:{mp}");
        let defaults = [
            ("--image-size", size.as_str()),
            ("--grpc-addr", grpc_addr.as_str()),
            ("--metrics-addr", metrics_addr.as_str()),
            ("--max-images-per-request", max_images.as_str()),
            ("--max-batch-size", "4"),
            ("--diagnostics-every", "1"),
            ("--log", "warn"),
        ];
        cmd.arg("--random-weights");
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
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
            metrics: format!("127.0.0.1:{mp}").parse().unwrap(),
            tls: None,
        }
    }

    /// An endpoint for this server (TLS if configured).
    fn endpoint(
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

    async fn channel(&self) -> Channel {
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

    async fn health(&self, service: &str) -> Result<ServingStatus, tonic::Status> {
        let mut client = HealthClient::new(self.channel().await);
        let r = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?;
        Ok(ServingStatus::try_from(r.into_inner().status).unwrap())
    }

    /// Starts and waits until the model service is SERVING.
    async fn ready(extra: &[&str], env: &[(&str, &str)]) -> (Self, CrateMaeClient<Channel>) {
        Self::ready_tls(extra, env, None).await
    }

    async fn ready_tls(
        extra: &[&str],
        env: &[(&str, &str)],
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> (Self, CrateMaeClient<Channel>) {
        let mut server = Self::start(extra, env).await;
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

    async fn scrape(&self) -> String {
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

    fn terminate(&self) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

/// A series' value from a Prometheus text exposition (exact label string).
fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn picture(seed: u32, w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let v = x.wrapping_mul(31 + seed) ^ y.wrapping_mul(17 + 3 * seed);
        image::Rgb([
            (v % 251) as u8,
            ((x + y + seed) * 3 % 256) as u8,
            ((x * y) % 199) as u8,
        ])
    })
}

fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img.clone())
        .write_to(&mut out, format)
        .unwrap();
    out.into_inner()
}

fn png(seed: u32) -> Vec<u8> {
    encode(&picture(seed, 96, 80), ImageFormat::Png)
}

fn encoded(bytes: Vec<u8>) -> Image {
    Image {
        encoded: bytes,
        tensor: None,
    }
}

fn embed_request(images: Vec<Image>) -> EmbedRequest {
    EmbedRequest {
        images,
        ..Default::default()
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embed_and_complete_real_png_and_jpeg() {
    let (_server, mut client) = Server::ready(&[], &[]).await;
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.image_size, IMAGE_SIZE);
    assert!(info.random_weights && info.name.contains("RANDOM"));
    let jpeg = encode(&picture(2, 50, 120), ImageFormat::Jpeg);

    let r = client
        .embed(embed_request(vec![encoded(png(1)), encoded(jpeg.clone())]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.embeddings.len(), 2);
    assert_eq!(r.dim, info.dim);
    for e in &r.embeddings {
        assert_eq!(e.values.len(), info.dim as usize);
        assert!(e.values.iter().all(|v| v.is_finite()));
    }
    assert!(
        max_abs_diff(&r.embeddings[0].values, &r.embeddings[1].values) > 1e-3,
        "different images, different embeddings"
    );
    let timing = r.timing.unwrap();
    assert!(timing.inference_seconds > 0.0 && timing.batch_size >= 1);

    // Options: mean pooling differs from cls, normalisation gives unit norm, patch tokens,
    // diagnostics and attention come back with the documented shapes.
    let r2 = client
        .embed(EmbedRequest {
            images: vec![encoded(png(1))],
            pooling: pb::Pooling::Mean as i32,
            normalize: true,
            include_patch_tokens: true,
            include_diagnostics: true,
            attention_layer: Some(3),
            layer: None,
        })
        .await
        .unwrap()
        .into_inner();
    let e = &r2.embeddings[0];
    let norm: f32 = e.values.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "L2 norm {norm}");
    let grid = (IMAGE_SIZE / info.patch_size) as usize;
    assert_eq!(e.patch_tokens.len(), grid * grid * info.dim as usize);
    assert_eq!(e.diagnostics.len(), info.depth as usize);
    for d in &e.diagnostics {
        assert!(d.coding_rate > 0.0 && d.coding_rate.is_finite());
        assert!((d.rate_reduction - (d.expansion_rate - d.coding_rate)).abs() < 1e-9);
        assert!((0.0..=1.0).contains(&d.sparsity));
    }
    let attention = e.attention.as_ref().unwrap();
    assert_eq!(
        attention.cls_to_patches.len(),
        (attention.heads as usize) * grid * grid
    );

    // Completion: PNGs at model resolution, deterministic per seed, mask honoured.
    let complete = |seed: u64, patches: Vec<u32>| CompleteRequest {
        image: Some(encoded(jpeg.clone())),
        mask_ratio: 0.0,
        seed,
        masked_patches: patches,
        include_diagnostics: false,
    };
    let a = client
        .complete(complete(7, vec![]))
        .await
        .unwrap()
        .into_inner();
    let b = client
        .complete(complete(7, vec![]))
        .await
        .unwrap()
        .into_inner();
    let c = client
        .complete(complete(8, vec![]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        a.masked_patches.len(),
        grid * grid - (grid * grid) / 4,
        "default ratio 0.75"
    );
    assert_eq!(a.masked_patches, b.masked_patches);
    assert_eq!(a.reconstruction, b.reconstruction, "same seed, same output");
    assert_ne!(a.masked_patches, c.masked_patches);
    for bytes in [&a.reconstruction, &a.composite, &a.masked_input] {
        let img = image::load_from_memory_with_format(bytes, ImageFormat::Png).unwrap();
        assert_eq!((img.width(), img.height()), (IMAGE_SIZE, IMAGE_SIZE));
    }
    assert!(a.masked_patch_mse.is_finite() && a.masked_patch_mse > 0.0);
    let explicit = client
        .complete(complete(0, vec![0, 5, 15]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(explicit.masked_patches, vec![0, 5, 15]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_results_equal_single_results() {
    let (_server, mut client) = Server::ready(&[], &[]).await;
    let images: Vec<Vec<u8>> = (10..15).map(png).collect();
    let together = client
        .embed(embed_request(images.iter().cloned().map(encoded).collect()))
        .await
        .unwrap()
        .into_inner();
    // The same images as concurrent single-image requests (the server batches them).
    let singles = futures::future::join_all(images.iter().map(|img| {
        let mut c = client.clone();
        let req = embed_request(vec![encoded(img.clone())]);
        async move { c.embed(req).await.unwrap().into_inner() }
    }))
    .await;
    for (i, single) in singles.iter().enumerate() {
        let d = max_abs_diff(&single.embeddings[0].values, &together.embeddings[i].values);
        assert!(d < 1e-5, "image {i}: batched vs single differ by {d}");
    }
    // Streaming gives the same vectors, in order.
    let requests: Vec<EmbedRequest> = images
        .iter()
        .map(|img| embed_request(vec![encoded(img.clone())]))
        .collect();
    let mut stream = client
        .embed_stream(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut i = 0;
    while let Some(r) = stream.message().await.unwrap() {
        assert!(max_abs_diff(&r.embeddings[0].values, &together.embeddings[i].values) < 1e-5);
        i += 1;
    }
    assert_eq!(i, images.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_goes_not_serving_serving_not_serving() {
    let server = Server::start(&[], &[("CRATE_MAE_TEST_LOAD_DELAY_MS", "1500")]).await;
    // Listening but loading: both names answer NOT_SERVING.
    assert_eq!(
        server.health("cratemae.v1.CrateMae").await.unwrap(),
        ServingStatus::NotServing
    );
    assert_eq!(server.health("").await.unwrap(), ServingStatus::NotServing);
    let mut watch = HealthClient::new(server.channel().await)
        .watch(HealthCheckRequest {
            service: "cratemae.v1.CrateMae".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = vec![];
    while seen.last() != Some(&ServingStatus::Serving) {
        let msg = tokio::time::timeout(Duration::from_secs(60), watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push(ServingStatus::try_from(msg.status).unwrap());
    }
    assert_eq!(seen.first(), Some(&ServingStatus::NotServing));
    assert_eq!(server.health("").await.unwrap(), ServingStatus::Serving);
    server.terminate();
    let msg = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap();
    if let Ok(Some(m)) = msg {
        assert_eq!(
            ServingStatus::try_from(m.status).unwrap(),
            ServingStatus::NotServing
        );
    }
    // An unknown service name is NOT_FOUND, as the health protocol says.
    let mut server = server;
    let status = server.child.wait().await.unwrap();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let (server, _) = Server::ready(&[], &[]).await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["cratemae.v1.CrateMae", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    // v1alpha too (ghz falls back to it).
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as AlphaClient;
    let mut alpha = AlphaClient::new(server.channel().await);
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut responses = alpha
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    assert!(responses.message().await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_carry_every_series_with_sane_values() {
    let (server, mut client) = Server::ready(&[], &[]).await;
    let before = server.scrape().await;
    for name in [
        "cratemae_requests_total",
        "cratemae_request_duration_seconds",
        "cratemae_queue_duration_seconds",
        "cratemae_inference_duration_seconds",
        "cratemae_batch_size",
        "cratemae_queue_depth",
        "cratemae_inflight_requests",
        "cratemae_dropped_requests_total",
        "cratemae_build_info",
        "cratemae_coding_rate",
        "cratemae_expansion_rate",
        "cratemae_rate_reduction",
        "cratemae_sparsity",
    ] {
        assert!(
            before.contains(&format!("# TYPE {name} ")),
            "{name} not registered at start"
        );
    }
    for _ in 0..3 {
        client
            .embed(embed_request(vec![encoded(png(3)), encoded(png(4))]))
            .await
            .unwrap();
    }
    client
        .complete(CompleteRequest {
            image: Some(encoded(png(5))),
            ..Default::default()
        })
        .await
        .unwrap();
    let _ = client
        .embed(embed_request(vec![encoded(b"nope".to_vec())]))
        .await;
    let body = server.scrape().await;
    assert_eq!(
        metric(
            &body,
            r#"cratemae_requests_total{method="Embed",code="OK"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &body,
            r#"cratemae_requests_total{method="Complete",code="OK"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &body,
            r#"cratemae_requests_total{method="Embed",code="InvalidArgument"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&body, r#"cratemae_batch_size_sum{kind="embed"}"#),
        Some(6.0),
        "six images embedded"
    );
    assert_eq!(metric(&body, r#"cratemae_inflight_requests"#), Some(0.0));
    assert_eq!(
        metric(&body, r#"cratemae_queue_depth{kind="embed"}"#),
        Some(0.0)
    );
    let count = metric(
        &body,
        r#"cratemae_request_duration_seconds_count{method="Embed"}"#,
    )
    .unwrap();
    assert_eq!(count, 4.0);
    for layer in 0..12 {
        let rc = metric(
            &body,
            &format!(r#"cratemae_coding_rate{{layer="{layer}"}}"#),
        )
        .unwrap();
        let sp = metric(&body, &format!(r#"cratemae_sparsity{{layer="{layer}"}}"#)).unwrap();
        assert!(rc.is_finite() && rc > 0.0, "layer {layer} coding rate {rc}");
        assert!((0.0..=1.0).contains(&sp), "layer {layer} sparsity {sp}");
    }
    promtool_check(&body);
}

/// `promtool check metrics` on the live exposition. CI installs promtool (`.ci/run`); on a
/// developer machine without it the check says so instead of passing silently.
fn promtool_check(body: &str) {
    use std::io::Write;
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is required in CI"
        );
        eprintln!("promtool not installed: `promtool check metrics` NOT run");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_inputs_get_clear_statuses_and_the_server_keeps_serving() {
    let (_server, mut client) = Server::ready(&[], &[]).await;
    let good = png(9);
    let raw = |shape: Vec<u32>, data: Vec<f32>| Image {
        encoded: vec![],
        tensor: Some(RawTensor { shape, data }),
    };
    let n = (3 * IMAGE_SIZE * IMAGE_SIZE) as usize;
    let mut nan = vec![0.0; n];
    nan[7] = f32::NAN;
    let embed_cases: Vec<(&str, EmbedRequest, Code, &str)> = vec![
        (
            "not an image",
            embed_request(vec![encoded(b"hello, certainly not an image".to_vec())]),
            Code::InvalidArgument,
            "not a PNG or JPEG",
        ),
        (
            "GIF",
            embed_request(vec![encoded(
                b"GIF89a\x08\x00\x08\x00\x00\x00\x00;".to_vec(),
            )]),
            Code::InvalidArgument,
            "not supported",
        ),
        (
            "truncated PNG",
            embed_request(vec![encoded(good[..good.len() / 2].to_vec())]),
            Code::InvalidArgument,
            "decode",
        ),
        (
            "zero bytes",
            embed_request(vec![encoded(vec![])]),
            Code::InvalidArgument,
            "empty",
        ),
        (
            "zero-size PNG",
            embed_request(vec![encoded({
                let mut b = encode(&picture(0, 1, 1), ImageFormat::Png);
                b[16..24].copy_from_slice(&[0; 8]);
                b
            })]),
            Code::InvalidArgument,
            "",
        ),
        (
            "wrong raw shape",
            embed_request(vec![raw(vec![3, 32, 32], vec![0.0; 3 * 32 * 32])]),
            Code::InvalidArgument,
            "shape",
        ),
        (
            "raw NaN",
            embed_request(vec![raw(vec![3, IMAGE_SIZE, IMAGE_SIZE], nan)]),
            Code::InvalidArgument,
            "NaN",
        ),
        (
            "no images",
            embed_request(vec![]),
            Code::InvalidArgument,
            "no images",
        ),
        (
            "too many images",
            embed_request(vec![encoded(good.clone()); MAX_IMAGES + 1]),
            Code::ResourceExhausted,
            "limit",
        ),
        (
            "bad layer",
            EmbedRequest {
                layer: Some(99),
                ..embed_request(vec![encoded(good.clone())])
            },
            Code::InvalidArgument,
            "layer 99",
        ),
        (
            "second image bad",
            embed_request(vec![encoded(good.clone()), encoded(b"xx".to_vec())]),
            Code::InvalidArgument,
            "image 1",
        ),
    ];
    for (what, request, code, needle) in embed_cases {
        let status = client.embed(request).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        assert!(
            status.message().contains(needle),
            "{what}: message {:?} lacks {needle:?}",
            status.message()
        );
    }
    let complete = |ratio: f32, patches: Vec<u32>| CompleteRequest {
        image: Some(encoded(good.clone())),
        mask_ratio: ratio,
        seed: 1,
        masked_patches: patches,
        include_diagnostics: false,
    };
    let complete_cases: Vec<(&str, CompleteRequest, &str)> = vec![
        ("ratio -1", complete(-1.0, vec![]), "[0, 1)"),
        ("ratio 1", complete(1.0, vec![]), "[0, 1)"),
        ("ratio NaN", complete(f32::NAN, vec![]), "[0, 1)"),
        (
            "index out of range",
            complete(0.0, vec![3, 16]),
            "out of range",
        ),
        ("duplicate index", complete(0.0, vec![2, 2]), "twice"),
        (
            "no image",
            CompleteRequest {
                image: None,
                ..complete(0.5, vec![])
            },
            "no image",
        ),
    ];
    for (what, request, needle) in complete_cases {
        let status = client.complete(request).await.expect_err(what);
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{what}: {}",
            status.message()
        );
        assert!(
            status.message().contains(needle),
            "{what}: {:?}",
            status.message()
        );
    }
    // Still serving.
    let r = client
        .embed(embed_request(vec![encoded(good)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.embeddings.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_panic_fails_only_its_batch() {
    let (server, mut client) =
        Server::ready(&[], &[("CRATE_MAE_FAULT_INJECTION_VALUE", "777.25")]).await;
    let n = (3 * IMAGE_SIZE * IMAGE_SIZE) as usize;
    let mut poison = vec![0.0f32; n];
    poison[0] = 777.25;
    let status = client
        .embed(embed_request(vec![Image {
            encoded: vec![],
            tensor: Some(RawTensor {
                shape: vec![3, IMAGE_SIZE, IMAGE_SIZE],
                data: poison,
            }),
        }]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    let r = client
        .embed(embed_request(vec![encoded(png(1))]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.embeddings.len(), 1);
    assert_eq!(
        server.health("cratemae.v1.CrateMae").await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(
        metric(&server.scrape().await, "cratemae_worker_faults_total"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_accepted_requests_then_exits_zero() {
    // Full-size images at batch 1 make each request take a while, so many are in flight.
    let (mut server, client) =
        Server::ready(&["--image-size", "224", "--max-batch-size", "1"], &[]).await;
    let image = encode(&picture(1, 300, 300), ImageFormat::Png);
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let mut c = client.clone();
            let req = embed_request(vec![encoded(image.clone())]);
            tokio::spawn(async move { c.embed(req).await })
        })
        .collect();
    // Wait until they are admitted, then signal.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&server.scrape().await, "cratemae_inflight_requests").unwrap_or(0.0) < 6.0 {
        assert!(Instant::now() < deadline, "requests never became in flight");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.terminate();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New work is refused: the server answers UNAVAILABLE while draining, and after its
    // GOAWAY a client sees the connection closing (CANCELLED) or refused (UNAVAILABLE).
    let mut late = client.clone();
    match late
        .embed(embed_request(vec![encoded(image.clone())]))
        .await
    {
        Err(s) => assert!(
            matches!(s.code(), Code::Unavailable | Code::Cancelled),
            "{s:?}"
        ),
        Ok(_) => panic!("a request after SIGTERM was accepted"),
    }
    let mut completed = 0;
    for call in calls {
        let r = call.await.unwrap().expect("accepted request completes");
        assert_eq!(r.into_inner().embeddings.len(), 1);
        completed += 1;
    }
    assert_eq!(completed, 6);
    let status = tokio::time::timeout(Duration::from_secs(30), server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

/// Every `cratemae_*` metric the Grafana dashboard and the alert rules use is one the server
/// really exports (checked against a live scrape after traffic).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ops_kit_uses_only_exported_metrics() {
    let (server, mut client) = Server::ready(&[], &[]).await;
    client
        .embed(embed_request(vec![encoded(png(1))]))
        .await
        .unwrap();
    let scrape = server.scrape().await;
    let exported: std::collections::BTreeSet<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let dashboard =
        std::fs::read_to_string(format!("{root}/deploy/grafana/crate-mae-dashboard.json")).unwrap();
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("dashboard is valid JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 8));
    let rules =
        std::fs::read_to_string(format!("{root}/deploy/monitoring/prometheusrule.yaml")).unwrap();
    let adapter = std::fs::read_to_string(format!(
        "{root}/deploy/monitoring/prometheus-adapter-rules.yaml"
    ))
    .unwrap();
    let hpa = std::fs::read_to_string(format!("{root}/deploy/base/hpa.yaml")).unwrap();
    let mut used = std::collections::BTreeSet::new();
    for text in [&dashboard, &rules, &adapter, &hpa] {
        let mut rest = text.as_str();
        while let Some(i) = rest.find("cratemae_") {
            // Recording rules are `cratemae:…`; metric names are `cratemae_[a-z0-9_]+`.
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| exported.contains(b)))
                .unwrap_or(&name)
                .to_string();
            used.insert(base);
        }
    }
    assert!(used.len() >= 10, "found only {used:?}");
    let missing: Vec<_> = used
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "ops kit uses metrics the server does not export: {missing:?}"
    );
}

const TOKEN: &str = "test-token-0123456789abcdef";

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bearer_token_guards_the_model_service_but_not_probes() {
    // `ready` polls health without a token: probes stay open by default.
    let (server, mut client) = Server::ready(&[], &[("CRATE_MAE_AUTH_TOKEN", TOKEN)]).await;
    let image = || embed_request(vec![encoded(png(1))]);
    let missing = client.embed(image()).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(
        missing.message().contains("authorization"),
        "{}",
        missing.message()
    );
    let wrong = client
        .embed(with_token(image(), "test-token-0123456789abcdeX"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert!(wrong.message().contains("invalid"));
    let ok = client
        .embed(with_token(image(), TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.embeddings.len(), 1);
    assert_eq!(
        metric(&server.scrape().await, "cratemae_auth_failures_total"),
        Some(2.0)
    );

    // Guarding probes too is opt-in.
    let strict = Server::start(
        &["--auth-health-and-reflection"],
        &[("CRATE_MAE_AUTH_TOKEN", TOKEN)],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match strict.health("").await {
            Err(s) if s.code() == Code::Unauthenticated => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("health without a token should be UNAUTHENTICATED, got {other:?}"),
        }
    }
}

struct Pki {
    dir: std::path::PathBuf,
    ca: String,
    client_cert: String,
    client_key: String,
}

/// A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate.
fn make_pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "crate-mae test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        (
            params.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let (server_cert, server_key) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(
        vec![],
        "crate-mae test client",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let dir = std::env::temp_dir().join(format!(
        "crate-mae-pki-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server_cert).unwrap();
    std::fs::write(dir.join("server.key"), server_key).unwrap();
    Pki {
        dir,
        ca: ca_cert.pem(),
        client_cert,
        client_key,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let pki = make_pki();
    let path = |f: &str| pki.dir.join(f).display().to_string();
    let (cert, key, ca) = (path("server.pem"), path("server.key"), path("ca.pem"));
    let trust = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    let with_identity = trust
        .clone()
        .identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    // Server-side TLS only: any client that trusts the CA gets in.
    {
        let (_tls_only, mut client) = Server::ready_tls(
            &["--tls-cert", &cert, "--tls-key", &key],
            &[],
            Some(trust.clone()),
        )
        .await;
        let r = client
            .embed(embed_request(vec![encoded(png(2))]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.embeddings.len(),
            1,
            "TLS without client certificates works"
        );
    }
    let (server, mut client) = Server::ready_tls(
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
        ],
        &[],
        Some(with_identity),
    )
    .await;
    let r = client
        .embed(embed_request(vec![encoded(png(2))]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.embeddings.len(),
        1,
        "TLS handshake with a client certificate works"
    );

    // No client certificate: the handshake (or the first call) is refused.
    let refused = match server.endpoint(Some(trust)).connect().await {
        Err(_) => true,
        Ok(channel) => CrateMaeClient::new(channel)
            .embed(embed_request(vec![encoded(png(2))]))
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate got through");
    // Plaintext against the TLS port fails too.
    let plain = match server.endpoint(None).connect().await {
        Err(_) => true,
        Ok(channel) => CrateMaeClient::new(channel)
            .embed(embed_request(vec![encoded(png(2))]))
            .await
            .is_err(),
    };
    assert!(plain, "plaintext got through a TLS-only port");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_and_cancelled_requests_are_dropped_before_compute() {
    // Batch 1 at full resolution: the queue drains slowly, so later requests wait.
    let (server, client) = Server::ready(
        &[
            "--image-size",
            "224",
            "--max-batch-size",
            "1",
            "--diagnostics-every",
            "0",
        ],
        &[],
    )
    .await;
    let image = encode(&picture(3, 224, 224), ImageFormat::Png);
    let busy: Vec<_> = (0..6)
        .map(|_| {
            let mut c = client.clone();
            let req = embed_request(vec![encoded(image.clone())]);
            tokio::spawn(async move { c.embed(req).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&server.scrape().await, "cratemae_inflight_requests").unwrap_or(0.0) < 6.0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Five requests with a 30 ms deadline queue behind six busy ones.
    let short: Vec<_> = (0..5)
        .map(|_| {
            let mut c = client.clone();
            let mut req = tonic::Request::new(embed_request(vec![encoded(image.clone())]));
            req.set_timeout(Duration::from_millis(30));
            tokio::spawn(async move {
                let started = Instant::now();
                (c.embed(req).await, started.elapsed())
            })
        })
        .collect();
    // Three requests whose clients give up while they are queued.
    let abandoned: Vec<_> = (0..3)
        .map(|_| {
            let mut c = client.clone();
            let req = embed_request(vec![encoded(image.clone())]);
            tokio::spawn(async move { c.embed(req).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for call in &abandoned {
        call.abort();
    }
    for call in short {
        let (result, _elapsed) = call.await.unwrap();
        let status = result.expect_err("a request past its deadline must not succeed");
        // tonic's client enforces the deadline itself ("Timeout expired", CANCELLED); a
        // client that does not gets DEADLINE_EXCEEDED from the server.
        assert!(
            status.code() == Code::DeadlineExceeded
                || (status.code() == Code::Cancelled && status.message().contains("Timeout")),
            "{status:?}"
        );
    }
    for call in busy {
        call.await
            .unwrap()
            .expect("requests without a deadline complete");
    }
    // Let the worker reach the dropped items.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = server.scrape().await;
    let deadline = metric(
        &body,
        r#"cratemae_dropped_requests_total{reason="deadline"}"#,
    )
    .unwrap();
    let cancelled = metric(
        &body,
        r#"cratemae_dropped_requests_total{reason="cancelled"}"#,
    )
    .unwrap();
    // Every dropped request is counted exactly once. The split between the two reasons
    // depends on whose timer fires first (the client's own or the server's), so only its
    // sum and that deadlines are recognised are asserted.
    assert_eq!(
        deadline + cancelled,
        8.0,
        "deadline {deadline}, cancelled {cancelled}"
    );
    assert!(deadline >= 1.0, "no drop recognised as a deadline");
    // Only the six busy images were computed: the dropped ones never took a batch slot.
    assert_eq!(
        metric(&body, r#"cratemae_batch_size_sum{kind="embed"}"#),
        Some(6.0)
    );
}

/// Resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

fn png_with(
    width: u32,
    height: u32,
    color: png::ColorType,
    depth: png::BitDepth,
    palette: Option<Vec<u8>>,
    data: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(color);
        enc.set_depth(depth);
        if let Some(p) = palette {
            enc.set_palette(p);
        }
        let mut writer = enc.write_header().unwrap();
        writer.write_image_data(data).unwrap();
    }
    out
}

/// A PNG whose header declares `width × height` but carries almost no data: a decompression
/// bomb if anything allocated by the header.
fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = png_with(
        1,
        1,
        png::ColorType::Rgb,
        png::BitDepth::Eight,
        None,
        &[0, 0, 0],
    );
    bytes[16..20].copy_from_slice(&width.to_be_bytes());
    bytes[20..24].copy_from_slice(&height.to_be_bytes());
    // Fix the IHDR CRC so only the size is hostile.
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The hostile-input corpus (RELIABILITY.md): each input gets the expected status with a
/// message, the server answers a good request after every one, and memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_input_corpus() {
    let (server, mut client) = Server::ready(
        &["--max-image-pixels", "20000000", "--max-message-mib", "4"],
        &[],
    )
    .await;
    let pid = server.child.id().unwrap();
    let good = png(5);
    let jpeg = encode(&picture(4, 120, 90), ImageFormat::Jpeg);
    let noise = |seed: u32, n: usize| -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 11) as u8)
            .collect()
    };
    let mut corrupt_png = good.clone();
    let mid = corrupt_png.len() / 2;
    corrupt_png[mid..mid + 16]
        .iter_mut()
        .for_each(|b| *b ^= 0x5a);
    let mut corrupt_jpeg = jpeg.clone();
    let mid = corrupt_jpeg.len() / 2;
    corrupt_jpeg[mid..mid + 32]
        .iter_mut()
        .for_each(|b| *b = 0xff);
    let n = (3 * IMAGE_SIZE * IMAGE_SIZE) as usize;
    let raw = |data: Vec<f32>| Image {
        encoded: vec![],
        tensor: Some(RawTensor {
            shape: vec![3, IMAGE_SIZE, IMAGE_SIZE],
            data,
        }),
    };
    let mut with_inf = vec![0.0; n];
    with_inf[1] = f32::INFINITY;
    let grey16: Vec<u8> = (0..64 * 48)
        .flat_map(|i: u32| ((i * 37) as u16).to_be_bytes())
        .collect();
    let palette: Vec<u8> = (0..16u8)
        .flat_map(|i| [i * 16, 255 - i * 16, 128])
        .collect();
    let indexed: Vec<u8> = (0..50 * 40).map(|i: u32| (i % 16) as u8).collect();
    let rgba: Vec<u8> = (0..40 * 40)
        .flat_map(|i: u32| [(i % 255) as u8, 10, 200, (i % 7 * 30) as u8])
        .collect();
    let wide = encode(&picture(1, 4000, 1), ImageFormat::Png);
    let tall = encode(&picture(2, 1, 4000), ImageFormat::Png);

    // (name, image, expected code or OK)
    let cases: Vec<(&str, Image, Option<Code>)> = vec![
        (
            "random bytes 1",
            encoded(noise(1, 1000)),
            Some(Code::InvalidArgument),
        ),
        (
            "random bytes 2",
            encoded(noise(2, 64 * 1024)),
            Some(Code::InvalidArgument),
        ),
        (
            "PNG magic then garbage",
            encoded([&good[..8], &noise(3, 500)[..]].concat()),
            Some(Code::InvalidArgument),
        ),
        (
            "truncated PNG",
            encoded(good[..good.len() * 2 / 3].to_vec()),
            Some(Code::InvalidArgument),
        ),
        (
            "corrupt PNG",
            encoded(corrupt_png),
            Some(Code::InvalidArgument),
        ),
        (
            "truncated JPEG",
            encoded(jpeg[..jpeg.len() / 3].to_vec()),
            None,
        ),
        ("corrupt JPEG", encoded(corrupt_jpeg), None),
        ("zero bytes", encoded(vec![]), Some(Code::InvalidArgument)),
        (
            "PNG bomb 100000×100000",
            encoded(png_bomb(100_000, 100_000)),
            Some(Code::ResourceExhausted),
        ),
        (
            "PNG bomb 1×2^31",
            encoded(png_bomb(1, 1 << 31)),
            Some(Code::ResourceExhausted),
        ),
        ("1×4000", encoded(tall), Some(Code::Ok)),
        ("4000×1", encoded(wide), Some(Code::Ok)),
        (
            "16-bit grey",
            encoded(png_with(
                64,
                48,
                png::ColorType::Grayscale,
                png::BitDepth::Sixteen,
                None,
                &grey16,
            )),
            Some(Code::Ok),
        ),
        (
            "palette",
            encoded(png_with(
                50,
                40,
                png::ColorType::Indexed,
                png::BitDepth::Eight,
                Some(palette),
                &indexed,
            )),
            Some(Code::Ok),
        ),
        (
            "RGBA",
            encoded(png_with(
                40,
                40,
                png::ColorType::Rgba,
                png::BitDepth::Eight,
                None,
                &rgba,
            )),
            Some(Code::Ok),
        ),
        (
            "raw wrong shape",
            Image {
                encoded: vec![],
                tensor: Some(RawTensor {
                    shape: vec![3, 8, 8],
                    data: vec![0.0; 192],
                }),
            },
            Some(Code::InvalidArgument),
        ),
        (
            "raw wrong length",
            Image {
                encoded: vec![],
                tensor: Some(RawTensor {
                    shape: vec![3, IMAGE_SIZE, IMAGE_SIZE],
                    data: vec![0.0; 10],
                }),
            },
            Some(Code::InvalidArgument),
        ),
        ("raw Inf", raw(with_inf), Some(Code::InvalidArgument)),
        ("raw 3e38", raw(vec![3e38; n]), Some(Code::InvalidArgument)),
        (
            "both encoded and raw",
            Image {
                encoded: good.clone(),
                tensor: Some(RawTensor {
                    shape: vec![3, IMAGE_SIZE, IMAGE_SIZE],
                    data: vec![0.0; n],
                }),
            },
            Some(Code::InvalidArgument),
        ),
    ];
    let rss_before = rss_mib(pid);
    let mut tally: std::collections::BTreeMap<String, usize> = Default::default();
    for (name, image, expected) in cases {
        let result = client.embed(embed_request(vec![image])).await;
        let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        match expected {
            Some(want) => assert_eq!(code, want, "{name}: {result:?}"),
            // A damaged JPEG may still decode (baseline JPEG is resilient); anything but a
            // clean refusal or success is a bug.
            None => assert!(
                matches!(code, Code::Ok | Code::InvalidArgument),
                "{name}: {result:?}"
            ),
        }
        if let Err(status) = &result {
            assert!(!status.message().is_empty(), "{name}: empty message");
        }
        *tally.entry(format!("{code:?}")).or_default() += 1;
        let ok = client
            .embed(embed_request(vec![encoded(good.clone())]))
            .await;
        assert!(
            ok.is_ok(),
            "after {name} the server stopped serving: {ok:?}"
        );
    }
    // Parameters and limits.
    let complete = |ratio: f32, patches: Vec<u32>| CompleteRequest {
        image: Some(encoded(good.clone())),
        mask_ratio: ratio,
        seed: 0,
        masked_patches: patches,
        include_diagnostics: false,
    };
    for (name, request, want) in [
        (
            "mask ratio -1",
            complete(-1.0, vec![]),
            Code::InvalidArgument,
        ),
        ("mask ratio 1", complete(1.0, vec![]), Code::InvalidArgument),
        (
            "mask ratio NaN",
            complete(f32::NAN, vec![]),
            Code::InvalidArgument,
        ),
        (
            "mask index out of range",
            complete(0.0, vec![99]),
            Code::InvalidArgument,
        ),
        (
            "mask index duplicated",
            complete(0.0, vec![1, 1]),
            Code::InvalidArgument,
        ),
    ] {
        let status = client.complete(request).await.expect_err(name);
        assert_eq!(status.code(), want, "{name}");
        *tally.entry(format!("{want:?}")).or_default() += 1;
    }
    let too_many = client
        .embed(embed_request(vec![encoded(good.clone()); MAX_IMAGES + 1]))
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::ResourceExhausted);
    *tally.entry("ResourceExhausted".into()).or_default() += 1;
    let oversize = client
        .embed(embed_request(vec![encoded(vec![7u8; 5 << 20])]))
        .await
        .unwrap_err();
    assert!(
        matches!(oversize.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{oversize:?}"
    );
    *tally.entry(format!("{:?}", oversize.code())).or_default() += 1;
    assert!(client
        .embed(embed_request(vec![encoded(good)]))
        .await
        .is_ok());
    let rss_after = rss_mib(pid);
    eprintln!("hostile corpus: {tally:?}; server RSS {rss_before:.0} → {rss_after:.0} MiB");
    assert!(
        rss_after - rss_before < 256.0,
        "RSS grew from {rss_before:.0} to {rss_after:.0} MiB"
    );
}

/// A bulk stream larger than the admission queue is paced, not failed: an error status
/// would end the whole stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embed_stream_waits_for_capacity_instead_of_failing() {
    let (_server, mut client) = Server::ready(&["--max-queue-images", "8"], &[]).await;
    let requests: Vec<EmbedRequest> = (0..6)
        .map(|i| embed_request((0..8).map(|j| encoded(png(i * 8 + j))).collect()))
        .collect();
    let response = client
        .embed_stream(futures::stream::iter(requests))
        .await
        .unwrap();
    assert!(response.metadata().get("x-request-id").is_some());
    let mut stream = response.into_inner();
    let mut images = 0;
    while let Some(r) = stream
        .message()
        .await
        .expect("no message of the stream fails")
    {
        images += r.embeddings.len();
    }
    assert_eq!(images, 48, "6 requests × 8 images through an 8-image queue");
}

/// The bundled binaries against a live server: `crate-mae-cli` health/info/embed/complete and
/// `crate-mae-load`'s JSON report.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_and_load_generator_work_against_the_server() {
    let (server, _) = Server::ready(&[], &[]).await;
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/scene.png");
    let out = std::env::temp_dir().join(format!("crate-mae-cli-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_crate-mae-cli"))
            .arg("--addr")
            .arg(&server.grpc)
            .args(args)
            .output()
            .unwrap()
    };
    let health = cli(&["health", "--service", "cratemae.v1.CrateMae"]);
    assert!(health.status.success());
    assert_eq!(String::from_utf8_lossy(&health.stdout).trim(), "SERVING");

    let info: serde_json::Value = serde_json::from_slice(&cli(&["info"]).stdout).unwrap();
    let dim = info["dim"].as_u64().unwrap() as usize;

    let embed = cli(&["embed", "--json", fixture]);
    assert!(
        embed.status.success(),
        "{}",
        String::from_utf8_lossy(&embed.stderr)
    );
    let parsed: serde_json::Value = serde_json::from_slice(&embed.stdout).unwrap();
    assert_eq!(parsed[0]["embedding"].as_array().unwrap().len(), dim);

    let grid = out.join("grid.png");
    let complete = cli(&["complete", fixture, fixture, "-o", grid.to_str().unwrap()]);
    assert!(
        complete.status.success(),
        "{}",
        String::from_utf8_lossy(&complete.stderr)
    );
    let img = image::open(&grid).unwrap();
    // Two rows of three 64-px panels with 2-px gaps.
    assert_eq!(
        (img.width(), img.height()),
        (3 * IMAGE_SIZE + 4, 2 * IMAGE_SIZE + 2)
    );

    let bad = cli(&["embed", "/etc/hostname"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("INVALID_ARGUMENT"));

    let report = out.join("load.json");
    let load = std::process::Command::new(env!("CARGO_BIN_EXE_crate-mae-load"))
        .args([
            "--addr",
            &server.grpc,
            "--image",
            fixture,
            "-n",
            "12",
            "-c",
            "3",
            "--json",
        ])
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["ok_count"], 12);
    assert_eq!(report["status_codes"]["OK"], 12);
    let _ = std::fs::remove_dir_all(&out);
}
