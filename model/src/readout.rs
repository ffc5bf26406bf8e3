//! Readouts beyond cls and mean: the patch tokens pooled over a grid of regions, and the
//! whitened grid a model may ship for retrieval.
//!
//! A global average throws the garment's layout away; averaging the patch tokens within each
//! of g×g regions keeps it (g²·d values). Cosine similarity on those raw values is dominated
//! by a few high-variance directions, so a model can carry a **whitening** fitted on its
//! training images without labels: centre, project onto the top k principal components and
//! scale each to unit variance (PCA whitening, the standard retrieval post-processing). The
//! result is a compact k-value embedding whose cosine k-NN is what the model card measures.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use serde::{Deserialize, Serialize};

use crate::cpu::panels::PanelMatrix;
use crate::error::{ModelError, Result};

/// `[B, 1 + L, d]` tokens → `[B, g·g·d]`: the patch tokens averaged within each of g×g
/// regions (row-major regions, each a d-vector), the cls token left out.
pub fn grid_pool(tokens: &Tensor, grid: usize) -> Result<Tensor> {
    let (b, n, d) = tokens.dims3()?;
    let side = ((n - 1) as f64).sqrt().round() as usize;
    if grid == 0 || side * side != n - 1 || !side.is_multiple_of(grid) {
        return Err(ModelError::input(format!(
            "a {grid}×{grid} grid does not divide the {side}×{side} patch grid"
        )));
    }
    // One product with a fixed pooling matrix `[g², 1 + L]` (a zero column for the cls token,
    // 1/region-size where a patch lies in a region): a single matmul on every device, where
    // reshaping into regions and averaging twice cost several strided reductions (at batch
    // 32, 2.5 ms on two Xeon cores against a 9 ms encoder).
    let cell = side / grid;
    let weight = 1.0 / (cell * cell) as f32;
    let pooling: Vec<f32> = (0..grid * grid)
        .flat_map(|r| {
            (0..n).map(move |t| match t.checked_sub(1) {
                Some(p) if (p / side / cell) * grid + (p % side) / cell == r => weight,
                _ => 0.0,
            })
        })
        .collect();
    let pooling = Tensor::from_vec(pooling, (1, grid * grid, n), tokens.device())?
        .to_dtype(tokens.dtype())?
        .broadcast_as((b, grid * grid, n))?
        .contiguous()?;
    Ok(pooling
        .matmul(&tokens.contiguous()?)?
        .reshape((b, grid * grid * d))?)
}

/// Which tokens a whitened grid reads: stored as the safetensors metadata
/// `crate_mae.whitened_grid` beside the two tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhitenedGridSpec {
    /// The deepest encoder block read (`Embed`'s `layer`).
    pub layer: usize,
    /// Regions per side.
    pub grid: usize,
    /// The first block read, when the readout concatenates the grids of blocks
    /// `first_layer..=layer` (earlier blocks keep finer detail, later ones more shape); absent:
    /// `layer` alone, as files written before it mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_layer: Option<usize>,
}

impl WhitenedGridSpec {
    /// One block's grid.
    pub fn of_layer(layer: usize, grid: usize) -> Self {
        Self {
            layer,
            grid,
            first_layer: None,
        }
    }

    /// The blocks read, in the order their grids are concatenated.
    pub fn layers(&self) -> std::ops::RangeInclusive<usize> {
        self.first_layer.unwrap_or(self.layer)..=self.layer
    }

    /// The blocks read, in words: "layer 1" or "layers 0 to 1" (for messages).
    pub fn describe_layers(&self) -> String {
        let layers = self.layers();
        if layers.start() == layers.end() {
            format!("layer {}", self.layer)
        } else {
            format!("layers {} to {}", layers.start(), layers.end())
        }
    }

    /// Pooled values before the projection: g²·d per block read.
    pub fn pooled_dim(&self, dim: usize) -> usize {
        self.layers().count() * self.grid * self.grid * dim
    }
}

/// The whitened grid readout: `([grid_pool(tokens of block l) for l in layers] − mean) ·
/// projection`, the grids concatenated.
#[derive(Debug, Clone)]
pub struct WhitenedGrid {
    pub spec: WhitenedGridSpec,
    /// `[blocks·g²·d]`, the training images' mean pooled vector.
    mean: Tensor,
    /// `[blocks·g²·d, k]`: principal directions, each divided by the square root of its variance.
    projection: Projection,
}

/// Where the projection lives: on the CPU packed once for few-row products (a general GEMM
/// repacks all of it on every call, which at a batch of 8 cost 3× reading it), elsewhere the
/// device's tensor.
#[derive(Debug, Clone)]
enum Projection {
    Packed(Arc<PanelMatrix>),
    Tensor(Tensor),
}

