//! A task: its adapter, head and every parameter it trains, kept apart from the frozen base.
//!
//! All trainable-set choices share one mechanism: the task owns a copy of each base parameter it
//! trains (LayerNorms for Houlsby adapters, whole layers for top-k or full fine-tuning), and the
//! encoder prefers the task's copy. The base is never written, so tasks cannot disturb each other.

pub mod infer;

pub use crate::format::files;
pub use crate::keys::{Leaf, ParamKey, Role};
pub use infer::TaskRow;

use crate::adapter::{AdapterConfig, AdapterMethod, LoraConfig, PrefixConfig};
use crate::encoder::{BaseModel, FusedQkv, MergedWeights, Param, ParamValue};
use crate::error::{Error, Result};
use crate::head::{HeadConfig, Pooling};
use crate::rng::Rng;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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

/// A task's trainable state on top of a shared base model.
#[derive(Debug, Clone)]
pub struct TaskModel {
    /// Name; appears in tensor names (`adapters.{name}`, `heads.{name}`).
    pub name: String,
    /// Bottleneck adapter configuration, if the task has bottleneck adapters.
    pub adapter: Option<AdapterConfig>,
    /// LoRA / (IA)³ configuration, if the task adapts projections that way.
    pub lora: Option<LoraConfig>,
    /// Prefix-tuning configuration, if the task adds learned attention prefixes.
    pub prefix: Option<PrefixConfig>,
    /// The weights derived from the task's tensors (LoRA merged into the projections, Compacter's
    /// PHM projections, fused q|k|v; see [`TaskModel::merge`]): set for inference, cleared as a
    /// whole whenever the task's tensors may change.
    pub(crate) merged: Option<Merged>,
    /// Head configuration.
    pub head: HeadConfig,
    /// What the task trains.
    pub trainable: TrainableSet,
    /// Every parameter the task owns, keyed by checkpoint name and role (adapters, head, copies of
    /// base parameters); look up by name with `params.get("…")`. A merge is read only while
    /// these are the tensors it was derived from ([`TaskModel::set_param`] also drops it).
    pub params: BTreeMap<ParamKey, Tensor>,
    /// Base the task fits.
    pub base: BaseFingerprint,
    /// Maximum input length.
    pub max_len: usize,
}

/// What [`TaskModel::merge`] derives from a task's tensors for inference. It is replaced or
/// dropped only as a whole, and a forward reads it only while it is fresh (see
/// [`Merged::fresh_for`]), so it cannot outlive the tensors it was derived from.
#[derive(Debug, Clone)]
pub(crate) struct Merged {
    /// The task's tensors it was derived from, by identity (`params` is public: a tensor put
    /// there directly, not through [`TaskModel::set_param`], must not meet a stale merge).
    sources: Vec<(ParamKey, candle_core::TensorId)>,
    /// The method configuration it was derived under.
    method: Option<AdapterMethod>,
    /// Derived tensors by the name of what they replace or add (merged projections, PHM
    /// projections, prefixes, LoRA factors kept as updates), less the projections in `weights`.
    pub tensors: BTreeMap<ParamKey, Tensor>,
    /// The task's projections that differ from the base's (merged, or its own copies), packed:
    /// without them every forward concatenated q|k|v (unpacking the base's untouched ones from
    /// their panels) and packed each such weight for its product.
    pub weights: MergedWeights,
}

impl Merged {
    /// `tensors` and `weights` derived from `task` as it is now.
    fn new(task: &TaskModel, tensors: BTreeMap<ParamKey, Tensor>, weights: MergedWeights) -> Self {
        Merged {
            sources: Self::sources(task),
            method: task.method(),
            tensors,
            weights,
        }
    }

    fn sources(task: &TaskModel) -> Vec<(ParamKey, candle_core::TensorId)> {
        task.params
            .iter()
            .map(|(k, v)| (k.clone(), v.id()))
            .collect()
    }

    /// Whether `task`'s tensors and method are still the ones this was derived from.
    pub(crate) fn fresh_for(&self, task: &TaskModel) -> bool {
        self.sources.len() == task.params.len()
            && self
                .sources
                .iter()
                .zip(&task.params)
                .all(|((k, id), (k2, v))| k == k2 && *id == v.id())
            && self.method == task.method()
    }
}

