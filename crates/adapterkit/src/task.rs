//! A task: its adapter, head and every parameter it trains, kept apart from the frozen base.
//!
//! All trainable-set choices share one mechanism: the task owns a copy of each base parameter it
//! trains (LayerNorms for Houlsby adapters, whole layers for top-k or full fine-tuning), and the
//! encoder prefers the task's copy. The base is never written, so tasks cannot disturb each other.

use crate::adapter::{param_name, AdapterConfig};
use crate::error::{Error, Result};
use crate::head::HeadConfig;
use crate::model::{is_layer_norm, BaseModel};
use crate::rng::Rng;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Which parameters a run trains; every baseline is a choice here, not a separate program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum TrainableSet {
    /// Bottleneck adapters + head, plus all LayerNorms unless `layernorms` is false (AdapterHub's default).
    Adapters {
        /// Whether the LayerNorms are trained too (the paper: yes).
        layernorms: bool,
    },
    /// Every base parameter + head (full fine-tuning).
    Full,
    /// The head only (linear probe on the frozen encoder).
    Head,
    /// The top `k` transformer layers + head.
    TopK {
        /// How many of the top layers are trained.
        k: usize,
    },
    /// All LayerNorms + head.
    Layernorm,
}

impl TrainableSet {
    /// A short name for reports, e.g. `adapters`, `top-2`.
    pub fn label(&self) -> String {
        match self {
            TrainableSet::Adapters { layernorms: true } => "adapters".into(),
            TrainableSet::Adapters { layernorms: false } => "adapters-frozen-ln".into(),
            TrainableSet::Full => "full".into(),
            TrainableSet::Head => "head".into(),
            TrainableSet::TopK { k } => format!("top-{k}"),
            TrainableSet::Layernorm => "layernorm".into(),
        }
    }

    /// Whether the task owns (and trains) its own copy of base parameter `name`.
    pub fn owns_base_param(&self, name: &str, num_layers: usize) -> bool {
        match self {
            TrainableSet::Adapters { layernorms } => *layernorms && is_layer_norm(name),
            TrainableSet::Full => true,
            TrainableSet::Head => false,
            TrainableSet::TopK { k } => (num_layers.saturating_sub(*k)..num_layers)
                .any(|l| name.starts_with(&format!("encoder.layer.{l}."))),
            TrainableSet::Layernorm => is_layer_norm(name),
        }
    }
}

/// The base model a task was made for; loading it onto another base is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseFingerprint {
    /// `model_type` of the base config.
    pub model_type: String,
    /// Hidden width.
    pub hidden_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
}

impl BaseFingerprint {
    /// The fingerprint of a loaded base.
    pub fn of(base: &BaseModel) -> Self {
        BaseFingerprint {
            model_type: base.config.model_type.clone(),
            hidden_size: base.config.hidden_size,
            num_hidden_layers: base.config.num_hidden_layers,
            vocab_size: base.config.vocab_size,
        }
    }
}

/// Our own metadata file in an adapter directory (`adapterkit.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskMeta {
    /// File format version.
    pub format: u32,
    /// Task (and adapter) name.
    pub name: String,
    /// What was trained.
    pub trainable: TrainableSet,
    /// Adapter configuration, if the task has adapters.
    pub adapter: Option<AdapterConfig>,
    /// Head configuration.
    pub head: HeadConfig,
    /// The base this task fits.
    pub base: BaseFingerprint,
    /// Maximum input length used in training (the default for prediction).
    pub max_len: usize,
}

/// A task's trainable state on top of a shared base model.
#[derive(Debug, Clone)]
pub struct TaskModel {
    /// Name; appears in tensor names (`adapters.{name}`, `heads.{name}`).
    pub name: String,
    /// Adapter configuration, if any.
    pub adapter: Option<AdapterConfig>,
    /// Head configuration.
    pub head: HeadConfig,
    /// What the task trains.
    pub trainable: TrainableSet,
    /// Every parameter the task owns, by checkpoint name (adapters, head, copies of base parameters).
    pub params: BTreeMap<String, Tensor>,
    /// Base the task fits.
    pub base: BaseFingerprint,
    /// Maximum input length.
    pub max_len: usize,
}

