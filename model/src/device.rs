//! Picking the compute device and precision at run time. CUDA and Metal exist only when the
//! crate is built with the `cuda` / `metal` features.

use candle_core::{DType, Device};

use crate::error::{ModelError, Result};

/// `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => (
            k,
            n.parse::<usize>()
                .map_err(|_| ModelError::Config(format!("bad device ordinal in `{spec}`")))?,
        ),
        None => (spec, 0),
    };
    let unavailable = |feature: &str| {
        ModelError::Config(format!(
            "device `{spec}` needs a build with the `{feature}` feature"
        ))
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" if cfg!(feature = "cuda") => Ok(Device::new_cuda(ordinal)?),
        "cuda" => Err(unavailable("cuda")),
        "metal" if cfg!(feature = "metal") => Ok(Device::new_metal(ordinal)?),
        "metal" => Err(unavailable("metal")),
        other => Err(ModelError::Config(format!(
            "unknown device `{other}` (expected cpu, cuda[:N] or metal[:N])"
        ))),
    }
}

/// A short human name for logs and `GetModelInfo`.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// The precision the model computes in. f32 is the reference (golden parity); the others
/// trade accuracy for speed where the hardware has fast units for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }

    /// Whether `device` computes in this precision: f16 only on GPUs (CPUs have no fast f16
    /// matrix units; use bf16 there).
    pub fn check_device(self, device: &Device) -> Result<()> {
        if self == Self::F16 && device.is_cpu() {
            return Err(ModelError::Config(
                "f16 is for GPUs; on the CPU use f32 or bf16".into(),
            ));
        }
        Ok(())
    }
}

impl std::str::FromStr for Precision {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            other => Err(ModelError::Config(format!(
                "unknown dtype `{other}` (expected f32, bf16 or f16)"
            ))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
