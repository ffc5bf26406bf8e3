//! The built-in trained model: labelled as trained, and its completions beat a trivial
//! baseline on real Fashion-MNIST test images.

use crate::support::*;

/// Fashion-MNIST test images, one per class, 32×32 as the built-in model sees them (written
/// by `crate-mae-train samples`).
fn fashion_mnist_fixtures() -> Vec<(String, Vec<u8>)> {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fashion-mnist");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            (
                p.file_stem().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// The built-in model's server, a client, and what `GetModelInfo` says.
async fn built_in() -> (Server, CrateMaeClient<Channel>, pb::ModelInfo) {
    let (server, mut client) = Server::ready_with(Weights::BuiltIn, &[], &[], None).await;
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    (server, client, info)
}

/// Summed squared error (values in [0, 1]) of `prediction` and of a fill with the mean colour
/// of the visible pixels, over the masked patches only; and how many values were compared.
fn masked_patch_errors(
    original: &RgbImage,
    prediction: &RgbImage,
    masked: &[u32],
    patch: u32,
    grid: u32,
) -> (f64, f64, usize) {
    let hidden = |x: u32, y: u32| masked.contains(&((y / patch) * grid + x / patch));
    let (mut sum, mut visible) = ([0f64; 3], 0usize);
    for (x, y, p) in original.enumerate_pixels() {
        if !hidden(x, y) {
            visible += 1;
            for c in 0..3 {
                sum[c] += p[c] as f64 / 255.0;
            }
        }
    }
    let mean = sum.map(|s| s / visible.max(1) as f64);
    let (mut model, mut fill, mut n) = (0.0, 0.0, 0);
    for (x, y, p) in original.enumerate_pixels() {
        if hidden(x, y) {
            n += 3;
            let q = prediction.get_pixel(x, y);
            for c in 0..3 {
                let truth = p[c] as f64 / 255.0;
                model += (q[c] as f64 / 255.0 - truth).powi(2);
                fill += (mean[c] - truth).powi(2);
            }
        }
    }
    (model, fill, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn built_in_model_is_trained_and_completes_better_than_mean_colour_fill() {
    let (_server, mut client, info) = built_in().await;
    assert!(
        !info.random_weights && !info.name.contains("RANDOM"),
        "{info:?}"
    );
    assert!(
        info.weights_source.starts_with("built-in"),
        "{}",
        info.weights_source
    );
    assert_eq!((info.image_size, info.weights_sha256.len()), (32, 64));

    let fixtures = fashion_mnist_fixtures();
    assert_eq!(fixtures.len(), 10, "one image per class");
    let (mut model, mut fill, mut values, mut wins) = (0.0, 0.0, 0, 0);
    for (seed, (name, png)) in fixtures.iter().enumerate() {
        let r = client
            .complete(CompleteRequest {
                image: Some(encoded(png.clone())),
                mask_ratio: 0.75,
                seed: seed as u64,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let original = image::load_from_memory(png).unwrap().to_rgb8();
        let composite = image::load_from_memory(&r.composite).unwrap().to_rgb8();
        assert_eq!(composite.dimensions(), original.dimensions(), "{name}");
        assert_eq!(r.masked_patches.len(), 48, "{name}: 75 % of 64 patches");
        let (m, f, n) = masked_patch_errors(
            &original,
            &composite,
            &r.masked_patches,
            info.patch_size,
            r.grid_size,
        );
        eprintln!(
            "{name}: masked-patch MSE model {:.4}, mean-colour fill {:.4}",
            m / n as f64,
            f / n as f64
        );
        wins += usize::from(m < f);
        (model, fill, values) = (model + m, fill + f, values + n);
    }
    let (model, fill) = (model / values as f64, fill / values as f64);
    eprintln!("all: model {model:.4}, mean-colour fill {fill:.4}, model better on {wins}/10");
    assert!(
        model * 3.0 < fill,
        "the built-in model's completions (MSE {model:.4}) should beat mean-colour fill ({fill:.4}) at least 3×"
    );
    assert!(
        wins >= 8,
        "the model beats mean fill on only {wins} of 10 images"
    );
}

/// A client sending one request at a time must not wait on the transport: with Nagle's
/// algorithm on the accepted sockets, each response's last frames sat ~40 ms waiting for the
/// client's delayed ACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serial_calls_do_not_wait_for_delayed_acks() {
    let _cores = exclusive().await;
    let (_server, mut client) = Server::ready_with(Weights::BuiltIn, &[], &[], None).await;
    let (_, image) = fashion_mnist_fixtures().remove(0);
    let call = |client: &mut CrateMaeClient<Channel>| {
        let mut c = client.clone();
        let req = embed_request(vec![encoded(image.clone())]);
        async move {
            let started = Instant::now();
            let r = c.embed(req).await.unwrap().into_inner();
            let timing = r.timing.unwrap();
            (
                started.elapsed(),
                Duration::from_secs_f64(timing.queue_seconds + timing.inference_seconds),
            )
        }
    };
    for _ in 0..3 {
        call(&mut client).await;
    }
    let mut round_trips = Vec::with_capacity(20);
    let mut transport = Vec::with_capacity(20);
    for _ in 0..20 {
        let (rtt, server) = call(&mut client).await;
        round_trips.push(rtt);
        transport.push(rtt.saturating_sub(server));
    }
    round_trips.sort();
    transport.sort();
    let (median, overhead) = (round_trips[10], transport[10]);
    eprintln!(
        "serial Embed: median round trip {median:?}, of which outside queue + model {overhead:?}"
    );
    assert!(
        median < Duration::from_millis(15),
        "median round trip {median:?}: the delayed-ACK stall is back?"
    );
}

/// The built-in model was trained on 28×28 images padded onto 32×32, and says so: a 28×28
/// PNG (what Fashion-MNIST users have) is padded the same way, so it embeds exactly as the
/// padded 32×32 picture does (a resize would blur it into another image).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_images_are_fitted_as_the_built_in_model_was_trained() {
    let (_server, mut client, info) = built_in().await;
    assert_eq!(info.small_image_fit, "pad");
    for (name, padded) in fashion_mnist_fixtures().into_iter().take(3) {
        let picture = image::load_from_memory(&padded).unwrap().to_rgb8();
        assert_eq!(picture.dimensions(), (32, 32));
        let original = image::imageops::crop_imm(&picture, 2, 2, 28, 28).to_image();
        let small = encode(&original, ImageFormat::Png);
        let r = client
            .embed(embed_request(vec![encoded(padded), encoded(small)]))
            .await
            .unwrap()
            .into_inner();
        let diff = max_abs_diff(&r.embeddings[0].values, &r.embeddings[1].values);
        assert!(
            diff <= 1e-6,
            "{name}: the 28×28 PNG embeds {diff} away from the padded one"
        );
    }
}

/// What `Embed` returns unasked is the readout the model card recommends: the whitened grid
/// the weights ship, with its width in `GetModelInfo`; the other poolings stay available, and
/// a `layer` the readout does not read is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_default_embedding_is_the_whitened_grid_the_weights_ship() {
    let (_server, mut client, info) = built_in().await;
    assert_eq!(info.recommended_pooling, pb::Pooling::WhitenedGrid as i32);
    let grid = info
        .whitened_grid
        .expect("the built-in weights ship a whitened grid");
    assert_eq!(info.embedding_dim, grid.dim);
    assert!(
        grid.first_layer <= grid.layer && grid.layer < info.depth && grid.grid > 1 && grid.dim > 0,
        "{grid:?}"
    );
    let images: Vec<_> = fashion_mnist_fixtures()
        .into_iter()
        .take(MAX_IMAGES)
        .map(|(_, png)| encoded(png))
        .collect();
    let unasked = client
        .embed(embed_request(images.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unasked.dim, grid.dim);
    assert!(unasked
        .embeddings
        .iter()
        .all(|e| e.values.len() == grid.dim as usize && e.values.iter().all(|v| v.is_finite())));
    // Different garments get different vectors (a broken projection would collapse them).
    let cosine = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (norm(a) * norm(b))
    };
    let e = &unasked.embeddings;
    assert!(
        cosine(&e[0].values, &e[1].values) < 0.9,
        "two classes embed alike"
    );
    let asked = client
        .embed(EmbedRequest {
            pooling: pb::Pooling::WhitenedGrid as i32,
            layer: Some(grid.layer),
            ..embed_request(images[..1].to_vec())
        })
        .await
        .unwrap()
        .into_inner();
    // Alone or in a batch, the same image: equal to float rounding (products of another
    // batch size sum in another order; whitened values are of order 1).
    let diff = max_abs_diff(&asked.embeddings[0].values, &e[0].values);
    assert!(diff <= 1e-4, "asked by name vs unasked: {diff}");
    let mean = client
        .embed(EmbedRequest {
            pooling: pb::Pooling::Mean as i32,
            ..embed_request(images[..1].to_vec())
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mean.dim, info.dim);
    // Patch tokens stay the final encoder's whatever the pooling reads.
    let tokens = |pooling: pb::Pooling| EmbedRequest {
        pooling: pooling as i32,
        include_patch_tokens: true,
        ..embed_request(images[..1].to_vec())
    };
    let a = client
        .embed(tokens(pb::Pooling::Unspecified))
        .await
        .unwrap()
        .into_inner();
    let b = client
        .embed(tokens(pb::Pooling::Mean))
        .await
        .unwrap()
        .into_inner();
    assert!(!a.embeddings[0].patch_tokens.is_empty());
    assert_eq!(a.embeddings[0].patch_tokens, b.embeddings[0].patch_tokens);
    let other = (grid.layer + 1) % info.depth;
    let status = client
        .embed(EmbedRequest {
            layer: Some(other),
            ..embed_request(images[..1].to_vec())
        })
        .await
        .expect_err("the whitened grid reads its own layers only");
    assert_eq!(status.code(), Code::InvalidArgument);
    let reads = if grid.first_layer == grid.layer {
        format!("reads layer {}", grid.layer)
    } else {
        format!("reads layers {} to {}", grid.first_layer, grid.layer)
    };
    assert!(status.message().contains(&reads), "{}", status.message());
}

/// The built-in model's evaluation (`eval.json`, written by `crate-mae-train eval --export`
/// with the weights) is what the server serves and what the README reports: the default
/// readout's block and width, and its 20-NN and linear-probe figures in the README's table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readme_and_model_info_report_the_shipped_evaluation() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let eval: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("server/assets/default-model/eval.json")).unwrap(),
    )
    .unwrap();
    let default = &eval["probes"]["default"];
    let readout = default["readout"].as_str().unwrap();
    let (_server, _client, info) = built_in().await;
    let grid = info.whitened_grid.expect("a whitened grid");
    let source = if grid.first_layer == grid.layer {
        format!("layer{}", grid.layer)
    } else {
        format!("layers{}-{}", grid.first_layer, grid.layer)
    };
    assert_eq!(
        readout,
        format!("{source}.whitened-grid{}-{}", grid.grid, grid.dim),
        "eval.json's default readout is not what the server serves"
    );
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let row = readme
        .lines()
        .find(|l| l.starts_with("| **what `Embed` returns by default**"))
        .expect("the README's built-in table has a default row");
    let pct = |key: &str| format!("{:.2} %", default[key].as_f64().unwrap() * 100.0);
    for key in ["knn20", "linear_probe"] {
        assert!(
            row.contains(&pct(key)),
            "README's default row lacks {key} = {}: {row}",
            pct(key)
        );
    }
    assert!(row.contains(&format!("| {} |", grid.dim)), "{row}");
}
