//! CRATE-MAE, the white-box masked autoencoder of Pai et al. (ICLR 2024), in candle.
//!
//! Every encoder layer is a compression step ([`mssa`]) followed by a sparsification step
//! ([`ista`]); the decoder layers ([`decoder`]) invert them. [`mae::CrateMae`] ties them
//! together with the patch embedding and masking of the official `MaskedAutoencoderViT`, and
//! [`diagnostics`] measures the rate-reduction quantities the layers optimise.

pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod decoder;
pub mod device;
pub mod diagnostics;
pub mod encoder;
pub mod error;
pub mod init;
pub mod ista;
pub mod mae;
pub mod masking;
pub mod mssa;
pub mod ops;
pub mod patch_embed;
pub mod readout;

pub use checkpoint::{LoadOptions, WeightsFormat, WeightsInfo};
pub use config::CrateMaeConfig;
pub use device::Precision;
pub use diagnostics::LayerDiagnostics;
pub use error::{ModelError, Result};
pub use mae::{Completion, CrateMae, DecoderTrace, Encoded, EncoderTrace, Keep, Pooling};
pub use masking::Mask;
pub use readout::{WhitenedGrid, WhitenedGridSpec};
