//! Errors of the model crate. Every variant says what was wrong in words a caller can act on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    #[error("checkpoint is missing tensor `{name}` (expected shape {expected:?})")]
    MissingTensor { name: String, expected: Vec<usize> },

    #[error("checkpoint tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    #[error("invalid input: {0}")]
    Input(String),

    /// The device ran out of memory for this computation; smaller batches may fit.
    #[error("device out of memory: {0}")]
    OutOfMemory(String),

    /// The device failed in a way that poisons every later computation (a sticky CUDA error,
    /// a lost GPU): the process must be restarted.
    #[error("device lost: {0}")]
    DeviceLost(String),

    #[error(transparent)]
    Candle(candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn input(msg: impl Into<String>) -> Self {
        Self::Input(msg.into())
    }
}

/// Driver and library errors that mean "not enough device memory".
const OUT_OF_MEMORY: &[&str] = &[
    "CUDA_ERROR_OUT_OF_MEMORY",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CURAND_STATUS_ALLOCATION_FAILED",
];

/// Sticky CUDA errors: after one of these the context is unusable (NVIDIA's documentation of
/// `cudaError`: "the process must be terminated and relaunched"), or the device is gone.
const DEVICE_LOST: &[&str] = &[
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_ECC_UNCORRECTABLE",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_LAUNCH_TIMEOUT",
    "CUDA_ERROR_DEVICE_UNAVAILABLE",
    "CUDA_ERROR_NO_DEVICE",
    "CUDA_ERROR_CONTEXT_IS_DESTROYED",
    "CUDA_ERROR_DEVICE_NOT_LICENSED",
    "CUDA_ERROR_SYSTEM_NOT_READY",
];

impl From<candle_core::Error> for ModelError {
    /// Device failures become their own variants, so a server can fail one batch on out of
    /// memory and stop serving on a lost device.
    fn from(e: candle_core::Error) -> Self {
        let text = e.to_string();
        if OUT_OF_MEMORY.iter().any(|p| text.contains(p)) {
            Self::OutOfMemory(text)
        } else if DEVICE_LOST.iter().any(|p| text.contains(p)) {
            Self::DeviceLost(text)
        } else {
            Self::Candle(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_failures_are_classified_from_driver_messages() {
        // The text cudarc gives candle for a failed allocation, and a sticky fault.
        let oom = candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        );
        assert!(matches!(ModelError::from(oom), ModelError::OutOfMemory(_)));
        let lost = candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access was encountered\")"
                .into(),
        );
        assert!(matches!(ModelError::from(lost), ModelError::DeviceLost(_)));
        let shape = candle_core::Error::Msg("shape mismatch in matmul".into());
        assert!(matches!(ModelError::from(shape), ModelError::Candle(_)));
    }
}
