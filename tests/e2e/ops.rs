//! What operators rely on: health transitions, metrics, the ops kit's metric names, and a
//! graceful drain on SIGTERM.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_goes_not_serving_serving_not_serving() {
    // Base at 224 px takes a few seconds to initialise and warm up: long enough to watch.
    let server = Server::start(&["--preset", "base", "--image-size", "224"], &[]).await;
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
            r#"cratemae_requests_total{protocol="cratemae.v1",method="Embed",code="OK"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &body,
            r#"cratemae_requests_total{protocol="cratemae.v1",method="Complete",code="OK"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &body,
            r#"cratemae_requests_total{protocol="cratemae.v1",method="Embed",code="InvalidArgument"}"#
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
        r#"cratemae_request_duration_seconds_count{protocol="cratemae.v1",method="Embed"}"#,
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
async fn sigterm_finishes_accepted_requests_then_exits_zero() {
    // Full-size images at batch 1 make each request take a while, so many are in flight.
    let (mut server, client) =
        Server::ready(&["--image-size", "224", "--max-batch-size", "1"], &[]).await;
    let image = encode(&picture(1, 300, 300), ImageFormat::Png);
    // Signal once they are admitted.
    let calls = server.embeds_in_flight(&client, &image, 6).await;
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

/// The kernel computing the model is chosen per CPU at run time and reported in
/// `GetModelInfo` and `/metrics`; `--dtype auto` says what it measured and picks a precision
/// this CPU has a kernel for (bf16 only with its kernel).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_kernel_and_dtype_auto_choice_are_reported() {
    let _cores = exclusive().await;
    for dtype in ["f32", "auto"] {
        let (server, mut client) = Server::ready(&["--dtype", dtype], &[]).await;
        let info = client
            .get_model_info(pb::GetModelInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        let known = ["f32-avx512", "f32-avx2", "f32-generic", "avx512-bf16"];
        assert!(
            known.contains(&info.kernel.as_str()),
            "kernel {:?}",
            info.kernel
        );
        assert_eq!(
            info.kernel == "avx512-bf16",
            info.dtype == "bf16",
            "{dtype}: kernel {} computes {}",
            info.kernel,
            info.dtype
        );
        match dtype {
            "auto" => assert!(
                info.dtype_reason.starts_with("auto: ") && info.dtype_reason.contains(&info.dtype),
                "{}",
                info.dtype_reason
            ),
            _ => assert_eq!(
                (info.dtype.as_str(), info.dtype_reason.as_str()),
                ("f32", "--dtype")
            ),
        }
        let series = format!(
            r#"cratemae_model_kernel_info{{kernel="{}",precision="{}"}}"#,
            info.kernel, info.dtype
        );
        assert_eq!(
            metric(&server.scrape().await, &series),
            Some(1.0),
            "{series}"
        );
        let r = client
            .embed(embed_request(vec![encoded(png(9))]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.embeddings.len(), 1);
    }
}
