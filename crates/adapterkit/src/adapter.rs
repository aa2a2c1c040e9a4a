//! Bottleneck adapters (Houlsby et al. 2019): configuration, placement and parameter naming.

use crate::error::{Error, Result};
use crate::ops::Activation;
use serde::{Deserialize, Serialize};

/// Where adapters sit inside each transformer layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Two per layer: after the attention output projection and after the FFN output projection.
    Houlsby,
    /// One per layer, after the FFN output projection only.
    Pfeiffer,
}

/// One of the two adapter sites of a layer, named by the module AdapterHub attaches it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// After the multi-head-attention output projection (`attention.output`).
    Attention,
    /// After the FFN output projection (`output`).
    Ffn,
}

impl Site {
    /// The module path of the site inside `encoder.layer.{i}`.
    pub fn module(self) -> &'static str {
        match self {
            Site::Attention => "attention.output",
            Site::Ffn => "output",
        }
    }
}

/// A bottleneck adapter configuration: plain data that round-trips through JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Houlsby (two per layer) or Pfeiffer (one per layer).
    #[serde(default = "default_placement")]
    pub placement: Placement,
    /// Bottleneck size m (the down-projection's output width).
    pub bottleneck: usize,
    /// Nonlinearity between the projections.
    #[serde(default = "default_activation")]
    pub nonlinearity: Activation,
    /// Std of the truncated-normal init of both projections (biases start at zero).
    #[serde(default = "default_init_std")]
    pub init_std: f64,
    /// Layers that get no adapter.
    #[serde(default)]
    pub leave_out: Vec<usize>,
}

fn default_placement() -> Placement {
    Placement::Houlsby
}
fn default_activation() -> Activation {
    Activation::Gelu
}
fn default_init_std() -> f64 {
    1e-3
}

impl Default for AdapterConfig {
    fn default() -> Self {
        AdapterConfig {
            placement: Placement::Houlsby,
            bottleneck: 64,
            nonlinearity: Activation::Gelu,
            init_std: 1e-3,
            leave_out: Vec::new(),
        }
    }
}

impl AdapterConfig {
    /// Checks the configuration against a base model of `hidden` width and `layers` layers.
    pub fn validate(&self, hidden: usize, layers: usize) -> Result<()> {
        if self.bottleneck == 0 {
            return Err(Error::config("adapter", "bottleneck", "must be at least 1"));
        }
        if !(self.init_std.is_finite() && self.init_std >= 0.0) {
            return Err(Error::config(
                "adapter",
                "init_std",
                "must be a finite number ≥ 0",
            ));
        }
        if let Some(&l) = self.leave_out.iter().find(|&&l| l >= layers) {
            return Err(Error::config(
                "adapter",
                "leave_out",
                format!("layer {l} does not exist (the base has layers 0..{layers})"),
            ));
        }
        if self.bottleneck > hidden * 4 {
            return Err(Error::config(
                "adapter",
                "bottleneck",
                format!(
                    "{} is larger than 4× the hidden size {hidden}",
                    self.bottleneck
                ),
            ));
        }
        Ok(())
    }

    /// Bottleneck size from AdapterHub's `reduction_factor` (m = hidden / factor).
    pub fn bottleneck_from_reduction(hidden: usize, factor: f64) -> Result<usize> {
        if !(factor.is_finite() && factor > 0.0) {
            return Err(Error::config(
                "adapter",
                "reduction_factor",
                "must be a positive number",
            ));
        }
        Ok(((hidden as f64 / factor).floor() as usize).max(1))
    }

    /// The sites this placement uses in each layer.
    pub fn sites(&self) -> &'static [Site] {
        match self.placement {
            Placement::Houlsby => &[Site::Attention, Site::Ffn],
            Placement::Pfeiffer => &[Site::Ffn],
        }
    }

    /// Whether layer `layer` carries adapters.
    pub fn has_layer(&self, layer: usize) -> bool {
        !self.leave_out.contains(&layer)
    }

    /// Trainable parameters of all adapters: (2md + d + m) per site.
    pub fn num_params(&self, hidden: usize, layers: usize) -> usize {
        let per_site = 2 * self.bottleneck * hidden + hidden + self.bottleneck;
        let active_layers = (0..layers).filter(|&l| self.has_layer(l)).count();
        per_site * self.sites().len() * active_layers
    }
}

/// The checkpoint name of one adapter tensor, as AdapterHub names it (without the `bert.` prefix).
/// `part` is one of `down.weight`, `down.bias`, `up.weight`, `up.bias`.
pub fn param_name(layer: usize, site: Site, adapter: &str, part: &str) -> String {
    let (proj, leaf) = match part {
        "down.weight" => ("adapter_down.0", "weight"),
        "down.bias" => ("adapter_down.0", "bias"),
        "up.weight" => ("adapter_up", "weight"),
        _ => ("adapter_up", "bias"),
    };
    format!(
        "encoder.layer.{layer}.{}.adapters.{adapter}.{proj}.{leaf}",
        site.module()
    )
}
