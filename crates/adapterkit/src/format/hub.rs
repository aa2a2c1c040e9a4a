//! AdapterHub's (`adapters`, Python) configuration files as typed structs: `adapter_config.json`
//! (a `BnConfig` in its envelope) and `head_config.json`. Unknown keys are refused by name; every
//! known key is honoured or refused with an error that names the key and value, none is silently
//! ignored. The conversions to and from our configurations are `TryFrom` / `From`.

use super::hub_lora::HubLoraConfig;
use crate::adapter::{
    AdapterConfig, AdapterMethod, Init, LoraConfig, PhmConfig, Placement, Residual, Scaling,
};
use crate::error::{Error, Result};
use crate::head::{HeadConfig, HeadKind, Pooling, MAX_HEAD_LAYERS};
use crate::kernels::Activation;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// The `version` we write; AdapterHub only compares it for LoRA fixes, so any 1.x works.
pub const HUB_VERSION: &str = "adapters.1.3.0";

/// The envelope AdapterHub writes around a configuration: what it is for and the config itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubFile<C> {
    /// The configuration.
    pub config: C,
    /// Hidden width of the model it was saved from.
    #[serde(default)]
    pub hidden_size: Option<usize>,
    /// The Python model class.
    #[serde(default)]
    pub model_class: Option<String>,
    /// The base model's name.
    #[serde(default)]
    pub model_name: Option<String>,
    /// The base model's type (`bert`).
    #[serde(default)]
    pub model_type: Option<String>,
    /// The adapter's or head's name.
    #[serde(default)]
    pub name: Option<String>,
    /// The library version that wrote it.
    #[serde(default)]
    pub version: Option<String>,
    /// Our file of trained base parameters (LayerNorms, top layers) that the run needs besides
    /// AdapterHub's files, when it has one: a copy without it would predict differently.
    /// AdapterHub keeps extra top-level keys of these files (its `meta_dict`) and ignores them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapterkit_base_params: Option<String>,
}

impl<C> HubFile<C> {
    /// The envelope alone, its configuration taken out.
    pub fn without_config(self) -> HubFile<()> {
        HubFile {
            config: (),
            hidden_size: self.hidden_size,
            model_class: self.model_class,
            model_name: self.model_name,
            model_type: self.model_type,
            name: self.name,
            version: self.version,
            adapterkit_base_params: self.adapterkit_base_params,
        }
    }
}

