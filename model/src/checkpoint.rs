//! Weights: the official tensor names and shapes, and reading them from safetensors
//! (memory-mapped) or PyTorch `.pth` in every layout the official checkpoints use.
//!
//! Reading is defensive: a truncated, corrupt or foreign file, a missing tensor or a wrong
//! shape is an error that names the file, the tensor and the shapes; it never panics.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};

use crate::config::CrateMaeConfig;
use crate::error::{ModelError, Result};
use crate::mae::{CrateMae, Pooling};
use crate::readout::{WhitenedGrid, WhitenedGridSpec};

/// Key under which our own safetensors files carry their configuration as JSON.
pub const CONFIG_METADATA_KEY: &str = "crate_mae.config";
/// Key under which a safetensors file may declare the pooling its embeddings are best used
/// with (`cls` or `mean`).
pub const POOLING_METADATA_KEY: &str = "crate_mae.recommended_pooling";

/// Key under which a safetensors file may declare how images smaller than the model's input
/// are fitted to it (`pad` or `resize`): what the model was trained on.
pub const FIT_METADATA_KEY: &str = "crate_mae.small_image_fit";

/// Key under which a safetensors file declares the whitened grid readout it ships (JSON
/// `{"layer": l, "grid": g}`, with `"first_layer"` when it reads blocks `first_layer..=layer`;
/// the tensors are `whitened_grid.mean` and `.projection`).
pub const WHITENED_GRID_METADATA_KEY: &str = "crate_mae.whitened_grid";

/// How an image smaller than the model's `S × S` input is fitted to it. Larger images are
/// always centre-cropped and resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SmallImageFit {
    /// Scaled up to `S × S` (the official models: ImageNet pictures are larger anyway).
    #[default]
    Resize,
    /// Centred on a black `S × S` canvas, unscaled (e.g. 28×28 Fashion-MNIST on 32×32).
    Pad,
}

impl SmallImageFit {
    pub fn name(self) -> &'static str {
        match self {
            Self::Resize => "resize",
            Self::Pad => "pad",
        }
    }
}

impl std::str::FromStr for SmallImageFit {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "resize" => Ok(Self::Resize),
            "pad" => Ok(Self::Pad),
            other => Err(ModelError::input(format!(
                "unknown small-image fit `{other}` (expected pad or resize)"
            ))),
        }
    }
}

/// How a tensor is initialised for training (the official recipe).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Normal {
        std: f64,
    },
    Uniform {
        bound: f64,
    },
    /// The fixed 2-D sin-cos position table (never trained).
    SinCos,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl CrateMaeConfig {
    /// Parameter count of every tensor in the checkpoint (including the unused
    /// `pos_embed` / `decoder_embed.*`, as the paper's table counts them). Here, beside the
    /// tensor list it counts, so the configuration needs nothing from this module.
    pub fn parameter_count(&self) -> usize {
        tensor_specs(self).iter().map(|s| s.numel()).sum()
    }
}

