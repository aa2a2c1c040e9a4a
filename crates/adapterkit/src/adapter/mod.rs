//! Adapter methods: bottleneck adapters (Houlsby et al. 2019; sequential or parallel) with their
//! configuration, placement and parameter naming here, the site interface in [`site`], the
//! bottleneck adapter's forward in [`bottleneck`], Compacter's PHM projections in [`phm`]; LoRA
//! and (IA)³ in [`lora`]; prefix tuning in [`prefix`].

pub mod bottleneck;
pub mod lora;
pub mod phm;
pub mod prefix;
pub mod site;

pub use bottleneck::BottleneckAdapter;
pub use lora::LoraConfig;
pub use phm::{PhmConfig, PhmProj, PhmTensor};
pub use prefix::PrefixConfig;
pub use site::{residual_norm, SiteAdapter, SiteContext};

use crate::error::{Error, Result};
use crate::kernels::Activation;
use crate::keys::{Leaf, ParamKey, Role};
use crate::rng::Rng;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A task's adapter method: what its `adapter_config.json` describes.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterMethod {
    /// Bottleneck adapters at the layers' sites.
    Bottleneck(AdapterConfig),
    /// LoRA or (IA)³ on the layers' projections.
    Lora(LoraConfig),
    /// Learned key/value prefixes in the layers' self-attention.
    Prefix(PrefixConfig),
}

/// Where adapters sit inside each transformer layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Two per layer: after the attention output projection and after the FFN output projection.
    Houlsby,
    /// One per layer, after the FFN output projection only.
    Pfeiffer,
    /// One per layer, after the attention output projection only (AdapterHub `mh_adapter` alone).
    Attention,
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

/// Where the adapter's skip connection starts (AdapterHub's `residual_before_ln`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Residual {
    /// The sub-layer output, before any original LayerNorm (`residual_before_ln: true`).
    Sublayer,
    /// The adapter's own input, after the original LayerNorm if that runs first (`false`).
    AdapterInput,
    /// The sub-layer output plus the block input, before the original LayerNorm (`"post_add"`).
    PostAdd,
}

/// How the adapter's output is scaled before the skip connection (He et al. 2021).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scaling {
    /// A fixed factor (1.0 is the plain adapter).
    Fixed(f64),
    /// One trained scalar, initialised to 1.
    Learned,
    /// One trained factor per hidden channel, initialised to 1.
    Channel,
}

impl Serialize for Scaling {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Scaling::Fixed(v) => s.serialize_f64(*v),
            Scaling::Learned => s.serialize_str("learned"),
            Scaling::Channel => s.serialize_str("channel"),
        }
    }
}

impl<'de> Deserialize<'de> for Scaling {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Scaling::from_json(&v).map_err(serde::de::Error::custom)
    }
}

impl Scaling {
    /// Parses AdapterHub's `scaling` value: a number, `"learned"` or `"channel"`.
    pub fn from_json(v: &serde_json::Value) -> std::result::Result<Self, String> {
        match v {
            serde_json::Value::Number(n) => match n.as_f64() {
                Some(f) if f.is_finite() => Ok(Scaling::Fixed(f)),
                _ => Err(format!("`{n}` is not a finite number")),
            },
            serde_json::Value::String(s) if s == "learned" => Ok(Scaling::Learned),
            serde_json::Value::String(s) if s == "channel" => Ok(Scaling::Channel),
            other => Err(format!(
                "`{other}`: expected a number, \"learned\" or \"channel\""
            )),
        }
    }
}

/// How a new adapter's projections are initialised (biases always start at zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// Truncated normal (±2 std) with [`AdapterConfig::init_std`] on both projections (the paper's
    /// near-identity init; our default).
    TruncatedNormal,
    /// AdapterHub `"bert"`: normal with std 0.02 on both projections.
    Bert,
    /// AdapterHub `"houlsby"`: truncated normal, std 1e-2, cut at ±2e-2, on both projections.
    Houlsby,
    /// AdapterHub `"mam_adapter"`: Kaiming-uniform down projection, zero up projection.
    MamAdapter,
}

impl Init {
    /// The name AdapterHub writes in `init_weights`.
    pub fn hub_name(self) -> &'static str {
        match self {
            Init::TruncatedNormal | Init::Houlsby => "houlsby",
            Init::Bert => "bert",
            Init::MamAdapter => "mam_adapter",
        }
    }
}