/// AdapterHub's `BnConfig` (bottleneck adapter options, as of adapters 1.3), every key as the
/// library writes it. `null` means the library's default for every key, as in Python.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BnConfig {
    /// Whether the residual is added before the adapter's own `ln_after`.
    #[serde(default)]
    pub adapter_residual_before_ln: Option<bool>,
    /// `"bottleneck"` (the only architecture this config may name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// Adapters after decoder cross-attention (a BERT encoder has none).
    #[serde(default)]
    pub cross_adapter: Option<bool>,
    /// Dropout on the adapter's input.
    #[serde(default)]
    pub dropout: Option<f64>,
    /// PHM option (only with `phm_layer`).
    #[serde(default, rename = "factorized_phm_W")]
    pub factorized_phm_w: Option<Value>,
    /// PHM option (only with `phm_layer`).
    #[serde(default)]
    pub factorized_phm_rule: Option<Value>,
    /// PHM option (only with `phm_layer`).
    #[serde(default)]
    pub hypercomplex_nonlinearity: Option<Value>,
    /// `"bert"`, `"houlsby"` or `"mam_adapter"`.
    #[serde(default)]
    pub init_weights: Option<String>,
    /// Seed of the library's own init (irrelevant once trained).
    #[serde(default)]
    pub init_weights_seed: Option<i64>,
    /// Invertible adapter (refused).
    #[serde(default)]
    pub inv_adapter: Option<Value>,
    /// Invertible adapter size (only with `inv_adapter`).
    #[serde(default)]
    pub inv_adapter_reduction_factor: Option<Value>,
    /// A parallel adapter (`ParBnConfig`), beside the sub-layer.
    #[serde(default)]
    pub is_parallel: Option<bool>,
    /// PHM option (only with `phm_layer`).
    #[serde(default)]
    pub learn_phm: Option<Value>,
    /// Layers without adapters.
    #[serde(default)]
    pub leave_out: Option<Vec<usize>>,
    /// A new LayerNorm on the adapter's output.
    #[serde(default)]
    pub ln_after: Option<bool>,
    /// A new LayerNorm on the adapter's input.
    #[serde(default)]
    pub ln_before: Option<bool>,
    /// An adapter after multi-head attention.
    pub mh_adapter: bool,
    /// The nonlinearity between the projections.
    pub non_linearity: String,
    /// The original residual + LayerNorm after the adapter.
    #[serde(default)]
    pub original_ln_after: Option<bool>,
    /// The original residual + LayerNorm before the adapter.
    #[serde(default)]
    pub original_ln_before: Option<bool>,
    /// An adapter after the FFN.
    pub output_adapter: bool,
    /// PHM option (only with `phm_layer`).
    #[serde(default)]
    pub phm_bias: Option<Value>,
    /// PHM option (only with `phm_layer`).
    #[serde(default)]
    pub phm_c_init: Option<Value>,
    /// PHM option (only with `phm_layer`).
    #[serde(default)]
    pub phm_dim: Option<Value>,
    /// PHM option (only with `phm_layer`).
    #[serde(default)]
    pub phm_init_range: Option<Value>,
    /// PHM (Compacter) projections.
    #[serde(default)]
    pub phm_layer: Option<bool>,
    /// PHM option (only with `phm_layer`).
    #[serde(default)]
    pub phm_rank: Option<Value>,
    /// Hidden width / bottleneck width: a number, or `{"default": f, "<layer>": f}`.
    pub reduction_factor: Value,
    /// Where the skip connection starts: true, false or `"post_add"`.
    #[serde(default)]
    pub residual_before_ln: Option<Value>,
    /// Output scaling: a number, `"learned"` or `"channel"`.
    #[serde(default)]
    pub scaling: Option<Value>,
    /// PHM option (only with `phm_layer`).
    #[serde(default, rename = "shared_W_phm")]
    pub shared_w_phm: Option<Value>,
    /// PHM option (only with `phm_layer`).
    #[serde(default)]
    pub shared_phm_rule: Option<Value>,
    /// Stochastic depth (refused unless 0).
    #[serde(default)]
    pub stochastic_depth: Option<f64>,
    /// Gated adapters (refused).
    #[serde(default)]
    pub use_gating: Option<bool>,
}

/// The dimensions of the base a configuration is read for (reduction factors become bottleneck
/// sizes, layer keys are checked).
#[derive(Debug, Clone, Copy)]
pub struct ForBase<'a, C> {
    /// The configuration.
    pub config: &'a C,
    /// Hidden width.
    pub hidden: usize,
    /// FFN width (`intermediate_size`).
    pub intermediate: usize,
    /// Number of layers.
    pub layers: usize,
}

/// Why a configuration was refused: the key and what was wrong with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The offending key.
    pub key: String,
    /// What was wrong and what was expected.
    pub message: String,
}

