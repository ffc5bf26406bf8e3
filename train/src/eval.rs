//! Frozen-encoder evaluation: k-NN and linear probes on cls / mean pooling, masked-patch
//! reconstruction against a trivial baseline, and the per-layer white-box picture.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor, D};
use crate_mae::{diagnostics, mae, readout, CrateMae, Keep, Mask, Pooling};
use nalgebra::DMatrix;
use serde::Serialize;

use crate::data::Split;

/// `n × d` features, row-major.
#[derive(Clone)]
pub struct Features {
    pub values: Vec<f32>,
    pub dim: usize,
}

impl Features {
    fn rows(&self) -> usize {
        self.values.len() / self.dim
    }
}

impl Features {
    /// Feature sets of the same rows side by side (row i: each part's row i in order).
    pub fn concat(parts: &[&Features]) -> Features {
        let rows = parts.first().map_or(0, |p| p.rows());
        assert!(
            parts.iter().all(|p| p.rows() == rows),
            "parts of unequal rows"
        );
        let values = (0..rows)
            .flat_map(|r| {
                parts
                    .iter()
                    .flat_map(move |p| &p.values[r * p.dim..(r + 1) * p.dim])
            })
            .copied()
            .collect();
        Features {
            values,
            dim: parts.iter().map(|p| p.dim).sum(),
        }
    }

    /// Rows `range` as their own feature set.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Features {
        Features {
            values: self.values[range.start * self.dim..range.end * self.dim].to_vec(),
            dim: self.dim,
        }
    }
}

/// A named way of reading one vector per image off the frozen encoder.
pub struct Readout {
    /// `{source}.{pooling}`. Sources: `final` (after the encoder's final norm: what `Embed`
    /// serves by default) or `layer{l}` (block `l`'s output: `Embed` with `layer = l`).
    /// Poolings: `cls`, `mean`, and `grid{k}`: the patch tokens averaged over a k×k grid of
    /// regions and concatenated (k²·d values; from `include_patch_tokens`), which keeps the
    /// coarse layout that a global average throws away.
    pub name: String,
    pub features: Features,
}

/// Region grids for the `grid{k}` readouts: those that divide the patch grid, coarser than it.
fn region_grids(patch_grid: usize) -> Vec<usize> {
    [2, 4]
        .into_iter()
        .filter(|&k| k < patch_grid && patch_grid.is_multiple_of(k))
        .collect()
}

/// Every readout of every image, from one encoder pass per batch.
pub fn readouts(model: &CrateMae, split: &Split, device: &Device) -> Result<Vec<Readout>> {
    let cfg = model.config();
    let norm = (cfg.mean[0], cfg.std[0]);
    // Each readout's source: an encoder layer's output, or (None) the final latent.
    let mut sources: Vec<(String, Option<usize>)> = (0..cfg.depth)
        .map(|l| (format!("layer{l}"), Some(l)))
        .collect();
    sources.push(("final".into(), None));
    let keep = Keep {
        outputs: (0..cfg.depth).collect(),
        ..Keep::default()
    };
    let grids = region_grids(cfg.img_size / cfg.patch_size);
    let poolings: Vec<(String, usize)> = [("cls".to_string(), 1), ("mean".to_string(), 1)]
        .into_iter()
        .chain(grids.iter().map(|&k| (format!("grid{k}"), k * k)))
        .collect();
    let mut out: Vec<Readout> = sources
        .iter()
        .flat_map(|(name, _)| {
            poolings.iter().map(move |(pooling, regions)| Readout {
                name: format!("{name}.{pooling}"),
                features: Features {
                    values: Vec::new(),
                    dim: regions * cfg.dim,
                },
            })
        })
        .collect();
    let indices: Vec<usize> = (0..split.len()).collect();
    for chunk in indices.chunks(256) {
        let mut encoded =
            model.encode_keeping(&split.batch(chunk, None, norm, device)?, None, &keep)?;
        for (i, (name, source)) in sources.iter().enumerate() {
            let tokens = match source {
                Some(l) => encoded.outputs.remove(l),
                None => encoded.latent.take(),
            }
            .ok_or_else(|| anyhow::anyhow!("the encoder kept no `{name}`"))?;
            let pooled = [
                mae::pool(&tokens, Pooling::Cls)?,
                mae::pool(&tokens, Pooling::Mean)?,
            ]
            .into_iter()
            .map(Ok)
            .chain(
                grids
                    .iter()
                    .map(|&k| readout::grid_pool(&tokens, k).map_err(anyhow::Error::from)),
            );
            for (j, features) in pooled.enumerate() {
                out[poolings.len() * i + j]
                    .features
                    .values
                    .extend(features?.flatten_all()?.to_vec1::<f32>()?);
            }
        }
    }
    Ok(out)
}

