//! Behaviour of the model crate that the golden vectors do not pin down: batching,
//! the equivalences between entry points, the fused ISTA, the fused CPU blocks against the
//! reference blocks, and checkpoint errors.

use std::io::Write;

use anyhow::Result;
use candle_core::{Device, IndexOp, Tensor};
use crate_mae::checkpoint::{self, LoadOptions};
use crate_mae::{
    init, CrateMae, CrateMaeConfig, Keep, Mask, ModelError, Pooling, WhitenedGrid, WhitenedGridSpec,
};

fn small_config() -> CrateMaeConfig {
    CrateMaeConfig {
        img_size: 32,
        patch_size: 8,
        dim: 64,
        depth: 2,
        heads: 4,
        decoder_depth: 2,
        decoder_num_heads: 4,
        ..CrateMaeConfig::tiny()
    }
}

fn model(cfg: &CrateMaeConfig, seed: u64) -> Result<CrateMae> {
    let weights = init::random_weights(cfg, seed, &Device::Cpu)?;
    Ok(checkpoint::model_from_tensors(weights, cfg, &Device::Cpu)?)
}

fn images(cfg: &CrateMaeConfig, batch: usize, seed: u64) -> Result<Tensor> {
    let noise = Mask::seeded_noise(batch, cfg.in_chans * cfg.img_size * cfg.img_size, seed);
    let flat: Vec<f32> = noise.into_iter().flatten().map(|v| 4.0 * v - 2.0).collect();
    Ok(Tensor::from_vec(
        flat,
        (batch, cfg.in_chans, cfg.img_size, cfg.img_size),
        &Device::Cpu,
    )?)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn one_image_alone_equals_the_same_image_inside_a_batch_of_five() -> Result<()> {
    let cfg = small_config();
    let m = model(&cfg, 1)?;
    let batch = images(&cfg, 5, 2)?;
    let together = m.embed_tokens(&batch)?;
    let mask = Mask::random(5, cfg.num_patches(), 0.75, 3)?;
    let completed = m.complete(&batch, &mask)?;
    for i in 0..5 {
        let alone = m.embed_tokens(&batch.narrow(0, i, 1)?)?;
        let d = max_diff(&alone, &together.narrow(0, i, 1)?)?;
        assert!(d < 1e-5, "image {i}: embedding differs by {d}");
        let one_mask = Mask::from_indices(
            &[(0..cfg.num_patches())
                .filter(|&l| mask.rows()[i][l])
                .collect()],
            cfg.num_patches(),
        )?;
        let alone = m.complete(&batch.narrow(0, i, 1)?, &one_mask)?;
        let d = max_diff(&alone.pred, &completed.pred.narrow(0, i, 1)?)?;
        assert!(d < 1e-5, "image {i}: completion differs by {d}");
    }
    Ok(())
}

#[test]
fn mask_ratio_zero_is_the_embedding_path() -> Result<()> {
    let cfg = small_config();
    let m = model(&cfg, 4)?;
    let x = images(&cfg, 3, 5)?;
    let mask = Mask::random(3, cfg.num_patches(), 0.0, 9)?;
    assert_eq!(mask.masked_count(0), 0);
    let masked = m.encode(&x, Some(&mask))?;
    let plain = m.embed_tokens(&x)?;
    assert!(max_diff(&masked, &plain)? < 1e-6);
    Ok(())
}

#[test]
fn explicit_mask_equals_the_noise_derived_mask() -> Result<()> {
    let cfg = small_config();
    let m = model(&cfg, 6)?;
    let x = images(&cfg, 2, 7)?;
    let noise = Mask::seeded_noise(2, cfg.num_patches(), 11);
    let from_noise = Mask::from_noise(&noise, 0.75)?;
    let indices: Vec<Vec<usize>> = from_noise
        .rows()
        .iter()
        .map(|row| (0..row.len()).filter(|&l| row[l]).collect())
        .collect();
    let explicit = Mask::from_indices(&indices, cfg.num_patches())?;
    assert_eq!(explicit, from_noise);
    let a = m.complete(&x, &from_noise)?;
    let b = m.complete(&x, &explicit)?;
    assert_eq!(max_diff(&a.composite, &b.composite)?, 0.0);
    // And the masked patches really are hidden: changing them changes nothing upstream of
    // the mask token.
    let masked_patch = indices[0][0];
    let g = cfg.grid_size();
    let (pi, pj) = (masked_patch / g, masked_patch % g);
    let p = cfg.patch_size;
    let bump = Tensor::ones((1, 3, p, p), candle_core::DType::F32, &Device::Cpu)?;
    let mut changed = x.clone();
    let region = changed.i((0..1, .., pi * p..pi * p + p, pj * p..pj * p + p))?;
    changed = changed.slice_assign(
        &[0..1, 0..3, pi * p..pi * p + p, pj * p..pj * p + p],
        &(region + bump)?,
    )?;
    let c = m.complete(&changed, &explicit)?;
    assert!(max_diff(&a.pred, &c.pred)? < 1e-6);
    Ok(())
}

#[test]
fn fused_ista_equals_the_three_matmul_form() -> Result<()> {
    let cfg = CrateMaeConfig {
        depth: 1,
        decoder_depth: 1,
        ..CrateMaeConfig::tiny()
    };
    let weights = init::random_weights(&cfg, 8, &Device::Cpu)?;
    let dictionary = weights["blocks.0.layers.0.1.fn.weight"].clone();
    let m = checkpoint::model_from_tensors(weights, &cfg, &Device::Cpu)?;
    let ista = m.encoder_blocks()[0].ista();
    let values: Vec<f32> = Mask::seeded_noise(1, 50 * cfg.dim, 3)[0]
        .iter()
        .map(|v| 4.0 * v - 2.0)
        .collect();
    let n = Tensor::from_vec(values, (2, 25, cfg.dim), &Device::Cpu)?;
    let fused = ista.forward(&n)?;
    // The official form, from the checkpoint's D: ReLU(n + η(n·D − n·Dᵀ·D) − ηλ).
    let (eta, lambd) = (cfg.ista_step_size, cfg.lambd);
    let nd = n.broadcast_matmul(&dictionary)?;
    let ndtd = n
        .broadcast_matmul(&dictionary.t()?)?
        .broadcast_matmul(&dictionary)?;
    let three = ((&n + ((nd - ndtd)? * eta)?)? - eta * lambd)?.relu()?;
    let d = max_diff(&fused, &three)?;
    assert!(d < 1e-5, "fused vs three-matmul: {d}");
    assert!(
        ista.forward_three_matmul(&n).is_err(),
        "inference keeps only M, not D"
    );
    // Both really are ISTA: sparse (some exact zeros) and not all zero.
    let zeros = fused
        .eq(0f64)?
        .to_dtype(candle_core::DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    assert!(zeros > 0.05 && zeros < 0.95, "zero fraction {zeros}");
    Ok(())
}

#[test]
fn pooling_and_layer_tokens_have_the_documented_shapes() -> Result<()> {
    let cfg = small_config();
    let m = model(&cfg, 2)?;
    let x = images(&cfg, 2, 1)?;
    let tokens = m.embed_tokens(&x)?;
    assert_eq!(tokens.dims(), &[2, cfg.seq_len(), cfg.dim]);
    let cls = m.embed(&x, Pooling::Cls)?;
    assert_eq!(max_diff(&cls, &tokens.i((.., 0))?)?, 0.0);
    let mean = m.embed(&x, Pooling::Mean)?;
    assert!(max_diff(&mean, &tokens.i((.., 1..))?.mean(1)?)? < 1e-6);
    assert_eq!(m.layer_tokens(&x, 1)?.dims(), &[2, cfg.seq_len(), cfg.dim]);
    assert_eq!(
        m.attention_maps(&x, 0)?.dims(),
        &[2, cfg.heads, cfg.seq_len(), cfg.seq_len()]
    );
    assert!(matches!(m.layer_tokens(&x, 2), Err(ModelError::Input(_))));
    // Wrong image size is an input error, not a panic.
    let wrong = Tensor::zeros((1, 3, 31, 32), candle_core::DType::F32, &Device::Cpu)?;
    assert!(matches!(m.embed_tokens(&wrong), Err(ModelError::Input(_))));
    Ok(())
}

#[test]
fn layer_norm_and_softmax_fall_back_to_differentiable_ops_when_training() -> Result<()> {
    let cfg = small_config();
    let weights = init::random_weights(&cfg, 3, &Device::Cpu)?;
    let varmap = candle_nn::VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for (k, t) in &weights {
            data.insert(k.clone(), candle_core::Var::from_tensor(t)?);
        }
    }
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &Device::Cpu);
    let trainable = CrateMae::new(&cfg, vb)?;
    let frozen = checkpoint::model_from_tensors(weights, &cfg, &Device::Cpu)?;
    let x = images(&cfg, 2, 4)?;
    let mask = Mask::random(2, cfg.num_patches(), 0.75, 1)?;
    let out = trainable.complete(&x, &mask)?;
    let loss = trainable.loss(&x, &out.pred, &out.mask, false)?;
    let grads = loss.backward()?;
    let dict = varmap.data().lock().unwrap()["blocks.0.layers.0.1.fn.weight"].clone();
    let g = grads
        .get(&dict)
        .expect("gradient reaches the ISTA dictionary");
    assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    let reference = frozen.complete(&x, &mask)?;
    assert!(max_diff(&out.pred.detach(), &reference.pred)? < 1e-4);
    Ok(())
}