impl Refusal {
    pub(crate) fn new(key: &str, message: impl Into<String>) -> Self {
        Refusal {
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// As an error naming the file `ctx`.
    pub fn in_file(self, ctx: &str) -> Error {
        Error::config(ctx, self.key, self.message)
    }
}

type Refused<T> = std::result::Result<T, Refusal>;

/// Bottleneck size for one reduction factor, as AdapterHub computes it: `max(1, int(d // factor))`.
fn bottleneck_for(hidden: usize, v: &Value) -> Refused<usize> {
    let f = v
        .as_f64()
        .filter(|f| f.is_finite() && *f > 0.0)
        .ok_or_else(|| {
            Refusal::new(
                "reduction_factor",
                format!("`{v}`: expected a positive number"),
            )
        })?;
    Ok(((hidden as f64 / f).floor() as usize).max(1))
}

/// A refusal of `key` when it is `true` (an option we do not implement).
pub(crate) fn refuse_true(key: &str, v: Option<bool>, what: &str) -> Refused<()> {
    match v {
        Some(true) => Err(Refusal::new(
            key,
            format!("`true` is not supported: {what}"),
        )),
        _ => Ok(()),
    }
}

impl TryFrom<ForBase<'_, BnConfig>> for AdapterConfig {
    type Error = Refusal;

    fn try_from(b: ForBase<'_, BnConfig>) -> Refused<AdapterConfig> {
        let (c, hidden, layers) = (b.config, b.hidden, b.layers);
        match c.architecture.as_deref() {
            None | Some("bottleneck") => {}
            Some(a) => {
                return Err(Refusal::new(
                    "architecture",
                    format!(
                        "`\"{a}\"` is not supported: only bottleneck adapters (\"bottleneck\") are"
                    ),
                ))
            }
        }
        refuse_true(
            "use_gating",
            c.use_gating,
            "gated adapters (UniPELT) are not implemented",
        )?;
        let phm = match c.phm_layer {
            Some(true) => Some(phm_from_hub(c)?),
            _ => None,
        };
        if let Some(v) = c.inv_adapter.as_ref().filter(|v| !v.is_null()) {
            return Err(Refusal::new(
                "inv_adapter",
                format!("`{v}` is not supported: invertible adapters are not implemented"),
            ));
        }
        if let Some(s) = c.stochastic_depth.filter(|&s| s != 0.0) {
            return Err(Refusal::new(
                "stochastic_depth",
                format!("`{s}` is not supported: stochastic depth is not implemented"),
            ));
        }
        // cross_adapter places adapters after decoder cross-attention; a BERT encoder has none, so
        // the option changes nothing here (as in the Python library) and is accepted either way.
        let placement = match (c.mh_adapter, c.output_adapter) {
            (true, true) => Placement::Houlsby,
            (false, true) => Placement::Pfeiffer,
            (true, false) => Placement::Attention,
            (false, false) => {
                return Err(Refusal::new(
                    "output_adapter",
                    "mh_adapter and output_adapter are both false: the adapter has no site",
                ))
            }
        };
        let (bottleneck, layer_bottleneck) = match &c.reduction_factor {
            Value::Object(map) => {
                for k in map.keys() {
                    let ok = k == "default" || k.parse::<usize>().is_ok_and(|l| l < layers);
                    if !ok {
                        return Err(Refusal::new(
                            "reduction_factor",
                            format!("key `{k}` is neither \"default\" nor a layer in 0..{layers}"),
                        ));
                    }
                }
                let default = match map.get("default") {
                    Some(v) => Some(bottleneck_for(hidden, v)?),
                    None => None,
                };
                let mut per_layer = BTreeMap::new();
                for l in 0..layers {
                    let m = match (map.get(&l.to_string()), default) {
                        (Some(v), _) => bottleneck_for(hidden, v)?,
                        (None, Some(m)) => m,
                        (None, None) => {
                            return Err(Refusal::new(
                                "reduction_factor",
                                format!("layer {l} has no entry and there is no \"default\""),
                            ))
                        }
                    };
                    per_layer.insert(l, m);
                }
                let base = default.or_else(|| per_layer.get(&0).copied()).unwrap_or(1);
                per_layer.retain(|_, m| *m != base);
                (base, per_layer)
            }
            v => (bottleneck_for(hidden, v)?, BTreeMap::new()),
        };
        let nonlinearity = Activation::parse(&c.non_linearity).ok_or_else(|| {
            Refusal::new(
                "non_linearity",
                format!(
                    "`\"{}\"` is not supported: expected one of {}",
                    c.non_linearity,
                    Activation::NAMES
                ),
            )
        })?;
        let residual = match &c.residual_before_ln {
            None | Some(Value::Null) | Some(Value::Bool(true)) => Residual::Sublayer,
            Some(Value::Bool(false)) => Residual::AdapterInput,
            Some(Value::String(s)) if s == "post_add" => Residual::PostAdd,
            Some(v) => {
                return Err(Refusal::new(
                    "residual_before_ln",
                    format!("`{v}`: expected true, false or \"post_add\""),
                ))
            }
        };
        let scaling = match c.scaling.as_ref().filter(|v| !v.is_null()) {
            None => Scaling::Fixed(1.0),
            Some(v) => Scaling::from_json(v).map_err(|m| Refusal::new("scaling", m))?,
        };
        let init = match c.init_weights.as_deref() {
            None | Some("bert") => Init::Bert,
            Some("houlsby") => Init::Houlsby,
            Some("mam_adapter") => Init::MamAdapter,
            Some(v) => {
                return Err(Refusal::new(
                    "init_weights",
                    format!("`\"{v}\"`: expected \"bert\", \"houlsby\" or \"mam_adapter\""),
                ))
            }
        };
        let dropout = c.dropout.unwrap_or(0.0);
        let cfg = AdapterConfig {
            placement,
            bottleneck,
            nonlinearity,
            init_std: 1e-2,
            leave_out: c.leave_out.clone().unwrap_or_default(),
            layer_bottleneck,
            original_ln_before: c.original_ln_before.unwrap_or(false),
            original_ln_after: c.original_ln_after.unwrap_or(true),
            residual,
            ln_before: c.ln_before.unwrap_or(false),
            ln_after: c.ln_after.unwrap_or(false),
            adapter_residual_before_ln: c.adapter_residual_before_ln.unwrap_or(false),
            scaling,
            init,
            dropout,
            parallel: c.is_parallel.unwrap_or(false),
            phm,
        };
        if cfg.phm.is_some() && init != Init::Bert {
            return Err(Refusal::new(
                "init_weights",
                format!(
                    "`\"{}\"` with phm_layer: AdapterHub 1.3 fails on it (a PHM layer has no \
                     `weight`); use \"bert\", which leaves the PHM layers' own init",
                    init.hub_name()
                ),
            ));
        }
        cfg.validate(hidden, layers)
            .map_err(|e| Refusal::new("config", e.to_string()))?;
        Ok(cfg)
    }
}

/// The PHM (Compacter) options of a config with `phm_layer: true`; `null` or absent keys take
/// AdapterHub's defaults.
fn phm_from_hub(c: &BnConfig) -> Refused<PhmConfig> {
    let d = PhmConfig::default();
    let present = |v: &Option<Value>| v.clone().filter(|v| !v.is_null());
    let flag = |key: &str, v: &Option<Value>, default: bool| -> Refused<bool> {
        match present(v) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(b),
            Some(v) => Err(Refusal::new(key, format!("`{v}`: expected true or false"))),
        }
    };
    let count = |key: &str, v: &Option<Value>, default: usize| -> Refused<usize> {
        match present(v) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|&n| n >= 1)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| Refusal::new(key, format!("`{v}`: expected a whole number ≥ 1"))),
        }
    };
    if !flag("learn_phm", &c.learn_phm, true)? {
        return Err(Refusal::new(
            "learn_phm",
            "`false` is not supported: frozen PHM rules are not implemented",
        ));
    }
    let phm_c_init = match present(&c.phm_c_init) {
        None => d.phm_c_init,
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
            Refusal::new(
                "phm_c_init",
                format!("`{v}`: expected \"normal\" or \"uniform\""),
            )
        })?,
    };
    let hypercomplex_nonlinearity = match present(&c.hypercomplex_nonlinearity) {
        None => d.hypercomplex_nonlinearity,
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
            Refusal::new(
                "hypercomplex_nonlinearity",
                format!(
                    "`{v}`: expected \"glorot-uniform\", \"glorot-normal\", \"normal\" or \"phm\""
                ),
            )
        })?,
    };
    let phm_init_range = match present(&c.phm_init_range) {
        None => d.phm_init_range,
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .ok_or_else(|| {
                Refusal::new("phm_init_range", format!("`{v}`: expected a number ≥ 0"))
            })?,
    };
    Ok(PhmConfig {
        phm_dim: count("phm_dim", &c.phm_dim, d.phm_dim)?,
        shared_phm_rule: flag("shared_phm_rule", &c.shared_phm_rule, d.shared_phm_rule)?,
        factorized_phm_rule: flag(
            "factorized_phm_rule",
            &c.factorized_phm_rule,
            d.factorized_phm_rule,
        )?,
        factorized_phm_w: flag("factorized_phm_W", &c.factorized_phm_w, d.factorized_phm_w)?,
        shared_w_phm: flag("shared_W_phm", &c.shared_w_phm, d.shared_w_phm)?,
        phm_rank: count("phm_rank", &c.phm_rank, d.phm_rank)?,
        phm_bias: flag("phm_bias", &c.phm_bias, d.phm_bias)?,
        phm_c_init,
        phm_init_range,
        hypercomplex_nonlinearity,
    })
}

