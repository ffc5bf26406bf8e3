//! Pixels in and out: decode PNG/JPEG within limits, convert to RGB, resize the shorter side
//! and centre-crop to the model's size, normalise; and the reverse for PNG responses.
//!
//! Runs on the blocking pool, never on the model thread.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, ImageFormat, ImageReader, RgbImage};

use crate::error::ServeError;
pub use crate_mae::checkpoint::SmallImageFit;

/// What the model expects.
#[derive(Debug, Clone)]
pub struct Preprocessing {
    pub image_size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub max_pixels: u64,
    /// How an image smaller than `S × S` is fitted: padded (centred on black) or resized,
    /// as the model declares.
    pub small_image_fit: SmallImageFit,
}

/// Largest magnitude accepted in a raw tensor.
const RAW_LIMIT: f32 = 1000.0;

/// A preprocessed image: `[3, S, S]` normalised, row-major.
pub type Pixels = Vec<f32>;

/// A preprocessed image shared between a request and its queued work (the completion's
/// masked view reads it after the model ran), never copied.
pub type SharedPixels = std::sync::Arc<Pixels>;

impl Preprocessing {
    /// Decodes and preprocesses one encoded image.
    pub fn encoded(&self, bytes: &[u8]) -> Result<Pixels, ServeError> {
        Ok(self.normalise(&self.decode_square(bytes)?))
    }

    /// Decodes to RGB and resizes/crops to `S × S` (no normalisation): also what clients see
    /// as "the original" in completion pictures.
    pub fn decode_square(&self, bytes: &[u8]) -> Result<RgbImage, ServeError> {
        let (format, w, h) = self.header(bytes)?;
        let pixels = u64::from(w) * u64::from(h);
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(w);
        limits.max_image_height = Some(h);
        // RGBA16 worst case plus decoder scratch.
        limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(64 << 20));
        reader.limits(limits);
        let decoded = reader
            .decode()
            .map_err(|e| ServeError::invalid(format!("cannot decode the {format:?} image: {e}")))?;
        Ok(self.square(decoded))
    }

    /// Format and size from the header alone (cheap), with the size limits applied.
    pub fn header(&self, bytes: &[u8]) -> Result<(ImageFormat, u32, u32), ServeError> {
        if bytes.is_empty() {
            return Err(ServeError::invalid("image is empty (0 bytes)"));
        }
        let format = image::guess_format(bytes).map_err(|_| {
            ServeError::invalid("image is not a PNG or JPEG file (unrecognised header)")
        })?;
        if !matches!(format, ImageFormat::Png | ImageFormat::Jpeg) {
            return Err(ServeError::invalid(format!(
                "image format {format:?} is not supported: send PNG or JPEG"
            )));
        }
        let reader = || ImageReader::with_format(Cursor::new(bytes), format);
        let (w, h) = reader()
            .into_dimensions()
            .map_err(|e| ServeError::invalid(format!("cannot read the {format:?} header: {e}")))?;
        let pixels = u64::from(w) * u64::from(h);
        if w == 0 || h == 0 {
            return Err(ServeError::invalid(format!(
                "image has zero size ({w}×{h})"
            )));
        }
        if pixels > self.max_pixels {
            return Err(ServeError::ResourceExhausted(format!(
                "image is {w}×{h} = {pixels} pixels, above the limit of {}",
                self.max_pixels
            )));
        }
        Ok((format, w, h))
    }

    /// Worst-case memory to decode a `w × h` image, in MiB: the decoded buffer (up to RGBA16,
    /// 8 bytes a pixel), its RGB8 conversion and the cropped square (3 bytes a pixel each).
    pub fn decode_mib(w: u32, h: u32) -> u32 {
        let bytes = u64::from(w) * u64::from(h) * (8 + 3 + 3);
        bytes.div_ceil(1 << 20).max(1).min(u64::from(u32::MAX)) as u32
    }

    /// Centre square of the shorter side, resized to `S × S`: the same framing as "resize the
    /// shorter side to S, centre-crop S × S", but cropping first keeps 1×N images small.
    fn square(&self, image: DynamicImage) -> RgbImage {
        let rgb = image.into_rgb8();
        let (w, h) = rgb.dimensions();
        let s = self.image_size;
        if self.small_image_fit == SmallImageFit::Pad && w <= s && h <= s {
            let mut canvas = RgbImage::new(s, s);
            image::imageops::replace(
                &mut canvas,
                &rgb,
                i64::from((s - w) / 2),
                i64::from((s - h) / 2),
            );
            return canvas;
        }
        let side = w.min(h);
        let cropped =
            image::imageops::crop_imm(&rgb, (w - side) / 2, (h - side) / 2, side, side).to_image();
        if side == s {
            cropped
        } else {
            image::imageops::resize(&cropped, s, s, FilterType::Triangle)
        }
    }

    /// `[3, S, S]` with `(x/255 − mean)/std` per channel.
    pub fn normalise(&self, rgb: &RgbImage) -> Pixels {
        let (w, h) = rgb.dimensions();
        let plane = (w * h) as usize;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in rgb.pixels().enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (f32::from(px[c]) / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        out
    }

    /// Checks a client-preprocessed tensor.
    pub fn raw(&self, shape: &[u32], data: Vec<f32>) -> Result<Pixels, ServeError> {
        let s = self.image_size;
        if shape != [3, s, s] {
            return Err(ServeError::invalid(format!(
                "raw tensor shape must be [3, {s}, {s}], got {shape:?}"
            )));
        }
        if data.len() != (3 * s * s) as usize {
            return Err(ServeError::invalid(format!(
                "raw tensor has {} values, shape [3, {s}, {s}] needs {}",
                data.len(),
                3 * s * s
            )));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(ServeError::invalid(format!(
                "raw tensor value {i} is {} (NaN/Inf are not allowed)",
                data[i]
            )));
        }
        // Normalised pixels lie within about ±3; huge values would overflow in the model.
        if let Some(i) = data.iter().position(|v| v.abs() > RAW_LIMIT) {
            return Err(ServeError::invalid(format!(
                "raw tensor value {i} is {}: outside ±{RAW_LIMIT} (send pixels normalised with the model's mean/std)",
                data[i]
            )));
        }
        Ok(data)
    }

    /// `[3, S, S]` normalised pixels back to an 8-bit RGB image (clamped).
    pub fn to_rgb(&self, pixels: &[f32]) -> RgbImage {
        let s = self.image_size;
        let plane = (s * s) as usize;
        RgbImage::from_fn(s, s, |x, y| {
            let i = (y * s + x) as usize;
            image::Rgb(std::array::from_fn(|c| {
                let v = pixels[c * plane + i] * self.std[c] + self.mean[c];
                (v.clamp(0.0, 1.0) * 255.0).round() as u8
            }))
        })
    }

    /// Normalised pixels with the masked patches painted mid-grey: what the encoder was shown.
    pub fn masked_view(&self, pixels: &[f32], masked: &[bool], patch: u32) -> RgbImage {
        let mut rgb = self.to_rgb(pixels);
        let grid = self.image_size / patch;
        for (l, _) in masked.iter().enumerate().filter(|(_, m)| **m) {
            let (pi, pj) = (l as u32 / grid, l as u32 % grid);
            for y in pi * patch..(pi + 1) * patch {
                for x in pj * patch..(pj + 1) * patch {
                    rgb.put_pixel(x, y, image::Rgb([128, 128, 128]));
                }
            }
        }
        rgb
    }
}

