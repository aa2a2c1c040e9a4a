//! Task heads: classification (single sentence or pair) and regression on a pooled representation.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// What the head predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// One of `labels`, trained with cross-entropy.
    Classification,
    /// One real number, trained with mean squared error.
    Regression,
}

/// How the token states become one vector per example.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The [CLS] state as it is (AdapterHub's default head input).
    Cls,
    /// The [CLS] state through the checkpoint's frozen pooler (dense + tanh), as in the paper.
    Pooler,
    /// The mean of the non-padding token states.
    Mean,
}

/// A head configuration: plain data, saved with the adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    /// Classification or regression.
    pub kind: HeadKind,
    /// Class names in index order (empty for regression).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Pooling of the encoder output.
    #[serde(default = "default_pooling")]
    pub pooling: Pooling,
    /// 1 = a linear layer; 2 = dense + tanh + linear (AdapterHub's default classification head).
    #[serde(default = "default_layers")]
    pub layers: usize,
    /// Whether inputs are sentence pairs.
    #[serde(default)]
    pub pair: bool,
}

fn default_pooling() -> Pooling {
    Pooling::Cls
}
fn default_layers() -> usize {
    2
}

impl HeadConfig {
    /// A classification head over the given class names.
    pub fn classification(labels: Vec<String>) -> Self {
        HeadConfig {
            kind: HeadKind::Classification,
            labels,
            pooling: Pooling::Cls,
            layers: 2,
            pair: false,
        }
    }

    /// Number of outputs.
    pub fn num_outputs(&self) -> usize {
        match self.kind {
            HeadKind::Classification => self.labels.len(),
            HeadKind::Regression => 1,
        }
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<()> {
        if !(1..=2).contains(&self.layers) {
            return Err(Error::config("head", "layers", "must be 1 or 2"));
        }
        if self.kind == HeadKind::Classification && self.labels.len() < 2 {
            return Err(Error::config(
                "head",
                "labels",
                format!(
                    "a classification head needs at least 2 classes, got {}",
                    self.labels.len()
                ),
            ));
        }
        Ok(())
    }

    /// Names and shapes of the head's tensors (AdapterHub's `heads.{name}.{i}` layout).
    pub fn param_shapes(&self, name: &str, hidden: usize) -> Vec<(String, Vec<usize>)> {
        let out = self.num_outputs();
        let mut v = Vec::new();
        if self.layers == 2 {
            v.push((format!("heads.{name}.1.weight"), vec![hidden, hidden]));
            v.push((format!("heads.{name}.1.bias"), vec![hidden]));
            v.push((format!("heads.{name}.4.weight"), vec![out, hidden]));
            v.push((format!("heads.{name}.4.bias"), vec![out]));
        } else {
            v.push((format!("heads.{name}.1.weight"), vec![out, hidden]));
            v.push((format!("heads.{name}.1.bias"), vec![out]));
        }
        v
    }
}
