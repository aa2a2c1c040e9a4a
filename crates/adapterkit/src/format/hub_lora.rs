//! AdapterHub's `LoRAConfig` (`"architecture": "lora"`, which also carries (IA)³) as a typed
//! struct, every key as adapters 1.3 writes it, converted to and from [`LoraConfig`]. Options we
//! do not implement are refused by name.

use super::hub::{refuse_true, ForBase, Refusal};
use crate::adapter::lora::{Composition, LoraConfig, LoraInit, Projection};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// AdapterHub's `LoRAConfig`. Absent keys take the library's defaults (the `lora` preset's).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubLoraConfig {
    /// α (a number; the library writes an integer).
    #[serde(default)]
    pub alpha: Option<Value>,
    /// `"lora"`.
    pub architecture: String,
    /// Which attention projections: `"q"`, `"k"`, `"v"`.
    #[serde(default)]
    pub attn_matrices: Option<Vec<String>>,
    /// `"add"` (LoRA) or `"scale"` ((IA)³).
    #[serde(default)]
    pub composition_mode: Option<String>,
    /// Dropout on LoRA's input (only 0: we merge LoRA into the weights).
    #[serde(default)]
    pub dropout: Option<f64>,
    /// Parameter dtype (only `null`).
    #[serde(default)]
    pub dtype: Option<Value>,
    /// `"lora"`, `"bert"` or `"ia3"` (`"vera"` is refused).
    #[serde(default)]
    pub init_weights: Option<String>,
    /// Seed of the library's own init (irrelevant once trained).
    #[serde(default)]
    pub init_weights_seed: Option<i64>,
    /// LoRA on the FFN's first projection.
    #[serde(default)]
    pub intermediate_lora: Option<bool>,
    /// Layers left unchanged.
    #[serde(default)]
    pub leave_out: Option<Vec<usize>>,
    /// LoRA on the FFN's second projection.
    #[serde(default)]
    pub output_lora: Option<bool>,
    /// Rank.
    #[serde(default)]
    pub r: Option<usize>,
    /// LoRA on the attention projections named by `attn_matrices`.
    #[serde(default)]
    pub selfattn_lora: Option<bool>,
    /// DoRA (refused).
    #[serde(default)]
    pub use_dora: Option<bool>,
    /// Gated LoRA (refused).
    #[serde(default)]
    pub use_gating: Option<bool>,
    /// VeRA (refused unless null).
    #[serde(default)]
    pub vera_b: Option<Value>,
    /// VeRA (refused unless null).
    #[serde(default)]
    pub vera_d: Option<Value>,
}

type Refused<T> = std::result::Result<T, Refusal>;

impl TryFrom<ForBase<'_, HubLoraConfig>> for LoraConfig {
    type Error = Refusal;

    fn try_from(b: ForBase<'_, HubLoraConfig>) -> Refused<LoraConfig> {
        let c = b.config;
        refuse_true("use_dora", c.use_dora, "DoRA is not implemented")?;
        refuse_true(
            "use_gating",
            c.use_gating,
            "gated LoRA (UniPELT) is not implemented",
        )?;
        for (key, v) in [
            ("vera_b", &c.vera_b),
            ("vera_d", &c.vera_d),
            ("dtype", &c.dtype),
        ] {
            if let Some(v) = v.as_ref().filter(|v| !v.is_null()) {
                return Err(Refusal::new(
                    key,
                    format!("`{v}` is not supported: expected null (VeRA and other dtypes are not implemented)"),
                ));
            }
        }
        if let Some(p) = c.dropout.filter(|&p| p != 0.0) {
            return Err(Refusal::new(
                "dropout",
                format!(
                    "`{p}` is not supported: adapterkit runs LoRA merged into the weights, which \
                     has no separate input to drop; use 0"
                ),
            ));
        }
        let composition = match c.composition_mode.as_deref() {
            None | Some("add") => Composition::Add,
            Some("scale") => Composition::Scale,
            Some(v) => {
                return Err(Refusal::new(
                    "composition_mode",
                    format!("`\"{v}\"`: expected \"add\" or \"scale\""),
                ))
            }
        };
        let init = match c.init_weights.as_deref() {
            None | Some("lora") => LoraInit::Lora,
            Some("bert") => LoraInit::Bert,
            Some("ia3") => LoraInit::Ia3,
            Some(v) => {
                return Err(Refusal::new(
                    "init_weights",
                    format!("`\"{v}\"`: expected \"lora\", \"bert\" or \"ia3\""),
                ))
            }
        };
        let alpha = match &c.alpha {
            None => 8.0,
            Some(v) => v
                .as_f64()
                .filter(|a| a.is_finite())
                .ok_or_else(|| Refusal::new("alpha", format!("`{v}`: expected a number")))?,
        };
        let mut targets = Vec::new();
        if c.selfattn_lora.unwrap_or(true) {
            let letters = c
                .attn_matrices
                .clone()
                .unwrap_or_else(|| vec!["q".into(), "v".into()]);
            for m in &letters {
                let p = match m.as_str() {
                    "q" => Projection::Query,
                    "k" => Projection::Key,
                    "v" => Projection::Value,
                    other => {
                        return Err(Refusal::new(
                            "attn_matrices",
                            format!("`\"{other}\"`: expected \"q\", \"k\" or \"v\""),
                        ))
                    }
                };
                if !targets.contains(&p) {
                    targets.push(p);
                }
            }
            targets.sort();
        }
        if c.intermediate_lora.unwrap_or(false) {
            targets.push(Projection::Intermediate);
        }
        if c.output_lora.unwrap_or(false) {
            targets.push(Projection::Output);
        }
        let cfg = LoraConfig {
            targets,
            leave_out: c.leave_out.clone().unwrap_or_default(),
            r: c.r.unwrap_or(8),
            alpha,
            composition,
            init,
        };
        cfg.validate(b.hidden, b.intermediate, b.layers)
            .map_err(|e| Refusal::new("config", e.to_string()))?;
        Ok(cfg)
    }
}

impl From<&LoraConfig> for HubLoraConfig {
    /// Every key AdapterHub 1.3 writes, so the Python library reads back exactly this LoRA.
    fn from(c: &LoraConfig) -> HubLoraConfig {
        let letters: Vec<String> = c
            .targets
            .iter()
            .filter_map(|p| p.attn_letter().map(String::from))
            .collect();
        let alpha = if c.alpha.fract() == 0.0 && c.alpha.abs() < 1e15 {
            json!(c.alpha as i64)
        } else {
            json!(c.alpha)
        };
        HubLoraConfig {
            alpha: Some(alpha),
            architecture: "lora".into(),
            selfattn_lora: Some(!letters.is_empty()),
            attn_matrices: Some(if letters.is_empty() {
                vec!["q".into(), "v".into()]
            } else {
                letters
            }),
            composition_mode: Some(
                match c.composition {
                    Composition::Add => "add",
                    Composition::Scale => "scale",
                }
                .into(),
            ),
            dropout: Some(0.0),
            dtype: Some(Value::Null),
            init_weights: Some(c.init.hub_name().into()),
            init_weights_seed: None,
            intermediate_lora: Some(c.targets.contains(&Projection::Intermediate)),
            leave_out: Some(c.leave_out.clone()),
            output_lora: Some(c.targets.contains(&Projection::Output)),
            r: Some(c.r),
            use_dora: Some(false),
            use_gating: Some(false),
            vera_b: Some(Value::Null),
            vera_d: Some(Value::Null),
        }
    }
}