/// Principal components of some feature rows: the mean, and the eigenvectors of the
/// covariance by decreasing eigenvalue (what a whitening keeps the first k of).
pub struct Pca {
    mean: Vec<f32>,
    /// `D × D`, column j the j-th component.
    vectors: DMatrix<f64>,
    values: Vec<f64>,
}

impl Pca {
    /// Fitted on `rows` of `features` (no labels).
    pub fn fit(features: &Features, rows: std::ops::Range<usize>) -> Result<Self> {
        let d = features.dim;
        let part = features.slice(rows);
        let x = Tensor::from_slice(&part.values, (part.rows(), d), &Device::Cpu)?;
        let mean = x.mean(0)?;
        let centred = x.broadcast_sub(&mean)?;
        let cov = (centred.t()?.matmul(&centred)? / part.rows() as f64)?;
        let cov =
            DMatrix::from_row_slice(d, d, &cov.flatten_all()?.to_vec1::<f32>()?).map(|v| v as f64);
        let eigen = cov.symmetric_eigen();
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| eigen.eigenvalues[b].total_cmp(&eigen.eigenvalues[a]));
        Ok(Self {
            mean: mean.to_vec1()?,
            vectors: DMatrix::from_fn(d, d, |i, j| eigen.eigenvectors[(i, order[j])]),
            values: order.iter().map(|&j| eigen.eigenvalues[j]).collect(),
        })
    }

    /// The mean (`[D]`) and the whitening projection (`[D, k]`, row-major): the first k
    /// components, each divided by its standard deviation (floored at 10⁻⁵ of the largest,
    /// so a near-empty direction is not blown up into noise).
    pub fn whitening(&self, k: usize) -> (Vec<f32>, Vec<f32>) {
        let d = self.mean.len();
        let k = k.min(d);
        let floor = self.values[0].max(1e-12) * 1e-5;
        let scale: Vec<f64> = self.values[..k]
            .iter()
            .map(|&v| 1.0 / v.max(floor).sqrt())
            .collect();
        let projection = (0..d)
            .flat_map(|i| (0..k).map(move |j| (i, j)))
            .map(|(i, j)| (self.vectors[(i, j)] * scale[j]) as f32)
            .collect();
        (self.mean.clone(), projection)
    }
}

/// `(features − mean) · projection`, as [`readout::WhitenedGrid`] serves it.
pub fn whiten(features: &Features, mean: &[f32], projection: &[f32]) -> Result<Features> {
    let d = features.dim;
    let k = projection.len() / d;
    let dev = Device::Cpu;
    let x = Tensor::from_slice(&features.values, (features.rows(), d), &dev)?;
    let out = x
        .broadcast_sub(&Tensor::from_slice(mean, d, &dev)?)?
        .matmul(&Tensor::from_slice(projection, (d, k), &dev)?)?;
    Ok(Features {
        values: out.flatten_all()?.to_vec1()?,
        dim: k,
    })
}

/// Normalised pixels as features (the baseline to beat).
pub fn pixel_features(split: &Split, norm: (f32, f32)) -> Features {
    Features {
        values: split
            .pixels
            .iter()
            .map(|&p| (p as f32 / 255.0 - norm.0) / norm.1)
            .collect(),
        dim: 32 * 32,
    }
}

