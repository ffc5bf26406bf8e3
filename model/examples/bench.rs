//! Throughput of the encoder (embedding) and encoder + decoder (completion) on seeded random
//! weights, for the official sizes and the built-in model's shape, at several batch sizes,
//! on any device and precision.
//!
//! Each cell is timed call by call (the device synchronised after each) for at least
//! `--seconds` and at least 3 calls; the figure is the median call.
//! GFLOP/s counts the paper's FLOPs (three-matmul ISTA, 15.605 GFLOPs per Base image), so the
//! figure compares directly with PyTorch's; the fused ISTA does fewer real FLOPs.
//!
//! `served` is the server's built-in model itself (its weights, `--served-weights`), timed on
//! its default embedding: the encoder as far as its whitened grid reads, then the readout
//! (what `Embed` runs when a request names no pooling). Its records carry that embedding of a
//! fixed image (`check_embedding`), so that a peer can show it computes the same thing.
//!
//! `cargo run --release -p crate-mae --example bench -- --sizes builtin,tiny,base --batches 1,8,32`
//! `... -- --device cuda --dtypes f32,bf16,f16 --batches 1,8,32,128 --json gpu.json` (cuda build)

use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use crate_mae::{
    checkpoint, device, init, CrateMae, CrateMaeConfig, Keep, LoadOptions, Mask, ModelError,
    Precision,
};

#[derive(Parser)]
struct Args {
    /// builtin (the server's default model's shape, random weights: d128, depth 4, 32 px,
    /// patch 4), served (that model itself, timed on its default embedding), tiny, small,
    /// base, large.
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
    /// Also time the encoder while computing the white-box diagnostics.
    #[arg(long)]
    diagnostics: bool,
    /// Compute threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    dtypes: Vec<Precision>,
    /// The weights of the `served` size (run from the repository root).
    #[arg(long, default_value = "server/assets/default-model/model.safetensors")]
    served_weights: std::path::PathBuf,
    /// Also write the figures as JSON records.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Instead of timing: check that the device's out-of-memory error is recognised as such.
    #[arg(long)]
    check_oom: bool,
    /// Instead of whole passes: time each operation of one encoder block (first size, dtype
    /// and batch given), the device synchronised around each.
    #[arg(long)]
    profile: bool,
    /// Instead of timing: write the first size's seeded random weights to this safetensors
    /// file (configuration embedded), for serving and memory measurements.
    #[arg(long)]
    save_weights: Option<std::path::PathBuf>,
}

fn config(name: &str) -> Result<CrateMaeConfig> {
    if name == "builtin" {
        return Ok(CrateMaeConfig::built_in_shape());
    }
    Ok(CrateMaeConfig::preset(name)?)
}

/// The served model's default embedding `[B, k]`: blocks as far as its whitened grid reads
/// (no further: the engine stops there too), then the readout.
fn default_embedding(model: &CrateMae, x: &Tensor) -> Result<Tensor> {
    let grid = model.whitened_grid().ok_or_else(|| {
        anyhow::anyhow!("served: these weights carry no whitened grid (the default readout)")
    })?;
    let keep = Keep {
        outputs: grid.spec.layers().collect(),
        ..Keep::default()
    };
    let encoded = model.encode_through(x, &keep)?;
    Ok(model.whitened_embedding(&encoded.outputs)?)
}

/// A fixed image both this bench and `bench/peers.py` build exactly (integer arithmetic, one
/// f32 division): `[1, C, S, S]`, values in [-0.5, 0.5).
fn check_image(cfg: &CrateMaeConfig, device: &Device) -> Result<Tensor> {
    let n = cfg.in_chans * cfg.img_size * cfg.img_size;
    let values: Vec<f32> = (0..n)
        .map(|i| ((i * 37) % 101) as f32 / 101.0 - 0.5)
        .collect();
    Ok(Tensor::from_vec(
        values,
        (1, cfg.in_chans, cfg.img_size, cfg.img_size),
        device,
    )?)
}

