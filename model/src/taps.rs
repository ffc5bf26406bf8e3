//! Named intermediate tensors, recorded on request during a forward pass.
//!
//! Names mirror the golden vectors (`enc.0.qkv`, `dec.1.mssa`, `latent`, ...). A disabled
//! recorder costs one branch per block; the server enables only what it needs (per-layer
//! `qkv` and ISTA outputs for diagnostics, one layer's attention map).

use std::collections::{BTreeMap, BTreeSet};

use candle_core::Tensor;

#[derive(Debug, Default)]
enum Selection {
    #[default]
    Nothing,
    Everything,
    Only(BTreeSet<String>),
}

#[derive(Debug, Default)]
pub struct Taps {
    selection: Selection,
    recorded: BTreeMap<String, Tensor>,
}

impl Taps {
    /// Records nothing.
    pub fn none() -> Self {
        Self::default()
    }

    /// Records every intermediate (for parity tests and debugging).
    pub fn all() -> Self {
        Self {
            selection: Selection::Everything,
            ..Self::default()
        }
    }

    /// Records only these names.
    pub fn only<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        Self {
            selection: Selection::Only(names.into_iter().map(Into::into).collect()),
            ..Self::default()
        }
    }

    pub fn is_off(&self) -> bool {
        matches!(self.selection, Selection::Nothing)
    }

    pub fn wants(&self, name: &str) -> bool {
        match &self.selection {
            Selection::Nothing => false,
            Selection::Everything => true,
            Selection::Only(names) => names.contains(name),
        }
    }

    /// Records `scope.leaf` (or `leaf` when `scope` is empty) if selected.
    pub fn record(&mut self, scope: &str, leaf: &str, tensor: &Tensor) {
        if self.is_off() {
            return;
        }
        let name = if scope.is_empty() {
            leaf.to_string()
        } else {
            format!("{scope}.{leaf}")
        };
        if self.wants(&name) {
            self.recorded.insert(name, tensor.clone());
        }
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.recorded.get(name)
    }

    pub fn take(&mut self, name: &str) -> Option<Tensor> {
        self.recorded.remove(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.recorded.keys().map(String::as_str)
    }
}
