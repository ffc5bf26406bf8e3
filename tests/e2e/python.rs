//! The clients backend teams use, against the real server: the Python example client
//! (`clients/python`, stubs generated from `proto/`) and the Open Inference Protocol through
//! `tritonclient[grpc]` and the `kserve` SDK (`tests/python`). Each runs from a venv the test
//! makes on first use under `target/python/` (pinned requirements; PyPI is the only network
//! used), and must produce the same embeddings as cratemae.v1 `Embed` (1e-6).

use std::path::{Path, PathBuf};

use crate::support::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A venv with `requirements` installed, made once and remade when the file changes.
fn venv(name: &str, requirements: &str) -> PathBuf {
    let dir = repo().join("target/python").join(name);
    let wanted = std::fs::read_to_string(repo().join(requirements)).unwrap();
    let stamp = dir.join(".requirements");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        let _ = std::fs::remove_dir_all(&dir);
        let run = |cmd: &mut std::process::Command| {
            let out = cmd.output().expect("python3 runs");
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir));
        run(std::process::Command::new(dir.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check", "-r"])
            .arg(repo().join(requirements)));
        std::fs::write(&stamp, wanted).unwrap();
    }
    dir.join("bin/python")
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

/// Starts the built-in model, then runs `script` with the server's address, the fixtures and
/// the expected embeddings; it must pass every check.
async fn run_python(name: &str, requirements: &str, script: &str) {
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
    let addr = server.grpc.trim_start_matches("http://").to_string();
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
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_inference_protocol_through_tritonclient() {
    run_python(
        "tritonclient",
        "tests/python/requirements-tritonclient.txt",
        "tests/python/oip_tritonclient.py",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_inference_protocol_through_the_kserve_sdk() {
    run_python(
        "kserve",
        "tests/python/requirements-kserve.txt",
        "tests/python/oip_kserve.py",
    )
    .await;
}
