//! AdapterHub (`adapters`, Python) interoperability: reading and writing `adapter_config.json` and
//! `head_config.json`, and loading adapter directories saved by the Python library.
//!
//! Every `BnConfig` key is either honoured or refused with an error that names the key and value;
//! none is silently ignored.

use crate::adapter::{AdapterConfig, Init, Placement, Residual, Scaling};
use crate::error::{Error, Result};
use crate::head::{HeadConfig, HeadKind, Pooling, MAX_HEAD_LAYERS};
use crate::kernels::Activation;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// The `version` we write; AdapterHub only compares it for LoRA fixes, so any 1.x works.
pub const HUB_VERSION: &str = "adapters.1.3.0";

/// `BnConfig` keys that only matter with `phm_layer: true`, which is refused anyway.
const PHM_KEYS: &[&str] = &[
    "phm_dim",
    "factorized_phm_W",
    "shared_W_phm",
    "shared_phm_rule",
    "factorized_phm_rule",
    "phm_c_init",
    "phm_init_range",
    "learn_phm",
    "hypercomplex_nonlinearity",
    "phm_rank",
    "phm_bias",
];

struct Reader<'a> {
    ctx: String,
    obj: &'a Map<String, Value>,
}

impl<'a> Reader<'a> {
    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::config(self.ctx.clone(), key, msg)
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn required(&self, key: &str) -> Result<&'a Value> {
        self.get(key)
            .ok_or_else(|| self.err(key, "missing (AdapterHub's BnConfig requires it)"))
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(key, format!("`{v}`: expected true or false"))),
        }
    }

    fn number(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| self.err(key, format!("`{v}`: expected a number"))),
        }
    }

    /// Refuses `key` unless it is absent or equal to `ok`, explaining what it would have needed.
    fn refuse_unless(&self, key: &str, ok: &Value, what: &str) -> Result<()> {
        match self.get(key) {
            Some(v) if v != ok => Err(self.err(key, format!("`{v}` is not supported: {what}"))),
            _ => Ok(()),
        }
    }
}

/// Bottleneck size for one reduction factor, as AdapterHub computes it: `max(1, int(d // factor))`.
fn bottleneck_for(r: &Reader<'_>, key: &str, hidden: usize, v: &Value) -> Result<usize> {
    let f = v
        .as_f64()
        .filter(|f| f.is_finite() && *f > 0.0)
        .ok_or_else(|| r.err(key, format!("`{v}`: expected a positive number")))?;
    Ok(((hidden as f64 / f).floor() as usize).max(1))
}

