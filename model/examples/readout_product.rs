//! The whitened grid's projection product alone: `x·P` for `x` `[B, 4,096]` and the built-in
//! model's `P` `[4,096, 2,048]` (random values), candle's `matmul` (the `gemm` crate, which packs
//! `P` on every call) against `PanelMatrix` (packed once), medians of 30 calls.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p crate-mae --example readout_product`

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use crate_mae::cpu::panels::PanelMatrix;

fn median_ms(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(30);
    for _ in 0..30 {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[15])
}

fn main() -> Result<()> {
    let (k, n) = (4096, 2048);
    let p = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu)?;
    let packed = PanelMatrix::pack(&p.flatten_all()?.to_vec1::<f32>()?, k, n);
    println!("threads: {}", rayon::current_num_threads());
    println!("| batch | candle matmul ms | packed panels ms | ratio |");
    println!("|---|---|---|---|");
    for b in [1, 2, 8, 32] {
        let x = Tensor::randn(0f32, 1.0, (b, k), &Device::Cpu)?;
        let rows: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let candle = median_ms(|| Ok(x.matmul(&p).map(drop)?))?;
        let panels = median_ms(|| {
            packed.left_multiply(&rows, b);
            Ok(())
        })?;
        println!(
            "| {b} | {candle:.3} | {panels:.3} | {:.2} |",
            candle / panels
        );
    }
    Ok(())
}