/// One tensor of an adapter at one site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Down projection weight [m, d].
    DownWeight,
    /// Down projection bias [m].
    DownBias,
    /// Up projection weight [d, m].
    UpWeight,
    /// Up projection bias [d].
    UpBias,
    /// Scale of the LayerNorm before the bottleneck (`ln_before`) [d].
    LnBeforeWeight,
    /// Shift of the LayerNorm before the bottleneck [d].
    LnBeforeBias,
    /// Scale of the LayerNorm after the bottleneck (`ln_after`) [d].
    LnAfterWeight,
    /// Shift of the LayerNorm after the bottleneck [d].
    LnAfterBias,
    /// Trained output scaling ([1] for `learned`, [d] for `channel`).
    Scaling,
    /// A tensor of a PHM (Compacter) projection kept at the site; the projection's weight is then
    /// derived from these (see [`phm`]).
    Phm(PhmProj, PhmTensor),
}

impl Part {
    /// The tensor's shape class, for weight decay.
    pub fn leaf(self) -> Leaf {
        match self {
            Part::DownWeight | Part::UpWeight => Leaf::Weight,
            Part::DownBias | Part::UpBias => Leaf::Bias,
            Part::LnBeforeWeight | Part::LnBeforeBias | Part::LnAfterWeight | Part::LnAfterBias => {
                Leaf::Norm
            }
            Part::Scaling => Leaf::Scale,
            Part::Phm(..) => Leaf::Weight,
        }
    }
}

/// A bottleneck adapter configuration: plain data that round-trips through JSON. The fields after
/// `leave_out` are AdapterHub's `BnConfig` options; their defaults are the Houlsby arrangement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Houlsby (two per layer), Pfeiffer (after the FFN) or attention-only.
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
    /// Per-layer bottleneck sizes that replace `bottleneck` (from a per-layer `reduction_factor`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub layer_bottleneck: BTreeMap<usize, usize>,
    /// Apply the original residual + LayerNorm before the adapter (`original_ln_before`).
    #[serde(default)]
    pub original_ln_before: bool,
    /// Apply the original residual + LayerNorm after the adapter (`original_ln_after`).
    #[serde(default = "default_true")]
    pub original_ln_after: bool,
    /// Where the adapter's skip connection starts (`residual_before_ln`).
    #[serde(default = "default_residual")]
    pub residual: Residual,
    /// A new LayerNorm on the adapter's input (`ln_before`).
    #[serde(default)]
    pub ln_before: bool,
    /// A new LayerNorm on the adapter's output (`ln_after`).
    #[serde(default)]
    pub ln_after: bool,
    /// Add the skip connection before `ln_after` rather than after it (`adapter_residual_before_ln`).
    #[serde(default)]
    pub adapter_residual_before_ln: bool,
    /// Output scaling (`scaling`).
    #[serde(default = "default_scaling")]
    pub scaling: Scaling,
    /// Initialisation scheme of new adapters (`init_weights`).
    #[serde(default = "default_init")]
    pub init: Init,
    /// Dropout on the adapter's output in training (`dropout`).
    #[serde(default)]
    pub dropout: f64,
    /// Beside the sub-layer instead of after it (He et al. 2022; AdapterHub's `is_parallel`): the
    /// adapter reads the block input and its output joins the sub-layer's before the original
    /// residual + LayerNorm. `original_ln_before`, `residual_before_ln` and
    /// `adapter_residual_before_ln` then have no effect, as in AdapterHub.
    #[serde(default)]
    pub parallel: bool,
    /// Compacter (Mahabadi et al. 2021; AdapterHub's `phm_layer`): both projections are PHM
    /// layers with these options, their weights derived from sums of Kronecker products.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phm: Option<PhmConfig>,
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
fn default_true() -> bool {
    true
}
fn default_residual() -> Residual {
    Residual::Sublayer
}
fn default_scaling() -> Scaling {
    Scaling::Fixed(1.0)
}
fn default_init() -> Init {
    Init::TruncatedNormal
}

impl Default for AdapterConfig {
    fn default() -> Self {
        AdapterConfig {
            placement: Placement::Houlsby,
            bottleneck: 64,
            nonlinearity: Activation::Gelu,
            init_std: 1e-3,
            leave_out: Vec::new(),
            layer_bottleneck: BTreeMap::new(),
            original_ln_before: false,
            original_ln_after: true,
            residual: Residual::Sublayer,
            ln_before: false,
            ln_after: false,
            adapter_residual_before_ln: false,
            scaling: Scaling::Fixed(1.0),
            init: Init::TruncatedNormal,
            dropout: 0.0,
            parallel: false,
            phm: None,
        }
    }
}