/// Parses the `config` object of an AdapterHub `adapter_config.json` (or the object holding it) for a
/// base of `hidden` width and `layers` layers. `ctx` names the file in errors.
pub fn adapter_config_from_hub(
    ctx: &str,
    value: &Value,
    hidden: usize,
    layers: usize,
) -> Result<AdapterConfig> {
    let value = value.get("config").unwrap_or(value);
    let obj = value
        .as_object()
        .ok_or_else(|| Error::config(ctx, "config", "expected a JSON object"))?;
    let r = Reader {
        ctx: ctx.to_string(),
        obj,
    };
    for key in obj.keys() {
        let known = matches!(
            key.as_str(),
            "architecture"
                | "mh_adapter"
                | "output_adapter"
                | "reduction_factor"
                | "non_linearity"
                | "original_ln_before"
                | "original_ln_after"
                | "ln_before"
                | "ln_after"
                | "init_weights"
                | "init_weights_seed"
                | "is_parallel"
                | "scaling"
                | "use_gating"
                | "residual_before_ln"
                | "adapter_residual_before_ln"
                | "inv_adapter"
                | "inv_adapter_reduction_factor"
                | "cross_adapter"
                | "leave_out"
                | "dropout"
                | "phm_layer"
                | "stochastic_depth"
        ) || PHM_KEYS.contains(&key.as_str());
        if !known {
            return Err(r.err(
                key,
                "unknown bottleneck-adapter option (not in AdapterHub's BnConfig as of adapters 1.3)",
            ));
        }
    }
    match r.get("architecture") {
        None => {}
        Some(Value::String(s)) if s == "bottleneck" => {}
        Some(v) => {
            return Err(r.err(
                "architecture",
                format!("`{v}` is not supported: only bottleneck adapters (\"bottleneck\") are"),
            ))
        }
    }
    r.refuse_unless(
        "is_parallel",
        &json!(false),
        "parallel adapters (ParBnConfig) are not implemented",
    )?;
    r.refuse_unless(
        "use_gating",
        &json!(false),
        "gated adapters (UniPELT) are not implemented",
    )?;
    r.refuse_unless(
        "phm_layer",
        &json!(false),
        "PHM (Compacter) layers are not implemented",
    )?;
    r.refuse_unless(
        "inv_adapter",
        &Value::Null,
        "invertible adapters are not implemented",
    )?;
    if r.number("stochastic_depth", 0.0)? != 0.0 {
        return Err(r.err(
            "stochastic_depth",
            format!(
                "`{}` is not supported: stochastic depth is not implemented",
                obj["stochastic_depth"]
            ),
        ));
    }
    // cross_adapter places adapters after decoder cross-attention; a BERT encoder has none, so the
    // option changes nothing here (as in the Python library) and is accepted either way.
    r.bool("cross_adapter", false)?;
    if let Some(v) = r.get("init_weights_seed") {
        if !v.is_u64() && !v.is_i64() {
            return Err(r.err(
                "init_weights_seed",
                format!("`{v}`: expected an integer or null"),
            ));
        }
    }

    let mh = r.bool("mh_adapter", false)?;
    let out = r.bool("output_adapter", false)?;
    r.required("mh_adapter")?;
    r.required("output_adapter")?;
    let placement = match (mh, out) {
        (true, true) => Placement::Houlsby,
        (false, true) => Placement::Pfeiffer,
        (true, false) => Placement::Attention,
        (false, false) => {
            return Err(r.err(
                "output_adapter",
                "mh_adapter and output_adapter are both false: the adapter has no site",
            ))
        }
    };

    let rf = r.required("reduction_factor")?;
    let (bottleneck, layer_bottleneck) = match rf {
        Value::Object(map) => {
            for k in map.keys() {
                let ok = k == "default" || k.parse::<usize>().is_ok_and(|l| l < layers);
                if !ok {
                    return Err(r.err(
                        "reduction_factor",
                        format!("key `{k}` is neither \"default\" nor a layer in 0..{layers}"),
                    ));
                }
            }
            let default = match map.get("default") {
                Some(v) => Some(bottleneck_for(&r, "reduction_factor", hidden, v)?),
                None => None,
            };
            let mut per_layer = BTreeMap::new();
            for l in 0..layers {
                let m = match (map.get(&l.to_string()), default) {
                    (Some(v), _) => bottleneck_for(&r, "reduction_factor", hidden, v)?,
                    (None, Some(m)) => m,
                    (None, None) => {
                        return Err(r.err(
                            "reduction_factor",
                            format!("layer {l} has no entry and there is no \"default\""),
                        ))
                    }
                };
                per_layer.insert(l, m);
            }
            let base = default.unwrap_or(per_layer[&0]);
            per_layer.retain(|_, m| *m != base);
            (base, per_layer)
        }
        v => (
            bottleneck_for(&r, "reduction_factor", hidden, v)?,
            BTreeMap::new(),
        ),
    };

    let nl = r.required("non_linearity")?;
    let nonlinearity = nl.as_str().and_then(Activation::parse).ok_or_else(|| {
        r.err(
            "non_linearity",
            format!(
                "`{nl}` is not supported: expected one of {}",
                Activation::NAMES
            ),
        )
    })?;

    let residual = match r.get("residual_before_ln") {
        None | Some(Value::Bool(true)) => Residual::Sublayer,
        Some(Value::Bool(false)) => Residual::AdapterInput,
        Some(Value::String(s)) if s == "post_add" => Residual::PostAdd,
        Some(v) => {
            return Err(r.err(
                "residual_before_ln",
                format!("`{v}`: expected true, false or \"post_add\""),
            ))
        }
    };
    let scaling = match r.get("scaling") {
        None => Scaling::Fixed(1.0),
        Some(v) => Scaling::from_json(v).map_err(|m| r.err("scaling", m))?,
    };
    let init = match r.get("init_weights") {
        None => Init::Bert,
        Some(Value::String(s)) if s == "bert" => Init::Bert,
        Some(Value::String(s)) if s == "houlsby" => Init::Houlsby,
        Some(Value::String(s)) if s == "mam_adapter" => Init::MamAdapter,
        Some(v) => {
            return Err(r.err(
                "init_weights",
                format!("`{v}`: expected \"bert\", \"houlsby\" or \"mam_adapter\""),
            ))
        }
    };
    let leave_out = match r.get("leave_out") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .map(|l| l as usize)
                    .ok_or_else(|| r.err("leave_out", format!("`{v}`: expected layer numbers")))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(v) => return Err(r.err("leave_out", format!("`{v}`: expected a list"))),
    };
    let cfg = AdapterConfig {
        placement,
        bottleneck,
        nonlinearity,
        init_std: 1e-2,
        leave_out,
        layer_bottleneck,
        original_ln_before: r.bool("original_ln_before", false)?,
        original_ln_after: r.bool("original_ln_after", true)?,
        residual,
        ln_before: r.bool("ln_before", false)?,
        ln_after: r.bool("ln_after", false)?,
        adapter_residual_before_ln: r.bool("adapter_residual_before_ln", false)?,
        scaling,
        init,
        dropout: r.number("dropout", 0.0)?,
    };
    cfg.validate(hidden, layers)
        .map_err(|e| Error::config(ctx, "config", e.to_string()))?;
    Ok(cfg)
}

