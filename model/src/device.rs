//! Picking the compute device at run time. CUDA and Metal exist only when the crate is
//! built with the `cuda` / `metal` features.

use candle_core::Device;

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
