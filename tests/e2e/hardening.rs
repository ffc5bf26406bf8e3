//! Bad and hostile input, deadlines, cancellation and worker faults: a clear status every
//! time, and the server keeps serving.

use crate::support::*;

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
            "whitened grid on a model without one",
            EmbedRequest {
                pooling: pb::Pooling::WhitenedGrid as i32,
                ..embed_request(vec![encoded(good.clone())])
            },
            Code::InvalidArgument,
            "no whitened grid",
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
    let busy = server.embeds_in_flight(&client, &image, 6).await;
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

/// The hostile images of RELIABILITY.md's corpus: (name, image, expected code; `None`: either
/// OK or INVALID_ARGUMENT, for damaged JPEGs that may still decode).
fn hostile_images(good: &[u8]) -> Vec<(&'static str, Image, Option<Code>)> {
    let jpeg = encode(&picture(4, 120, 90), ImageFormat::Jpeg);
    let noise = |seed: u32, n: usize| -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 11) as u8)
            .collect()
    };
    let mut corrupt_png = good.to_vec();
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

    vec![
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
                encoded: good.to_vec(),
                tensor: Some(RawTensor {
                    shape: vec![3, IMAGE_SIZE, IMAGE_SIZE],
                    data: vec![0.0; n],
                }),
            },
            Some(Code::InvalidArgument),
        ),
    ]
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
    let cases = hostile_images(&good);
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