/// Refuses a task name that cannot be part of tensor and file names.
pub(crate) fn validate_name(name: &str) -> Result<()> {
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
        let method = adapter.map(AdapterMethod::Bottleneck);
        Self::with_method(base, name, trainable, method, head, max_len, seed)
    }

    /// [`TaskModel::new`] for any adapter method (bottleneck adapters, LoRA, (IA)³).
    pub fn with_method(
        base: &BaseModel,
        name: &str,
        trainable: TrainableSet,
        method: Option<AdapterMethod>,
        head: HeadConfig,
        max_len: usize,
        seed: u64,
    ) -> Result<Self> {
        let (adapter, lora, prefix) = match method {
            Some(AdapterMethod::Bottleneck(a)) => (Some(a), None, None),
            Some(AdapterMethod::Lora(l)) => (None, Some(l), None),
            Some(AdapterMethod::Prefix(p)) => (None, None, Some(p)),
            None => (None, None, None),
        };
        validate_name(name)?;
        head.validate()?;
        let cfg = &base.config;
        if max_len < 4 || max_len > cfg.max_position_embeddings {
            return Err(Error::config(
                "task",
                "max_len",
                format!(
                    "{max_len} must be in 4..={} (the model's max_position_embeddings)",
                    cfg.max_position_embeddings
                ),
            ));
        }
        let (d, layers) = (cfg.hidden_size, cfg.num_hidden_layers);
        let is_adapters = matches!(trainable, TrainableSet::Adapters { .. });
        if is_adapters != (adapter.is_some() || lora.is_some() || prefix.is_some()) {
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
                    "top_k",
                    format!("{k} must be in 1..={layers} (the base's layers)"),
                ));
            }
        }
        if let Some(a) = adapter
            .as_ref()
            .filter(|a| (0..layers).all(|l| !a.has_layer(l)))
        {
            return Err(Error::config(
                "adapter",
                "leave_out",
                format!(
                    "{:?} leaves out every layer of the base (0..{layers}): no adapter would be \
                     trained; use --method layernorm or --method head for that",
                    a.leave_out
                ),
            ));
        }
        if head.pooling == crate::head::Pooling::Pooler
            && base.param("pooler.dense.weight").is_none()
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
            params.extend(a.new_params(name, d, layers, &mut rng, dev)?);
        }
        if let Some(c) = &lora {
            c.validate(d, cfg.intermediate_size, layers)?;
            params.extend(c.new_params(name, base, &mut rng)?);
        }
        if let Some(p) = &prefix {
            p.validate(d, layers)?;
            params.extend(p.new_params(name, d, layers, &mut rng, dev)?);
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
            // Held as a tensor: copied, so training never writes the base's; held as panels: the
            // unpacked tensor is already a copy of the task's own.
            let copy = match p.as_tensor() {
                Some(t) => t.copy()?,
                None => p.tensor()?,
            };
            params.insert(p.key.clone(), copy);
        }
        Ok(TaskModel {
            name: name.to_string(),
            adapter,
            lora,
            prefix,
            merged: None,
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
        for v in t
            .params
            .values_mut()
            .chain(t.merged.iter_mut().flat_map(|m| m.tensors.values_mut()))
        {
            *v = v.detach();
        }
        // Detaching keeps the values: a merge fresh for `self` is fresh for the copy.
        if self.is_merged() {
            let sources = Merged::sources(&t);
            if let Some(m) = &mut t.merged {
                m.sources = sources;
            }
        } else {
            t.merged = None;
        }
        t
    }

    /// Whether the task reads the base's embedding, attention and FFN weights unchanged, so that
    /// its rows can share a batch with other such tasks (see `BaseModel::predict_mixed`). LoRA
    /// changes the projections' weights and prefix tuning the attention's keys and values, so
    /// such a task runs in batches of its own.
    pub fn shares_encoder(&self) -> bool {
        (self.lora.is_none() || self.lora_as_updates())
            && self.prefix.is_none()
            && !self
                .params
                .keys()
                .any(|k| matches!(k.role(), Role::LayerWeight { .. } | Role::Embedding))
    }

    /// The same task with parameters in `dtype` (f64 for gradient checks); unmerged.
    pub fn to_dtype(&self, dtype: candle_core::DType) -> Result<TaskModel> {
        let mut t = self.clone();
        t.merged = None;
        for v in t.params.values_mut() {
            *v = v.to_dtype(dtype)?;
        }
        Ok(t)
    }

    /// The adapter method, as one value.
    pub fn method(&self) -> Option<AdapterMethod> {
        match (&self.adapter, &self.lora, &self.prefix) {
            (Some(a), _, _) => Some(AdapterMethod::Bottleneck(a.clone())),
            (None, Some(l), _) => Some(AdapterMethod::Lora(l.clone())),
            (None, None, Some(p)) => Some(AdapterMethod::Prefix(p.clone())),
            (None, None, None) => None,
        }
    }

    /// Merges LoRA into the projections' weights, builds Compacter's PHM projections, and fuses
    /// q, k and v wherever the task changes any of them, once for inference on `base`: forwards
    /// then read those weights and pay nothing for the derivation. Computed from the current
    /// tensors (detached); a no-op for tasks that neither derive weights nor change q, k or v.
    /// Changing a tensor ([`TaskModel::set_param`], training) unmerges.
    pub fn merge(&mut self, base: &BaseModel) -> Result<()> {
        self.merged = None;
        let derived = self.derive_as(base, true)?;
        let derives = derived.is_some();
        let mut tensors = derived.unwrap_or_default();
        for v in tensors.values_mut() {
            *v = v.detach();
        }
        // What the view reads: the derived tensor, else the task's own copy, else the base's.
        let own = |tensors: &mut BTreeMap<ParamKey, Tensor>, p: &Param| {
            tensors
                .remove(p.key.name())
                .or_else(|| self.params.get(p.key.name()).map(Tensor::detach))
        };
        let mut weights = MergedWeights::default();
        for (l, layer) in base.weights.layers.iter().enumerate() {
            let a = &layer.attention;
            let params = [&a.query, &a.key, &a.value].map(|lin| [&lin.weight, &lin.bias]);
            let changed = params.iter().flatten().any(|p| {
                tensors.contains_key(p.key.name()) || self.params.contains_key(p.key.name())
            });
            if changed {
                let mut take = |p: &Param| own(&mut tensors, p).map_or_else(|| p.tensor(), Ok);
                let [[wq, bq], [wk, bk], [wv, bv]] = params;
                let w = [take(wq)?, take(wk)?, take(wv)?];
                let b = [take(bq)?, take(bk)?, take(bv)?];
                weights.qkv.insert(l, FusedQkv::new(w, b, true)?);
            }
            for lin in [
                &layer.attention_output.dense,
                &layer.intermediate.dense,
                &layer.output.dense,
            ] {
                if let Some(w) = own(&mut tensors, &lin.weight) {
                    let held = ParamValue::packed(w)?;
                    weights.dense.insert(lin.weight.key.clone(), held);
                }
            }
        }
        if derives || !weights.qkv.is_empty() || !weights.dense.is_empty() {
            self.merged = Some(Merged::new(self, tensors, weights));
        }
        Ok(())
    }

    /// Replaces prefix tuning's MLP by the prefixes it produces (AdapterHub's
    /// `eject_prefix_tuning`): what training leaves, stored in a fraction of the space and run
    /// without the MLP. A no-op for other methods and for flat prefixes.
    pub fn fold_prefix(&mut self) -> Result<()> {
        let Some(p) = self.prefix.as_ref().filter(|p| !p.flat) else {
            return Ok(());
        };
        let (d, layers) = (self.base.hidden_size, self.base.num_hidden_layers);
        let (flat, tensors) = p.fold(&self.name, &self.params, d, layers)?;
        self.params
            .retain(|k, _| !k.name().starts_with("prefix_tuning.prefix_tunings."));
        self.params.extend(tensors);
        self.prefix = Some(flat);
        self.merged = None;
        Ok(())
    }

    /// Keeps LoRA as its factors instead of merged weights (for serving), when that lets the
    /// task's rows share batches: LoRA (`add`) on q, k, v and the FFN's first projection, whose
    /// updates the encoder computes per row group beside the shared projections. Each forward
    /// then pays the low-rank products, and the task holds no copy of the projections. A no-op
    /// for other tasks; `merge` goes back to merged weights.
    pub fn keep_lora_as_updates(&mut self, base: &BaseModel) -> Result<()> {
        let Some(l) = &self.lora else {
            return Ok(());
        };
        let layers = base.config.num_hidden_layers;
        let shareable = !l
            .targets
            .contains(&crate::adapter::lora::Projection::Output);
        if let Some(mut factors) = l
            .factors(&self.name, &self.params, layers)?
            .filter(|_| shareable)
        {
            for v in factors.values_mut() {
                *v = v.detach();
            }
            self.merged = Some(Merged::new(self, factors, MergedWeights::default()));
        }
        Ok(())
    }

    /// Whether the task's LoRA is kept as factors whose updates run per row group (see
    /// [`TaskModel::keep_lora_as_updates`]).
    pub fn lora_as_updates(&self) -> bool {
        self.merged.as_ref().is_some_and(|m| {
            m.fresh_for(self) && m.tensors.keys().any(|k| k.name().contains(".lora_factor_"))
        })
    }

    /// Drops the merged weights: forwards derive them from the task's tensors again.
    pub fn unmerge(&mut self) {
        self.merged = None;
    }

    /// Whether the derived weights (LoRA, PHM, fused q|k|v) are merged into what this task's
    /// forwards read.
    pub fn is_merged(&self) -> bool {
        self.merged.as_ref().is_some_and(|m| m.fresh_for(self))
    }

    /// The task's tensors by file: adapters (AdapterHub's `bert.` names), head, base copies.
    pub(crate) fn split_params(&self) -> [BTreeMap<String, Tensor>; 3] {
        let mut adapters = BTreeMap::new();
        let mut head = BTreeMap::new();
        let mut base = BTreeMap::new();
        for (k, v) in &self.params {
            match k.role() {
                Role::Head => head.insert(k.to_string(), v.clone()),
                // A prefix tensor goes in once, under the pool's name: AdapterHub also saves a
                // copy per layer (shared storage in its pickles), but loads from this one alone.
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
        self.merged = None;
        Ok(())
    }
}

/// The key of a head tensor: matrices are decayed weights, vectors biases.
pub(crate) fn head_key(name: String, shape: &[usize]) -> ParamKey {
    let leaf = if shape.len() == 2 {
        Leaf::Weight
    } else {
        Leaf::Bias
    };
    ParamKey::new(name, Role::Head, leaf)
}