/// A reduction factor whose `int(d // factor)` is exactly `m` in floating point.
fn reduction_for(hidden: usize, m: usize) -> Value {
    if hidden.is_multiple_of(m) {
        json!((hidden / m) as f64)
    } else {
        json!(hidden as f64 / (m as f64 + 0.5))
    }
}

impl From<ForBase<'_, AdapterConfig>> for BnConfig {
    /// Every key AdapterHub 1.3 writes, so the Python library reads back exactly this adapter.
    fn from(b: ForBase<'_, AdapterConfig>) -> BnConfig {
        let (cfg, hidden) = (b.config, b.hidden);
        // AdapterHub writes its PHM defaults even without PHM layers.
        let phm = cfg.phm.clone().unwrap_or_default();
        let reduction_factor = if cfg.layer_bottleneck.is_empty() {
            reduction_for(hidden, cfg.bottleneck)
        } else {
            let mut map = serde_json::Map::new();
            map.insert("default".into(), reduction_for(hidden, cfg.bottleneck));
            for (l, &m) in &cfg.layer_bottleneck {
                map.insert(l.to_string(), reduction_for(hidden, m));
            }
            Value::Object(map)
        };
        BnConfig {
            adapter_residual_before_ln: Some(cfg.adapter_residual_before_ln),
            architecture: None,
            cross_adapter: Some(false),
            dropout: Some(cfg.dropout),
            factorized_phm_w: Some(json!(phm.factorized_phm_w)),
            factorized_phm_rule: Some(json!(phm.factorized_phm_rule)),
            hypercomplex_nonlinearity: serde_json::to_value(phm.hypercomplex_nonlinearity).ok(),
            init_weights: Some(cfg.init.hub_name().into()),
            init_weights_seed: None,
            inv_adapter: None,
            inv_adapter_reduction_factor: None,
            is_parallel: Some(cfg.parallel),
            learn_phm: Some(json!(true)),
            leave_out: Some(cfg.leave_out.clone()),
            ln_after: Some(cfg.ln_after),
            ln_before: Some(cfg.ln_before),
            mh_adapter: matches!(cfg.placement, Placement::Houlsby | Placement::Attention),
            non_linearity: cfg.nonlinearity.name().into(),
            original_ln_after: Some(cfg.original_ln_after),
            original_ln_before: Some(cfg.original_ln_before),
            output_adapter: matches!(cfg.placement, Placement::Houlsby | Placement::Pfeiffer),
            phm_bias: Some(json!(phm.phm_bias)),
            phm_c_init: serde_json::to_value(phm.phm_c_init).ok(),
            phm_dim: Some(json!(phm.phm_dim)),
            phm_init_range: Some(json!(phm.phm_init_range)),
            phm_layer: Some(cfg.phm.is_some()),
            phm_rank: Some(json!(phm.phm_rank)),
            reduction_factor,
            residual_before_ln: Some(match cfg.residual {
                Residual::Sublayer => json!(true),
                Residual::AdapterInput => json!(false),
                Residual::PostAdd => json!("post_add"),
            }),
            scaling: serde_json::to_value(cfg.scaling).ok(),
            shared_w_phm: Some(json!(phm.shared_w_phm)),
            shared_phm_rule: Some(json!(phm.shared_phm_rule)),
            stochastic_depth: Some(0.0),
            use_gating: Some(false),
        }
    }
}