/// The same corpus through the Open Inference Protocol, plus what only that protocol can get
/// wrong (length prefixes, raw sizes, shapes, parameters): every input gets the expected
/// status with a message, and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_input_corpus_through_the_open_inference_protocol() {
    use crate_mae_server::oip_pb::grpc_inference_service_client::GrpcInferenceServiceClient;
    use crate_mae_server::oip_pb::infer_parameter::ParameterChoice;
    use crate_mae_server::oip_pb::model_infer_request::InferInputTensor;
    use crate_mae_server::oip_pb::{InferParameter, InferTensorContents, ModelInferRequest};

    let (server, _) = Server::ready(
        &["--max-image-pixels", "20000000", "--max-message-mib", "4"],
        &[],
    )
    .await;
    let pid = server.child.id().unwrap();
    let mut client = GrpcInferenceServiceClient::new(server.channel().await);
    let good = png(5);
    let s = i64::from(IMAGE_SIZE);
    let bytes_input = |elements: &[&[u8]]| -> (InferInputTensor, Vec<u8>) {
        let raw = elements
            .iter()
            .flat_map(|e| {
                (e.len() as u32)
                    .to_le_bytes()
                    .into_iter()
                    .chain(e.iter().copied())
            })
            .collect();
        (
            InferInputTensor {
                name: "image".into(),
                datatype: "BYTES".into(),
                shape: vec![elements.len() as i64],
                ..Default::default()
            },
            raw,
        )
    };
    let request = |model: &str, (input, raw): (InferInputTensor, Vec<u8>)| ModelInferRequest {
        model_name: model.into(),
        inputs: vec![input],
        raw_input_contents: vec![raw],
        ..Default::default()
    };
    let with_params = |mut r: ModelInferRequest, params: &[(&str, ParameterChoice)]| {
        for (k, v) in params {
            r.parameters.insert(
                k.to_string(),
                InferParameter {
                    parameter_choice: Some(v.clone()),
                },
            );
        }
        r
    };
    let pixels = |shape: Vec<i64>, data: &[f32]| {
        (
            InferInputTensor {
                name: "pixels".into(),
                datatype: "FP32".into(),
                shape,
                ..Default::default()
            },
            data.iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
    };
    let mut cases: Vec<(String, ModelInferRequest, Option<Code>)> = hostile_images(&good)
        .into_iter()
        .filter_map(|(name, image, want)| {
            let input = match (image.encoded.is_empty(), image.tensor) {
                (_, None) => bytes_input(&[&image.encoded]),
                (true, Some(t)) => pixels(
                    std::iter::once(1)
                        .chain(t.shape.iter().map(|&d| i64::from(d)))
                        .collect(),
                    &t.data,
                ),
                (false, Some(_)) => return None, // not expressible: one input, one datatype
            };
            Some((name.to_string(), request("crate-mae", input), want))
        })
        .collect();
    let plane = (3 * s * s) as usize;
    let mut lying_prefix = bytes_input(&[&good]);
    lying_prefix.1[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut typed_and_raw = request("crate-mae", bytes_input(&[&good]));
    typed_and_raw.inputs[0].contents = Some(InferTensorContents {
        bytes_contents: vec![good.clone()],
        ..Default::default()
    });
    let mut no_inputs = request("crate-mae", bytes_input(&[&good]));
    no_inputs.inputs.clear();
    no_inputs.raw_input_contents.clear();
    let mut extra_raw = request("crate-mae", bytes_input(&[&good]));
    extra_raw.raw_input_contents.push(vec![1, 2, 3]);
    let invalid = Some(Code::InvalidArgument);
    let protocol_cases = vec![
        (
            "BYTES length prefix past the end",
            request("crate-mae", lying_prefix),
            invalid,
        ),
        (
            "BYTES shape [2], one element",
            {
                let mut r = request("crate-mae", bytes_input(&[&good]));
                r.inputs[0].shape = vec![2];
                r
            },
            invalid,
        ),
        (
            "BYTES shape [1, 2]",
            {
                let mut r = request("crate-mae", bytes_input(&[&good]));
                r.inputs[0].shape = vec![1, 2];
                r
            },
            invalid,
        ),
        (
            "priority 3",
            with_params(
                request("crate-mae", bytes_input(&[&good])),
                &[("priority", ParameterChoice::Uint64Param(3))],
            ),
            invalid,
        ),
        (
            "timeout -5 microseconds",
            with_params(
                request("crate-mae", bytes_input(&[&good])),
                &[("timeout", ParameterChoice::Int64Param(-5))],
            ),
            invalid,
        ),
        (
            "FP32 raw of 7 bytes",
            {
                let (input, _) = pixels(vec![1, 3, s, s], &[]);
                request("crate-mae", (input, vec![0; 7]))
            },
            invalid,
        ),
        (
            "FP32 shape with a negative dimension",
            request("crate-mae", pixels(vec![-1, 3, s, s], &vec![0.0; plane])),
            invalid,
        ),
        (
            "FP32 batch overflowing usize",
            request(
                "crate-mae",
                pixels(vec![i64::MAX, 3, s, s], &vec![0.0; plane]),
            ),
            invalid,
        ),
        (
            "FP32 declared as FP64",
            {
                let mut r = request("crate-mae", pixels(vec![1, 3, s, s], &vec![0.0; plane]));
                r.inputs[0].datatype = "FP64".into();
                r
            },
            invalid,
        ),
        ("typed and raw contents", typed_and_raw, invalid),
        ("no inputs", no_inputs, invalid),
        ("two raw contents for one input", extra_raw, invalid),
        (
            "unknown model",
            request("crate-mae-large", bytes_input(&[&good])),
            Some(Code::NotFound),
        ),
        (
            "unknown version",
            {
                let mut r = request("crate-mae", bytes_input(&[&good]));
                r.model_version = "2".into();
                r
            },
            Some(Code::NotFound),
        ),
        (
            "pooling as an integer",
            with_params(
                request("crate-mae", bytes_input(&[&good])),
                &[("pooling", ParameterChoice::Int64Param(1))],
            ),
            invalid,
        ),
        (
            "pooling `max`",
            with_params(
                request("crate-mae", bytes_input(&[&good])),
                &[("pooling", ParameterChoice::StringParam("max".into()))],
            ),
            invalid,
        ),
        (
            "layer -1",
            with_params(
                request("crate-mae", bytes_input(&[&good])),
                &[("layer", ParameterChoice::Int64Param(-1))],
            ),
            invalid,
        ),
        (
            "layer 99",
            with_params(
                request("crate-mae", bytes_input(&[&good])),
                &[("layer", ParameterChoice::Int64Param(99))],
            ),
            invalid,
        ),
        (
            "misspelt parameter",
            with_params(
                request("crate-mae", bytes_input(&[&good])),
                &[("poolng", ParameterChoice::StringParam("mean".into()))],
            ),
            invalid,
        ),
        (
            "mask_ratio `abc`",
            with_params(
                request("crate-mae-complete", bytes_input(&[&good])),
                &[("mask_ratio", ParameterChoice::StringParam("abc".into()))],
            ),
            invalid,
        ),
        (
            "mask_ratio 1.5",
            with_params(
                request("crate-mae-complete", bytes_input(&[&good])),
                &[("mask_ratio", ParameterChoice::DoubleParam(1.5))],
            ),
            invalid,
        ),
        (
            "mask_ratio NaN",
            with_params(
                request("crate-mae-complete", bytes_input(&[&good])),
                &[("mask_ratio", ParameterChoice::DoubleParam(f64::NAN))],
            ),
            invalid,
        ),
        (
            "mask_ratio \"0.5\" (what the kserve SDK can send)",
            with_params(
                request("crate-mae-complete", bytes_input(&[&good])),
                &[("mask_ratio", ParameterChoice::StringParam("0.5".into()))],
            ),
            Some(Code::Ok),
        ),
        (
            "too many images",
            request("crate-mae", bytes_input(&[good.as_slice(); MAX_IMAGES + 1])),
            Some(Code::ResourceExhausted),
        ),
    ];
    cases.extend(
        protocol_cases
            .into_iter()
            .map(|(n, r, w)| (n.to_string(), r, w)),
    );
    let rss_before = rss_mib(pid);
    let mut tally: std::collections::BTreeMap<String, usize> = Default::default();
    for (name, req, expected) in cases {
        let result = client.model_infer(req).await;
        let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        match expected {
            Some(want) => assert_eq!(code, want, "{name}: {result:?}"),
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
            .model_infer(request("crate-mae", bytes_input(&[&good])))
            .await;
        assert!(
            ok.is_ok(),
            "after {name} the server stopped serving: {ok:?}"
        );
    }
    let rss_after = rss_mib(pid);
    eprintln!("hostile corpus (OIP): {tally:?}; server RSS {rss_before:.0} → {rss_after:.0} MiB");
    assert!(
        rss_after - rss_before < 256.0,
        "RSS grew from {rss_before:.0} to {rss_after:.0} MiB"
    );
}
