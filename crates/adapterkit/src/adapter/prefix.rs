//! Prefix tuning (Li & Liang 2021) as AdapterHub's `PrefixTuningConfig` defines it for an encoder:
//! every layer's self-attention attends to `prefix_length` learned key/value pairs before the
//! sequence's own. The prefixes come from a reparametrising MLP while training
//! (`wte → Linear → tanh → Linear`, all layers' keys and values in one output), or are stored flat
//! (`flat`, and after [`PrefixConfig::fold`], AdapterHub's `eject_prefix_tuning`).
//!
//! The encoder reads per-layer key and value prefixes [heads, P, dh] that [`PrefixConfig::derive`]
//! builds from the task's tensors: per forward in training (gradients reach the MLP), once for
//! inference (merged). The attention kernels take them as extra key/value positions that no mask
//! hides (see `kernels::attention`).

use crate::error::{Error, Result};
use crate::kernels::{Activation, Backend};
use crate::keys::{Leaf, ParamKey, Role};
use crate::rng::Rng;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The prefix module's location key for a BERT encoder's self-attention (AdapterHub's names).
const LOCATION: &str = "self_prefix";

/// A prefix-tuning configuration: plain data, AdapterHub's `PrefixTuningConfig` keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefixConfig {
    /// P: learned key/value positions per layer (`prefix_length`).
    #[serde(default = "default_length")]
    pub prefix_length: usize,
    /// Prefixes stored directly (`true`) or produced by the MLP (`false`, AdapterHub's default).
    #[serde(default)]
    pub flat: bool,
    /// Width of the MLP's hidden layer (`bottleneck_size`).
    #[serde(default = "default_bottleneck")]
    pub bottleneck_size: usize,
    /// The MLP's nonlinearity (`non_linearity`).
    #[serde(default = "default_activation")]
    pub non_linearity: Activation,
    /// Layers without prefixes (`leave_out`).
    #[serde(default)]
    pub leave_out: Vec<usize>,
}

fn default_length() -> usize {
    30
}
fn default_bottleneck() -> usize {
    512
}
fn default_activation() -> Activation {
    Activation::Tanh
}

impl Default for PrefixConfig {
    fn default() -> Self {
        PrefixConfig {
            prefix_length: default_length(),
            flat: false,
            bottleneck_size: default_bottleneck(),
            non_linearity: Activation::Tanh,
            leave_out: Vec::new(),
        }
    }
}

/// One tensor of the prefix module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrefixPart {
    /// Flat prefixes [P · L · 2 · d] (`control_trans`).
    Flat,
    /// The MLP's input embeddings [P, d] (`wte.weight`).
    Embedding,
    /// First MLP layer weight [bottleneck, d].
    HiddenWeight,
    /// First MLP layer bias [bottleneck].
    HiddenBias,
    /// Second MLP layer weight [L · 2 · d, bottleneck].
    OutWeight,
    /// Second MLP layer bias [L · 2 · d].
    OutBias,
}

impl PrefixPart {
    fn leaf(self) -> &'static str {
        match self {
            PrefixPart::Flat => "control_trans",
            PrefixPart::Embedding => "wte.weight",
            PrefixPart::HiddenWeight => "control_trans.0.weight",
            PrefixPart::HiddenBias => "control_trans.0.bias",
            PrefixPart::OutWeight => "control_trans.2.weight",
            PrefixPart::OutBias => "control_trans.2.bias",
        }
    }
}

