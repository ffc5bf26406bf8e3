//! The API as a backend calls it: embeddings, completions, batching, reflection, streaming,
//! and the bundled CLI and load generator.

use crate::support::*;

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
    // Image i is masked with seed + i: the same picture twice gets two different masks.
    let rgb = img.to_rgb8();
    let masked_panel = |row: u32| {
        image::imageops::crop_imm(
            &rgb,
            IMAGE_SIZE + 2,
            row * (IMAGE_SIZE + 2),
            IMAGE_SIZE,
            IMAGE_SIZE,
        )
        .to_image()
    };
    assert_ne!(masked_panel(0), masked_panel(1));
    let columns = cli(&[
        "complete",
        fixture,
        fixture,
        "--columns",
        "--scale",
        "2",
        "-o",
        grid.to_str().unwrap(),
    ]);
    assert!(
        columns.status.success(),
        "{}",
        String::from_utf8_lossy(&columns.stderr)
    );
    let img = image::open(&grid).unwrap();
    // Two columns of three 128-px panels.
    assert_eq!(
        (img.width(), img.height()),
        (2 * 2 * IMAGE_SIZE + 2, 3 * 2 * IMAGE_SIZE + 4)
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

/// A lone request is never left on one core: 8 Base images (random weights) through the
/// server take under 1.6× the in-process encoder's batch-8 time on a pool of every core,
/// with the default threading (no start-up measurement decides it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_request_spreads_over_every_core() {
    let _cores = exclusive().await;
    use candle_core::{Device, Tensor};
    use crate_mae::{checkpoint, init, CrateMaeConfig};
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cfg = CrateMaeConfig::preset("base").unwrap();
    let s = cfg.img_size;
    // In process first, with the server not yet started: the best of three batch-8 passes.
    let in_process = tokio::task::spawn_blocking(move || {
        let weights = init::random_weights(&cfg, 0, &Device::Cpu).unwrap();
        let model = checkpoint::model_from_tensors(weights, &cfg, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (8, 3, s, s), &Device::Cpu).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cores)
            .build()
            .unwrap();
        (0..4)
            .map(|_| {
                let started = Instant::now();
                pool.install(|| model.encode(&x, None)).unwrap();
                started.elapsed()
            })
            .skip(1)
            .min()
            .unwrap()
    })
    .await
    .unwrap();
    let (_server, mut client) = Server::ready(
        &[
            "--preset",
            "base",
            "--image-size",
            "224",
            "--max-batch-size",
            "8",
            "--diagnostics-every",
            "0",
        ],
        &[],
    )
    .await;
    let image = || Image {
        encoded: vec![],
        tensor: Some(RawTensor {
            shape: vec![3, s as u32, s as u32],
            data: vec![0.25; 3 * s * s],
        }),
    };
    let mut served = Duration::MAX;
    for _ in 0..3 {
        let answer = client
            .embed(embed_request((0..8).map(|_| image()).collect()))
            .await
            .unwrap()
            .into_inner();
        let timing = answer.timing.unwrap();
        assert_eq!(timing.batch_size, 8, "one request, one batch");
        served = served.min(Duration::from_secs_f64(timing.inference_seconds));
    }
    let ratio = served.as_secs_f64() / in_process.as_secs_f64();
    eprintln!(
        "Base batch 8 on {cores} cores: served {served:?}, in process {in_process:?}, {ratio:.2}×"
    );
    assert!(
        ratio < 1.6,
        "a lone request of 8 images took {ratio:.2}× the in-process time: it did not use every core"
    );
}