/// Cosine k-NN accuracy for each `k` (majority vote; ties go to the larger summed similarity).
pub fn knn(
    train: &Features,
    train_labels: &[u8],
    test: &Features,
    test_labels: &[u8],
    ks: &[usize],
) -> Result<Vec<f64>> {
    let dev = Device::Cpu;
    let unit = |f: &Features| -> Result<Tensor> {
        let t = Tensor::from_slice(&f.values, (f.rows(), f.dim), &dev)?;
        let n = t
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        Ok(t.broadcast_div(&n)?)
    };
    let (tr, te) = (unit(train)?, unit(test)?);
    let kmax = *ks.iter().max().unwrap_or(&1);
    let mut correct = vec![0usize; ks.len()];
    for start in (0..test.rows()).step_by(512) {
        let len = 512.min(test.rows() - start);
        let sims: Vec<Vec<f32>> = te.narrow(0, start, len)?.matmul(&tr.t()?)?.to_vec2()?;
        for (row, sim) in sims.iter().enumerate() {
            let mut idx: Vec<usize> = (0..sim.len()).collect();
            idx.select_nth_unstable_by(kmax - 1, |&a, &b| sim[b].total_cmp(&sim[a]));
            idx.truncate(kmax);
            idx.sort_by(|&a, &b| sim[b].total_cmp(&sim[a]));
            for (j, &k) in ks.iter().enumerate() {
                let mut votes = [(0usize, 0f32); 10];
                for &i in &idx[..k] {
                    let v = &mut votes[train_labels[i] as usize];
                    v.0 += 1;
                    v.1 += sim[i];
                }
                let best = (0..10)
                    .max_by(|&a, &b| {
                        votes[a]
                            .0
                            .cmp(&votes[b].0)
                            .then(votes[a].1.total_cmp(&votes[b].1))
                    })
                    .unwrap();
                correct[j] += usize::from(best == test_labels[start + row] as usize);
            }
        }
    }
    Ok(correct
        .iter()
        .map(|&c| c as f64 / test.rows() as f64)
        .collect())
}

/// Per-column mean and standard deviation of the rows a probe is fitted on; probes see
/// standardised features with a column of ones for the bias (`[n, d + 1]`).
struct Standardised {
    mean: Vec<f64>,
    sd: Vec<f64>,
}

impl Standardised {
    fn fit(f: &Features, rows: std::ops::Range<usize>) -> Self {
        let d = f.dim;
        let n = rows.len() as f64;
        let (mean, sd) = (0..d)
            .map(|j| {
                let col = || rows.clone().map(|i| f.values[i * d + j] as f64);
                let m = col().sum::<f64>() / n;
                let v = col().map(|x| (x - m).powi(2)).sum::<f64>() / n;
                (m, v.sqrt().max(1e-8))
            })
            .unzip();
        Self { mean, sd }
    }

    /// Row `i`, column `j` of the design: the standardised feature, or 1 for the bias.
    fn value(&self, f: &Features, i: usize, j: usize) -> f64 {
        match self.mean.get(j) {
            Some(m) => (f.values[i * f.dim + j] as f64 - m) / self.sd[j],
            None => 1.0,
        }
    }

    /// Rows `rows` of the design as an f32 tensor (the softmax probe's).
    fn design(&self, f: &Features, rows: std::ops::Range<usize>) -> Result<Tensor> {
        let d1 = f.dim + 1;
        let values: Vec<f32> = rows
            .clone()
            .flat_map(|i| (0..d1).map(move |j| self.value(f, i, j) as f32))
            .collect();
        Ok(Tensor::from_vec(values, (rows.len(), d1), &Device::Cpu)?)
    }
}

/// Ridge-regression linear probe on standardised features (one-hot targets). The penalty is
/// picked on the last `val` training rows, then the probe is refitted on all training rows.
pub fn ridge_probe(
    train: &Features,
    train_labels: &[u8],
    test: &Features,
    test_labels: &[u8],
    val: usize,
) -> (f64, f64) {
    let d = train.dim;
    let standard = Standardised::fit(train, 0..train.rows());
    let design = |f: &Features, rows: std::ops::Range<usize>| {
        DMatrix::from_fn(rows.len(), d + 1, |i, j| {
            standard.value(f, rows.start + i, j)
        })
    };
    let onehot = |labels: &[u8]| {
        DMatrix::from_fn(labels.len(), 10, |i, c| {
            if labels[i] as usize == c {
                1.0
            } else {
                0.0
            }
        })
    };
    // XᵀX and XᵀY once per design; each penalty only changes the diagonal.
    let normal_equations =
        |x: &DMatrix<f64>, y: &DMatrix<f64>| (x.transpose() * x, x.transpose() * y);
    let fit = |(gram, xty): &(DMatrix<f64>, DMatrix<f64>), alpha: f64| {
        let mut gram = gram.clone();
        for i in 0..d {
            gram[(i, i)] += alpha;
        }
        gram.cholesky().map(|c| c.solve(xty))
    };
    let accuracy = |x: &DMatrix<f64>, w: &DMatrix<f64>, labels: &[u8]| {
        let scores = x * w;
        let hits = (0..labels.len())
            .filter(|&i| scores.row(i).transpose().argmax().0 == labels[i] as usize)
            .count();
        hits as f64 / labels.len() as f64
    };
    let n = train.rows();
    let split = n - val.min(n / 2);
    let fit_part = normal_equations(&design(train, 0..split), &onehot(&train_labels[..split]));
    let (xv, yv) = (design(train, split..n), &train_labels[split..]);
    let mut best = (f64::NEG_INFINITY, 1.0);
    for alpha in [1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4] {
        if let Some(w) = fit(&fit_part, alpha) {
            let acc = accuracy(&xv, &w, yv);
            if acc > best.0 {
                best = (acc, alpha);
            }
        }
    }
    let all = normal_equations(&design(train, 0..n), &onehot(train_labels));
    let w = fit(&all, best.1).expect("ridge system is positive definite");
    (
        accuracy(&design(test, 0..test.rows()), &w, test_labels),
        best.1,
    )
}