impl PrefixConfig {
    /// Checks the configuration against a base of `layers` layers and hidden width `d`.
    pub fn validate(&self, d: usize, layers: usize) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::config("prefix tuning", field, msg));
        if self.prefix_length == 0 || self.prefix_length > 512 {
            return bad(
                "prefix_length",
                format!("{} must be in 1..=512", self.prefix_length),
            );
        }
        if !self.flat && (self.bottleneck_size == 0 || self.bottleneck_size > 16 * d) {
            return bad(
                "bottleneck_size",
                format!("{} must be in 1..={}", self.bottleneck_size, 16 * d),
            );
        }
        if let Some(&l) = self.leave_out.iter().find(|&&l| l >= layers) {
            return bad(
                "leave_out",
                format!("layer {l} does not exist (the base has layers 0..{layers})"),
            );
        }
        if self.layers(layers).is_empty() {
            return bad(
                "leave_out",
                format!(
                    "{:?} leaves out every layer: no prefix would be trained",
                    self.leave_out
                ),
            );
        }
        Ok(())
    }

    /// The layers that get prefixes, in order (their index in this list is AdapterHub's prefix id).
    pub fn layers(&self, layers: usize) -> Vec<usize> {
        (0..layers)
            .filter(|l| !self.leave_out.contains(l))
            .collect()
    }

    fn parts(&self, d: usize, layers: usize) -> Vec<(PrefixPart, Vec<usize>)> {
        let (p, out) = (self.prefix_length, self.layers(layers).len() * 2 * d);
        if self.flat {
            return vec![(PrefixPart::Flat, vec![p * out])];
        }
        let b = self.bottleneck_size;
        vec![
            (PrefixPart::Embedding, vec![p, d]),
            (PrefixPart::HiddenWeight, vec![b, d]),
            (PrefixPart::HiddenBias, vec![b]),
            (PrefixPart::OutWeight, vec![out, b]),
            (PrefixPart::OutBias, vec![out]),
        ]
    }

    fn key(&self, task: &str, part: PrefixPart, layers: usize) -> ParamKey {
        let first = self.layers(layers).first().copied().unwrap_or(0);
        let leaf = match part {
            PrefixPart::HiddenBias | PrefixPart::OutBias => Leaf::Bias,
            _ => Leaf::Weight,
        };
        ParamKey::new(
            param_name(task, part.leaf()),
            Role::Adapter { layer: first },
            leaf,
        )
    }

    /// Every tensor of the configuration: typed key and shape.
    pub fn param_keys(&self, task: &str, d: usize, layers: usize) -> Vec<(ParamKey, Vec<usize>)> {
        self.parts(d, layers)
            .into_iter()
            .map(|(part, shape)| (self.key(task, part, layers), shape))
            .collect()
    }

    /// Trainable parameters of the configuration.
    pub fn num_params(&self, d: usize, layers: usize) -> usize {
        self.parts(d, layers)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// New tensors for task `task`, drawn as PyTorch draws them: embeddings and flat prefixes
    /// standard normal, linear layers uniform in ±1/√fan_in.
    pub fn new_params(
        &self,
        task: &str,
        d: usize,
        layers: usize,
        rng: &mut Rng,
        dev: &Device,
    ) -> Result<Vec<(ParamKey, Tensor)>> {
        let b = self.bottleneck_size as f64;
        self.parts(d, layers)
            .into_iter()
            .map(|(part, shape)| {
                let n: usize = shape.iter().product();
                let bound = match part {
                    PrefixPart::Flat | PrefixPart::Embedding => None,
                    PrefixPart::HiddenWeight | PrefixPart::HiddenBias => {
                        Some(1.0 / (d as f64).sqrt())
                    }
                    PrefixPart::OutWeight | PrefixPart::OutBias => Some(1.0 / b.sqrt()),
                };
                let v: Vec<f32> = (0..n)
                    .map(|_| match bound {
                        None => rng.normal() as f32,
                        Some(k) => ((2.0 * rng.uniform() - 1.0) * k) as f32,
                    })
                    .collect();
                Ok((
                    self.key(task, part, layers),
                    Tensor::from_vec(v, shape, dev)?,
                ))
            })
            .collect()
    }

    /// All layers' keys and values [P, L · 2 · d] from the task's tensors (through the MLP unless
    /// flat), differentiable.
    fn key_values(
        &self,
        task: &str,
        params: &BTreeMap<ParamKey, Tensor>,
        d: usize,
        layers: usize,
    ) -> Result<Tensor> {
        let get = |part: PrefixPart| -> Result<&Tensor> {
            let name = param_name(task, part.leaf());
            params
                .get(name.as_str())
                .ok_or_else(|| Error::NotFound(format!("the task has no parameter `{name}`")))
        };
        let (p, out) = (self.prefix_length, self.layers(layers).len() * 2 * d);
        if self.flat {
            return Ok(get(PrefixPart::Flat)?.reshape((p, out))?);
        }
        let affine = |x: &Tensor, w: PrefixPart, b: PrefixPart| -> Result<Tensor> {
            Ok(x.matmul(&get(w)?.t()?)?.broadcast_add(get(b)?)?)
        };
        let hidden = affine(
            get(PrefixPart::Embedding)?,
            PrefixPart::HiddenWeight,
            PrefixPart::HiddenBias,
        )?;
        let hidden = self.non_linearity.apply(Backend::Reference, &hidden)?;
        affine(&hidden, PrefixPart::OutWeight, PrefixPart::OutBias)
    }

    /// Each prefixed layer's key and value prefixes [heads, P, dh], keyed by
    /// [`prefix_key_name`], built from the task's tensors as they are (so a loss over a forward
    /// that reads them has gradients for those tensors).
    pub fn derive(
        &self,
        task: &str,
        params: &BTreeMap<ParamKey, Tensor>,
        d: usize,
        heads: usize,
        layers: usize,
    ) -> Result<BTreeMap<ParamKey, Tensor>> {
        let p = self.prefix_length;
        let with = self.layers(layers);
        let kv = self.key_values(task, params, d, layers)?.reshape((
            p,
            with.len() * 2,
            heads,
            d / heads,
        ))?;
        let mut out = BTreeMap::new();
        for (j, &l) in with.iter().enumerate() {
            for (which, name) in [(0, "key"), (1, "value")] {
                let t = kv
                    .narrow(1, 2 * j + which, 1)?
                    .squeeze(1)?
                    .transpose(0, 1)?
                    .contiguous()?;
                let key = ParamKey::new(
                    prefix_key_name(l, name),
                    Role::Adapter { layer: l },
                    Leaf::Weight,
                );
                out.insert(key, t);
            }
        }
        Ok(out)
    }

    /// The flat form of the task's prefixes: the MLP run once and its output stored (AdapterHub's
    /// `eject_prefix_tuning`); the configuration becomes `flat`. Identity for flat prefixes.
    pub fn fold(
        &self,
        task: &str,
        params: &BTreeMap<ParamKey, Tensor>,
        d: usize,
        layers: usize,
    ) -> Result<(PrefixConfig, Vec<(ParamKey, Tensor)>)> {
        let flat = PrefixConfig {
            flat: true,
            ..self.clone()
        };
        let kv = self
            .key_values(task, params, d, layers)?
            .detach()
            .flatten_all()?;
        Ok((
            flat.clone(),
            vec![(flat.key(task, PrefixPart::Flat, layers), kv)],
        ))
    }
}

/// The checkpoint name of a prefix tensor (without `bert.`): the pool's own name.
pub fn param_name(task: &str, leaf: &str) -> String {
    format!("prefix_tuning.prefix_tunings.{task}.{LOCATION}.{leaf}")
}

/// The other names AdapterHub saves the same tensor under: one per layer, through each layer's
/// reference to the shared pool. `name` is a [`param_name`].
pub fn aliases(name: &str, layers: usize) -> Vec<String> {
    let Some(rest) = name.strip_prefix("prefix_tuning.") else {
        return Vec::new();
    };
    (0..layers)
        .map(|l| format!("encoder.layer.{l}.attention.self.prefix_tuning.pool.{rest}"))
        .collect()
}

/// The name of layer `layer`'s derived key (`which` = `key`) or value prefix.
pub fn prefix_key_name(layer: usize, which: &str) -> String {
    format!("encoder.layer.{layer}.attention.self.prefix.{which}")
}