/// AdapterHub's `head_config.json` `config` object for a classification (or, with one label,
/// regression) head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubHeadConfig {
    /// The activation between dense layers; absent means tanh, `null` none.
    #[serde(default = "absent_activation")]
    pub activation_function: Value,
    /// Mean pooling, which AdapterHub lacks: written so that the Python library refuses the head
    /// rather than silently pools differently.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapterkit_pooling: Option<String>,
    /// Biases on the dense layers.
    #[serde(default)]
    pub bias: Option<bool>,
    /// Dropout (training only).
    #[serde(default)]
    pub dropout_prob: Option<Value>,
    /// `"classification"` (the only head type implemented).
    pub head_type: String,
    /// Ids of the labels by name (absent for written `id2label` only).
    #[serde(default, skip_serializing)]
    pub id2label: Option<Value>,
    /// Label name → class index.
    #[serde(default)]
    pub label2id: Option<BTreeMap<String, usize>>,
    /// Dense layers.
    #[serde(default)]
    pub layers: Option<usize>,
    /// Outputs (1 = regression).
    #[serde(default)]
    pub num_labels: Option<usize>,
    /// Whether the head reads the checkpoint's pooler.
    #[serde(default)]
    pub use_pooler: Option<bool>,
}

fn absent_activation() -> Value {
    Value::String("tanh".into())
}

