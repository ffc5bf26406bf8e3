//! Throughput of the encoder (embedding) and encoder + decoder (completion) on seeded random
//! weights, for the official sizes at several batch sizes.
//!
//! GFLOP/s counts the paper's FLOPs (three-matmul ISTA, 15.605 GFLOPs per Base image), so the
//! figure compares directly with PyTorch's; the fused ISTA does fewer real FLOPs.
//!
//! `cargo run --release -p crate-mae --example bench -- --sizes tiny,small,base --batches 1,8,32`

use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use crate_mae::{checkpoint, init, CrateMaeConfig, Keep, Mask};

#[derive(Parser)]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "tiny,small,base")]
    sizes: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    /// Minimum measuring time per cell.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Skip the completion (encoder + decoder) column.
    #[arg(long)]
    encoder_only: bool,
    /// Also time the encoder with the three-matmul ISTA instead of the fused one.
    #[arg(long)]
    diagnostics: bool,
}

/// Runs `f` at least twice and for at least `min` seconds; returns images/s.
fn images_per_second(
    batch: usize,
    min: Duration,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    f()?; // warm-up
    let start = Instant::now();
    let mut runs = 0;
    while runs < 2 || start.elapsed() < min {
        f()?;
        runs += 1;
    }
    Ok((runs * batch) as f64 / start.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let min = Duration::from_secs_f64(args.seconds);
    println!(
        "threads: {} (rayon), device: cpu",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("| size | batch | encoder img/s | encoder GFLOP/s (paper count) | completion img/s | diagnostics overhead |");
    println!("|---|---|---|---|---|---|");
    for size in &args.sizes {
        let cfg = CrateMaeConfig::preset(size)?;
        let weights = init::random_weights(&cfg, 0, &Device::Cpu)?;
        let model = checkpoint::model_from_tensors(weights, &cfg, &Device::Cpu)?;
        for &batch in &args.batches {
            let x = Tensor::randn(
                0f32,
                1.0,
                (batch, 3, cfg.img_size, cfg.img_size),
                &Device::Cpu,
            )?
            .to_dtype(DType::F32)?;
            let enc = images_per_second(batch, min, || {
                model.embed_tokens(&x)?;
                Ok(())
            })?;
            let gflops = enc * cfg.encoder_flops_per_image() / 1e9;
            let completion = if args.encoder_only {
                "-".to_string()
            } else {
                let mask = Mask::random(batch, cfg.num_patches(), 0.75, 0)?;
                let ips = images_per_second(batch, min, || {
                    model.complete(&x, &mask)?;
                    Ok(())
                })?;
                format!("{ips:.1}")
            };
            let diag = if args.diagnostics {
                let ips = images_per_second(batch, min, || {
                    let keep = Keep {
                        diagnostics: true,
                        ..Keep::default()
                    };
                    model.encode_keeping(&x, None, &keep)?;
                    Ok(())
                })?;
                format!("{:+.0} % time", (enc / ips - 1.0) * 100.0)
            } else {
                "-".to_string()
            };
            println!("| {size} | {batch} | {enc:.1} | {gflops:.0} | {completion} | {diag} |");
        }
    }
    Ok(())
}