/// L2 penalties the softmax probe tries, strongest first (each fit starts from the last).
const SOFTMAX_PENALTIES: [f64; 8] = [1e-1, 3e-2, 1e-2, 5e-3, 3e-3, 1e-3, 3e-4, 1e-4];

/// Mean cross-entropy of a linear classifier plus `penalty / 2 · ‖W‖²` (the bias row is not
/// penalised), with its gradient; parameters are `W` `[d + 1, 10]` row-major, as L-BFGS
/// sees them. The last evaluation is cached: the line search asks for the cost and the
/// gradient at the same point.
struct SoftmaxLoss<'a> {
    x: &'a Tensor,
    onehot: Tensor,
    /// 1 on weight rows, 0 on the bias row.
    penalised: Tensor,
    penalty: f64,
    last: std::sync::Mutex<Option<Evaluation>>,
}

/// The loss and its gradient at one point.
struct Evaluation {
    params: Vec<f64>,
    cost: f64,
    grad: Vec<f64>,
}

impl<'a> SoftmaxLoss<'a> {
    fn new(x: &'a Tensor, labels: &[u8], penalty: f64) -> Result<Self> {
        let (n, d1) = x.dims2()?;
        let onehot: Vec<f32> = labels
            .iter()
            .flat_map(|&l| (0..10).map(move |c| f32::from(c == l as usize)))
            .collect();
        let penalised: Vec<f32> = (0..d1).flat_map(|r| [f32::from(r + 1 < d1); 10]).collect();
        Ok(Self {
            x,
            onehot: Tensor::from_vec(onehot, (n, 10), &Device::Cpu)?,
            penalised: Tensor::from_vec(penalised, (d1, 10), &Device::Cpu)?,
            penalty,
            last: Default::default(),
        })
    }

    fn evaluate(&self, params: &[f64]) -> Result<(f64, Vec<f64>)> {
        let mut last = self.last.lock().expect("probe cache");
        if let Some(e) = last.as_ref().filter(|e| e.params == params) {
            return Ok((e.cost, e.grad.clone()));
        }
        let n = self.x.dim(0)? as f64;
        let w = softmax_weights(params)?;
        let logits = self.x.matmul(&w)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let shifted = logits.broadcast_sub(&max)?;
        let exp = shifted.exp()?;
        let sum = exp.sum_keepdim(D::Minus1)?;
        // −log softmax at the label, summed: Σ log Σ exp − Σ shifted·onehot.
        let nll = (sum.log()?.sum_all()?.to_scalar::<f32>()? as f64)
            - (shifted * &self.onehot)?.sum_all()?.to_scalar::<f32>()? as f64;
        let wp = (&w * &self.penalised)?;
        let norm = wp.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        let cost = nll / n + 0.5 * self.penalty * norm;
        let residual = ((exp.broadcast_div(&sum)? - &self.onehot)? / n)?;
        // (rᵀ x)ᵀ rather than xᵀ r: only the small residual is transposed.
        let grad = (residual.t()?.contiguous()?.matmul(self.x)?.t()? + (wp * self.penalty)?)?;
        let grad: Vec<f64> = grad
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        *last = Some(Evaluation {
            params: params.to_vec(),
            cost,
            grad: grad.clone(),
        });
        Ok((cost, grad))
    }

