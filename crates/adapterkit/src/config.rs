//! The Hugging Face `config.json` of a BERT-family checkpoint.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Architecture hyper-parameters read from a checkpoint's `config.json`; unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states (d).
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Longest supported input in tokens.
    pub max_position_embeddings: usize,
    /// Number of segment (token type) ids.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Dropout on hidden states during training.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities during training.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// FFN activation; only the exact (erf) GELU of BERT is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Model family, e.g. `bert`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Std of the normal init of new weights (heads).
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    /// Id of the padding token.
    #[serde(default)]
    pub pad_token_id: u32,
    /// Position embedding type; only `absolute` is supported.
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f64 {
    0.1
}
fn default_act() -> String {
    "gelu".into()
}
fn default_model_type() -> String {
    "bert".into()
}
fn default_init_range() -> f64 {
    0.02
}
fn default_position_type() -> String {
    "absolute".into()
}

impl BertConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: BertConfig = crate::io::read_json(path)?;
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }

    /// Checks the values the encoder relies on.
    pub fn validate(&self, context: &str) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        // Bounds far above any BERT-family model: a size field is checked before anything of that
        // size is allocated (a typo of 1e9 layers must be an error, not an abort).
        let limit = |field: &str| match field {
            "num_hidden_layers" | "num_attention_heads" => 1 << 10,
            "type_vocab_size" => 1 << 10,
            "hidden_size" | "max_position_embeddings" => 1 << 16,
            "intermediate_size" => 1 << 18,
            _ => 1 << 24,
        };
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::config(context, field, "must be a positive integer"));
            }
            if v > limit(field) {
                return Err(Error::config(
                    context,
                    field,
                    format!(
                        "{v} is above {} (no BERT-family model is that large)",
                        limit(field)
                    ),
                ));
            }
        }
        if self.pad_token_id as usize >= self.vocab_size {
            return Err(Error::config(
                context,
                "pad_token_id",
                format!(
                    "{} is not below vocab_size {}",
                    self.pad_token_id, self.vocab_size
                ),
            ));
        }
        if !(self.layer_norm_eps.is_finite()
            && self.layer_norm_eps > 0.0
            && self.layer_norm_eps < 1.0)
        {
            return Err(Error::config(
                context,
                "layer_norm_eps",
                format!(
                    "{} must be a small positive number (BERT: 1e-12)",
                    self.layer_norm_eps
                ),
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::config(
                context,
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by {} heads",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !matches!(self.hidden_act.as_str(), "gelu" | "gelu_python") {
            return Err(Error::config(
                context,
                "hidden_act",
                format!("`{}` is not supported (expected \"gelu\")", self.hidden_act),
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(Error::config(
                context,
                "position_embedding_type",
                format!(
                    "`{}` is not supported (expected \"absolute\")",
                    self.position_embedding_type
                ),
            ));
        }
        for (field, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::config(context, field, "must be in [0, 1)"));
            }
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}