/// A reduction factor whose `int(d // factor)` is exactly `m` in floating point.
fn reduction_for(hidden: usize, m: usize) -> Value {
    if hidden.is_multiple_of(m) {
        json!((hidden / m) as f64)
    } else {
        json!(hidden as f64 / (m as f64 + 0.5))
    }
}

/// The `config` object of `adapter_config.json` for an adapter (all keys AdapterHub 1.3 writes).
pub fn adapter_config_to_hub(cfg: &AdapterConfig, hidden: usize) -> Value {
    let reduction = if cfg.layer_bottleneck.is_empty() {
        reduction_for(hidden, cfg.bottleneck)
    } else {
        let mut map = Map::new();
        map.insert("default".into(), reduction_for(hidden, cfg.bottleneck));
        for (l, &m) in &cfg.layer_bottleneck {
            map.insert(l.to_string(), reduction_for(hidden, m));
        }
        Value::Object(map)
    };
    json!({
        "adapter_residual_before_ln": cfg.adapter_residual_before_ln,
        "cross_adapter": false,
        "dropout": cfg.dropout,
        "factorized_phm_W": true,
        "factorized_phm_rule": false,
        "hypercomplex_nonlinearity": "glorot-uniform",
        "init_weights": cfg.init.hub_name(),
        "init_weights_seed": null,
        "inv_adapter": null,
        "inv_adapter_reduction_factor": null,
        "is_parallel": false,
        "learn_phm": true,
        "leave_out": cfg.leave_out,
        "ln_after": cfg.ln_after,
        "ln_before": cfg.ln_before,
        "mh_adapter": matches!(cfg.placement, Placement::Houlsby | Placement::Attention),
        "non_linearity": cfg.nonlinearity.name(),
        "original_ln_after": cfg.original_ln_after,
        "original_ln_before": cfg.original_ln_before,
        "output_adapter": matches!(cfg.placement, Placement::Houlsby | Placement::Pfeiffer),
        "phm_bias": true,
        "phm_c_init": "normal",
        "phm_dim": 4,
        "phm_init_range": 0.0001,
        "phm_layer": false,
        "phm_rank": 1,
        "reduction_factor": reduction,
        "residual_before_ln": match cfg.residual {
            Residual::Sublayer => json!(true),
            Residual::AdapterInput => json!(false),
            Residual::PostAdd => json!("post_add"),
        },
        "scaling": cfg.scaling,
        "shared_W_phm": false,
        "shared_phm_rule": true,
        "stochastic_depth": 0.0,
        "use_gating": false
    })
}