pub fn png(image: &RgbImage) -> Result<Vec<u8>, ServeError> {
    let mut out = Cursor::new(Vec::new());
    image
        .write_to(&mut out, ImageFormat::Png)
        .map_err(|e| ServeError::Internal(format!("PNG encoding failed: {e}")))?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prep() -> Preprocessing {
        Preprocessing {
            image_size: 32,
            mean: crate_mae::config::IMAGENET_MEAN,
            std: crate_mae::config::IMAGENET_STD,
            max_pixels: 1 << 20,
            small_image_fit: SmallImageFit::Resize,
        }
    }

    fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn round_trip_keeps_pixels_within_quantisation() {
        let img = RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([(x * 8) as u8, (y * 8) as u8, 100])
        });
        let bytes = encode(DynamicImage::ImageRgb8(img.clone()), ImageFormat::Png);
        let p = prep();
        let back = p.to_rgb(&p.encoded(&bytes).unwrap());
        assert_eq!(back, img);
    }

    #[test]
    fn long_thin_images_are_centre_cropped_not_stretched() {
        // 8 × 200: the centre 8 × 8 square is kept, then scaled to 32 × 32.
        let img = RgbImage::from_fn(8, 200, |_, y| {
            if (96..104).contains(&y) {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let bytes = encode(DynamicImage::ImageRgb8(img), ImageFormat::Png);
        let sq = prep().decode_square(&bytes).unwrap();
        assert_eq!(sq.dimensions(), (32, 32));
        assert_eq!(sq.get_pixel(16, 16)[0], 255);
    }

    #[test]
    fn small_images_are_padded_or_resized_as_the_model_declares() {
        let img = RgbImage::from_pixel(28, 28, image::Rgb([200, 200, 200]));
        let bytes = encode(DynamicImage::ImageRgb8(img), ImageFormat::Png);
        let padded = Preprocessing {
            small_image_fit: SmallImageFit::Pad,
            ..prep()
        }
        .decode_square(&bytes)
        .unwrap();
        assert_eq!(padded.dimensions(), (32, 32));
        // Centred, unscaled, on black: a 2-pixel border.
        assert_eq!(padded.get_pixel(1, 1).0, [0, 0, 0]);
        assert_eq!(padded.get_pixel(2, 2).0, [200, 200, 200]);
        assert_eq!(padded.get_pixel(29, 29).0, [200, 200, 200]);
        assert_eq!(padded.get_pixel(30, 30).0, [0, 0, 0]);
        let resized = prep().decode_square(&bytes).unwrap();
        assert_eq!(
            resized.get_pixel(1, 1).0,
            [200, 200, 200],
            "resize fills the square"
        );
        // Larger than the input: cropped and resized whatever the fit.
        let big = encode(
            DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 40, image::Rgb([9, 9, 9]))),
            ImageFormat::Png,
        );
        let fitted = Preprocessing {
            small_image_fit: SmallImageFit::Pad,
            ..prep()
        }
        .decode_square(&big)
        .unwrap();
        assert_eq!(fitted.get_pixel(0, 0).0, [9, 9, 9]);
    }

    #[test]
    fn grey_alpha_and_16_bit_become_rgb() {
        let grey = DynamicImage::ImageLuma16(image::ImageBuffer::from_pixel(
            40,
            40,
            image::Luma([65535u16]),
        ));
        let rgba = DynamicImage::ImageRgba8(image::ImageBuffer::from_pixel(
            40,
            40,
            image::Rgba([10, 20, 30, 0]),
        ));
        for img in [grey, rgba] {
            let bytes = encode(img, ImageFormat::Png);
            assert_eq!(prep().encoded(&bytes).unwrap().len(), 3 * 32 * 32);
        }
    }

    #[test]
    fn bad_images_are_named() {
        let p = prep();
        let msg = |r: Result<Pixels, ServeError>| r.unwrap_err().to_string();
        assert!(msg(p.encoded(b"")).contains("empty"));
        assert!(msg(p.encoded(b"hello world, not an image")).contains("not a PNG or JPEG"));
        let bytes = encode(
            DynamicImage::ImageRgb8(RgbImage::new(64, 64)),
            ImageFormat::Png,
        );
        assert!(msg(p.encoded(&bytes[..bytes.len() / 2])).contains("decode"));
        let big = encode(
            DynamicImage::ImageRgb8(RgbImage::new(2048, 1024)),
            ImageFormat::Png,
        );
        assert!(matches!(
            p.encoded(&big),
            Err(ServeError::ResourceExhausted(_))
        ));
        assert!(msg(p.raw(&[3, 32], vec![0.0; 3 * 32])).contains("shape"));
        let mut nan = vec![0.0; 3 * 32 * 32];
        nan[5] = f32::NAN;
        assert!(msg(p.raw(&[3, 32, 32], nan)).contains("NaN"));
    }
}