impl AdapterConfig {
    /// AdapterHub's `seq_bn` arrangement (Pfeiffer et al. 2020): one adapter after the FFN, fed by the
    /// output of the original residual + LayerNorm, which runs again after the adapter.
    pub fn pfeiffer(bottleneck: usize, nonlinearity: Activation) -> Self {
        AdapterConfig {
            placement: Placement::Pfeiffer,
            bottleneck,
            nonlinearity,
            original_ln_before: true,
            ..AdapterConfig::default()
        }
    }

    /// AdapterHub's `par_bn` arrangement (He et al. 2022): one adapter beside the FFN, reading the
    /// FFN's input, its output scaled by `scaling` (4 in AdapterHub's preset, or learned) and added
    /// to the FFN's; ReLU, Kaiming-uniform down and zero up projection.
    pub fn parallel(bottleneck: usize, scaling: Scaling) -> Self {
        AdapterConfig {
            placement: Placement::Pfeiffer,
            bottleneck,
            nonlinearity: Activation::Relu,
            scaling,
            init: Init::MamAdapter,
            parallel: true,
            ..AdapterConfig::default()
        }
    }

    /// AdapterHub's `compacter` (both sites, as Houlsby) or, with `plus_plus`, `compacter++` (after
    /// the FFN, as Pfeiffer): GELU, bottleneck `m`, PHM projections with AdapterHub's defaults.
    pub fn compacter(bottleneck: usize, plus_plus: bool) -> Self {
        let base = if plus_plus {
            AdapterConfig::pfeiffer(bottleneck, Activation::Gelu)
        } else {
            AdapterConfig {
                bottleneck,
                ..AdapterConfig::default()
            }
        };
        AdapterConfig {
            init: Init::Bert,
            phm: Some(PhmConfig::default()),
            ..base
        }
    }

