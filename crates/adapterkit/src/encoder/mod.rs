//! The frozen BERT encoder: typed modules loaded once ([`checkpoint`]), the view through which a
//! task's trained copies replace base tensors ([`view`]), per-row task routing ([`routing`]), the
//! forward pass ([`forward`]), its graph cut between layers for training ([`cuts`]) and inference helpers ([`predict`]).

pub mod batch;
pub mod checkpoint;
pub mod cuts;
pub mod forward;

pub mod routing;
pub mod view;

pub use crate::kernels::{LinearView, NormView};
pub use batch::Batch;
pub use checkpoint::{canonical_name, BertWeights, FusedQkv, Param, ParamValue};
pub use cuts::LayerCuts;
pub use forward::ForwardOptions;
pub use routing::{Routing, RowGroup};
pub use view::{LayerView, MergedWeights, SiteView, TaskParts, TaskView};

use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::kernels::{Backend, Precision};
use crate::tokenizer::TextTokenizer;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A frozen pre-trained encoder: configuration, typed weights, tokenizer. Shared read-only by every
/// task; nothing in this crate ever writes to it.
#[derive(Clone)]
pub struct BaseModel {
    /// Architecture read from `config.json`.
    pub config: BertConfig,
    /// The checkpoint's weights, by module.
    pub weights: BertWeights,
    /// Tokenizer of the checkpoint.
    pub tokenizer: TextTokenizer,
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Compute device.
    pub device: Device,
    /// The kernels every forward pass of this handle runs (see [`BaseModel::with_backend`]).
    pub backend: Backend,
}

impl BaseModel {
    /// Loads a Hugging Face BERT checkpoint directory: `config.json`, `model.safetensors` (or
    /// `pytorch_model.bin`) and `tokenizer.json` (or `vocab.txt`).
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_on(dir, &Device::Cpu)
    }

    /// [`BaseModel::load`] onto a given device (a CUDA device with the `cuda` feature).
    pub fn load_on(dir: &Path, device: &Device) -> Result<Self> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let weights_path = ["model.safetensors", "pytorch_model.bin"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
            .ok_or_else(|| {
                Error::io(
                    dir.join("model.safetensors"),
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no model.safetensors or pytorch_model.bin in the checkpoint directory",
                    ),
                )
            })?;
        let raw = crate::io::load_tensors(&weights_path)?;
        let tokenizer = TextTokenizer::from_dir(dir)?;
        tokenizer.check_fits(dir, &config)?;
        let mut model = Self::from_tensors(config, raw, tokenizer, dir, &weights_path)?;
        if !device.same_device(&Device::Cpu) {
            model.weights = model.weights.to_device(device)?;
            model.device = device.clone();
        }
        tracing::info!(
            dir = %dir.display(),
            params = model.num_params(),
            layers = model.config.num_hidden_layers,
            hidden = model.config.hidden_size,
            "loaded base model"
        );
        Ok(model)
    }

    /// Builds a base model from tensors already in memory, validating names and shapes.
    pub fn from_tensors(
        config: BertConfig,
        raw: HashMap<String, Tensor>,
        tokenizer: TextTokenizer,
        dir: &Path,
        source: &Path,
    ) -> Result<Self> {
        let weights = BertWeights::from_tensors(&config, raw, source)?;
        Ok(BaseModel {
            config,
            weights,
            tokenizer,
            dir: dir.to_path_buf(),
            device: Device::Cpu,
            backend: Backend::Fused,
        })
    }

    /// A base with random weights (normal, std `initializer_range`) of the shape `config` describes:
    /// for benchmarks and tests of architectures whose real checkpoints are not available.
    pub fn random(config: BertConfig, tokenizer: TextTokenizer, seed: u64) -> Result<Self> {
        config.validate("random model")?;
        let weights = BertWeights::random(&config, seed)?;
        Ok(BaseModel {
            config,
            weights,
            tokenizer,
            dir: PathBuf::from("<random>"),
            device: Device::Cpu,
            backend: Backend::Fused,
        })
    }

    /// The same model (its tensors shared, not copied) running `backend`'s kernels.
    pub fn with_backend(&self, backend: Backend) -> Self {
        BaseModel {
            backend,
            ..self.clone()
        }
    }

    /// The same model whose frozen projections run their products in `precision`
    /// ([`BertWeights::with_precision`]); an error for fp16 on a CPU without AVX512_FP16.
    pub fn with_precision(&self, precision: Precision) -> Result<Self> {
        Ok(BaseModel {
            weights: self.weights.with_precision(precision)?,
            ..self.clone()
        })
    }

    /// The precision the frozen projections' products run in ([`BaseModel::with_precision`]).
    pub fn precision(&self) -> Precision {
        self.weights.precision()
    }

    /// A base parameter by canonical name.
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.weights
            .params()
            .into_iter()
            .find(|p| p.key.name() == name)
    }

    /// A base weight by canonical name, as a tensor (a fresh copy where it is held packed).
    pub fn weight(&self, name: &str) -> Result<Option<Tensor>> {
        self.param(name).map(Param::tensor).transpose()
    }

    /// All base weight names, sorted.
    pub fn weight_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .weights
            .params()
            .iter()
            .map(|p| p.key.name().to_string())
            .collect();
        v.sort();
        v
    }

    /// Number of base parameters.
    pub fn num_params(&self) -> usize {
        self.weights.params().iter().map(|p| p.elem_count()).sum()
    }

    /// Drops the base's copy of every weight `task` trains a copy of (all of them in full
    /// fine-tuning, the top layers in top-k): a process that trains such a task then holds the
    /// model once, as PyTorch does, instead of the frozen base beside the trained one. A
    /// released weight cannot be read: a forward of another task that needs it fails with an
    /// error naming it, never reads other values.
    pub fn release_owned_by(&mut self, task: &crate::TaskModel) -> Result<()> {
        self.weights.release(&|name| task.params.contains_key(name))
    }

    /// The same model with weights in `dtype` (f64 for gradient checks).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(BaseModel {
            weights: self.weights.map(&|t| Ok(t.to_dtype(dtype)?))?,
            ..self.clone()
        })
    }
}