/// Property-based fuzzing of request decoding and preprocessing: whatever the bytes, the
/// result is a correctly sized tensor or an error with a message, never a panic.
/// `PROPTEST_CASES=100000 cargo test -p crate-mae-server --release fuzz_` for a long run.
#[cfg(test)]
mod fuzz {
    use std::io::Cursor;

    use image::{DynamicImage, ImageFormat, RgbImage};
    use proptest::prelude::*;

    use super::*;

    fn prep() -> Preprocessing {
        Preprocessing {
            image_size: 32,
            mean: crate_mae::config::IMAGENET_MEAN,
            std: crate_mae::config::IMAGENET_STD,
            max_pixels: 4_000_000,
            small_image_fit: SmallImageFit::Resize,
        }
    }

    fn seed_file(format: ImageFormat, w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 5) as u8, (x ^ y) as u8])
        });
        let mut out = Cursor::new(Vec::new());
        DynamicImage::ImageRgb8(img)
            .write_to(&mut out, format)
            .unwrap();
        out.into_inner()
    }

    fn check(bytes: &[u8]) {
        match prep().encoded(bytes) {
            Ok(pixels) => {
                assert_eq!(pixels.len(), 3 * 32 * 32);
                assert!(pixels.iter().all(|v| v.is_finite()));
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }

    /// Mutations of a valid file: byte flips, truncation, splices.
    fn mutated(seed: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
        let len = seed.len();
        (
            proptest::collection::vec((0..len, any::<u8>()), 0..24),
            0..=len,
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
        )
            .prop_map(move |(flips, cut, splice)| {
                let mut bytes = seed.clone();
                for (i, v) in flips {
                    bytes[i] = v;
                }
                bytes.truncate(cut.max(8));
                if let Some(extra) = splice {
                    bytes.extend(extra);
                }
                bytes
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn fuzz_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            check(&bytes);
        }

        #[test]
        fn fuzz_mutated_png(bytes in mutated(seed_file(ImageFormat::Png, 37, 23))) {
            check(&bytes);
        }

        #[test]
        fn fuzz_mutated_jpeg(bytes in mutated(seed_file(ImageFormat::Jpeg, 40, 30))) {
            check(&bytes);
        }

        #[test]
        fn fuzz_raw_tensors(shape in proptest::collection::vec(0u32..70, 0..5), data in proptest::collection::vec(any::<f32>(), 0..4000)) {
            match prep().raw(&shape, data) {
                Ok(p) => prop_assert_eq!(p.len(), 3 * 32 * 32),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}
