//! Task heads: classification (single sentence or pair) and regression on a pooled representation.

use crate::error::{Error, Result};
use crate::kernels::Activation;
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
    /// 1 = a linear layer; 2 = dense + activation + linear (AdapterHub's default classification
    /// head); n = n − 1 hidden dense layers of the hidden width.
    #[serde(default = "default_layers")]
    pub layers: usize,
    /// Activation after each hidden dense layer (`None`: none, AdapterHub's `null`).
    #[serde(default = "default_head_activation")]
    pub activation: Option<Activation>,
    /// Whether the output layer has a bias (AdapterHub's `bias`).
    #[serde(default = "default_true")]
    pub bias: bool,
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
fn default_head_activation() -> Option<Activation> {
    Some(Activation::Tanh)
}
fn default_true() -> bool {
    true
}

/// Most layers a head may have.
pub const MAX_HEAD_LAYERS: usize = 8;

/// One dense layer of a head: its checkpoint prefix (`heads.{name}.{index}`), output width, bias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadLayer {
    /// Tensor name prefix.
    pub prefix: String,
    /// Output width.
    pub out: usize,
    /// Whether it has a bias.
    pub bias: bool,
    /// Whether the head's activation follows it.
    pub activation: bool,
}

impl HeadConfig {
    /// A classification head over the given class names.
    pub fn classification(labels: Vec<String>) -> Self {
        HeadConfig {
            kind: HeadKind::Classification,
            labels,
            pooling: Pooling::Cls,
            layers: 2,
            activation: Some(Activation::Tanh),
            bias: true,
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
        if !(1..=MAX_HEAD_LAYERS).contains(&self.layers) {
            return Err(Error::config(
                "head",
                "layers",
                format!("{} is not in 1..={MAX_HEAD_LAYERS}", self.layers),
            ));
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

    /// The dense layers in order, named as AdapterHub's `nn.Sequential` numbers its modules
    /// (dropout, linear, activation, dropout, linear, …).
    pub fn dense_layers(&self, name: &str, hidden: usize) -> Vec<HeadLayer> {
        let mut v = Vec::new();
        let mut index = 0;
        for l in 0..self.layers {
            index += 1; // the dropout module
            let last = l + 1 == self.layers;
            v.push(HeadLayer {
                prefix: format!("heads.{name}.{index}"),
                out: if last { self.num_outputs() } else { hidden },
                bias: !last || self.bias,
                activation: !last && self.activation.is_some(),
            });
            index += 1;
            if !last && self.activation.is_some() {
                index += 1;
            }
        }
        v
    }

    /// Names and shapes of the head's tensors (AdapterHub's `heads.{name}.{i}` layout).
    pub fn param_shapes(&self, name: &str, hidden: usize) -> Vec<(String, Vec<usize>)> {
        let mut v = Vec::new();
        for layer in self.dense_layers(name, hidden) {
            v.push((format!("{}.weight", layer.prefix), vec![layer.out, hidden]));
            if layer.bias {
                v.push((format!("{}.bias", layer.prefix), vec![layer.out]));
            }
        }
        v
    }
}