/// Parses an AdapterHub `head_config.json` (the whole file). Returns the head and the name its
/// tensors carry (`heads.{name}.…`).
pub fn head_config_from_hub(ctx: &str, value: &Value) -> Result<(HeadConfig, String)> {
    let name = value
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::config(ctx, "name", "missing: expected the head's name"))?
        .to_string();
    let obj = value
        .get("config")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::config(ctx, "config", "missing: expected a JSON object"))?;
    let r = Reader {
        ctx: ctx.to_string(),
        obj,
    };
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "head_type"
                | "num_labels"
                | "layers"
                | "activation_function"
                | "label2id"
                | "id2label"
                | "use_pooler"
                | "bias"
                | "dropout_prob"
                | "adapterkit_pooling"
        ) {
            return Err(r.err(key, "unknown option of a classification head"));
        }
    }
    let head_type = r.required("head_type")?;
    if head_type != "classification" {
        return Err(r.err(
            "head_type",
            format!("`{head_type}` is not supported: only \"classification\" heads (num_labels 1 = regression) are"),
        ));
    }
    let int = |key: &str, default: u64| -> Result<usize> {
        match r.get(key) {
            None => Ok(default as usize),
            Some(v) => v
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| r.err(key, format!("`{v}`: expected a whole number"))),
        }
    };
    let num_labels = int("num_labels", 2)?;
    let layers = int("layers", 2)?;
    if !(1..=MAX_HEAD_LAYERS).contains(&layers) {
        return Err(r.err(
            "layers",
            format!("{layers} is not in 1..={MAX_HEAD_LAYERS}"),
        ));
    }
    let activation = match obj.get("activation_function") {
        None => Some(Activation::Tanh),
        Some(Value::Null) => None,
        Some(v) => Some(v.as_str().and_then(Activation::parse).ok_or_else(|| {
            r.err(
                "activation_function",
                format!(
                    "`{v}` is not supported: expected one of {}",
                    Activation::NAMES
                ),
            )
        })?),
    };
    let pooling = match (r.bool("use_pooler", false)?, r.get("adapterkit_pooling")) {
        (_, Some(Value::String(s))) if s == "mean" => Pooling::Mean,
        (_, Some(v)) => {
            return Err(r.err("adapterkit_pooling", format!("`{v}`: expected \"mean\"")))
        }
        (true, None) => Pooling::Pooler,
        (false, None) => Pooling::Cls,
    };
    let (kind, labels) = if num_labels == 1 {
        (HeadKind::Regression, Vec::new())
    } else {
        let mut labels: Vec<String> = (0..num_labels).map(|i| format!("LABEL_{i}")).collect();
        if let Some(map) = r.get("label2id") {
            let map = map
                .as_object()
                .ok_or_else(|| r.err("label2id", "expected an object of label: id"))?;
            for (label, id) in map {
                let i = id.as_u64().map(|i| i as usize).filter(|&i| i < num_labels);
                let i = i.ok_or_else(|| {
                    r.err(
                        "label2id",
                        format!("`{label}`: id `{id}` is not in 0..{num_labels}"),
                    )
                })?;
                labels[i] = label.clone();
            }
        }
        (HeadKind::Classification, labels)
    };
    let head = HeadConfig {
        kind,
        labels,
        pooling,
        layers,
        activation,
        bias: r.bool("bias", true)?,
        pair: false,
    };
    head.validate()
        .map_err(|e| Error::config(ctx, "config", e.to_string()))?;
    Ok((head, name))
}

/// The `config` object of `head_config.json` for a head. Mean pooling has no AdapterHub
/// equivalent: it is written as an extra key that makes the Python library refuse the head rather
/// than silently pool differently.
pub fn head_config_to_hub(head: &HeadConfig) -> Value {
    let label2id: Value = match head.kind {
        HeadKind::Classification => Value::Object(
            head.labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.clone(), json!(i)))
                .collect(),
        ),
        HeadKind::Regression => Value::Null,
    };
    let mut cfg = json!({
        "activation_function": head.activation.map(Activation::name),
        "bias": head.bias,
        "dropout_prob": null,
        "head_type": "classification",
        "label2id": label2id,
        "layers": head.layers,
        "num_labels": head.num_outputs(),
        "use_pooler": head.pooling == Pooling::Pooler
    });
    if head.pooling == Pooling::Mean {
        cfg["adapterkit_pooling"] = json!("mean");
    }
    cfg
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