/// A scratch folder removed when the test ends, passed or not.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("crate-mae-test-")
        .tempdir()
        .expect("a scratch folder")
}

fn write_temp(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
    path
}

/// A whitened grid saved with the weights comes back with them, pools as its definition
/// says, and a file that declares one without its tensors is refused by name.
#[test]
fn a_whitened_grid_readout_travels_with_the_weights() -> Result<()> {
    let cfg = small_config();
    let dev = Device::Cpu;
    let mut weights = init::random_weights(&cfg, 3, &dev)?;
    let spec = WhitenedGridSpec::of_layer(1, 2);
    let pooled = 4 * cfg.dim;
    let mean = Tensor::randn(0f32, 1.0, pooled, &dev)?;
    let projection = Tensor::randn(0f32, 1.0, (pooled, 5), &dev)?;
    weights.insert(WhitenedGrid::MEAN.into(), mean.clone());
    weights.insert(WhitenedGrid::PROJECTION.into(), projection.clone());
    let serving = checkpoint::ServingMetadata {
        recommended_pooling: Some(Pooling::WhitenedGrid),
        whitened_grid: Some(spec),
        ..Default::default()
    };
    let dir = scratch();
    let path = dir.path().join("wg.safetensors");
    checkpoint::save_safetensors(&weights, &cfg, serving, &path)?;
    let (m, info) = checkpoint::load(&path, &LoadOptions::default(), &dev)?;
    assert_eq!(info.recommended_pooling, Some(Pooling::WhitenedGrid));
    assert!(info.unexpected.is_empty(), "{:?}", info.unexpected);
    let readout = m.whitened_grid().expect("the readout came back");
    assert_eq!((readout.spec, readout.dim()), (spec, 5));

    let x = Tensor::randn(0f32, 1.0, (2, 3, cfg.img_size, cfg.img_size), &dev)?;
    let keep = Keep {
        outputs: [1].into(),
        ..Keep::default()
    };
    let outputs = m.encode_keeping(&x, None, &keep)?.outputs;
    let tokens = &outputs[&1];
    let got = m.whitened_embedding(&outputs)?;
    let want = crate_mae::readout::grid_pool(tokens, 2)?
        .broadcast_sub(&mean)?
        .matmul(&projection)?;
    let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(
        err < 1e-4,
        "whitened grid differs from its definition by {err}"
    );
    assert!(crate_mae::mae::pool(tokens, Pooling::WhitenedGrid).is_err());

    // Declared but missing: refused, naming the tensor.
    weights.remove(WhitenedGrid::PROJECTION);
    checkpoint::save_safetensors(&weights, &cfg, serving, &path)?;
    let err = checkpoint::load(&path, &LoadOptions::default(), &dev).unwrap_err();
    assert!(err.to_string().contains(WhitenedGrid::PROJECTION), "{err}");
    // A model without one refuses the pooling with a message, never a panic.
    let (plain, _) = checkpoint::load(
        &path_of_plain(dir.path(), &init::random_weights(&cfg, 3, &dev)?, &cfg)?,
        &LoadOptions::default(),
        &dev,
    )?;
    let err = plain.whitened_embedding(&outputs).unwrap_err();
    assert!(
        err.to_string().contains("no whitened-grid readout"),
        "{err}"
    );
    Ok(())
}

