//! Which patches the encoder sees.
//!
//! The official `random_masking`: `ids_shuffle = argsort(noise)` ascending, the first
//! `len_keep = int(L·(1 − ratio))` stay visible, the rest are masked (`mask = 1`). A mask can
//! be built from that noise, from a ratio and a seed (noise drawn from a seeded ChaCha stream,
//! so the same seed gives the same mask on every device and platform), or from an explicit
//! list of masked patches.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{ModelError, Result};

/// One mask per image. `masked[b][l]` is true when patch `l` of image `b` is hidden.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    masked: Vec<Vec<bool>>,
}

impl Mask {
    /// `int(L·(1 − ratio))` as Python computes it: the f32 ratio is read as its shortest
    /// decimal (0.6f32 → 0.6), so the count matches a caller who wrote the same literal.
    pub fn len_keep(num_patches: usize, ratio: f32) -> usize {
        let ratio: f64 = ratio.to_string().parse().unwrap_or(ratio as f64);
        (num_patches as f64 * (1.0 - ratio)) as usize
    }

    pub fn check_ratio(ratio: f32) -> Result<()> {
        if ratio.is_finite() && (0.0..1.0).contains(&ratio) {
            Ok(())
        } else {
            Err(ModelError::input(format!(
                "mask ratio must be in [0, 1), got {ratio}"
            )))
        }
    }

    /// From official-style noise, one row of `L` values per image.
    pub fn from_noise(noise: &[Vec<f32>], ratio: f32) -> Result<Self> {
        Self::check_ratio(ratio)?;
        let masked = noise
            .iter()
            .map(|row| {
                if row.iter().any(|v| v.is_nan()) {
                    return Err(ModelError::input("mask noise contains NaN"));
                }
                let keep = Self::len_keep(row.len(), ratio);
                let mut order: Vec<usize> = (0..row.len()).collect();
                // Stable ascending sort: ties (never in real noise) keep the lower index.
                order.sort_by(|&a, &b| row[a].total_cmp(&row[b]));
                let mut masked = vec![true; row.len()];
                for &l in &order[..keep] {
                    masked[l] = false;
                }
                Ok(masked)
            })
            .collect::<Result<_>>()?;
        Ok(Self { masked })
    }

    /// Uniform `[0, 1)` noise for `batch` images from one seed. Independent requests batched
    /// together each build their own mask and are joined with [`Mask::stack`], so a request's
    /// mask never depends on its neighbours.
    pub fn seeded_noise(batch: usize, num_patches: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..batch)
            .map(|_| (0..num_patches).map(|_| rng.random::<f32>()).collect())
            .collect()
    }

    /// Random masking at `ratio` with reproducible noise from `seed`.
    pub fn random(batch: usize, num_patches: usize, ratio: f32, seed: u64) -> Result<Self> {
        Self::from_noise(&Self::seeded_noise(batch, num_patches, seed), ratio)
    }

    /// Masks exactly the listed patches of each image.
    pub fn from_indices(masked_indices: &[Vec<usize>], num_patches: usize) -> Result<Self> {
        let masked = masked_indices
            .iter()
            .map(|indices| {
                let mut masked = vec![false; num_patches];
                for &l in indices {
                    if l >= num_patches {
                        return Err(ModelError::input(format!(
                            "masked patch index {l} is out of range (the model has {num_patches} patches)"
                        )));
                    }
                    if masked[l] {
                        return Err(ModelError::input(format!(
                            "masked patch index {l} is listed twice"
                        )));
                    }
                    masked[l] = true;
                }
                Ok(masked)
            })
            .collect::<Result<_>>()?;
        Ok(Self { masked })
    }

    /// No patch hidden.
    pub fn none(batch: usize, num_patches: usize) -> Self {
        Self {
            masked: vec![vec![false; num_patches]; batch],
        }
    }

    /// Concatenates per-request masks into one batch mask.
    pub fn stack<'a>(masks: impl IntoIterator<Item = &'a Mask>) -> Self {
        Self {
            masked: masks
                .into_iter()
                .flat_map(|m| m.masked.iter().cloned())
                .collect(),
        }
    }

    pub fn batch_size(&self) -> usize {
        self.masked.len()
    }

    pub fn num_patches(&self) -> usize {
        self.masked.first().map_or(0, Vec::len)
    }

    pub fn rows(&self) -> &[Vec<bool>] {
        &self.masked
    }

    pub fn masked_count(&self, image: usize) -> usize {
        self.masked[image].iter().filter(|m| **m).count()
    }

    /// `[B, L]` float tensor, 1 = masked (the official `mask`).
    pub fn to_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        let flat: Vec<f32> = self
            .masked
            .iter()
            .flat_map(|row| row.iter().map(|&m| if m { 1.0 } else { 0.0 }))
            .collect();
        Tensor::from_vec(flat, (self.batch_size(), self.num_patches()), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn len_keep_matches_python_int_truncation() {
        assert_eq!(Mask::len_keep(196, 0.75), 49);
        assert_eq!(Mask::len_keep(16, 0.75), 4);
        // Python: int(196 * (1 - 0.6)) = int(78.4) = 78; a naive f32→f64 cast gives 78 too,
        // but int(10 * (1 - 0.7)) = int(3.0000000000000004) = 3 needs the decimal reading.
        assert_eq!(Mask::len_keep(10, 0.7), 3);
        assert_eq!(Mask::len_keep(196, 0.0), 196);
    }

    #[test]
    fn noise_mask_keeps_the_smallest_noise() {
        let m = Mask::from_noise(&[vec![0.9, 0.1, 0.5, 0.3]], 0.5).unwrap();
        assert_eq!(m.rows()[0], vec![true, false, true, false]);
    }

    #[test]
    fn seeded_masks_are_reproducible_and_seed_dependent() {
        let a = Mask::random(2, 196, 0.75, 42).unwrap();
        let b = Mask::random(2, 196, 0.75, 42).unwrap();
        let c = Mask::random(2, 196, 0.75, 43).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.masked_count(0), 196 - 49);
    }

    #[test]
    fn bad_indices_and_ratios_are_rejected() {
        assert!(Mask::from_indices(&[vec![0, 16]], 16).is_err());
        assert!(Mask::from_indices(&[vec![3, 3]], 16).is_err());
        for r in [-0.1, 1.0, f32::NAN, f32::INFINITY] {
            assert!(Mask::check_ratio(r).is_err(), "{r}");
        }
    }
}