/// Every tensor of an official checkpoint for this configuration, with its shape and
/// official initialisation. Unused tensors (`pos_embed`, `decoder_embed.*`) are included
/// because official checkpoints carry them.
pub fn tensor_specs(cfg: &CrateMaeConfig) -> Vec<TensorSpec> {
    let (d, n, p, c, pd) = (
        cfg.dim,
        cfg.seq_len(),
        cfg.patch_size,
        cfg.in_chans,
        cfg.patch_dim(),
    );
    let xavier = |fan_in: usize, fan_out: usize| Init::Uniform {
        bound: (6.0 / (fan_in + fan_out) as f64).sqrt(),
    };
    let kaiming = Init::Uniform {
        bound: (6.0 / d as f64).sqrt(),
    };
    let mut specs = Vec::new();
    let mut add =
        |name: String, shape: Vec<usize>, init: Init| specs.push(TensorSpec { name, shape, init });
    let layer_norm = |add: &mut dyn FnMut(String, Vec<usize>, Init), prefix: &str| {
        add(format!("{prefix}.weight"), vec![d], Init::Ones);
        add(format!("{prefix}.bias"), vec![d], Init::Zeros);
    };
    let mssa = |add: &mut dyn FnMut(String, Vec<usize>, Init), prefix: &str, heads: usize| {
        add(format!("{prefix}.qkv.weight"), vec![d, d], xavier(d, d));
        if !(heads == 1 && d / heads == d) {
            add(
                format!("{prefix}.to_out.0.weight"),
                vec![d, d],
                xavier(d, d),
            );
            add(format!("{prefix}.to_out.0.bias"), vec![d], Init::Zeros);
        }
    };

    add(
        "cls_token".into(),
        vec![1, 1, d],
        Init::Normal { std: 0.02 },
    );
    add(
        "mask_token".into(),
        vec![1, 1, d],
        Init::Normal { std: 0.02 },
    );
    add("pos_embed".into(), vec![1, n, d], Init::SinCos);
    add("decoder_pos_embed".into(), vec![1, n, d], Init::SinCos);
    add(
        "patch_embed.proj.weight".into(),
        vec![d, c, p, p],
        xavier(c * p * p, d),
    );
    add(
        "patch_embed.proj.bias".into(),
        vec![d],
        Init::Uniform {
            bound: 1.0 / ((c * p * p) as f64).sqrt(),
        },
    );
    for i in 0..cfg.depth {
        let b = format!("blocks.{i}.layers.0");
        layer_norm(&mut add, &format!("{b}.0.norm"));
        mssa(&mut add, &format!("{b}.0.fn"), cfg.heads);
        layer_norm(&mut add, &format!("{b}.1.norm"));
        add(format!("{b}.1.fn.weight"), vec![d, d], kaiming);
    }
    layer_norm(&mut add, "norm");
    add("decoder_embed.weight".into(), vec![d, d], xavier(d, d));
    add("decoder_embed.bias".into(), vec![d], Init::Zeros);
    for i in 0..cfg.decoder_depth {
        let b = format!("decoder_blocks.{i}.layers.0");
        layer_norm(&mut add, &format!("{b}.0.norm"));
        add(format!("{b}.0.fn.weight"), vec![d, d], kaiming);
        layer_norm(&mut add, &format!("{b}.1.norm"));
        mssa(&mut add, &format!("{b}.1.fn"), cfg.decoder_num_heads);
    }
    layer_norm(&mut add, "decoder_norm");
    add("decoder_pred.weight".into(), vec![pd, d], xavier(d, pd));
    add("decoder_pred.bias".into(), vec![pd], Init::Zeros);
    specs
}

/// The on-disk container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    Safetensors,
    /// PyTorch zip pickle; `layout` says where the state dict was found.
    Pth {
        layout: PthLayout,
    },
    /// Generated in process (seeded random initialisation).
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PthLayout {
    /// `{'model': state_dict, 'optimizer': …, 'epoch': …}` (MAE training code).
    ModelKey,
    /// `{'state_dict': {'module.<name>': …}}` (DataParallel).
    StateDictKey,
    /// A bare state dict.
    Bare,
}

/// Tensors read from a file, not yet checked against a configuration.
pub struct RawWeights {
    pub tensors: HashMap<String, Tensor>,
    pub format: WeightsFormat,
    /// Configuration stored in the file itself (our safetensors metadata), if any.
    pub embedded_config: Option<CrateMaeConfig>,
    /// The pooling the file recommends (our safetensors metadata), if any.
    pub recommended_pooling: Option<Pooling>,
    /// How the file says small images are fitted (our safetensors metadata), if it says.
    pub small_image_fit: Option<SmallImageFit>,
    /// Which tokens the file's whitened grid readout reads (its tensors are in `tensors`).
    pub whitened_grid: Option<WhitenedGridSpec>,
}

/// Where weights came from, for `GetModelInfo` and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightsInfo {
    pub source: String,
    pub format: WeightsFormat,
    pub sha256: String,
    /// Tensors in the file that the model does not use (optimizer state excluded).
    pub unexpected: Vec<String>,
    /// The pooling the file recommends, if it says.
    pub recommended_pooling: Option<Pooling>,
    /// How small images are fitted, if the file says.
    pub small_image_fit: Option<SmallImageFit>,
}