#[test]
fn bad_checkpoints_give_errors_that_name_the_problem() -> Result<()> {
    let cfg = small_config();
    let weights = init::random_weights(&cfg, 1, &Device::Cpu)?;
    let opts = LoadOptions {
        heads: Some(cfg.heads),
        ..Default::default()
    };

    // A good file round-trips with its configuration embedded.
    let dir = scratch();
    let good = dir.path().join("good.safetensors");
    checkpoint::save_safetensors(&weights, &cfg, Default::default(), &good)?;
    let (m, info) = checkpoint::load(&good, &LoadOptions::default(), &Device::Cpu)?;
    assert_eq!(m.config(), &cfg);
    assert_eq!(info.sha256.len(), 64);
    assert_eq!(info.recommended_pooling, None);

    // So does a recommended pooling.
    checkpoint::save_safetensors(
        &weights,
        &cfg,
        checkpoint::ServingMetadata {
            recommended_pooling: Some(Pooling::Cls),
            small_image_fit: Some(checkpoint::SmallImageFit::Pad),
            whitened_grid: None,
        },
        &good,
    )?;
    let (_, info) = checkpoint::load(&good, &LoadOptions::default(), &Device::Cpu)?;
    assert_eq!(info.recommended_pooling, Some(Pooling::Cls));
    assert_eq!(info.small_image_fit, Some(checkpoint::SmallImageFit::Pad));
    let (_, plain) = checkpoint::load(
        &path_of_plain(dir.path(), &weights, &cfg)?,
        &LoadOptions::default(),
        &Device::Cpu,
    )?;
    assert_eq!(
        plain.small_image_fit, None,
        "a file that does not say leaves it to the server"
    );

    // Missing tensor.
    let mut missing = weights.clone();
    missing.remove("blocks.1.layers.0.1.fn.weight");
    let path = dir.path().join("missing.safetensors");
    checkpoint::save_safetensors(&missing, &cfg, Default::default(), &path)?;
    match checkpoint::load(&path, &opts, &Device::Cpu) {
        Err(ModelError::MissingTensor { name, expected }) => {
            assert_eq!(name, "blocks.1.layers.0.1.fn.weight");
            assert_eq!(expected, vec![64, 64]);
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }

    // A layer with its first tensor missing is an error, not a shallower model.
    let mut gap = weights.clone();
    gap.remove("blocks.0.layers.0.0.norm.weight");
    gap.remove("blocks.1.layers.0.0.norm.weight");
    checkpoint::save_safetensors(&gap, &cfg, Default::default(), &path)?;
    let err = checkpoint::load(&path, &opts, &Device::Cpu).unwrap_err();
    assert!(matches!(err, ModelError::Config(_)), "{err}");
    let mut gap = weights.clone();
    gap.remove("blocks.1.layers.0.0.norm.weight");
    checkpoint::save_safetensors(&gap, &cfg, Default::default(), &path)?;
    let err = checkpoint::load(&path, &opts, &Device::Cpu).unwrap_err();
    assert!(
        err.to_string().contains("earlier layer is missing"),
        "{err}"
    );

    // Mis-shaped tensor.
    let mut misshaped = weights.clone();
    misshaped.insert(
        "norm.weight".into(),
        Tensor::ones(63, candle_core::DType::F32, &Device::Cpu)?,
    );
    checkpoint::save_safetensors(&misshaped, &cfg, Default::default(), &path)?;
    let err = checkpoint::load(&path, &opts, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, ModelError::ShapeMismatch { name, expected, actual } if name == "norm.weight" && expected == &vec![64] && actual == &vec![63]),
        "{err}"
    );
    assert!(err.to_string().contains("norm.weight"));

    // Garbage, empty, truncated safetensors, truncated and non-PyTorch zip: errors, no panics.
    let good_bytes = std::fs::read(&good)?;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage.bin",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
        ("empty.safetensors", vec![]),
        (
            "truncated.safetensors",
            good_bytes[..good_bytes.len() / 2].to_vec(),
        ),
        (
            "truncated.pth",
            std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/golden/set_a/checkpoint.pth"
            ))
            .map(|b| b[..b.len() / 3].to_vec())
            .expect("the committed golden checkpoint"),
        ),
        (
            "zip.pth",
            b"PK\x03\x04\x14\x00\x00\x00\x08\x00garbage-after-a-zip-magic".to_vec(),
        ),
    ];
    for (name, bytes) in cases {
        let path = write_temp(dir.path(), name, &bytes);
        match checkpoint::load(&path, &opts, &Device::Cpu) {
            Err(ModelError::Checkpoint { path: p, reason }) => {
                assert_eq!(p, path, "{name}");
                assert!(!reason.is_empty(), "{name}");
            }
            other => panic!("{name}: expected a checkpoint error, got {other:?}"),
        }
    }
    // A file that does not exist.
    assert!(matches!(
        checkpoint::load(
            std::path::Path::new("/nonexistent/w.safetensors"),
            &opts,
            &Device::Cpu
        ),
        Err(ModelError::Checkpoint { .. })
    ));
    // An unknown width without a head count cannot be guessed.
    let mut no_cfg = weights.clone();
    no_cfg.remove("nothing");
    let raw_path = dir.path().join("nocfg.safetensors");
    let tensors: Vec<(String, Tensor)> = no_cfg.into_iter().collect();
    safetensors::serialize_to_file(
        tensors.iter().map(|(k, t)| (k.as_str(), t)),
        None,
        &raw_path,
    )?;
    let err = checkpoint::load(&raw_path, &LoadOptions::default(), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("head count"), "{err}");
    Ok(())
}