impl WhitenedGrid {
    /// Tensor names in a checkpoint.
    pub const MEAN: &'static str = "whitened_grid.mean";
    pub const PROJECTION: &'static str = "whitened_grid.projection";

    /// Checks the shapes against the model's width and depth. The tensors stay on the device
    /// they come on (the model's: checkpoints are read onto it).
    pub fn new(
        spec: WhitenedGridSpec,
        mean: Tensor,
        projection: Tensor,
        dim: usize,
        depth: usize,
    ) -> Result<Self> {
        let pooled = spec.pooled_dim(dim);
        let bad = |why: String| Err(ModelError::Config(format!("whitened grid: {why}")));
        if spec.grid == 0 {
            return bad("a grid of 0 regions".into());
        }
        if spec.layer >= depth || spec.layers().is_empty() {
            return bad(format!(
                "reads {} of a {depth}-layer encoder",
                spec.describe_layers()
            ));
        }
        if mean.dims() != [pooled] {
            return bad(format!(
                "mean is {:?}, expected [{pooled}] ({} blocks × {}×{} regions × {dim})",
                mean.dims(),
                spec.layers().count(),
                spec.grid,
                spec.grid
            ));
        }
        match projection.dims() {
            [rows, k] if *rows == pooled && *k > 0 => {}
            dims => return bad(format!("projection is {dims:?}, expected [{pooled}, k]")),
        }
        let projection = projection.to_dtype(DType::F32)?;
        let projection = if projection.device().is_cpu() {
            let (rows, k) = projection.dims2()?;
            let projection = projection.contiguous()?;
            // Packed from the tensor's own storage: no third copy at load (it is 32 MiB).
            let (storage, layout) = projection.storage_and_layout();
            let packed = match (&*storage, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(data)), Some((from, to))) => {
                    PanelMatrix::pack(&data[from..to], rows, k)
                }
                _ => return bad("the projection is not a contiguous f32 tensor".into()),
            };
            Projection::Packed(Arc::new(packed))
        } else {
            Projection::Tensor(projection)
        };
        Ok(Self {
            spec,
            mean: mean.to_dtype(DType::F32)?,
            projection,
        })
    }

    /// Values per embedding (k).
    pub fn dim(&self) -> usize {
        match &self.projection {
            Projection::Packed(p) => p.cols(),
            Projection::Tensor(t) => t.dims()[1],
        }
    }

    /// Blocks' `[B, 1 + L, d]` output tokens (at least those of `spec.layers()`, as
    /// [`crate::Encoded::outputs`] holds them) → `[B, k]` (f32).
    pub fn apply(&self, outputs: &BTreeMap<usize, Tensor>) -> Result<Tensor> {
        let grids = self
            .spec
            .layers()
            .map(|l| {
                let tokens = outputs.get(&l).ok_or_else(|| {
                    ModelError::input(format!("the whitened grid reads block {l}'s output"))
                })?;
                grid_pool(&tokens.to_dtype(DType::F32)?, self.spec.grid)
            })
            .collect::<Result<Vec<_>>>()?;
        let centred = Tensor::cat(&grids, 1)?.broadcast_sub(&self.mean)?;
        match &self.projection {
            Projection::Packed(p) => {
                let b = centred.dim(0)?;
                let rows: Vec<f32> = centred.flatten_all()?.to_vec1()?;
                let out = p.left_multiply(&rows, b);
                Ok(Tensor::from_vec(out, (b, p.cols()), &Device::Cpu)?)
            }
            Projection::Tensor(t) => Ok(centred.matmul(t)?),
        }
    }

    /// The two tensors under their checkpoint names.
    pub fn tensors(&self) -> Result<[(String, Tensor); 2]> {
        let projection = match &self.projection {
            Projection::Packed(p) => {
                Tensor::from_vec(p.unpack(), (p.rows(), p.cols()), &Device::Cpu)?
            }
            Projection::Tensor(t) => t.clone(),
        };
        Ok([
            (Self::MEAN.to_string(), self.mean.clone()),
            (Self::PROJECTION.to_string(), projection),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn grid_pool_averages_each_region_of_patch_tokens() {
        // 1 cls + 4×4 patches, d = 1: token value = its patch index; the cls is 100.
        let values: Vec<f32> = std::iter::once(100.0)
            .chain((0..16).map(|i| i as f32))
            .collect();
        let tokens = Tensor::from_vec(values, (1, 17, 1), &Device::Cpu).unwrap();
        let pooled: Vec<f32> = grid_pool(&tokens, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Region (0,0) holds patches 0, 1, 4, 5.
        assert_eq!(pooled, vec![2.5, 4.5, 10.5, 12.5]);
        assert!(grid_pool(&tokens, 3).is_err(), "3 does not divide 4");
    }

    /// Every batch row, region and channel is the plain average of its patches' values.
    #[test]
    fn grid_pool_is_the_average_over_each_region_for_every_image_and_channel() {
        let (b, side, d, grid) = (3, 8, 5, 4);
        let n = 1 + side * side;
        let values: Vec<f32> = (0..b * n * d)
            .map(|i| ((i * 7919) % 101) as f32 / 10.0 - 5.0)
            .collect();
        let tokens = Tensor::from_vec(values.clone(), (b, n, d), &Device::Cpu).unwrap();
        let pooled: Vec<f32> = grid_pool(&tokens, grid)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(pooled.len(), b * grid * grid * d);
        let cell = side / grid;
        for i in 0..b {
            for r in 0..grid * grid {
                for c in 0..d {
                    let (ri, rj) = (r / grid, r % grid);
                    let want = (0..cell * cell)
                        .map(|q| {
                            let patch = (ri * cell + q / cell) * side + rj * cell + q % cell;
                            values[(i * n + 1 + patch) * d + c]
                        })
                        .sum::<f32>()
                        / (cell * cell) as f32;
                    let got = pooled[(i * grid * grid + r) * d + c];
                    assert!(
                        (got - want).abs() < 1e-5,
                        "image {i} region {r} channel {c}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn whitening_centres_and_projects_and_checks_its_shapes() {
        let dev = Device::Cpu;
        let spec = WhitenedGridSpec::of_layer(0, 1);
        let mean = Tensor::new(&[1f32, 2.0], &dev).unwrap();
        let projection = Tensor::new(&[[2f32], [0.0]], &dev).unwrap();
        let w = WhitenedGrid::new(spec, mean.clone(), projection.clone(), 2, 1).unwrap();
        assert_eq!(w.dim(), 1);
        // One patch token (3, 5): (3 − 1)·2 + (5 − 2)·0 = 4.
        let tokens = Tensor::new(&[[[9f32, 9.0], [3.0, 5.0]]], &dev).unwrap();
        let out: Vec<f32> = w
            .apply(&[(0, tokens)].into())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(out, vec![4.0]);
        assert!(WhitenedGrid::new(spec, mean.clone(), projection.clone(), 3, 1).is_err());
        let deep = WhitenedGridSpec::of_layer(1, 1);
        assert!(WhitenedGrid::new(deep, mean, projection, 2, 1).is_err());
        // A grid of no regions pools nothing: refused at load, not at the first request.
        let empty = (
            Tensor::zeros(0, DType::F32, &dev),
            Tensor::zeros((0, 1), DType::F32, &dev),
        );
        let none = WhitenedGridSpec::of_layer(0, 0);
        assert!(WhitenedGrid::new(none, empty.0.unwrap(), empty.1.unwrap(), 2, 1).is_err());
    }

    /// Two blocks' grids are concatenated in block order before the one projection, and a
    /// missing block is an error that names it.
    #[test]
    fn a_readout_of_several_blocks_concatenates_their_grids() {
        let dev = Device::Cpu;
        let spec = WhitenedGridSpec {
            layer: 2,
            grid: 1,
            first_layer: Some(1),
        };
        assert_eq!((spec.layers(), spec.pooled_dim(2)), (1..=2, 4));
        let mean = Tensor::new(&[1f32, 0.0, 0.0, 0.0], &dev).unwrap();
        // Picks pooled values 0 and 3: block 1's first channel, block 2's second.
        let projection =
            Tensor::new(&[[1f32, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]], &dev).unwrap();
        let w = WhitenedGrid::new(spec, mean.clone(), projection.clone(), 2, 3).unwrap();
        let tokens = |a: f32, b: f32| Tensor::new(&[[[0f32, 0.0], [a, b]]], &dev).unwrap();
        let outputs: BTreeMap<usize, Tensor> =
            [(1, tokens(3.0, 4.0)), (2, tokens(5.0, 6.0))].into();
        let out: Vec<f32> = w
            .apply(&outputs)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(out, vec![2.0, 6.0]);
        let err = w.apply(&[(2, tokens(5.0, 6.0))].into()).unwrap_err();
        assert!(err.to_string().contains("block 1"), "{err}");
        // Too shallow an encoder, and a mean sized for one block, are refused.
        assert!(WhitenedGrid::new(spec, mean.clone(), projection.clone(), 2, 2).is_err());
        let one = WhitenedGridSpec::of_layer(2, 1);
        assert!(WhitenedGrid::new(one, mean, projection, 2, 3).is_err());
        // Files written before `first_layer` read one block.
        let old: WhitenedGridSpec = serde_json::from_str(r#"{"layer":1,"grid":4}"#).unwrap();
        assert_eq!(old.layers(), 1..=1);
    }
}
