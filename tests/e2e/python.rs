//! The clients backend teams use, against the real server: the Python example client
//! (`clients/python`, stubs generated from `proto/`) and the Open Inference Protocol through
//! `tritonclient` and the `kserve` SDK, gRPC and REST, and `/v1/embeddings` through the
//! `openai` SDK (`tests/python`). Each runs from a venv the test
//! makes on first use under `target/python/` (pinned requirements; PyPI is the only network
//! used), and must produce the same embeddings as cratemae.v1 `Embed` (1e-6).

use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::support::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A venv with `requirements` installed, made once and remade when the file changes.
fn venv(name: &str, requirements: &str) -> PathBuf {
    try_venv(name, requirements).unwrap_or_else(|e| panic!("{e}"))
}

/// As [`venv`], with the failure as an error (for tools whose wheel a platform may not have).
fn try_venv(name: &str, requirements: &str) -> Result<PathBuf, String> {
    // Tests sharing a venv (gRPC and REST through one SDK) must not build it twice at once.
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = repo().join("target/python").join(name);
    let wanted = std::fs::read_to_string(repo().join(requirements)).unwrap();
    let stamp = dir.join(".requirements");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        let _ = std::fs::remove_dir_all(&dir);
        let run = |cmd: &mut std::process::Command| -> Result<(), String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)))
            }
        };
        run(std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir))?;
        run(std::process::Command::new(dir.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check", "-r"])
            .arg(repo().join(requirements)))?;
        std::fs::write(&stamp, wanted).unwrap();
    }
    Ok(dir.join("bin/python"))
}

/// The built-in model's cratemae.v1 embeddings of the fixtures (mean pooling, unit norm), as
/// the Python checks read them: `{"<file name>": [floats]}`.
async fn expected_embeddings(client: &mut CrateMaeClient<Channel>, at: &Path) -> PathBuf {
    let dir = repo().join("tests/fixtures/fashion-mnist");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    let images = files
        .iter()
        .map(|f| encoded(std::fs::read(f).unwrap()))
        .collect();
    let r = client
        .embed(EmbedRequest {
            pooling: pb::Pooling::Mean as i32,
            normalize: true,
            ..embed_request(images)
        })
        .await
        .unwrap()
        .into_inner();
    let map: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .zip(r.embeddings)
        .map(|(f, e)| {
            (
                f.file_name().unwrap().to_string_lossy().into_owned(),
                serde_json::json!(e.values),
            )
        })
        .collect();
    let path = at.join("expected.json");
    std::fs::write(&path, serde_json::to_vec(&map).unwrap()).unwrap();
    path
}

/// Which of the server's ports a script talks to.
#[derive(Clone, Copy)]
enum Port {
    Grpc,
    Http,
}