/// Times `f` call by call (at least 3 calls and `min`); returns the median call.
fn median_call(
    device: &Device,
    min: Duration,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Duration> {
    f()?; // warm-up
    device.synchronize()?;
    let start = Instant::now();
    let mut calls = Vec::new();
    while calls.len() < 3 || start.elapsed() < min {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        calls.push(t.elapsed());
    }
    calls.sort();
    Ok(calls[calls.len() / 2])
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(t) = args.threads {
        // candle sizes its matmul parallelism from this variable; rayon its pool.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()?;
    }
    let device = device::parse_device(&args.device)?;
    if args.check_oom {
        return check_oom(&device);
    }
    if args.profile {
        return profile(&args, &device);
    }
    if let Some(path) = &args.save_weights {
        let cfg = config(&args.sizes[0])?;
        checkpoint::save_safetensors(
            &init::random_weights(&cfg, 0, &device)?,
            &cfg,
            Default::default(),
            path,
        )?;
        println!(
            "wrote {} ({} parameters)",
            path.display(),
            cfg.parameter_count()
        );
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let min = Duration::from_secs_f64(args.seconds);
    println!("threads: {threads}, device: {}", device::describe(&device));
    println!("| size | dtype | batch | embedding img/s | ms per batch | encoder GFLOP/s (paper count) | completion img/s | diagnostics overhead |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut records = Vec::new();
    for size in &args.sizes {
        let served = size == "served";
        let (cfg, f32_model) = if served {
            let (model, _) =
                checkpoint::load(&args.served_weights, &LoadOptions::default(), &device)?;
            (model.config().clone(), model)
        } else {
            let cfg = config(size)?;
            let weights = init::random_weights(&cfg, 0, &device)?;
            let model = checkpoint::model_from_tensors(weights, &cfg, &device)?;
            (cfg, model)
        };
        for &precision in &args.dtypes {
            precision.check_device(&device)?;
            let model = f32_model.with_precision(precision)?;
            let check_embedding: Option<Vec<f32>> = if served {
                let e = default_embedding(&model, &check_image(&cfg, &device)?)?;
                Some(e.flatten_all()?.to_vec1()?)
            } else {
                None
            };
            for &batch in &args.batches {
                let x = Tensor::randn(0f32, 1.0, (batch, 3, cfg.img_size, cfg.img_size), &device)?
                    .to_dtype(DType::F32)?;
                let enc = median_call(&device, min, || {
                    if served {
                        default_embedding(&model, &x)?;
                    } else {
                        model.encode(&x, None)?;
                    }
                    Ok(())
                })?;
                let ips = batch as f64 / enc.as_secs_f64();
                // The paper's count is the whole encoder's; the served path is not that.
                let gflops = (!served).then(|| ips * cfg.encoder_flops_per_image() / 1e9);
                let completion = if args.encoder_only {
                    None
                } else {
                    let mask = Mask::random(batch, cfg.num_patches(), 0.75, 0)?;
                    let t = median_call(&device, min, || {
                        model.complete(&x, &mask)?;
                        Ok(())
                    })?;
                    Some(batch as f64 / t.as_secs_f64())
                };
                let diag = if args.diagnostics {
                    let keep = Keep {
                        diagnostics: true,
                        ..Keep::default()
                    };
                    let t = median_call(&device, min, || {
                        model.encode_keeping(&x, None, &keep)?;
                        Ok(())
                    })?;
                    format!(
                        "{:+.0} % time",
                        (t.as_secs_f64() / enc.as_secs_f64() - 1.0) * 100.0
                    )
                } else {
                    "-".to_string()
                };
                println!(
                    "| {size} | {precision} | {batch} | {ips:.1} | {:.2} | {} | {} | {diag} |",
                    enc.as_secs_f64() * 1e3,
                    gflops.map_or("-".into(), |g| format!("{g:.0}")),
                    completion.map_or("-".into(), |c| format!("{c:.1}"))
                );
                records.push(serde_json::json!({
                    // f32 is the reference engine; other precisions are engines of their own.
                    "engine": match precision {
                        Precision::F32 => "crate-mae".to_string(),
                        p => format!("crate-mae-{p}"),
                    },
                    "config": size,
                    "dtype": precision.name(),
                    // The kernel this CPU ran (chosen at run time from its features).
                    "kernel": model.kernel(),
                    "device": device::describe(&device),
                    "batch": batch,
                    "threads": threads,
                    "images_per_s": ips,
                    "ms_per_batch": enc.as_secs_f64() * 1e3,
                    "completion_images_per_s": completion,
                    "check_embedding": check_embedding,
                }));
            }
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&records)?)?;
    }
    Ok(())
}

/// Asks the device for far more memory than it has: the error must classify as out of
/// memory (the server then retries smaller batches instead of failing the device).
fn check_oom(device: &Device) -> Result<()> {
    let huge = Tensor::zeros((1usize << 40,), DType::F32, device).map_err(ModelError::from);
    match huge {
        Err(ModelError::OutOfMemory(msg)) => {
            println!("{{\"out_of_memory_recognised\": true, \"message\": {msg:?}}}");
            Ok(())
        }
        Err(other) => anyhow::bail!("not classified as out of memory: {other}"),
        Ok(_) => anyhow::bail!("a 4 TiB tensor was allocated?"),
    }
}

/// Where one encoder block's time goes, operation by operation.
fn profile(args: &Args, device: &Device) -> Result<()> {
    use candle_core::Module;
    let (size, precision, batch) = (&args.sizes[0], args.dtypes[0], args.batches[0]);
    let cfg = config(size)?;
    let weights = init::random_weights(&cfg, 0, device)?;
    let model =
        checkpoint::model_from_tensors(weights, &cfg, device)?.to_dtype(precision.dtype())?;
    let block = &model.encoder_blocks()[0];
    let (qkv, to_out, _) = block.mssa().parts();
    let to_out = to_out.expect("official configs have to_out");
    let (ista, threshold) = block.ista().fused().expect("inference model");
    let (n, d, h) = (cfg.seq_len(), cfg.dim, cfg.heads);
    let x = Tensor::randn(0f32, 1.0, (batch, n, d), device)?.to_dtype(precision.dtype())?;
    let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> Result<(f64, Tensor)> {
        let out = f()?;
        let t = median_call(
            device,
            Duration::from_secs_f64(args.seconds.min(0.5)),
            || {
                f()?;
                Ok(())
            },
        )?;
        Ok((t.as_secs_f64() * 1e3, out))
    };
    let mut rows: Vec<(&str, f64)> = vec![];
    let (t, ln1) = time(&|| block.ln1().forward(&x))?;
    rows.push(("LayerNorm 1", t));
    let (t, w) = time(&|| qkv.forward(&ln1))?;
    rows.push(("qkv linear", t));
    let (t, heads) = time(&|| {
        w.reshape((batch, n, h, d / h))?
            .transpose(1, 2)?
            .contiguous()
    })?;
    rows.push(("split heads (copy)", t));
    let (t, scores) = time(&|| heads.matmul(&heads.t()?))?;
    rows.push(("scores w·wᵀ", t));
    let (t, attn) = time(&|| crate_mae::ops::softmax_last_dim(&scores))?;
    rows.push(("softmax", t));
    let (t, av) = time(&|| attn.matmul(&heads))?;
    rows.push(("A·w", t));
    let (t, merged) = time(&|| av.transpose(1, 2)?.reshape((batch, n, d)))?;
    rows.push(("merge heads (copy)", t));
    let (t, o) = time(&|| to_out.forward(&merged))?;
    rows.push(("to_out linear", t));
    let (t, z) = time(&|| &x + &o)?;
    rows.push(("residual add", t));
    let (t, ln2) = time(&|| block.ln2().forward(&z))?;
    rows.push(("LayerNorm 2", t));
    let (t, m) = time(&|| ista.forward(&ln2))?;
    rows.push(("ISTA n·M", t));
    let (t, _) = time(&|| crate_mae::ops::shrink_relu(&m, threshold))?;
    rows.push(("shrink + ReLU", t));
    let (t, _) = time(&|| block.forward(&x))?;
    let total: f64 = rows.iter().map(|r| r.1).sum();
    println!(
        "{size}, {precision}, batch {batch}, {}: one encoder block",
        device::describe(device)
    );
    println!("| operation | ms | share |\n|---|---|---|");
    for (name, ms) in &rows {
        println!("| {name} | {ms:.3} | {:.0} % |", 100.0 * ms / total);
    }
    println!("| sum of the operations | {total:.3} | |\n| the block's forward | {t:.3} | |");
    Ok(())
}
