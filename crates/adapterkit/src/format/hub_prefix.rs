//! AdapterHub's `PrefixTuningConfig` (`"architecture": "prefix_tuning"`) as a typed struct, every
//! key as adapters 1.3 writes it, converted to and from [`PrefixConfig`]. Options we do not
//! implement are refused by name.

use super::hub::{refuse_true, ForBase, Refusal};
use crate::adapter::PrefixConfig;
use crate::kernels::Activation;
use serde::{Deserialize, Serialize};

/// AdapterHub's `PrefixTuningConfig`. Absent keys take the library's defaults.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubPrefixConfig {
    /// `"prefix_tuning"`.
    pub architecture: String,
    /// Width of the reparametrising MLP's hidden layer.
    #[serde(default)]
    pub bottleneck_size: Option<usize>,
    /// Prefixes in decoder cross-attention (a BERT encoder has none).
    #[serde(default)]
    pub cross_prefix: Option<bool>,
    /// Dropout on the prefixes (only 0).
    #[serde(default)]
    pub dropout: Option<f64>,
    /// Prefixes in the encoder's self-attention (must be true: a BERT has nothing else).
    #[serde(default)]
    pub encoder_prefix: Option<bool>,
    /// Prefixes stored directly instead of produced by the MLP.
    #[serde(default)]
    pub flat: Option<bool>,
    /// Seed of the library's own init (irrelevant once trained).
    #[serde(default)]
    pub init_weights_seed: Option<i64>,
    /// Layers without prefixes.
    #[serde(default)]
    pub leave_out: Option<Vec<usize>>,
    /// The MLP's nonlinearity.
    #[serde(default)]
    pub non_linearity: Option<String>,
    /// Positions per layer.
    #[serde(default)]
    pub prefix_length: Option<usize>,
    /// One gate for keys and values (only with `use_gating`).
    #[serde(default)]
    pub shared_gating: Option<bool>,
    /// Gated prefixes (refused).
    #[serde(default)]
    pub use_gating: Option<bool>,
}

type Refused<T> = std::result::Result<T, Refusal>;

impl TryFrom<ForBase<'_, HubPrefixConfig>> for PrefixConfig {
    type Error = Refusal;

    fn try_from(b: ForBase<'_, HubPrefixConfig>) -> Refused<PrefixConfig> {
        let c = b.config;
        if c.architecture != "prefix_tuning" {
            return Err(Refusal::new(
                "architecture",
                format!("`\"{}\"`: expected \"prefix_tuning\"", c.architecture),
            ));
        }
        refuse_true(
            "use_gating",
            c.use_gating,
            "gated prefixes (UniPELT) are not implemented",
        )?;
        if c.encoder_prefix == Some(false) {
            return Err(Refusal::new(
                "encoder_prefix",
                "`false` leaves a BERT encoder without prefixes: nothing would be adapted",
            ));
        }
        if let Some(p) = c.dropout.filter(|&p| p != 0.0) {
            return Err(Refusal::new(
                "dropout",
                format!("`{p}` is not supported: prefix dropout is not implemented; use 0"),
            ));
        }
        let d = PrefixConfig::default();
        let non_linearity = match c.non_linearity.as_deref() {
            None => d.non_linearity,
            Some(s) => Activation::parse(s).ok_or_else(|| {
                Refusal::new(
                    "non_linearity",
                    format!(
                        "`\"{s}\"` is not supported: expected one of {}",
                        Activation::NAMES
                    ),
                )
            })?,
        };
        let cfg = PrefixConfig {
            prefix_length: c.prefix_length.unwrap_or(d.prefix_length),
            flat: c.flat.unwrap_or(false),
            bottleneck_size: c.bottleneck_size.unwrap_or(d.bottleneck_size),
            non_linearity,
            leave_out: c.leave_out.clone().unwrap_or_default(),
        };
        cfg.validate(b.hidden, b.layers)
            .map_err(|e| Refusal::new("config", e.to_string()))?;
        Ok(cfg)
    }
}

impl From<&PrefixConfig> for HubPrefixConfig {
    /// Every key AdapterHub 1.3 writes, so the Python library reads back exactly these prefixes.
    fn from(c: &PrefixConfig) -> HubPrefixConfig {
        HubPrefixConfig {
            architecture: "prefix_tuning".into(),
            bottleneck_size: Some(c.bottleneck_size),
            cross_prefix: Some(true),
            dropout: Some(0.0),
            encoder_prefix: Some(true),
            flat: Some(c.flat),
            init_weights_seed: None,
            leave_out: Some(c.leave_out.clone()),
            non_linearity: Some(c.non_linearity.name().into()),
            prefix_length: Some(c.prefix_length),
            shared_gating: Some(true),
            use_gating: Some(false),
        }
    }
}