fn checkpoint_error(path: &Path, reason: impl ToString) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| checkpoint_error(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| checkpoint_error(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Reads every tensor of a safetensors or `.pth` file (told apart by content, not name)
/// onto `device`.
pub fn read_weights(path: &Path, device: &Device) -> Result<RawWeights> {
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|e| checkpoint_error(path, e))?;
    let got = file
        .read(&mut magic)
        .map_err(|e| checkpoint_error(path, e))?;
    if got == 4 && &magic == b"PK\x03\x04" {
        read_pth(path, device)
    } else {
        // SAFETY: the file is mapped read-only; a concurrent writer truncating it is the
        // usual mmap caveat, accepted by candle's own loaders too.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| checkpoint_error(path, e))?;
        read_safetensors_bytes(&mmap, device).map_err(|e| match e {
            ModelError::Checkpoint { reason, .. } => checkpoint_error(path, reason),
            other => other,
        })
    }
}

/// Reads safetensors from memory (a mapped file or bytes embedded in the binary).
pub fn read_safetensors_bytes(bytes: &[u8], device: &Device) -> Result<RawWeights> {
    const MEMORY: &str = "<memory>";
    let here = Path::new(MEMORY);
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| checkpoint_error(here, format!("not a valid safetensors file: {e}")))?;
    // Each of our metadata entries, parsed, or None when the file does not say.
    fn entry<T>(
        metadata: &Option<HashMap<String, String>>,
        key: &str,
        parse: impl FnOnce(&str) -> std::result::Result<T, String>,
    ) -> Result<Option<T>> {
        match metadata.as_ref().and_then(|m| m.get(key)) {
            Some(value) => parse(value)
                .map(Some)
                .map_err(|e| checkpoint_error(Path::new(MEMORY), format!("metadata `{key}`: {e}"))),
            None => Ok(None),
        }
    }
    let metadata = metadata.metadata();
    fn json<T: serde::de::DeserializeOwned>(v: &str) -> std::result::Result<T, String> {
        serde_json::from_str(v).map_err(|e| e.to_string())
    }
    let embedded_config = entry(metadata, CONFIG_METADATA_KEY, json)?;
    let recommended_pooling = entry(metadata, POOLING_METADATA_KEY, |v| {
        v.parse::<Pooling>().map_err(|e| e.to_string())
    })?;
    let small_image_fit = entry(metadata, FIT_METADATA_KEY, |v| {
        v.parse::<SmallImageFit>().map_err(|e| e.to_string())
    })?;
    let whitened_grid = entry(metadata, WHITENED_GRID_METADATA_KEY, json)?;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| checkpoint_error(here, format!("not a valid safetensors file: {e}")))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let tensor = candle_core::safetensors::Load::load(&view, device)
            .map_err(|e| checkpoint_error(here, format!("tensor `{name}`: {e}")))?;
        tensors.insert(name, tensor);
    }
    Ok(RawWeights {
        tensors,
        format: WeightsFormat::Safetensors,
        embedded_config,
        recommended_pooling,
        small_image_fit,
        whitened_grid,
    })
}

fn read_pth(path: &Path, device: &Device) -> Result<RawWeights> {
    // candle's pickle reader is young; a hostile file must not take the process down.
    let attempt = |key: Option<&'static str>| {
        std::panic::catch_unwind(|| -> candle_core::Result<Vec<(String, Tensor)>> {
            candle_core::pickle::read_all_with_key(path, key)
        })
        .unwrap_or_else(|_| Err(candle_core::Error::Msg("the pickle reader panicked".into())))
    };
    let layouts = [
        (Some("model"), PthLayout::ModelKey),
        (Some("state_dict"), PthLayout::StateDictKey),
        (None, PthLayout::Bare),
    ];
    let mut last_error = None;
    for (key, layout) in layouts {
        match attempt(key) {
            Ok(found) if !found.is_empty() => {
                let mut tensors = HashMap::with_capacity(found.len());
                for (name, tensor) in found {
                    let name = name.strip_prefix("module.").unwrap_or(&name).to_string();
                    tensors.insert(name, tensor.to_device(device)?);
                }
                return Ok(RawWeights {
                    tensors,
                    format: WeightsFormat::Pth { layout },
                    embedded_config: None,
                    recommended_pooling: None,
                    small_image_fit: None,
                    whitened_grid: None,
                });
            }
            Ok(_) => {}
            Err(e) => last_error = Some(e),
        }
    }
    Err(checkpoint_error(
        path,
        match last_error {
            Some(e) => format!("no state dict found in the PyTorch file: {e}"),
            None => "no tensors found under `model`, `state_dict` or at the top level".into(),
        },
    ))
}