    /// L-BFGS from `start` to convergence (or 300 iterations).
    fn minimise(self, start: Vec<f64>) -> Result<Vec<f64>> {
        use argmin::core::{Executor, State};
        use argmin::solver::linesearch::{condition::ArmijoCondition, BacktrackingLineSearch};
        use argmin::solver::quasinewton::LBFGS;
        // L-BFGS's step is nearly always accepted at once: Armijo backtracking costs about
        // one evaluation per iteration where a More-Thuente search costs three.
        let linesearch = BacktrackingLineSearch::new(ArmijoCondition::new(1e-4)?).rho(0.5)?;
        let solver = LBFGS::new(linesearch, 10)
            .with_tolerance_grad(1e-6)?
            .with_tolerance_cost(1e-10)?;
        let result = Executor::new(self, solver)
            .configure(|s| s.param(start).max_iters(300))
            .run()?;
        result
            .state()
            .get_best_param()
            .cloned()
            .context("L-BFGS kept no parameters")
    }
}

impl argmin::core::CostFunction for SoftmaxLoss<'_> {
    type Param = Vec<f64>;
    type Output = f64;
    fn cost(&self, p: &Vec<f64>) -> std::result::Result<f64, argmin::core::Error> {
        Ok(self.evaluate(p)?.0)
    }
}

impl argmin::core::Gradient for SoftmaxLoss<'_> {
    type Param = Vec<f64>;
    type Gradient = Vec<f64>;
    fn gradient(&self, p: &Vec<f64>) -> std::result::Result<Vec<f64>, argmin::core::Error> {
        Ok(self.evaluate(p)?.1)
    }
}

/// The probe's parameters as `W` `[d + 1, 10]`.
fn softmax_weights(params: &[f64]) -> Result<Tensor> {
    let w: Vec<f32> = params.iter().map(|&v| v as f32).collect();
    Ok(Tensor::from_vec(w, (params.len() / 10, 10), &Device::Cpu)?)
}

fn softmax_accuracy(x: &Tensor, labels: &[u8], params: &[f64]) -> Result<f64> {
    let predicted: Vec<u32> = x
        .matmul(&softmax_weights(params)?)?
        .argmax(D::Minus1)?
        .to_vec1()?;
    let hits = predicted
        .iter()
        .zip(labels)
        .filter(|(p, l)| **p == **l as u32)
        .count();
    Ok(hits as f64 / labels.len() as f64)
}

/// The softmax probe's penalty search: fitted on `fit` rows of `train`, scored on the rows
/// after them. Returns the best held-out accuracy and its penalty.
pub fn softmax_validation(train: &Features, labels: &[u8], fit: usize) -> Result<(f64, f64)> {
    let n = train.rows();
    let standard = Standardised::fit(train, 0..fit);
    let (x, xv) = (
        standard.design(train, 0..fit)?,
        standard.design(train, fit..n)?,
    );
    let mut params = vec![0.0; (train.dim + 1) * 10];
    let mut best = (f64::NEG_INFINITY, SOFTMAX_PENALTIES[0]);
    let mut worse = 0;
    for penalty in SOFTMAX_PENALTIES {
        params = SoftmaxLoss::new(&x, &labels[..fit], penalty)?.minimise(params)?;
        let acc = softmax_accuracy(&xv, &labels[fit..], &params)?;
        if acc > best.0 {
            (best, worse) = ((acc, penalty), 0);
        } else {
            // Past the best penalty, weaker ones only overfit more (and take longer).
            worse += 1;
            if worse == 2 {
                break;
            }
        }
    }
    if best.1 == SOFTMAX_PENALTIES[0] {
        // The optimum may lie beyond the grid: say so rather than report it as found.
        eprintln!(
            "warning: the strongest L2 penalty tried ({}) did best on validation",
            best.1
        );
    }
    Ok(best)
}

/// Linear probe as MAE and DINO report it: a linear classifier trained with cross-entropy
/// (multinomial logistic regression) on standardised features, fitted to convergence by
/// L-BFGS. The L2 penalty is picked on the last `val` training rows, then the probe is
/// refitted on all training rows and scored on `test`.
pub fn softmax_probe(
    train: &Features,
    train_labels: &[u8],
    test: &Features,
    test_labels: &[u8],
    val: usize,
) -> Result<(f64, f64)> {
    let n = train.rows();
    let (_, penalty) = softmax_validation(train, train_labels, n - val.min(n / 2))?;
    let standard = Standardised::fit(train, 0..n);
    let x = standard.design(train, 0..n)?;
    let params =
        SoftmaxLoss::new(&x, train_labels, penalty)?.minimise(vec![0.0; (train.dim + 1) * 10])?;
    let accuracy = softmax_accuracy(
        &standard.design(test, 0..test.rows())?,
        test_labels,
        &params,
    )?;
    Ok((accuracy, penalty))
}

