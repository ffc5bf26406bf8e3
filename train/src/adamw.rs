//! AdamW (decoupled weight decay, bias-corrected moments: candle-nn's update, step for step)
//! whose state can be saved and restored, so a run resumed from a checkpoint continues with the
//! moments it had: the resumed run is the run it continues, not a new one from warm weights.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{backprop::GradStore, Tensor, Var};

pub struct Params {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    slots: Vec<Slot>,
    step_t: usize,
    params: Params,
}

/// The step count, stored as a one-element tensor beside the moments.
const STEP_KEY: &str = "adamw.step";

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: Params) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok(Slot {
                    name,
                    m: zeros.clone(),
                    v: zeros,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            slots,
            step_t: 0,
            params,
        })
    }

    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step_t += 1;
        let Params {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        let t = self.step_t as i32;
        let (scale_m, scale_v) = (1.0 / (1.0 - beta1.powi(t)), 1.0 / (1.0 - beta2.powi(t)));
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            slot.m = ((&slot.m * beta1)? + (g * (1.0 - beta1))?)?;
            slot.v = ((&slot.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let step = ((&slot.m * scale_m)? / ((&slot.v * scale_v)?.sqrt()? + eps)?)?;
            let decayed = (slot.var.as_tensor() * (1.0 - lr * weight_decay))?;
            slot.var.set(&(decayed - (step * lr)?)?)?;
        }
        Ok(())
    }

    /// The moments by parameter name (`<prefix>.m.<name>`, `<prefix>.v.<name>`) and the step.
    pub fn state(&self, prefix: &str) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("{prefix}.m.{}", s.name), s.m.clone());
            out.insert(format!("{prefix}.v.{}", s.name), s.v.clone());
        }
        let step = Tensor::new(&[self.step_t as u32], self.slots[0].m.device())?;
        out.insert(format!("{prefix}.{STEP_KEY}"), step);
        Ok(out)
    }

    /// Takes back what [`AdamW::state`] saved; every parameter's moments must be there.
    pub fn restore(&mut self, state: &HashMap<String, Tensor>, prefix: &str) -> Result<()> {
        for s in &mut self.slots {
            let get = |which: &str| -> Result<Tensor> {
                let key = format!("{prefix}.{which}.{}", s.name);
                let t = state
                    .get(&key)
                    .with_context(|| format!("optimizer state has no `{key}`"))?;
                anyhow::ensure!(
                    t.dims() == s.var.dims(),
                    "optimizer state `{key}` is {:?}, the parameter {:?}",
                    t.dims(),
                    s.var.dims()
                );
                Ok(t.to_device(s.var.device())?)
            };
            s.m = get("m")?;
            s.v = get("v")?;
        }
        let key = format!("{prefix}.{STEP_KEY}");
        let step = state
            .get(&key)
            .with_context(|| format!("optimizer state has no `{key}`"))?;
        self.step_t = step.to_vec1::<u32>()?[0] as usize;
        Ok(())
    }
}
