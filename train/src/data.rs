//! Fashion-MNIST from its IDX files (gzip; 16-byte image header, 8-byte label header), as
//! the model sees it: 28×28 grey padded with zeros to 32×32 (patch 4 → an 8×8 grid; 28 has
//! no useful patch size) and replicated to 3 channels, because the official architecture is
//! RGB and the server's preprocessing produces RGB from any picture.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use rand::Rng;

pub const SIDE: usize = 32;
const RAW: usize = 28;
const PAD: usize = (SIDE - RAW) / 2;

/// Where `apt-get install dataset-fashion-mnist` puts the files.
pub const DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Fashion-MNIST's labels, in label order.
pub const CLASSES: [&str; 10] = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
];

pub struct Split {
    /// `n × 32 × 32` grey pixels in [0, 255], zero padded.
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Loads `{prefix}-images-idx3-ubyte.gz` and `{prefix}-labels-idx1-ubyte.gz`.
    pub fn load(dir: &Path, prefix: &str) -> Result<Self> {
        let images = read_gz(&dir.join(format!("{prefix}-images-idx3-ubyte.gz")))?;
        let labels = read_gz(&dir.join(format!("{prefix}-labels-idx1-ubyte.gz")))?;
        let header = |bytes: &[u8], i: usize| {
            u32::from_be_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()) as usize
        };
        ensure!(
            images.len() >= 16 && header(&images, 0) == 0x0803,
            "{prefix}: not an IDX image file"
        );
        ensure!(
            labels.len() >= 8 && header(&labels, 0) == 0x0801,
            "{prefix}: not an IDX label file"
        );
        let (n, rows, cols) = (header(&images, 1), header(&images, 2), header(&images, 3));
        ensure!(
            (rows, cols) == (RAW, RAW),
            "{prefix}: images are {rows}×{cols}, expected 28×28"
        );
        ensure!(
            header(&labels, 1) == n,
            "{prefix}: {n} images but {} labels",
            header(&labels, 1)
        );
        ensure!(
            images.len() == 16 + n * RAW * RAW && labels.len() == 8 + n,
            "{prefix}: truncated file"
        );
        let mut pixels = vec![0u8; n * SIDE * SIDE];
        for (i, img) in images[16..].chunks_exact(RAW * RAW).enumerate() {
            for r in 0..RAW {
                let dst = i * SIDE * SIDE + (r + PAD) * SIDE + PAD;
                pixels[dst..dst + RAW].copy_from_slice(&img[r * RAW..(r + 1) * RAW]);
            }
        }
        let labels = labels[8..].to_vec();
        if let Some(bad) = labels.iter().find(|&&l| l >= 10) {
            bail!("{prefix}: label {bad} out of range");
        }
        Ok(Self { pixels, labels })
    }

    /// The first `n` images (for smoke runs).
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        self.labels.truncate(n);
        self.pixels.truncate(n * SIDE * SIDE);
    }

    /// Splits off the last `n` images (a validation set carved from train).
    pub fn split_off(&mut self, n: usize) -> Split {
        let at = self.len() - n.min(self.len());
        Split {
            pixels: self.pixels.split_off(at * SIDE * SIDE),
            labels: self.labels.split_off(at),
        }
    }

    /// Mean and standard deviation of the (padded) pixels in [0, 1]: the normalisation the
    /// model is trained with and the server applies.
    pub fn stats(&self) -> (f32, f32) {
        let n = self.pixels.len() as f64;
        let mean = self.pixels.iter().map(|&p| p as f64 / 255.0).sum::<f64>() / n;
        let var = self
            .pixels
            .iter()
            .map(|&p| (p as f64 / 255.0 - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean as f32, var.sqrt() as f32)
    }

    /// Images `indices` as a normalised `[B, 3, 32, 32]` tensor; `flip[i]` mirrors image i.
    pub fn batch(
        &self,
        indices: &[usize],
        flip: Option<&[bool]>,
        norm: (f32, f32),
        device: &Device,
    ) -> Result<Tensor> {
        let plane = SIDE * SIDE;
        let mut out = Vec::with_capacity(indices.len() * 3 * plane);
        for (k, &i) in indices.iter().enumerate() {
            let img = &self.pixels[i * plane..(i + 1) * plane];
            let mirrored = flip.is_some_and(|f| f[k]);
            let one: Vec<f32> = (0..plane)
                .map(|p| {
                    let (r, c) = (p / SIDE, p % SIDE);
                    let c = if mirrored { SIDE - 1 - c } else { c };
                    (img[r * SIDE + c] as f32 / 255.0 - norm.0) / norm.1
                })
                .collect();
            for _ in 0..3 {
                out.extend_from_slice(&one);
            }
        }
        Ok(Tensor::from_vec(
            out,
            (indices.len(), 3, SIDE, SIDE),
            device,
        )?)
    }

    /// Image `i` as a 32×32 grey picture, exactly as the model sees it (padded).
    pub fn image(&self, i: usize) -> image::GrayImage {
        let plane = SIDE * SIDE;
        image::GrayImage::from_raw(
            SIDE as u32,
            SIDE as u32,
            self.pixels[i * plane..(i + 1) * plane].to_vec(),
        )
        .expect("a plane holds SIDE × SIDE pixels")
    }

    /// Random horizontal flips for a batch.
    pub fn flips(n: usize, rng: &mut impl Rng) -> Vec<bool> {
        (0..n).map(|_| rng.random::<bool>()).collect()
    }
}

fn read_gz(path: &PathBuf) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| {
        format!(
            "{} (install the data with `apt-get install dataset-fashion-mnist`)",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut out)
        .with_context(|| format!("decompressing {}", path.display()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    #[test]
    fn reads_the_fixture_subset_padded_to_32() {
        let train = Split::load(&fixtures(), "train").unwrap();
        assert_eq!(train.len(), 512);
        assert_eq!(train.pixels.len(), 512 * 32 * 32);
        // Padding rows and columns are zero; the image itself is not.
        let first = &train.pixels[..32 * 32];
        assert!(first[..2 * 32].iter().all(|&p| p == 0));
        assert!(first.iter().any(|&p| p > 0));
        // The first Fashion-MNIST training label is 9 (ankle boot).
        assert_eq!(train.labels[0], 9);
        let (mean, std) = train.stats();
        assert!(mean > 0.1 && mean < 0.5 && std > 0.1, "{mean} {std}");
    }

    #[test]
    fn image_is_the_padded_plane() {
        let test = Split::load(&fixtures(), "t10k").unwrap();
        let img = test.image(3);
        assert_eq!(img.dimensions(), (32, 32));
        assert_eq!(img.as_raw().as_slice(), &test.pixels[3 * 1024..4 * 1024]);
    }

    #[test]
    fn batches_are_normalised_rgb_and_flip_mirrors() {
        let train = Split::load(&fixtures(), "train").unwrap();
        let norm = train.stats();
        let b = train
            .batch(&[0, 1], Some(&[false, true]), norm, &Device::Cpu)
            .unwrap();
        assert_eq!(b.dims(), &[2, 3, 32, 32]);
        let v: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let plane = 32 * 32;
        assert_eq!(&v[..plane], &v[plane..2 * plane], "channels are replicated");
        let plain = train
            .batch(&[1], None, norm, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let flipped = &v[3 * plane..4 * plane];
        assert_eq!(flipped[5 * 32 + 3], plain[5 * 32 + 28]);
    }
}