/// The configuration these tensors describe. Sizes come from the shapes; head count, η, λ,
/// eps and normalisation from `base` (the file's embedded config, the caller's, or the
/// official preset of the same width).
pub fn infer_config(
    tensors: &HashMap<String, Tensor>,
    base: &CrateMaeConfig,
    heads: Option<usize>,
) -> Result<CrateMaeConfig> {
    let dims = |name: &str| -> Result<Vec<usize>> {
        tensors
            .get(name)
            .map(|t| t.dims().to_vec())
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.into(),
                expected: vec![],
            })
    };
    let proj = dims("patch_embed.proj.weight")?;
    let [dim, in_chans, patch, patch_w] = proj[..] else {
        return Err(ModelError::Config(format!(
            "`patch_embed.proj.weight` must be [d, C, p, p], got {proj:?}"
        )));
    };
    if patch != patch_w {
        return Err(ModelError::Config(format!("non-square patches {proj:?}")));
    }
    let pos = dims("decoder_pos_embed")?;
    let n = match pos[..] {
        [1, n, d] if d == dim && n >= 2 => n,
        _ => {
            return Err(ModelError::Config(format!(
                "`decoder_pos_embed` must be [1, N, {dim}], got {pos:?}"
            )))
        }
    };
    let grid = ((n - 1) as f64).sqrt().round() as usize;
    if grid * grid != n - 1 {
        return Err(ModelError::Config(format!(
            "`decoder_pos_embed` has {} patch rows, not a square grid",
            n - 1
        )));
    }
    let count = |prefix: &str| {
        (0..)
            .take_while(|i| tensors.contains_key(&format!("{prefix}.{i}.layers.0.0.norm.weight")))
            .count()
    };
    let heads = match heads {
        Some(h) => h,
        None if base.dim == dim => base.heads,
        None => CrateMaeConfig::official_heads_for_dim(dim).ok_or_else(|| {
            ModelError::Config(format!(
                "the head count cannot be read from the tensors and width {dim} is no official \
                 preset: give it explicitly"
            ))
        })?,
    };
    let mut cfg = base.clone();
    cfg.dim = dim;
    cfg.in_chans = in_chans;
    cfg.patch_size = patch;
    cfg.img_size = grid * patch;
    cfg.depth = count("blocks");
    cfg.decoder_depth = count("decoder_blocks");
    cfg.heads = heads;
    cfg.decoder_num_heads = heads;
    cfg.validate()?;
    Ok(cfg)
}

/// Checks every tensor the configuration needs (all problems at once, first one reported in
/// full) and converts them to f32.
pub fn check_tensors(
    tensors: &mut HashMap<String, Tensor>,
    cfg: &CrateMaeConfig,
) -> Result<Vec<String>> {
    let specs = tensor_specs(cfg);
    let mut problems = Vec::new();
    for spec in &specs {
        match tensors.get(&spec.name) {
            None => problems.push(ModelError::MissingTensor {
                name: spec.name.clone(),
                expected: spec.shape.clone(),
            }),
            Some(t) if t.dims() != spec.shape.as_slice() => {
                problems.push(ModelError::ShapeMismatch {
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                    actual: t.dims().to_vec(),
                })
            }
            Some(t) if t.dtype() != DType::F32 => {
                let converted = t.to_dtype(DType::F32)?;
                tensors.insert(spec.name.clone(), converted);
            }
            Some(_) => {}
        }
    }
    if let Some(first) = problems.into_iter().next() {
        return Err(first);
    }
    let known: std::collections::HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut unexpected: Vec<String> = tensors
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .cloned()
        .collect();
    unexpected.sort();
    // Depth is counted up to the first missing layer: a layer tensor beyond it means a
    // tensor of an earlier layer is missing, not a shallower model.
    if let Some(name) = unexpected
        .iter()
        .find(|n| n.starts_with("blocks.") || n.starts_with("decoder_blocks."))
    {
        return Err(ModelError::Config(format!(
            "checkpoint has `{name}`, beyond the {} encoder / {} decoder layers found: a tensor of an earlier layer is missing",
            cfg.depth, cfg.decoder_depth
        )));
    }
    Ok(unexpected)
}

/// Builds the model from checked tensors (moved to `device`).
pub fn model_from_tensors(
    tensors: HashMap<String, Tensor>,
    cfg: &CrateMaeConfig,
    device: &Device,
) -> Result<CrateMae> {
    let tensors = if device.is_cpu() {
        tensors
            .into_iter()
            .map(|(name, t)| {
                let t = row_major_transpose(&name, t)?;
                Ok((name, t))
            })
            .collect::<Result<_>>()?
    } else {
        tensors
    };
    CrateMae::new(cfg, VarBuilder::from_tensors(tensors, DType::F32, device))
}

/// Every product applies a linear weight `W` (`[out, in]`) as `x·Wᵀ`. On the CPU, `gemm`
/// packs `Wᵀ` faster when it is row-major (197×768×768 on two Xeon cores: 270 against
/// 195 GFLOP/s), so 2-D weights are kept as the same tensor laid out transposed (strides
/// `(1, out)`); every consumer reads them through their strides.
fn row_major_transpose(name: &str, t: Tensor) -> Result<Tensor> {
    if t.rank() == 2 && name.ends_with(".weight") && t.is_contiguous() {
        Ok(t.t()?.contiguous()?.t()?)
    } else {
        Ok(t)
    }
}

