//! Compiles `proto/` in pure Rust (protox, no protoc) and keeps each encoded descriptor set
//! for gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    for (file, descriptor) in [
        ("cratemae/v1/cratemae.proto", "cratemae_descriptor.bin"),
        (
            "inference/grpc_predict_v2.proto",
            "inference_descriptor.bin",
        ),
    ] {
        let proto = proto_root.join(file);
        println!("cargo:rerun-if-changed={}", proto.display());
        let fds = protox::compile([&proto], [&proto_root])?;
        std::fs::write(out.join(descriptor), prost::Message::encode_to_vec(&fds))?;
        tonic_prost_build::configure()
            .build_server(true)
            .build_client(true)
            .compile_fds(fds)?;
    }
    Ok(())
}