/// File names inside an adapter directory.
pub mod files {
    /// AdapterHub adapter config.
    pub const ADAPTER_CONFIG: &str = "adapter_config.json";
    /// AdapterHub adapter weights.
    pub const ADAPTER_WEIGHTS: &str = "adapter.safetensors";
    /// AdapterHub head config.
    pub const HEAD_CONFIG: &str = "head_config.json";
    /// AdapterHub head weights.
    pub const HEAD_WEIGHTS: &str = "model_head.safetensors";
    /// Our metadata.
    pub const META: &str = "adapterkit.json";
    /// Our copies of trained base parameters (LayerNorms, top-k layers, …).
    pub const BASE_PARAMS: &str = "adapterkit_params.safetensors";
}

const FORMAT_VERSION: u32 = 1;

fn validate_name(name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(Error::config(
            "task",
            "name",
            format!("`{name}` must be non-empty ASCII letters, digits, `_` or `-`"),
        ));
    }
    Ok(())
}

impl TaskModel {
    /// A fresh task: new adapters (near-identity init) and head, copies of the base parameters the
    /// trainable set trains. Init is drawn from `seed`.
    pub fn new(
        base: &BaseModel,
        name: &str,
        trainable: TrainableSet,
        adapter: Option<AdapterConfig>,
        head: HeadConfig,
        max_len: usize,
        seed: u64,
    ) -> Result<Self> {
        validate_name(name)?;
        head.validate()?;
        let cfg = &base.config;
        let (d, layers) = (cfg.hidden_size, cfg.num_hidden_layers);
        let is_adapters = matches!(trainable, TrainableSet::Adapters { .. });
        if is_adapters != adapter.is_some() {
            return Err(Error::config(
                "task",
                "adapter",
                "an adapter configuration goes with the `adapters` trainable set, and only with it",
            ));
        }
        if let TrainableSet::TopK { k } = trainable {
            if k == 0 || k > layers {
                return Err(Error::config(
                    "task",
                    "k",
                    format!("must be in 1..={layers}"),
                ));
            }
        }
        if head.pooling == crate::head::Pooling::Pooler
            && base.weight("pooler.dense.weight").is_none()
        {
            return Err(Error::config(
                "head",
                "pooling",
                "`pooler` needs a checkpoint with pooler weights; use `cls` or `mean`",
            ));
        }
        let dev = &base.device;
        let mut params = BTreeMap::new();
        let mut rng = Rng::derive(seed, "init");
        if let Some(a) = &adapter {
            a.validate(d, layers)?;
            let m = a.bottleneck;
            for l in (0..layers).filter(|&l| a.has_layer(l)) {
                for &site in a.sites() {
                    let mut draw = |rows: usize, cols: usize| -> Result<Tensor> {
                        let v: Vec<f32> = (0..rows * cols)
                            .map(|_| rng.truncated_normal(a.init_std) as f32)
                            .collect();
                        Ok(Tensor::from_vec(v, (rows, cols), dev)?)
                    };
                    params.insert(param_name(l, site, name, "down.weight"), draw(m, d)?);
                    params.insert(param_name(l, site, name, "up.weight"), draw(d, m)?);
                    params.insert(
                        param_name(l, site, name, "down.bias"),
                        Tensor::zeros(m, candle_core::DType::F32, dev)?,
                    );
                    params.insert(
                        param_name(l, site, name, "up.bias"),
                        Tensor::zeros(d, candle_core::DType::F32, dev)?,
                    );
                }
            }
        }
        for (pname, shape) in head.param_shapes(name, d) {
            let t = if shape.len() == 2 {
                let n = shape[0] * shape[1];
                let v: Vec<f32> = (0..n)
                    .map(|_| (rng.normal() * cfg.initializer_range) as f32)
                    .collect();
                Tensor::from_vec(v, shape, dev)?
            } else {
                Tensor::zeros(shape, candle_core::DType::F32, dev)?
            };
            params.insert(pname, t);
        }
        for bname in base.weight_names() {
            let is_pooler = bname.starts_with("pooler.");
            let owned = if is_pooler {
                trainable == TrainableSet::Full && head.pooling == crate::head::Pooling::Pooler
            } else {
                trainable.owns_base_param(&bname, layers)
            };
            if owned {
                if let Some(t) = base.weight(&bname) {
                    params.insert(bname, t.copy()?);
                }
            }
        }
        Ok(TaskModel {
            name: name.to_string(),
            adapter,
            head,
            trainable,
            params,
            base: BaseFingerprint::of(base),
            max_len,
        })
    }