    /// Checks the configuration against a base model of `hidden` width and `layers` layers.
    pub fn validate(&self, hidden: usize, layers: usize) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::config("adapter", field, msg));
        for (l, m) in std::iter::once((None, self.bottleneck))
            .chain(self.layer_bottleneck.iter().map(|(&l, &m)| (Some(l), m)))
        {
            let field = match l {
                Some(l) => format!("layer_bottleneck.{l}"),
                None => "bottleneck".to_string(),
            };
            if m == 0 {
                return bad(&field, "must be at least 1".into());
            }
            if m > hidden * 4 {
                return bad(
                    &field,
                    format!("{m} is larger than 4× the hidden size {hidden}"),
                );
            }
            if let Some(l) = l.filter(|&l| l >= layers) {
                return bad(
                    &field,
                    format!("layer {l} does not exist (the base has layers 0..{layers})"),
                );
            }
        }
        if !(self.init_std.is_finite() && self.init_std >= 0.0) {
            return bad("init_std", "must be a finite number ≥ 0".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", format!("{} is not in [0, 1)", self.dropout));
        }
        if let Scaling::Fixed(f) = self.scaling {
            if !f.is_finite() {
                return bad("scaling", "must be a finite number".into());
            }
        }
        if self.residual == Residual::PostAdd && !self.original_ln_before {
            return bad(
                "residual_before_ln",
                "\"post_add\" needs original_ln_before = true (there is no addition before the adapter otherwise)".into(),
            );
        }
        if let Some(&l) = self.leave_out.iter().find(|&&l| l >= layers) {
            return bad(
                "leave_out",
                format!("layer {l} does not exist (the base has layers 0..{layers})"),
            );
        }
        if let Some(p) = &self.phm {
            let sizes: Vec<usize> = (0..layers)
                .filter(|&l| self.has_layer(l))
                .map(|l| self.bottleneck_at(l))
                .collect();
            let per_layer = sizes.windows(2).any(|w| w[0] != w[1]);
            if let Err((field, msg)) = p.validate(hidden, &sizes, per_layer) {
                return bad(field, msg);
            }
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
        let m = (hidden as f64 / factor).floor() as usize;
        if m == 0 {
            return Err(Error::config(
                "adapter",
                "reduction_factor",
                format!(
                    "{factor} leaves no bottleneck: hidden size {hidden} / {factor} is below 1"
                ),
            ));
        }
        Ok(m)
    }

    /// The sites this placement uses in each layer.
    pub fn sites(&self) -> &'static [Site] {
        match self.placement {
            Placement::Houlsby => &[Site::Attention, Site::Ffn],
            Placement::Pfeiffer => &[Site::Ffn],
            Placement::Attention => &[Site::Attention],
        }
    }

    /// Whether layer `layer` carries adapters.
    pub fn has_layer(&self, layer: usize) -> bool {
        !self.leave_out.contains(&layer)
    }

    /// Bottleneck size m of layer `layer`.
    pub fn bottleneck_at(&self, layer: usize) -> usize {
        self.layer_bottleneck
            .get(&layer)
            .copied()
            .unwrap_or(self.bottleneck)
    }

    /// Whether this is the plain adapter `x + up(f(down(x)))` followed by the original residual +
    /// LayerNorm, which the fused kernel computes.
    pub fn is_plain(&self) -> bool {
        !self.parallel
            && !self.original_ln_before
            && self.original_ln_after
            && self.residual == Residual::Sublayer
            && !self.ln_before
            && !self.ln_after
            && self.scaling == Scaling::Fixed(1.0)
            && self.dropout == 0.0
    }

    /// Trainable parameters of all adapters.
    pub fn num_params(&self, hidden: usize, layers: usize) -> usize {
        self.param_keys("x", hidden, layers)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The tensors of one site of layer `layer` with their shapes (a Compacter's shared tensors
    /// are in [`AdapterConfig::param_keys`] only).
    pub fn param_shapes_at(&self, layer: usize, hidden: usize) -> Vec<(Part, Vec<usize>)> {
        let (m, d) = (self.bottleneck_at(layer), hidden);
        let mut v = match &self.phm {
            None => vec![
                (Part::DownWeight, vec![m, d]),
                (Part::DownBias, vec![m]),
                (Part::UpWeight, vec![d, m]),
                (Part::UpBias, vec![d]),
            ],
            Some(p) => {
                let mut v = Vec::new();
                for (proj, dims, bias) in [
                    (PhmProj::Down, (d, m), Part::DownBias),
                    (PhmProj::Up, (m, d), Part::UpBias),
                ] {
                    for (t, shape) in p.site_tensors(dims) {
                        v.push((Part::Phm(proj, t), shape));
                    }
                    if p.phm_bias {
                        v.push((bias, vec![dims.1]));
                    }
                }
                v
            }
        };
        if self.ln_before {
            v.push((Part::LnBeforeWeight, vec![d]));
            v.push((Part::LnBeforeBias, vec![d]));
        }
        if self.ln_after {
            v.push((Part::LnAfterWeight, vec![d]));
            v.push((Part::LnAfterBias, vec![d]));
        }
        match self.scaling {
            Scaling::Learned => v.push((Part::Scaling, vec![1])),
            Scaling::Channel => v.push((Part::Scaling, vec![d])),
            Scaling::Fixed(_) => {}
        }
        v
    }

    /// Every adapter tensor of the configuration: checkpoint name (without `bert.`) and shape.
    pub fn param_shapes(
        &self,
        name: &str,
        hidden: usize,
        layers: usize,
    ) -> Vec<(String, Vec<usize>)> {
        self.param_keys(name, hidden, layers)
            .into_iter()
            .map(|(k, s)| (k.name().to_string(), s))
            .collect()
    }

    /// Every adapter tensor of the configuration: typed key and shape.
    pub fn param_keys(
        &self,
        name: &str,
        hidden: usize,
        layers: usize,
    ) -> Vec<(ParamKey, Vec<usize>)> {
        let mut v = Vec::new();
        for l in (0..layers).filter(|&l| self.has_layer(l)) {
            for &site in self.sites() {
                for (part, shape) in self.param_shapes_at(l, hidden) {
                    v.push((self.param_key(l, site, name, part), shape));
                }
            }
        }
        if let Some(p) = &self.phm {
            let first = (0..layers).find(|&l| self.has_layer(l)).unwrap_or(0);
            for (leaf, _, _, shape) in p.shared_tensors(hidden, self.bottleneck) {
                v.push((phm::shared_key(name, &leaf, first), shape));
            }
        }
        v
    }

    /// New tensors of every adapter of task `name`, drawn from `rng` in a fixed order: projections
    /// by the configured scheme (PHM tensors as AdapterHub draws them), biases zero, norms and
    /// scales one.
    pub fn new_params(
        &self,
        name: &str,
        hidden: usize,
        layers: usize,
        rng: &mut Rng,
        dev: &Device,
    ) -> Result<Vec<(ParamKey, Tensor)>> {
        let mut v = Vec::new();
        for l in (0..layers).filter(|&l| self.has_layer(l)) {
            for &site in self.sites() {
                for (part, shape) in self.param_shapes_at(l, hidden) {
                    let values = self.init_values(part, &shape, rng);
                    let t = Tensor::from_vec(values, shape, dev)?;
                    v.push((self.param_key(l, site, name, part), t));
                }
            }
        }
        if let Some(p) = &self.phm {
            let first = (0..layers).find(|&l| self.has_layer(l)).unwrap_or(0);
            for (leaf, _, t, shape) in p.shared_tensors(hidden, self.bottleneck) {
                let values = p.init_values(t, &shape, true, rng);
                let tensor = Tensor::from_vec(values, shape, dev)?;
                v.push((phm::shared_key(name, &leaf, first), tensor));
            }
        }
        Ok(v)
    }

    /// The values of a new site tensor `part` of `shape`.
    fn init_values(&self, part: Part, shape: &[usize], rng: &mut Rng) -> Vec<f32> {
        let n: usize = shape.iter().product();
        match part {
            Part::DownWeight | Part::UpWeight => {
                let fan_in = shape[1] as f64;
                (0..n)
                    .map(|_| {
                        (match (self.init, part) {
                            (Init::TruncatedNormal, _) => rng.truncated_normal(self.init_std),
                            (Init::Bert, _) => rng.normal() * 0.02,
                            (Init::Houlsby, _) => rng.truncated_normal(1e-2),
                            // Kaiming-uniform with a = sqrt(5), as torch.nn.Linear: bound 1/sqrt(fan_in).
                            (Init::MamAdapter, Part::DownWeight) => {
                                (2.0 * rng.uniform() - 1.0) / fan_in.sqrt()
                            }
                            (Init::MamAdapter, _) => 0.0,
                        }) as f32
                    })
                    .collect()
            }
            Part::Phm(_, t) => match &self.phm {
                Some(p) => p.init_values(t, shape, false, rng),
                None => vec![0.0; n],
            },
            Part::LnBeforeWeight | Part::LnAfterWeight | Part::Scaling => vec![1.0; n],
            Part::DownBias | Part::UpBias | Part::LnBeforeBias | Part::LnAfterBias => vec![0.0; n],
        }
    }

    /// The typed key of one adapter tensor (see [`AdapterConfig::param_name`]).
    pub fn param_key(&self, layer: usize, site: Site, adapter: &str, part: Part) -> ParamKey {
        ParamKey::new(
            self.param_name(layer, site, adapter, part),
            Role::Adapter { layer },
            part.leaf(),
        )
    }

    /// The checkpoint name of one adapter tensor, as AdapterHub names it (without the `bert.` prefix).
    /// With `ln_before` the down projection is the second module of `adapter_down`. With PHM
    /// projections, `DownWeight` / `UpWeight` name the derived weights, and the biases are `b`.
    pub fn param_name(&self, layer: usize, site: Site, adapter: &str, part: Part) -> String {
        let down = if self.ln_before {
            "adapter_down.1"
        } else {
            "adapter_down.0"
        };
        let phm_leaf;
        let leaf = match part {
            Part::Phm(proj, t) => {
                let module = match proj {
                    PhmProj::Down => down,
                    PhmProj::Up => "adapter_up",
                };
                phm_leaf = format!("{module}.{}", t.leaf());
                phm_leaf.as_str()
            }
            Part::DownBias if self.phm.is_some() => {
                phm_leaf = format!("{down}.b");
                phm_leaf.as_str()
            }
            Part::UpBias if self.phm.is_some() => "adapter_up.b",
            Part::DownWeight if self.ln_before => "adapter_down.1.weight",
            Part::DownBias if self.ln_before => "adapter_down.1.bias",
            Part::DownWeight => "adapter_down.0.weight",
            Part::DownBias => "adapter_down.0.bias",
            Part::UpWeight => "adapter_up.weight",
            Part::UpBias => "adapter_up.bias",
            Part::LnBeforeWeight => "adapter_norm_before.weight",
            Part::LnBeforeBias => "adapter_norm_before.bias",
            Part::LnAfterWeight => "adapter_norm_after.weight",
            Part::LnAfterBias => "adapter_norm_after.bias",
            Part::Scaling => "scaling",
        };
        format!(
            "encoder.layer.{layer}.{}.adapters.{adapter}.{leaf}",
            site.module()
        )
    }
}

/// The checkpoint name of one tensor of a plain adapter (no `ln_before`), as AdapterHub names it
/// (without the `bert.` prefix). `part` is one of `down.weight`, `down.bias`, `up.weight`, `up.bias`.
pub fn param_name(layer: usize, site: Site, adapter: &str, part: &str) -> String {
    let part = match part {
        "down.weight" => Part::DownWeight,
        "down.bias" => Part::DownBias,
        "up.weight" => Part::UpWeight,
        _ => Part::UpBias,
    };
    AdapterConfig::default().param_name(layer, site, adapter, part)
}
