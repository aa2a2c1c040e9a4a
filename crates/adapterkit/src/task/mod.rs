//! A task: its adapter, head and every parameter it trains, kept apart from the frozen base.
//!
//! All trainable-set choices share one mechanism: the task owns a copy of each base parameter it
//! trains (LayerNorms for Houlsby adapters, whole layers for top-k or full fine-tuning), and the
//! encoder prefers the task's copy. The base is never written, so tasks cannot disturb each other.

pub mod infer;

pub use crate::keys::{Leaf, ParamKey, Role};
pub use infer::TaskRow;

use crate::adapter::{AdapterConfig, Init, Part};
use crate::encoder::BaseModel;
use crate::error::{Error, Result};
use crate::head::{HeadConfig, Pooling};
use crate::rng::Rng;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

    /// Whether the task owns (and trains) its own copy of a base parameter of role `role`, on a
    /// base of `num_layers` layers, with a head that pools by `pooling`: the one ownership rule.
    pub fn owns(&self, role: Role, num_layers: usize, pooling: Pooling) -> bool {
        let top = |layer: usize| match self {
            TrainableSet::TopK { k } => layer >= num_layers.saturating_sub(*k),
            _ => false,
        };
        match (self, role) {
            (TrainableSet::Full, Role::Pooler) => pooling == Pooling::Pooler,
            (_, Role::Pooler | Role::Head | Role::Adapter { .. }) => false,
            (TrainableSet::Full, _) => true,
            (TrainableSet::Adapters { layernorms }, Role::LayerNorm { .. }) => *layernorms,
            (TrainableSet::Layernorm, Role::LayerNorm { .. }) => true,
            (TrainableSet::TopK { .. }, Role::LayerNorm { layer: Some(l) }) => top(l),
            (TrainableSet::TopK { .. }, Role::LayerWeight { layer }) => top(layer),
            _ => false,
        }
    }

    /// The base parameters a task with this trainable set owns a copy of.
    pub fn owned_base_params<'b>(
        &self,
        base: &'b BaseModel,
        pooling: Pooling,
    ) -> Vec<&'b crate::encoder::Param> {
        let layers = base.config.num_hidden_layers;
        base.weights
            .params()
            .into_iter()
            .filter(|p| self.owns(p.key.role(), layers, pooling))
            .collect()
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
    /// Every parameter the task owns, keyed by checkpoint name and role (adapters, head, copies of
    /// base parameters); look up by name with `params.get("…")`.
    pub params: BTreeMap<ParamKey, Tensor>,
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
            for l in (0..layers).filter(|&l| a.has_layer(l)) {
                for &site in a.sites() {
                    for (part, shape) in a.param_shapes_at(l, d) {
                        let t = init_adapter_tensor(a, part, &shape, &mut rng, dev)?;
                        params.insert(a.param_key(l, site, name, part), t);
                    }
                }
            }
        }
        for (pname, shape) in head.param_shapes(name, d) {
            let key = head_key(pname, &shape);
            let t = if shape.len() == 2 {
                let n = shape[0] * shape[1];
                let v: Vec<f32> = (0..n)
                    .map(|_| (rng.normal() * cfg.initializer_range) as f32)
                    .collect();
                Tensor::from_vec(v, shape, dev)?
            } else {
                Tensor::zeros(shape, candle_core::DType::F32, dev)?
            };
            params.insert(key, t);
        }
        for p in trainable.owned_base_params(base, head.pooling) {
            params.insert(p.key.clone(), p.tensor.copy()?);
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

    /// How many of the lowest encoder layers hold nothing this task trains (no adapter, no own copy
    /// of a base parameter): 0 when it owns embedding parameters, all layers for a head-only task.
    pub fn frozen_prefix_layers(&self, layers: usize) -> usize {
        self.params
            .keys()
            .filter_map(|k| k.role().first_layer_changed())
            .fold(layers, usize::min)
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

    /// The task's tensors by file: adapters (AdapterHub's `bert.` names), head, base copies.
    fn split_params(&self) -> [BTreeMap<String, Tensor>; 3] {
        let mut adapters = BTreeMap::new();
        let mut head = BTreeMap::new();
        let mut base = BTreeMap::new();
        for (k, v) in &self.params {
            match k.role() {
                Role::Head => head.insert(k.to_string(), v.clone()),
                Role::Adapter { .. } => adapters.insert(format!("bert.{k}"), v.clone()),
                _ => base.insert(k.to_string(), v.clone()),
            };
        }
        [adapters, head, base]
    }

    /// Replaces the values of parameter `name`, keeping its key (for tests and tools that edit a
    /// trained task); an error when the task has no such parameter.
    pub fn set_param(&mut self, name: &str, value: Tensor) -> Result<()> {
        let key = self
            .params
            .keys()
            .find(|k| k.name() == name)
            .cloned()
            .ok_or_else(|| {
                Error::NotFound(format!("task `{}` has no parameter `{name}`", self.name))
            })?;
        self.params.insert(key, value);
        Ok(())
    }

    /// Writes the task as an adapter directory (AdapterHub file and tensor names, plus our own
    /// metadata and trained base parameters). Every file is written atomically.
    pub fn save(&self, dir: &Path, base_name: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let [adapters, head, base] = self.split_params();
        let version = crate::hub::HUB_VERSION;
        let envelope = |config: serde_json::Value| {
            serde_json::json!({
                "config": config,
                "hidden_size": self.base.hidden_size,
                "model_class": "BertAdapterModel",
                "model_name": base_name,
                "model_type": self.base.model_type,
                "name": self.name,
                "version": version
            })
        };
        if let Some(a) = &self.adapter {
            let cfg = envelope(crate::hub::adapter_config_to_hub(a, self.base.hidden_size));
            crate::io::write_json(&dir.join(files::ADAPTER_CONFIG), &cfg)?;
            let mut adapters = adapters;
            let aliases: Vec<(String, Tensor)> = adapters
                .iter()
                .filter_map(|(k, v)| crate::hub::ln_before_alias(k).map(|a| (a, v.clone())))
                .collect();
            adapters.extend(aliases);
            crate::io::save_safetensors(&dir.join(files::ADAPTER_WEIGHTS), &adapters)?;
        }
        let head_cfg = envelope(crate::hub::head_config_to_hub(&self.head));
        crate::io::write_json(&dir.join(files::HEAD_CONFIG), &head_cfg)?;
        crate::io::save_safetensors(&dir.join(files::HEAD_WEIGHTS), &head)?;
        if !base.is_empty() {
            crate::io::save_safetensors(&dir.join(files::BASE_PARAMS), &base)?;
        }
        // Files of an earlier task saved here that this one does not have must go: the Python
        // library would otherwise load a stale adapter next to this head.
        // We never write the pickle formats, so any found here are stale too.
        let mut stale = vec!["pytorch_adapter.bin", "pytorch_model_head.bin"];
        if self.adapter.is_none() {
            stale.extend([files::ADAPTER_CONFIG, files::ADAPTER_WEIGHTS]);
        }
        if base.is_empty() {
            stale.push(files::BASE_PARAMS);
        }
        for f in stale {
            let p = dir.join(f);
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
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
    /// A directory without our `adapterkit.json` is read as one saved by AdapterHub (see
    /// [`TaskModel::load_adapterhub`]).
    pub fn load(dir: &Path, base: &BaseModel) -> Result<Self> {
        // AdapterHub never writes our parameter file: with it and without the metadata (written
        // last), this is an interrupted save of ours and must not load as something else.
        if !dir.join(files::META).exists()
            && (dir.join(files::HEAD_CONFIG).exists() || dir.join(files::ADAPTER_CONFIG).exists())
            && !dir.join(files::BASE_PARAMS).exists()
        {
            return Self::load_adapterhub(dir, base);
        }
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
        let mut expected: Vec<(ParamKey, Vec<usize>, &str)> = Vec::new();
        if let Some(a) = &meta.adapter {
            a.validate(d, layers)?;
            for (k, shape) in a.param_keys(&meta.name, d, layers) {
                expected.push((k, shape, files::ADAPTER_WEIGHTS));
            }
        }
        for (n, s) in meta.head.param_shapes(&meta.name, d) {
            expected.push((head_key(n, &s), s, files::HEAD_WEIGHTS));
        }
        let mut owned = meta.trainable.owned_base_params(base, meta.head.pooling);
        owned.sort_by(|a, b| a.key.cmp(&b.key));
        for p in owned {
            expected.push((p.key.clone(), p.tensor.dims().to_vec(), files::BASE_PARAMS));
        }
        let mut loaded: BTreeMap<&str, std::collections::HashMap<String, Tensor>> = BTreeMap::new();
        let mut params = BTreeMap::new();
        for (key, shape, file) in expected {
            let path = dir.join(file);
            if !loaded.contains_key(file) {
                let map = crate::io::load_tensors(&path)?
                    .into_iter()
                    .map(|(k, v)| (k.strip_prefix("bert.").unwrap_or(&k).to_string(), v))
                    .collect();
                loaded.insert(file, map);
            }
            let map = loaded
                .get_mut(file)
                .ok_or_else(|| Error::NotFound(format!("{}: not read", path.display())))?;
            let t = crate::io::take_tensor(map, &path, key.name(), &shape, &base.device)?;
            params.insert(key, t);
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

    /// Loads an adapter directory saved by the Python `adapters` library (`save_adapter` with its
    /// head): `adapter_config.json` + `adapter.safetensors` or `pytorch_adapter.bin`, and
    /// `head_config.json` + `model_head.safetensors` or `pytorch_model_head.bin`. A directory with
    /// only a head loads as a head-only task. Every tensor in the weight files must be used.
    pub fn load_adapterhub(dir: &Path, base: &BaseModel) -> Result<Self> {
        let here = BaseFingerprint::of(base);
        let (d, layers) = (here.hidden_size, here.num_hidden_layers);
        let incompatible = |message: String| Error::Incompatible {
            path: dir.to_path_buf(),
            message,
        };
        let check_envelope = |path: &Path, v: &serde_json::Value| -> Result<()> {
            if let Some(h) = v.get("hidden_size").and_then(serde_json::Value::as_u64) {
                if h as usize != d {
                    return Err(incompatible(format!(
                        "{} was made for hidden size {h}; this base has {d}",
                        path.display()
                    )));
                }
            }
            if let Some(t) = v.get("model_type").and_then(serde_json::Value::as_str) {
                if t != here.model_type {
                    return Err(incompatible(format!(
                        "{} was made for model type `{t}`; this base is `{}`",
                        path.display(),
                        here.model_type
                    )));
                }
            }
            Ok(())
        };
        let pick = |safe: &str, bin: &str| -> Result<PathBuf> {
            let (s, b) = (dir.join(safe), dir.join(bin));
            if s.exists() {
                Ok(s)
            } else if b.exists() {
                Ok(b)
            } else {
                Err(Error::NotFound(format!(
                    "{}: neither {safe} nor {bin} is there",
                    dir.display()
                )))
            }
        };
        let strip = |m: std::collections::HashMap<String, Tensor>| {
            m.into_iter()
                .map(|(k, v)| (k.strip_prefix("bert.").unwrap_or(&k).to_string(), v))
                .collect::<std::collections::HashMap<String, Tensor>>()
        };
        let mut params = BTreeMap::new();
        let leftovers =
            |file: &Path, tensors: &std::collections::HashMap<String, Tensor>| match tensors
                .keys()
                .min()
            {
                Some(k) => Err(Error::Config {
                    context: file.display().to_string(),
                    field: k.clone(),
                    message: "tensor the configuration does not account for".into(),
                }),
                None => Ok(()),
            };

        let head_path = dir.join(files::HEAD_CONFIG);
        if !head_path.exists() {
            return Err(Error::NotFound(format!(
                "{}: an adapter without a prediction head ({} is missing): predicting needs the \
                 head it was trained with; save both from Python with \
                 `save_adapter(dir, name, with_head=True)`",
                dir.display(),
                files::HEAD_CONFIG,
            )));
        }
        let head_json = crate::io::read_json::<serde_json::Value>(&head_path)?;
        check_envelope(&head_path, &head_json)?;
        let (head, head_name) =
            crate::hub::head_config_from_hub(&head_path.display().to_string(), &head_json)?;

        let adapter_path = dir.join(files::ADAPTER_CONFIG);
        let (adapter, name) = if adapter_path.exists() {
            let v = crate::io::read_json::<serde_json::Value>(&adapter_path)?;
            check_envelope(&adapter_path, &v)?;
            let ctx = adapter_path.display().to_string();
            let name = v
                .get("name")
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| Error::config(&ctx, "name", "missing: expected the adapter's name"))?
                .to_string();
            (
                Some(crate::hub::adapter_config_from_hub(&ctx, &v, d, layers)?),
                name,
            )
        } else {
            (None, head_name.clone())
        };
        validate_name(&name)?;

        if let Some(a) = &adapter {
            let file = pick(files::ADAPTER_WEIGHTS, "pytorch_adapter.bin")?;
            let mut tensors = strip(crate::io::load_tensors(&file)?);
            for (key, shape) in a.param_keys(&name, d, layers) {
                let alias = crate::hub::ln_before_alias(key.name());
                let from = match &alias {
                    Some(al) if !tensors.contains_key(key.name()) => al.clone(),
                    _ => key.to_string(),
                };
                let t = crate::io::take_tensor(&mut tensors, &file, &from, &shape, &base.device)?;
                params.insert(key, t);
                if let Some(al) = alias {
                    tensors.remove(&al);
                }
            }
            leftovers(&file, &tensors)?;
        }
        let file = pick(files::HEAD_WEIGHTS, "pytorch_model_head.bin")?;
        let mut tensors = strip(crate::io::load_tensors(&file)?);
        let theirs = head.param_shapes(&head_name, d);
        for ((from, shape), (to, _)) in theirs.into_iter().zip(head.param_shapes(&name, d)) {
            let t = crate::io::take_tensor(&mut tensors, &file, &from, &shape, &base.device)?;
            params.insert(head_key(to, &shape), t);
        }
        leftovers(&file, &tensors)?;
        if head.pooling == crate::head::Pooling::Pooler
            && base.weight("pooler.dense.weight").is_none()
        {
            return Err(incompatible(
                "the head uses the pooler (use_pooler) but the base checkpoint has no pooler weights".into(),
            ));
        }
        Ok(TaskModel {
            name,
            trainable: if adapter.is_some() {
                TrainableSet::Adapters { layernorms: false }
            } else {
                TrainableSet::Head
            },
            adapter,
            head,
            params,
            base: here,
            max_len: base.config.max_position_embeddings.min(512),
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

/// A new adapter tensor: projections by the configured scheme, biases zero, norms and scales one.
fn init_adapter_tensor(
    a: &AdapterConfig,
    part: Part,
    shape: &[usize],
    rng: &mut Rng,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = match part {
        Part::DownWeight | Part::UpWeight => {
            let fan_in = shape[1] as f64;
            (0..n)
                .map(|_| {
                    (match (a.init, part) {
                        (Init::TruncatedNormal, _) => rng.truncated_normal(a.init_std),
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
        Part::LnBeforeWeight | Part::LnAfterWeight | Part::Scaling => vec![1.0; n],
        Part::DownBias | Part::UpBias | Part::LnBeforeBias | Part::LnAfterBias => vec![0.0; n],
    };
    Ok(Tensor::from_vec(values, shape, dev)?)
}

/// The key of a head tensor: matrices are decayed weights, vectors biases.
fn head_key(name: String, shape: &[usize]) -> ParamKey {
    let leaf = if shape.len() == 2 {
        Leaf::Weight
    } else {
        Leaf::Bias
    };
    ParamKey::new(name, Role::Head, leaf)
}