    /// Number of parameters the task trains and stores.
    pub fn num_params(&self) -> usize {
        self.params.values().map(|t| t.elem_count()).sum()
    }

    /// A copy whose tensors carry no autograd history (for inference after or during training).
    pub fn detached(&self) -> TaskModel {
        let mut t = self.clone();
        for v in t.params.values_mut() {
            *v = v.detach();
        }
        t
    }

    /// The same task with parameters in `dtype` (f64 for gradient checks).
    pub fn to_dtype(&self, dtype: candle_core::DType) -> Result<TaskModel> {
        let mut t = self.clone();
        for v in t.params.values_mut() {
            *v = v.to_dtype(dtype)?;
        }
        Ok(t)
    }

    fn split_params(&self) -> [BTreeMap<String, Tensor>; 3] {
        let mut adapters = BTreeMap::new();
        let mut head = BTreeMap::new();
        let mut base = BTreeMap::new();
        for (k, v) in &self.params {
            if k.starts_with("heads.") {
                head.insert(k.clone(), v.clone());
            } else if k.contains(".adapters.") {
                adapters.insert(format!("bert.{k}"), v.clone());
            } else {
                base.insert(k.clone(), v.clone());
            }
        }
        [adapters, head, base]
    }

    /// Writes the task as an adapter directory (AdapterHub file and tensor names, plus our own
    /// metadata and trained base parameters). Every file is written atomically.
    pub fn save(&self, dir: &Path, base_name: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let [adapters, head, base] = self.split_params();
        let version = "adapters.1.2.0";
        if let Some(a) = &self.adapter {
            let cfg = serde_json::json!({
                "config": {
                    "adapter_residual_before_ln": false,
                    "architecture": "bottleneck",
                    "cross_adapter": false,
                    "dropout": 0.0,
                    "init_weights": "bert",
                    "inv_adapter": null,
                    "inv_adapter_reduction_factor": null,
                    "is_parallel": false,
                    "leave_out": a.leave_out,
                    "ln_after": false,
                    "ln_before": false,
                    "mh_adapter": a.placement == crate::adapter::Placement::Houlsby,
                    "non_linearity": a.nonlinearity.name(),
                    "original_ln_after": true,
                    "original_ln_before": false,
                    "output_adapter": true,
                    "phm_layer": false,
                    "reduction_factor": self.base.hidden_size as f64 / a.bottleneck as f64,
                    "residual_before_ln": true,
                    "scaling": 1.0,
                    "use_gating": false
                },
                "hidden_size": self.base.hidden_size,
                "model_class": "BertAdapterModel",
                "model_name": base_name,
                "model_type": self.base.model_type,
                "name": self.name,
                "version": version
            });
            crate::io::write_json(&dir.join(files::ADAPTER_CONFIG), &cfg)?;
            crate::io::save_safetensors(&dir.join(files::ADAPTER_WEIGHTS), &adapters)?;
        }
        let mut label2id = serde_json::Map::new();
        for (i, l) in self.head.labels.iter().enumerate() {
            label2id.insert(l.clone(), serde_json::json!(i));
        }
        let head_cfg = serde_json::json!({
            "config": {
                "activation_function": "tanh",
                "bias": true,
                "dropout_prob": null,
                "head_type": match self.head.kind {
                    crate::head::HeadKind::Classification => "classification",
                    crate::head::HeadKind::Regression => "regression",
                },
                "label2id": label2id,
                "layers": self.head.layers,
                "num_labels": self.head.num_outputs(),
                "use_pooler": self.head.pooling == crate::head::Pooling::Pooler
            },
            "hidden_size": self.base.hidden_size,
            "model_class": "BertAdapterModel",
            "model_name": base_name,
            "model_type": self.base.model_type,
            "name": self.name,
            "version": version
        });
        crate::io::write_json(&dir.join(files::HEAD_CONFIG), &head_cfg)?;
        crate::io::save_safetensors(&dir.join(files::HEAD_WEIGHTS), &head)?;
        if !base.is_empty() {
            crate::io::save_safetensors(&dir.join(files::BASE_PARAMS), &base)?;
        }
        let meta = TaskMeta {
            format: FORMAT_VERSION,
            name: self.name.clone(),
            trainable: self.trainable.clone(),
            adapter: self.adapter.clone(),
            head: self.head.clone(),
            base: self.base.clone(),
            max_len: self.max_len,
        };
        // Written last: a directory without it is an interrupted save and will not load.
        crate::io::write_json(&dir.join(files::META), &meta)
    }