/// The CPU engine's fused block (one pass per image, ISTA as one product) must differ in form
/// from the reference block (candle operations, the paper's equations); this ties every layer
/// of it to the reference, block by block, masked and not.
#[test]
fn fused_cpu_blocks_equal_the_reference_blocks_layer_by_layer() -> Result<()> {
    let cfg = CrateMaeConfig {
        depth: 3,
        decoder_depth: 1,
        ..small_config()
    };
    let m = model(&cfg, 11)?;
    let x = images(&cfg, 3, 5)?;
    let every_layer = Keep {
        outputs: (0..cfg.depth).collect(),
        ..Keep::default()
    };
    let masks = [None, Some(Mask::random(3, cfg.num_patches(), 0.5, 9)?)];
    for mask in &masks {
        let fused = m.encode_keeping(&x, mask.as_ref(), &every_layer)?;
        let reference = m.trace_encoder(&x, mask.as_ref())?;
        for (layer, block) in reference.blocks.iter().enumerate() {
            let d = max_diff(&fused.outputs[&layer], &block.out)?;
            assert!(
                d < 1e-4,
                "layer {layer} (mask: {}): fused vs reference {d}",
                mask.is_some()
            );
        }
        let d = max_diff(fused.latent.as_ref().unwrap(), &reference.latent)?;
        assert!(d < 1e-4, "latent: fused vs reference {d}");
    }
    // A pass that stops early (the engine's, when a readout reads early blocks only) keeps
    // the same tokens and has no latent.
    let early = Keep {
        outputs: [0, 1].into(),
        ..Keep::default()
    };
    let through = m.encode_through(&x, &early)?;
    let reference = m.trace_encoder(&x, None)?;
    assert!(
        through.latent.is_none(),
        "a pass through block 1 has no latent"
    );
    assert_eq!(through.outputs.keys().copied().collect::<Vec<_>>(), [0, 1]);
    for (layer, tokens) in &through.outputs {
        let d = max_diff(tokens, &reference.blocks[*layer].out)?;
        assert!(d < 1e-4, "layer {layer} through block 1 vs reference {d}");
    }
    Ok(())
}