impl TryFrom<&HubHeadConfig> for HeadConfig {
    type Error = Refusal;

    fn try_from(c: &HubHeadConfig) -> Refused<HeadConfig> {
        if c.head_type != "classification" {
            return Err(Refusal::new(
                "head_type",
                format!(
                    "`\"{}\"` is not supported: only \"classification\" heads (num_labels 1 = regression) are",
                    c.head_type
                ),
            ));
        }
        let num_labels = c.num_labels.unwrap_or(2);
        let layers = c.layers.unwrap_or(2);
        if !(1..=MAX_HEAD_LAYERS).contains(&layers) {
            return Err(Refusal::new(
                "layers",
                format!("{layers} is not in 1..={MAX_HEAD_LAYERS}"),
            ));
        }
        let activation = match &c.activation_function {
            Value::Null => None,
            v => Some(v.as_str().and_then(Activation::parse).ok_or_else(|| {
                Refusal::new(
                    "activation_function",
                    format!(
                        "`{v}` is not supported: expected one of {}",
                        Activation::NAMES
                    ),
                )
            })?),
        };
        let pooling = match (
            c.use_pooler.unwrap_or(false),
            c.adapterkit_pooling.as_deref(),
        ) {
            (_, Some("mean")) => Pooling::Mean,
            (_, Some(v)) => {
                return Err(Refusal::new(
                    "adapterkit_pooling",
                    format!("`\"{v}\"`: expected \"mean\""),
                ))
            }
            (true, None) => Pooling::Pooler,
            (false, None) => Pooling::Cls,
        };
        let (kind, labels) = if num_labels == 1 {
            (HeadKind::Regression, Vec::new())
        } else {
            let mut labels: Vec<String> = (0..num_labels).map(|i| format!("LABEL_{i}")).collect();
            for (label, &id) in c.label2id.iter().flatten() {
                let slot = labels.get_mut(id).ok_or_else(|| {
                    Refusal::new(
                        "label2id",
                        format!("`{label}`: id `{id}` is not in 0..{num_labels}"),
                    )
                })?;
                *slot = label.clone();
            }
            (HeadKind::Classification, labels)
        };
        let head = HeadConfig {
            kind,
            labels,
            pooling,
            layers,
            activation,
            bias: c.bias.unwrap_or(true),
            pair: false,
        };
        head.validate()
            .map_err(|e| Refusal::new("config", e.to_string()))?;
        Ok(head)
    }
}

impl From<&HeadConfig> for HubHeadConfig {
    fn from(head: &HeadConfig) -> HubHeadConfig {
        HubHeadConfig {
            activation_function: head
                .activation
                .map_or(Value::Null, |a| Value::String(a.name().into())),
            adapterkit_pooling: (head.pooling == Pooling::Mean).then(|| "mean".into()),
            bias: Some(head.bias),
            dropout_prob: None,
            head_type: "classification".into(),
            id2label: None,
            label2id: match head.kind {
                HeadKind::Classification => Some(
                    head.labels
                        .iter()
                        .enumerate()
                        .map(|(i, l)| (l.clone(), i))
                        .collect(),
                ),
                HeadKind::Regression => None,
            },
            layers: Some(head.layers),
            num_labels: Some(head.num_outputs()),
            use_pooler: Some(head.pooling == Pooling::Pooler),
        }
    }
}