#[derive(Debug, Clone, Serialize)]
pub struct Reconstruction {
    pub mask_ratio: f32,
    /// Masked-patch MSE in normalised pixel space (the MAE loss), model vs mean-colour fill.
    pub model_mse: f64,
    pub mean_fill_mse: f64,
}

/// Masked-patch MSE of the model and of filling each masked patch with the image's mean
/// visible value.
pub fn reconstruction(
    model: &CrateMae,
    split: &Split,
    ratio: f32,
    device: &Device,
) -> Result<Reconstruction> {
    let cfg = model.config();
    let norm = (cfg.mean[0], cfg.std[0]);
    let (mut model_sum, mut fill_sum, mut n) = (0.0, 0.0, 0usize);
    let indices: Vec<usize> = (0..split.len()).collect();
    for (b, chunk) in indices.chunks(256).enumerate() {
        let x = split.batch(chunk, None, norm, device)?;
        let mask = Mask::random(chunk.len(), cfg.num_patches(), ratio, 7_000 + b as u64)?;
        let m = mask.to_tensor(device)?;
        let out = model.complete(&x, &mask)?;
        let target = model.patchify(&x)?;
        model_sum += mae::masked_mse(&out.pred, &target, &m)?.to_scalar::<f32>()? as f64
            * chunk.len() as f64;
        // Mean of the visible pixels per image, broadcast over every masked patch.
        let keep = (1.0 - &m)?.unsqueeze(D::Minus1)?; // [B, L, 1]
        let visible_mean = target
            .broadcast_mul(&keep)?
            .sum((1, 2))?
            .broadcast_div(&(keep.sum((1, 2))? * target.dim(2)? as f64)?)?;
        let fill = visible_mean
            .reshape((chunk.len(), 1, 1))?
            .broadcast_as(target.shape())?
            .contiguous()?;
        fill_sum +=
            mae::masked_mse(&fill, &target, &m)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        n += chunk.len();
    }
    Ok(Reconstruction {
        mask_ratio: ratio,
        model_mse: model_sum / n as f64,
        mean_fill_mse: fill_sum / n as f64,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerPicture {
    pub layer: usize,
    pub coding_rate: f64,
    pub expansion_rate: f64,
    pub rate_reduction: f64,
    pub sparsity: f64,
}

/// Per-layer coding rate, expansion, ΔR and sparsity averaged over the first `n` images.
pub fn white_box(
    model: &CrateMae,
    split: &Split,
    n: usize,
    device: &Device,
) -> Result<Vec<LayerPicture>> {
    let cfg = model.config();
    let norm = (cfg.mean[0], cfg.std[0]);
    let indices: Vec<usize> = (0..n.min(split.len())).collect();
    let mut acc: Vec<LayerPicture> = Vec::new();
    let mut batches = 0.0;
    for chunk in indices.chunks(128) {
        let keep = Keep {
            diagnostics: true,
            ..Keep::default()
        };
        let encoded =
            model.encode_keeping(&split.batch(chunk, None, norm, device)?, None, &keep)?;
        for l in encoded.diagnostics.unwrap_or_default() {
            let mean = |v: &[f64]| diagnostics::mean_std(v).0;
            let p = LayerPicture {
                layer: l.layer,
                coding_rate: mean(&l.coding_rate),
                expansion_rate: mean(&l.expansion_rate),
                rate_reduction: mean(&l.rate_reduction()),
                sparsity: mean(&l.sparsity),
            };
            match acc.get_mut(l.layer) {
                Some(a) => {
                    a.coding_rate += p.coding_rate;
                    a.expansion_rate += p.expansion_rate;
                    a.rate_reduction += p.rate_reduction;
                    a.sparsity += p.sparsity;
                }
                None => acc.push(p),
            }
        }
        batches += 1.0;
    }
    for a in &mut acc {
        a.coding_rate /= batches;
        a.expansion_rate /= batches;
        a.rate_reduction /= batches;
        a.sparsity /= batches;
    }
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whitened features have zero mean and identity covariance on the rows they were fitted
    /// on, whatever the scale and correlation of the input; keeping k < D keeps the k
    /// directions of largest variance.
    #[test]
    fn whitening_decorrelates_and_scales_to_unit_variance() {
        let (n, d) = (400, 6);
        // Correlated columns with very different scales.
        let values: Vec<f32> = (0..n)
            .flat_map(|i| {
                let a = ((i * 7919 % 101) as f32 / 50.0) - 1.0;
                let b = ((i * 104729 % 97) as f32 / 48.0) - 1.0;
                let c = ((i * 1299709 % 89) as f32 / 44.0) - 1.0;
                [100.0 * a, a + b, 0.1 * c, 3.0 + b, a - c, 0.5 * b + 2.0 * c]
            })
            .collect();
        let features = Features { values, dim: d };
        let pca = Pca::fit(&features, 0..n).unwrap();
        let (mean, projection) = pca.whitening(3);
        let w = whiten(&features, &mean, &projection).unwrap();
        assert_eq!(w.dim, 3);
        for a in 0..3 {
            let mu = (0..n).map(|i| w.values[i * 3 + a] as f64).sum::<f64>() / n as f64;
            assert!(mu.abs() < 1e-3, "component {a} has mean {mu}");
            for b in 0..3 {
                let cov = (0..n)
                    .map(|i| w.values[i * 3 + a] as f64 * w.values[i * 3 + b] as f64)
                    .sum::<f64>()
                    / n as f64;
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((cov - want).abs() < 1e-3, "cov[{a}][{b}] = {cov}");
            }
        }
        // The first component is the 100×-scaled column's direction.
        assert!(projection[0].abs() > projection[3].abs());
    }

    /// Ten well-separated clusters: every probe must be perfect; with shuffled labels, near
    /// chance.
    fn clusters(n_per: usize, dim: usize, seed: u32) -> (Features, Vec<u8>) {
        let mut values = Vec::new();
        let mut labels = Vec::new();
        for c in 0..10u8 {
            for i in 0..n_per {
                for j in 0..dim {
                    let centre = if j % 10 == c as usize { 5.0 } else { 0.0 };
                    let jitter = (((i * 31 + j * 17) as u32)
                        .wrapping_mul(2654435761)
                        .wrapping_add(seed)
                        >> 20) as f32
                        / 4096.0
                        - 0.5;
                    values.push(centre + jitter);
                }
                labels.push(c);
            }
        }
        (Features { values, dim }, labels)
    }

    #[test]
    fn readouts_are_what_embed_serves_for_each_layer_and_pooling() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut test = Split::load(&fixtures, "t10k").unwrap();
        test.truncate(3);
        let cfg = crate_mae::CrateMaeConfig {
            img_size: 32,
            patch_size: 4,
            dim: 16,
            depth: 2,
            heads: 2,
            decoder_depth: 1,
            decoder_num_heads: 2,
            ..crate_mae::CrateMaeConfig::tiny()
        };
        let dev = Device::Cpu;
        let weights = crate_mae::init::random_weights(&cfg, 5, &dev).unwrap();
        let model = crate_mae::checkpoint::model_from_tensors(weights, &cfg, &dev).unwrap();
        let all = readouts(&model, &test, &dev).unwrap();
        let names: Vec<&str> = all.iter().map(|r| r.name.as_str()).collect();
        let expected: Vec<String> = ["layer0", "layer1", "final"]
            .iter()
            .flat_map(|s| ["cls", "mean", "grid2", "grid4"].map(|p| format!("{s}.{p}")))
            .collect();
        assert_eq!(names, expected);
        let x = test
            .batch(&[0, 1, 2], None, (cfg.mean[0], cfg.std[0]), &dev)
            .unwrap();
        let expect = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let served = [
            (
                "layer0.mean",
                mae::pool(&model.layer_tokens(&x, 0).unwrap(), Pooling::Mean),
            ),
            (
                "layer1.cls",
                mae::pool(&model.layer_tokens(&x, 1).unwrap(), Pooling::Cls),
            ),
            ("final.cls", model.embed(&x, Pooling::Cls)),
            ("final.mean", model.embed(&x, Pooling::Mean)),
        ];
        for (name, tensor) in served {
            let got = &all.iter().find(|r| r.name == name).unwrap().features;
            assert_eq!((got.rows(), got.dim), (3, 16), "{name}");
            let want = expect(tensor.unwrap());
            let diff = got
                .values
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-5,
                "{name}: differs from the served embedding by {diff}"
            );
        }
        // grid2 of image 0, region (row 1, column 0), channel 3: the mean of patch tokens in
        // patch rows 4..8 and patch columns 0..4 of the 8×8 grid.
        let tokens: Vec<Vec<Vec<f32>>> = model.embed_tokens(&x).unwrap().to_vec3().unwrap();
        let region: f32 = (4..8)
            .flat_map(|r| (0..4).map(move |c| (r, c)))
            .map(|(r, c)| tokens[0][1 + r * 8 + c][3])
            .sum::<f32>()
            / 16.0;
        let grid2 = &all
            .iter()
            .find(|r| r.name == "final.grid2")
            .unwrap()
            .features;
        assert_eq!(grid2.dim, 4 * 16);
        assert!((grid2.values[2 * 16 + 3] - region).abs() < 1e-5);
    }

    #[test]
    fn probes_separate_clusters_and_not_noise() {
        let (train, train_labels) = clusters(30, 20, 1);
        let (test, test_labels) = clusters(10, 20, 2);
        let knn_acc = knn(&train, &train_labels, &test, &test_labels, &[5, 1]).unwrap();
        assert_eq!(knn_acc, vec![1.0, 1.0]);
        let (linear, _) = ridge_probe(&train, &train_labels, &test, &test_labels, 50);
        assert_eq!(linear, 1.0);
        let shuffled: Vec<u8> = (0..train_labels.len())
            .map(|i| ((i * 7) % 10) as u8)
            .collect();
        let (chance, _) = ridge_probe(&train, &shuffled, &test, &test_labels, 50);
        assert!(chance < 0.4, "shuffled labels still scored {chance}");
        let (linear, _) = softmax_probe(&train, &train_labels, &test, &test_labels, 50).unwrap();
        assert_eq!(linear, 1.0);
        let (chance, _) = softmax_probe(&train, &shuffled, &test, &test_labels, 50).unwrap();
        assert!(chance < 0.4, "shuffled labels still scored {chance}");
    }

    /// The softmax probe's gradient is the loss's (finite differences agree), and L-BFGS
    /// stops at the penalised optimum: the gradient vanishes there and no nearby point is
    /// lower.
    #[test]
    fn softmax_probe_minimises_its_penalised_cross_entropy() {
        let (train, labels) = clusters(12, 8, 5);
        // Labels that the clusters only partly explain, so the optimum is interior.
        let labels: Vec<u8> = labels
            .iter()
            .enumerate()
            .map(|(i, &l)| if i % 5 == 0 { (l + 3) % 10 } else { l })
            .collect();
        let x = Standardised::fit(&train, 0..train.rows())
            .design(&train, 0..train.rows())
            .unwrap();
        let loss = || SoftmaxLoss::new(&x, &labels, 1e-2).unwrap();
        let n = (train.dim + 1) * 10;
        let point: Vec<f64> = (0..n)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) / 20.0)
            .collect();
        let (_, grad) = loss().evaluate(&point).unwrap();
        for i in [0, 7, 23, n - 1] {
            let h = 1e-2;
            let mut up = point.clone();
            up[i] += h;
            let mut down = point.clone();
            down[i] -= h;
            let numeric =
                (loss().evaluate(&up).unwrap().0 - loss().evaluate(&down).unwrap().0) / (2.0 * h);
            assert!(
                (numeric - grad[i]).abs() < 1e-3,
                "coordinate {i}: gradient {} but finite differences {numeric}",
                grad[i]
            );
        }
        let optimum = loss().minimise(vec![0.0; n]).unwrap();
        let (cost, grad) = loss().evaluate(&optimum).unwrap();
        let largest = grad.iter().fold(0f64, |m, g| m.max(g.abs()));
        assert!(largest < 1e-3, "gradient {largest} at the optimum");
        for (seed, step) in [(1, 0.05), (2, -0.05), (3, 0.01)] {
            let nearby: Vec<f64> = optimum
                .iter()
                .enumerate()
                .map(|(i, &p)| p + step * (((i * seed * 7919) % 13) as f64 / 6.0 - 1.0))
                .collect();
            let (near, _) = loss().evaluate(&nearby).unwrap();
            assert!(near > cost, "a nearby point is lower: {near} < {cost}");
        }
    }
}