/// The default embedding as the server computes it (a pass stopped after the readout's
/// deepest block, the projection packed into panels) against the same readout built from the
/// reference blocks and candle's own product, for batches that exercise whole row blocks and
/// the rows left over.
#[test]
fn the_whitened_grid_of_a_stopped_pass_equals_the_reference_readout() -> Result<()> {
    let cfg = CrateMaeConfig {
        depth: 3,
        decoder_depth: 1,
        ..small_config()
    };
    let spec = WhitenedGridSpec {
        layer: 1,
        grid: 2,
        first_layer: Some(0),
    };
    let (pooled, k) = (spec.pooled_dim(cfg.dim), 40);
    let mean = Tensor::randn(0f32, 1.0, pooled, &Device::Cpu)?;
    let projection = Tensor::randn(0f32, 0.1, (pooled, k), &Device::Cpu)?;
    let m = model(&cfg, 21)?.with_whitened_grid(spec, mean.clone(), projection.clone())?;
    let keep = Keep {
        outputs: spec.layers().collect(),
        ..Keep::default()
    };
    for batch in [1, 6] {
        let x = images(&cfg, batch, 17)?;
        let through = m.encode_through(&x, &keep)?;
        assert!(through.latent.is_none(), "the pass stops after block 1");
        let served = m.whitened_embedding(&through.outputs)?;
        let reference = m.trace_encoder(&x, None)?;
        let grids = spec
            .layers()
            .map(|l| crate_mae::readout::grid_pool(&reference.blocks[l].out, spec.grid))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let want = Tensor::cat(&grids, 1)?
            .broadcast_sub(&mean)?
            .matmul(&projection)?;
        assert_eq!(served.dims(), [batch, k]);
        let d = max_diff(&served, &want)?;
        assert!(d < 1e-4, "batch {batch}: served readout vs reference {d}");
    }
    Ok(())
}