/// Parses JSON text as `T`, naming the file and the key path of any error
/// (`config.mh_adapter: invalid type …`).
pub fn parse<T: DeserializeOwned>(ctx: &str, text: &str) -> Result<T> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| path_error(ctx, e))
}

/// A deserialisation error as a config error naming the file and the key path.
fn path_error(ctx: &str, e: serde_path_to_error::Error<serde_json::Error>) -> Error {
    let path = e.path().to_string();
    let inner = e.into_inner();
    // A file that is not JSON at all has no field at fault.
    if inner.is_syntax() || inner.is_eof() {
        return Error::Json {
            path: ctx.into(),
            source: inner,
        };
    }
    Error::config(ctx, path, inner.to_string())
}

/// Reads a bottleneck adapter configuration given as AdapterHub JSON, either the whole
/// `adapter_config.json` or its `config` object, for a base of `hidden` width and `layers` layers.
/// `ctx` names the file in errors.
pub fn adapter_config_from_hub(
    ctx: &str,
    value: &Value,
    hidden: usize,
    layers: usize,
) -> Result<AdapterConfig> {
    let inner = value.get("config").unwrap_or(value);
    let config: BnConfig =
        serde_path_to_error::deserialize(inner).map_err(|e| path_error(ctx, e))?;
    AdapterConfig::try_from(ForBase {
        config: &config,
        hidden,
        // Bottleneck adapters sit on hidden-width states; the FFN width does not enter.
        intermediate: 4 * hidden,
        layers,
    })
    .map_err(|r| r.in_file(ctx))
}

/// Whether an AdapterHub configuration (the whole file or its `config` object) is a `LoRAConfig`.
pub fn is_lora(value: &Value) -> bool {
    architecture(value) == Some("lora")
}

/// Whether an AdapterHub configuration is a `PrefixTuningConfig`.
pub fn is_prefix(value: &Value) -> bool {
    architecture(value) == Some("prefix_tuning")
}

/// The `architecture` an AdapterHub configuration names, if any.
fn architecture(value: &Value) -> Option<&str> {
    let inner = value.get("config").unwrap_or(value);
    inner.get("architecture").and_then(Value::as_str)
}

/// Reads any adapter configuration we implement from AdapterHub JSON (the whole
/// `adapter_config.json` or its `config` object): a bottleneck `BnConfig`, a `LoRAConfig`
/// (`"architecture": "lora"`, also (IA)³) or a `PrefixTuningConfig`, for the base `cfg`. `ctx` names the file in errors.
pub fn method_from_hub(
    ctx: &str,
    value: &Value,
    cfg: &crate::config::BertConfig,
) -> Result<AdapterMethod> {
    let (d, layers) = (cfg.hidden_size, cfg.num_hidden_layers);
    let inner = value.get("config").unwrap_or(value);
    if is_prefix(value) {
        let config: super::hub_prefix::HubPrefixConfig =
            serde_path_to_error::deserialize(inner).map_err(|e| path_error(ctx, e))?;
        return crate::adapter::PrefixConfig::try_from(ForBase {
            config: &config,
            hidden: d,
            intermediate: cfg.intermediate_size,
            layers,
        })
        .map(AdapterMethod::Prefix)
        .map_err(|r| r.in_file(ctx));
    }
    if !is_lora(value) {
        return adapter_config_from_hub(ctx, value, d, layers).map(AdapterMethod::Bottleneck);
    }
    let config: HubLoraConfig =
        serde_path_to_error::deserialize(inner).map_err(|e| path_error(ctx, e))?;
    LoraConfig::try_from(ForBase {
        config: &config,
        hidden: d,
        intermediate: cfg.intermediate_size,
        layers,
    })
    .map(AdapterMethod::Lora)
    .map_err(|r| r.in_file(ctx))
}

/// The AdapterHub name of a parameter alias the Python library also writes: with `ln_before` the
/// norm is registered twice, as `adapter_norm_before` and as module 0 of `adapter_down`.
pub fn ln_before_alias(name: &str) -> Option<String> {
    name.strip_suffix("adapter_norm_before.weight")
        .map(|p| format!("{p}adapter_down.0.weight"))
        .or_else(|| {
            name.strip_suffix("adapter_norm_before.bias")
                .map(|p| format!("{p}adapter_down.0.bias"))
        })
}