/// Starts the built-in model, then runs `script` with the server's address (gRPC or HTTP),
/// the fixtures and the expected embeddings; it must pass every check.
async fn run_python(name: &str, requirements: &str, script: &str, port: Port) {
    let python = tokio::task::spawn_blocking({
        let (name, requirements) = (name.to_string(), requirements.to_string());
        move || venv(&name, &requirements)
    })
    .await
    .unwrap();
    let (server, mut client) = Server::ready_with(
        Weights::BuiltIn,
        &["--max-images-per-request", "64"],
        &[],
        None,
    )
    .await;
    let scratch = std::env::temp_dir().join(format!("crate-mae-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let expected = expected_embeddings(&mut client, &scratch).await;
    let addr = match port {
        Port::Grpc => server.grpc.trim_start_matches("http://").to_string(),
        Port::Http => server.http.to_string(),
    };
    let out = Command::new(python)
        .arg(repo().join(script))
        .args(["--addr", &addr, "--expected"])
        .arg(&expected)
        .arg("--fixtures")
        .arg(repo().join("tests/fixtures/fashion-mnist"))
        .output()
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&scratch);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{script}:\n{stdout}");
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_example_client() {
    run_python(
        "client",
        "clients/python/requirements.txt",
        "clients/python/test_client.py",
        Port::Grpc,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_inference_protocol_through_tritonclient() {
    run_python(
        "tritonclient",
        "tests/python/requirements-tritonclient.txt",
        "tests/python/oip_tritonclient.py",
        Port::Grpc,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_inference_protocol_through_the_kserve_sdk() {
    run_python(
        "kserve",
        "tests/python/requirements-kserve.txt",
        "tests/python/oip_kserve.py",
        Port::Grpc,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_inference_protocol_rest_through_tritonclient_http() {
    run_python(
        "tritonclient",
        "tests/python/requirements-tritonclient.txt",
        "tests/python/oip_tritonclient_http.py",
        Port::Http,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_inference_protocol_rest_through_the_kserve_sdk() {
    run_python(
        "kserve",
        "tests/python/requirements-kserve.txt",
        "tests/python/oip_kserve_rest.py",
        Port::Http,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_embeddings_through_the_openai_sdk() {
    run_python(
        "openai",
        "tests/python/requirements-openai.txt",
        "tests/python/openai_embeddings.py",
        Port::Http,
    )
    .await;
}

/// Debian's libb64 (perf_analyzer links it); installed with apt-get when missing.
fn ensure_libb64() {
    let present = || {
        std::process::Command::new("ldconfig")
            .arg("-p")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("libb64.so.0d"))
    };
    if present() {
        return;
    }
    let installed = std::process::Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "libb64-0d",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        installed && present(),
        "perf_analyzer needs libb64.so.0d: `apt-get install libb64-0d` (as root) and rerun"
    );
}

/// What perf_analyzer reported for one run: client throughput (infer/s) and the server-side
/// inference count it read through ModelStatistics.
fn perf_analyzer_figures(output: &str) -> (f64, u64) {
    let after = |key: &str| {
        output
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(|rest| rest.trim().split(' ').next().unwrap_or("").to_string())
    };
    let throughput = after("Throughput:")
        .and_then(|v| v.parse().ok())
        .expect("perf_analyzer reports a throughput");
    let server_count = after("Inference count:")
        .and_then(|v| v.parse().ok())
        .expect("perf_analyzer reports the server's statistics");
    (throughput, server_count)
}

/// NVIDIA's perf_analyzer drives the Open Inference Protocol endpoint at concurrency 16: both
/// models, both input kinds, with the server-side statistics it reads from ModelStatistics.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn perf_analyzer_drives_both_models_and_both_inputs() {
    let _cores = exclusive().await;
    let python = match tokio::task::spawn_blocking(|| {
        try_venv(
            "perf-analyzer",
            "tests/python/requirements-perf-analyzer.txt",
        )
    })
    .await
    .unwrap()
    {
        Ok(python) => python,
        Err(e) if cfg!(not(all(target_os = "linux", target_arch = "x86_64"))) => {
            eprintln!("SKIPPED: perf_analyzer's wheel is for Linux x86-64 only: {e}");
            return;
        }
        Err(e) => panic!("installing perf_analyzer: {e}"),
    };
    tokio::task::spawn_blocking(ensure_libb64).await.unwrap();
    let venv = python.parent().unwrap().parent().unwrap().to_path_buf();
    let cudart = std::fs::read_dir(venv.join("lib"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .join("site-packages/nvidia/cuda_runtime/lib")
        })
        .find(|p| p.exists())
        .expect("the CUDA runtime wheel's lib folder");
    let (server, _client) = Server::ready_with(Weights::BuiltIn, &[], &[], None).await;
    let addr = server.grpc.trim_start_matches("http://").to_string();
    let scratch = std::env::temp_dir().join(format!("crate-mae-pa-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    // perf_analyzer's input data: BYTES as base64 of the serialised tensor (length-prefixed).
    let png =
        std::fs::read(repo().join("tests/fixtures/fashion-mnist/00000-ankle-boot.png")).unwrap();
    let mut serialised = (png.len() as u32).to_le_bytes().to_vec();
    serialised.extend_from_slice(&png);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&serialised);
    let image = scratch.join("image.json");
    std::fs::write(
        &image,
        format!(r#"{{"data":[{{"image":{{"b64":"{b64}"}}}}]}}"#),
    )
    .unwrap();
    let pixels = scratch.join("pixels.json");
    let zeros = vec!["0.0"; 3 * 32 * 32].join(",");
    std::fs::write(
        &pixels,
        format!(r#"{{"data":[{{"pixels":{{"content":[{zeros}]}}}}]}}"#),
    )
    .unwrap();
    for (model, data) in [
        ("crate-mae", &image),
        ("crate-mae", &pixels),
        ("crate-mae-complete", &image),
    ] {
        let out = Command::new(venv.join("bin/perf_analyzer"))
            .args(["-m", model, "-i", "grpc", "-u", &addr, "--input-data"])
            .arg(data)
            .args([
                "--concurrency-range",
                "16",
                "--measurement-interval",
                "1000",
                "--stability-percentage",
                "100",
            ])
            .env("LD_LIBRARY_PATH", &cudart)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("perf_analyzer {model} {}:\n{stdout}", data.display());
        assert!(
            out.status.success(),
            "perf_analyzer {model} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (throughput, server_count) = perf_analyzer_figures(&stdout);
        assert!(
            throughput > 0.0 && server_count > 0,
            "{model}: {throughput} {server_count}"
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