fn path_of_plain(
    dir: &std::path::Path,
    weights: &std::collections::HashMap<String, Tensor>,
    cfg: &CrateMaeConfig,
) -> Result<std::path::PathBuf> {
    let path = dir.join("plain.safetensors");
    checkpoint::save_safetensors(weights, cfg, Default::default(), &path)?;
    Ok(path)
}

/// The CPU engine's decoder pass (products, LayerNorm and attention on the engine's kernels)
/// against candle's reference decoder, on a latent with mask tokens in it.
#[test]
fn fused_cpu_decoder_equals_the_reference_decoder() -> Result<()> {
    let cfg = CrateMaeConfig {
        decoder_depth: 3,
        decoder_num_heads: 2,
        ..small_config()
    };
    let m = model(&cfg, 13)?;
    let x = images(&cfg, 3, 8)?;
    let mask = Mask::random(3, cfg.num_patches(), 0.75, 4)?;
    let latent = m.encode(&x, Some(&mask))?;
    let fused = m.decode(&latent)?;
    let reference = m.trace_decoder(&latent)?.pred;
    assert_eq!(fused.dims(), reference.dims());
    let d = max_diff(&fused, &reference)?;
    assert!(d < 1e-4, "fused vs reference decoder: {d}");
    Ok(())
}

/// Benchmark (not a timed test): the decoder on the CPU engine against candle's operations
/// (the reference path `trace_decoder` takes, what `decode` ran before), batch 8.
/// `cargo test --release -p crate-mae --test model decoder_speed -- --ignored --nocapture`
#[test]
#[ignore = "benchmark"]
fn decoder_speed() -> Result<()> {
    for (name, cfg, rounds) in [
        ("built-in shape", CrateMaeConfig::built_in_shape(), 30),
        ("base", CrateMaeConfig::base(), 3),
    ] {
        let m = model(&cfg, 1)?;
        let x = images(&cfg, 8, 2)?;
        let latent = m.encode(&x, None)?;
        let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
            f()?;
            let mut best = f64::MAX;
            for _ in 0..rounds {
                let t = std::time::Instant::now();
                f()?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            Ok(best)
        };
        let fused = time(&|| m.decode(&latent).map(|_| ()).map_err(Into::into))?;
        let reference = time(&|| m.trace_decoder(&latent).map(|_| ()).map_err(Into::into))?;
        println!(
            "{name}: decoder batch 8: engine {:.2} ms, candle {:.2} ms ({:.2}×)",
            fused * 1e3,
            reference * 1e3,
            reference / fused
        );
    }
    Ok(())
}