/// How to pick the configuration of a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Use exactly this configuration (the shapes must agree).
    pub config: Option<CrateMaeConfig>,
    /// The head count when no configuration is given or embedded (it cannot be read off
    /// the shapes); defaults to the official preset of the same width.
    pub heads: Option<usize>,
}

/// Reads, checks and builds a model from a file.
pub fn load(
    path: &Path,
    options: &LoadOptions,
    device: &Device,
) -> Result<(CrateMae, WeightsInfo)> {
    let raw = read_weights(path, device)?;
    let sha256 = sha256_file(path)?;
    build(raw, options, device, path.display().to_string(), sha256)
}

/// Reads, checks and builds a model from safetensors bytes (e.g. embedded in the binary).
pub fn load_bytes(
    bytes: &[u8],
    source: &str,
    options: &LoadOptions,
    device: &Device,
) -> Result<(CrateMae, WeightsInfo)> {
    let raw = read_safetensors_bytes(bytes, device)?;
    build(raw, options, device, source.to_string(), sha256_hex(bytes))
}

fn build(
    raw: RawWeights,
    options: &LoadOptions,
    device: &Device,
    source: String,
    sha256: String,
) -> Result<(CrateMae, WeightsInfo)> {
    let RawWeights {
        mut tensors,
        format,
        embedded_config,
        recommended_pooling,
        small_image_fit,
        whitened_grid,
    } = raw;
    let mut take = |name: &str| {
        tensors.remove(name).ok_or_else(|| {
            checkpoint_error(
                Path::new(&source),
                format!(
                    "metadata `{WHITENED_GRID_METADATA_KEY}` is set but tensor `{name}` is missing"
                ),
            )
        })
    };
    let readout = match whitened_grid {
        Some(spec) => Some((
            spec,
            take(WhitenedGrid::MEAN)?,
            take(WhitenedGrid::PROJECTION)?,
        )),
        None => None,
    };
    let cfg = match (&options.config, embedded_config) {
        (Some(cfg), _) => cfg.clone(),
        (None, embedded) => infer_config(&tensors, &embedded.unwrap_or_default(), options.heads)?,
    };
    cfg.validate()?;
    let unexpected = check_tensors(&mut tensors, &cfg)?;
    let mut model = model_from_tensors(tensors, &cfg, device)?;
    if let Some((spec, mean, projection)) = readout {
        model = model.with_whitened_grid(spec, mean, projection)?;
    }
    Ok((
        model,
        WeightsInfo {
            source,
            format,
            sha256,
            unexpected,
            recommended_pooling,
            small_image_fit,
        },
    ))
}

/// What a saved file says about serving it, beside its configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServingMetadata {
    pub recommended_pooling: Option<Pooling>,
    pub small_image_fit: Option<SmallImageFit>,
    /// Set when `tensors` include a whitened grid readout's two tensors.
    pub whitened_grid: Option<WhitenedGridSpec>,
}

/// Writes tensors as safetensors with the configuration (and, when known, the recommended
/// pooling and how small images are fitted) embedded in the metadata, so the file alone is
/// enough to serve it.
pub fn save_safetensors(
    tensors: &HashMap<String, Tensor>,
    cfg: &CrateMaeConfig,
    serving: ServingMetadata,
    path: &Path,
) -> Result<()> {
    let mut metadata: HashMap<String, String> = [(
        CONFIG_METADATA_KEY.to_string(),
        serde_json::to_string(cfg).map_err(|e| ModelError::Config(e.to_string()))?,
    )]
    .into();
    if let Some(pooling) = serving.recommended_pooling {
        metadata.insert(POOLING_METADATA_KEY.to_string(), pooling.name().to_string());
    }
    if let Some(fit) = serving.small_image_fit {
        metadata.insert(FIT_METADATA_KEY.to_string(), fit.name().to_string());
    }
    if let Some(spec) = serving.whitened_grid {
        metadata.insert(
            WHITENED_GRID_METADATA_KEY.to_string(),
            serde_json::to_string(&spec).map_err(|e| ModelError::Config(e.to_string()))?,
        );
    }
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    safetensors::serialize_to_file(
        cpu.iter().map(|(k, t)| (k.as_str(), t)),
        Some(metadata),
        path,
    )
    .map_err(|e| checkpoint_error(path, e))
}