    /// Loads an adapter directory written by [`TaskModel::save`] onto `base`, checking that it fits.
    pub fn load(dir: &Path, base: &BaseModel) -> Result<Self> {
        let meta: TaskMeta = crate::io::read_json(&dir.join(files::META))?;
        let incompatible = |message: String| Error::Incompatible {
            path: dir.to_path_buf(),
            message,
        };
        if meta.format != FORMAT_VERSION {
            return Err(incompatible(format!(
                "format {} is not supported (expected {FORMAT_VERSION})",
                meta.format
            )));
        }
        let here = BaseFingerprint::of(base);
        if meta.base != here {
            return Err(incompatible(format!(
                "made for {} with hidden size {}, {} layers, vocabulary {}; this base is {} with hidden size {}, {} layers, vocabulary {}",
                meta.base.model_type, meta.base.hidden_size, meta.base.num_hidden_layers, meta.base.vocab_size,
                here.model_type, here.hidden_size, here.num_hidden_layers, here.vocab_size
            )));
        }
        validate_name(&meta.name)?;
        meta.head.validate()?;
        let (d, layers) = (here.hidden_size, here.num_hidden_layers);
        let mut expected: Vec<(String, Vec<usize>, &str)> = Vec::new();
        if let Some(a) = &meta.adapter {
            a.validate(d, layers)?;
            let m = a.bottleneck;
            for l in (0..layers).filter(|&l| a.has_layer(l)) {
                for &site in a.sites() {
                    for (part, shape) in [
                        ("down.weight", vec![m, d]),
                        ("down.bias", vec![m]),
                        ("up.weight", vec![d, m]),
                        ("up.bias", vec![d]),
                    ] {
                        expected.push((
                            param_name(l, site, &meta.name, part),
                            shape,
                            files::ADAPTER_WEIGHTS,
                        ));
                    }
                }
            }
        }
        for (n, s) in meta.head.param_shapes(&meta.name, d) {
            expected.push((n, s, files::HEAD_WEIGHTS));
        }
        for bname in base.weight_names() {
            let is_pooler = bname.starts_with("pooler.");
            let owned = if is_pooler {
                meta.trainable == TrainableSet::Full
                    && meta.head.pooling == crate::head::Pooling::Pooler
            } else {
                meta.trainable.owns_base_param(&bname, layers)
            };
            if owned {
                if let Some(t) = base.weight(&bname) {
                    expected.push((bname.clone(), t.dims().to_vec(), files::BASE_PARAMS));
                }
            }
        }
        let mut loaded: BTreeMap<&str, std::collections::HashMap<String, Tensor>> = BTreeMap::new();
        let mut params = BTreeMap::new();
        for (name, shape, file) in expected {
            if !loaded.contains_key(file) {
                let map = crate::io::load_tensors(&dir.join(file))?
                    .into_iter()
                    .map(|(k, v)| (k.strip_prefix("bert.").unwrap_or(&k).to_string(), v))
                    .collect();
                loaded.insert(file, map);
            }
            let path = dir.join(file);
            let t = loaded
                .get_mut(file)
                .and_then(|m| m.remove(&name))
                .ok_or_else(|| Error::MissingTensor {
                    path: path.clone(),
                    name: name.clone(),
                })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::TensorShape {
                    path,
                    name,
                    expected: shape,
                    found: t.dims().to_vec(),
                });
            }
            params.insert(
                name,
                t.to_dtype(candle_core::DType::F32)?
                    .to_device(&base.device)?,
            );
        }
        Ok(TaskModel {
            name: meta.name,
            adapter: meta.adapter,
            head: meta.head,
            trainable: meta.trainable,
            params,
            base: here,
            max_len: meta.max_len,
        })
    }

    /// Bytes the saved directory takes on disk.
    pub fn dir_size(dir: &Path) -> Result<u64> {
        let mut total = 0;
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let e = e.map_err(|e| Error::io(dir, e))?;
            total += e.metadata().map_err(|err| Error::io(e.path(), err))?.len();
        }
        Ok(total)
    }
}
