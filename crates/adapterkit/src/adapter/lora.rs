//! LoRA (Hu et al. 2021) and (IA)³ (Liu et al. 2022) as AdapterHub's `LoRAConfig` defines them: a
//! low-rank update `W + (α/r)·B·A` of chosen projections (composition `"add"`), or a learned
//! rescaling `(W·x + b) ⊙ α·l` of their outputs (composition `"scale"`, AdapterHub's `ia3`).
//!
//! Both change only a projection's output. For inference they are merged into the weights once
//! ([`LoraConfig::derive`]: no cost per forward; tested against AdapterHub's unmerged forward,
//! fixtures). While training, the frozen fused kernels run the base's projection and apply what
//! [`LoraConfig::factors`] (LoRA's `A`, `(α/r)·B`) or [`LoraConfig::scales`] ((IA)³'s `α·l`) give,
//! so gradients reach `A`, `B` and `l` without a weight gradient of the projection; merged and
//! unmerged forwards are tested to agree.

use crate::encoder::BaseModel;
use crate::error::{Error, Result};
use crate::keys::{Leaf, ParamKey, Role};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A projection of a layer that LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    /// `attention.self.query` (AdapterHub `attn_matrices` `"q"`).
    Query,
    /// `attention.self.key` (`"k"`).
    Key,
    /// `attention.self.value` (`"v"`).
    Value,
    /// `intermediate.dense`, the FFN's first projection (`intermediate_lora`).
    Intermediate,
    /// `output.dense`, the FFN's second projection (`output_lora`).
    Output,
}

impl Projection {
    /// Every projection LoRA can adapt, in layer order.
    pub const ALL: [Projection; 5] = [
        Projection::Query,
        Projection::Key,
        Projection::Value,
        Projection::Intermediate,
        Projection::Output,
    ];

    /// The module path inside `encoder.layer.{i}`.
    pub fn module(self) -> &'static str {
        match self {
            Projection::Query => "attention.self.query",
            Projection::Key => "attention.self.key",
            Projection::Value => "attention.self.value",
            Projection::Intermediate => "intermediate.dense",
            Projection::Output => "output.dense",
        }
    }

    /// AdapterHub's `attn_matrices` letter of an attention projection.
    pub fn attn_letter(self) -> Option<&'static str> {
        match self {
            Projection::Query => Some("q"),
            Projection::Key => Some("k"),
            Projection::Value => Some("v"),
            _ => None,
        }
    }

    /// `(in, out)` widths on a base of hidden width `d` and FFN width `i`.
    pub fn dims(self, d: usize, i: usize) -> (usize, usize) {
        match self {
            Projection::Intermediate => (d, i),
            Projection::Output => (i, d),
            _ => (d, d),
        }
    }
}

/// How the learned tensors change the projection (AdapterHub's `composition_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Composition {
    /// `W + (α/r)·B·A` (LoRA).
    Add,
    /// Output times `α·l`, one factor per output channel ((IA)³; rank 1, no `A`).
    Scale,
}

/// How new LoRA tensors are initialised (AdapterHub's `init_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// `A` Kaiming-uniform (as `nn.Linear`), `B` zero: the update starts at zero (`"lora"`).
    Lora,
    /// Both normal with std 0.02 (`"bert"`).
    Bert,
    /// Ones: (IA)³'s identity rescaling (`"ia3"`).
    Ia3,
}

impl LoraInit {
    /// The name AdapterHub writes in `init_weights`.
    pub fn hub_name(self) -> &'static str {
        match self {
            LoraInit::Lora => "lora",
            LoraInit::Bert => "bert",
            LoraInit::Ia3 => "ia3",
        }
    }
}

/// One learned tensor of LoRA at one projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraPart {
    /// `lora_A` [r, in] (composition `add` only).
    A,
    /// `lora_B`: [out, r] for `add`, the rescaling vector [out, 1] for `scale`.
    B,
}

/// A LoRA / (IA)³ configuration: plain data, AdapterHub's `LoRAConfig` keys in our types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// The projections adapted in every layer not left out, in order.
    pub targets: Vec<Projection>,
    /// Layers left unchanged.
    #[serde(default)]
    pub leave_out: Vec<usize>,
    /// Rank r (1 for `scale`).
    pub r: usize,
    /// α: the update is scaled by α/r (`add`) or the rescaling by α (`scale`).
    pub alpha: f64,
    /// How the tensors change the projection.
    pub composition: Composition,
    /// Initialisation of new tensors.
    pub init: LoraInit,
}

impl LoraConfig {
    /// AdapterHub's `lora` preset with rank `r` and `alpha`: query and value of every layer.
    pub fn lora(r: usize, alpha: f64) -> Self {
        LoraConfig {
            targets: vec![Projection::Query, Projection::Value],
            leave_out: Vec::new(),
            r,
            alpha,
            composition: Composition::Add,
            init: LoraInit::Lora,
        }
    }

    /// AdapterHub's `ia3` preset: keys, values and the FFN's intermediate activations rescaled.
    pub fn ia3() -> Self {
        LoraConfig {
            targets: vec![Projection::Key, Projection::Value, Projection::Intermediate],
            leave_out: Vec::new(),
            r: 1,
            alpha: 1.0,
            composition: Composition::Scale,
            init: LoraInit::Ia3,
        }
    }

    /// Checks the configuration against a base of `layers` layers, hidden width `d`, FFN width `i`.
    pub fn validate(&self, d: usize, i: usize, layers: usize) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::config("lora", field, msg));
        if self.targets.is_empty() {
            return bad(
                "targets",
                "no projection is adapted: enable selfattn_lora (with attn_matrices), \
                 intermediate_lora or output_lora"
                    .into(),
            );
        }
        if self.r == 0 {
            return bad("r", "must be at least 1".into());
        }
        if self.composition == Composition::Scale && self.r != 1 {
            return bad(
                "r",
                format!(
                    "{}: composition_mode \"scale\" needs r = 1, as in AdapterHub",
                    self.r
                ),
            );
        }
        let widest = self
            .targets
            .iter()
            .map(|p| {
                let (a, b) = p.dims(d, i);
                a.min(b)
            })
            .min()
            .unwrap_or(d);
        if self.r > widest {
            return bad(
                "r",
                format!("{} is above the smallest adapted width {widest}", self.r),
            );
        }
        if !self.alpha.is_finite() {
            return bad("alpha", format!("{} is not a finite number", self.alpha));
        }
        if let Some(&l) = self.leave_out.iter().find(|&&l| l >= layers) {
            return bad(
                "leave_out",
                format!("layer {l} does not exist (the base has layers 0..{layers})"),
            );
        }
        if (0..layers).all(|l| !self.has_layer(l)) {
            return bad(
                "leave_out",
                format!(
                    "{:?} leaves out every layer: nothing would be trained",
                    self.leave_out
                ),
            );
        }
        Ok(())
    }

    /// Whether layer `layer` is adapted.
    pub fn has_layer(&self, layer: usize) -> bool {
        !self.leave_out.contains(&layer)
    }

    /// The factor on `B·A` (`add`) or on `l` (`scale`).
    pub fn scaling(&self) -> f64 {
        match self.composition {
            Composition::Add => self.alpha / self.r as f64,
            Composition::Scale => self.alpha,
        }
    }

    /// The tensors of one projection with their shapes.
    pub fn parts(&self, p: Projection, d: usize, i: usize) -> Vec<(LoraPart, Vec<usize>)> {
        let (fan_in, out) = p.dims(d, i);
        match self.composition {
            Composition::Add => vec![
                (LoraPart::A, vec![self.r, fan_in]),
                (LoraPart::B, vec![out, self.r]),
            ],
            Composition::Scale => vec![(LoraPart::B, vec![out, 1])],
        }
    }

    /// The checkpoint name of one tensor, as AdapterHub names it (without `bert.`).
    pub fn param_name(&self, layer: usize, p: Projection, task: &str, part: LoraPart) -> String {
        let leaf = match part {
            LoraPart::A => "lora_A",
            LoraPart::B => "lora_B",
        };
        format!("encoder.layer.{layer}.{}.loras.{task}.{leaf}", p.module())
    }

    /// Every tensor of the configuration: typed key, which tensor it is, and shape.
    fn entries(
        &self,
        task: &str,
        d: usize,
        i: usize,
        layers: usize,
    ) -> Vec<(ParamKey, LoraPart, Vec<usize>)> {
        let mut v = Vec::new();
        for l in (0..layers).filter(|&l| self.has_layer(l)) {
            for &p in &self.targets {
                for (part, shape) in self.parts(p, d, i) {
                    let leaf = match self.composition {
                        Composition::Scale => Leaf::Scale,
                        Composition::Add => Leaf::Weight,
                    };
                    let key = ParamKey::new(
                        self.param_name(l, p, task, part),
                        Role::Adapter { layer: l },
                        leaf,
                    );
                    v.push((key, part, shape));
                }
            }
        }
        v
    }

    /// Every tensor of the configuration: typed key and shape.
    pub fn param_keys(
        &self,
        task: &str,
        d: usize,
        i: usize,
        layers: usize,
    ) -> Vec<(ParamKey, Vec<usize>)> {
        self.entries(task, d, i, layers)
            .into_iter()
            .map(|(k, _, s)| (k, s))
            .collect()
    }

    /// New tensors for task `task` by the configured init, drawn from `rng`.
    pub fn new_params(
        &self,
        task: &str,
        base: &BaseModel,
        rng: &mut crate::rng::Rng,
    ) -> Result<Vec<(ParamKey, Tensor)>> {
        let c = &base.config;
        self.entries(
            task,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
        )
        .into_iter()
        .map(|(key, part, shape)| {
            let values = self.init_values(part, &shape, rng);
            Ok((key, Tensor::from_vec(values, shape, &base.device)?))
        })
        .collect()
    }

    /// Trainable parameters of the configuration.
    pub fn num_params(&self, d: usize, i: usize, layers: usize) -> usize {
        self.param_keys("x", d, i, layers)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The values of a new tensor of `shape` (`fan_in` = its last dimension for `A`).
    pub fn init_values(
        &self,
        part: LoraPart,
        shape: &[usize],
        rng: &mut crate::rng::Rng,
    ) -> Vec<f32> {
        let n: usize = shape.iter().product();
        let fan_in = *shape.last().unwrap_or(&1) as f64;
        (0..n)
            .map(|_| {
                (match (self.init, part) {
                    (LoraInit::Ia3, _) => 1.0,
                    (LoraInit::Bert, _) => rng.normal() * 0.02,
                    // Kaiming-uniform with a = sqrt(5), as torch.nn.Linear: bound 1/sqrt(fan_in).
                    (LoraInit::Lora, LoraPart::A) => (2.0 * rng.uniform() - 1.0) / fan_in.sqrt(),
                    (LoraInit::Lora, LoraPart::B) => 0.0,
                }) as f32
            })
            .collect()
    }

    /// For composition `scale` ((IA)³) in training: each adapted projection's output scale `α·l`
    /// [out], keyed by [`scale_name`], so the frozen fused kernels run the projection and rescale
    /// its output (no weight gradient). `None` for composition `add`, which derives weights.
    pub fn scales(
        &self,
        task: &str,
        params: &BTreeMap<ParamKey, Tensor>,
        layers: usize,
    ) -> Result<Option<BTreeMap<ParamKey, Tensor>>> {
        if self.composition != Composition::Scale {
            return Ok(None);
        }
        let s = self.scaling();
        let mut out = BTreeMap::new();
        for l in (0..layers).filter(|&l| self.has_layer(l)) {
            for &p in &self.targets {
                let name = self.param_name(l, p, task, LoraPart::B);
                let lb = params.get(name.as_str()).ok_or_else(|| {
                    Error::NotFound(format!("the task has no parameter `{name}`"))
                })?;
                let key = ParamKey::new(scale_name(l, p), Role::Adapter { layer: l }, Leaf::Scale);
                out.insert(key, (lb * s)?.squeeze(1)?);
            }
        }
        Ok(Some(out))
    }

    /// For composition `add` (LoRA) in training: each adapted projection's factors `A` [r, in]
    /// and `(α/r)·B` [out, r], keyed by [`factor_name`], so the frozen fused kernels run the
    /// projection and add `x·Aᵀ·(α/r)Bᵀ` computed beside it (no weight gradient of the base's
    /// projection). `None` for composition `scale`.
    pub fn factors(
        &self,
        task: &str,
        params: &BTreeMap<ParamKey, Tensor>,
        layers: usize,
    ) -> Result<Option<BTreeMap<ParamKey, Tensor>>> {
        if self.composition != Composition::Add {
            return Ok(None);
        }
        let get = |name: String| -> Result<&Tensor> {
            params
                .get(name.as_str())
                .ok_or_else(|| Error::NotFound(format!("the task has no parameter `{name}`")))
        };
        let s = self.scaling();
        let mut out = BTreeMap::new();
        for l in (0..layers).filter(|&l| self.has_layer(l)) {
            for &p in &self.targets {
                let a = get(self.param_name(l, p, task, LoraPart::A))?;
                let b = get(self.param_name(l, p, task, LoraPart::B))?;
                let key = |which| {
                    ParamKey::new(
                        factor_name(l, p, which),
                        Role::Adapter { layer: l },
                        Leaf::Weight,
                    )
                };
                out.insert(key("a"), a.clone());
                out.insert(key("b"), (b * s)?);
            }
        }
        Ok(Some(out))
    }

    /// The projections' weights (and, for `scale`, biases) with the task's LoRA tensors applied,
    /// keyed as the base's tensors they replace. Built from the task's tensors as they are, so a
    /// loss over a forward that reads them has gradients for those tensors.
    pub fn derive(
        &self,
        task: &str,
        params: &BTreeMap<ParamKey, Tensor>,
        base: &BaseModel,
    ) -> Result<BTreeMap<ParamKey, Tensor>> {
        let layers = base.config.num_hidden_layers;
        let s = self.scaling();
        let mut out = BTreeMap::new();
        let get = |name: &str| -> Result<&Tensor> {
            params
                .get(name)
                .ok_or_else(|| Error::NotFound(format!("the task has no parameter `{name}`")))
        };
        let base_param = |name: String| {
            base.param(&name)
                .ok_or_else(|| Error::NotFound(format!("the base has no parameter `{name}`")))
        };
        for l in (0..layers).filter(|&l| self.has_layer(l)) {
            for &p in &self.targets {
                let w = base_param(format!("encoder.layer.{l}.{}.weight", p.module()))?;
                let base_w = w.tensor()?;
                let b_name = self.param_name(l, p, task, LoraPart::B);
                let lb = get(&b_name)?.to_dtype(base_w.dtype())?;
                match self.composition {
                    Composition::Add => {
                        let la = get(&self.param_name(l, p, task, LoraPart::A))?
                            .to_dtype(base_w.dtype())?;
                        let delta = (lb.matmul(&la)? * s)?;
                        out.insert(w.key.clone(), base_w.add(&delta)?);
                    }
                    Composition::Scale => {
                        let bias = base_param(format!("encoder.layer.{l}.{}.bias", p.module()))?;
                        let factor = (lb * s)?;
                        out.insert(w.key.clone(), base_w.broadcast_mul(&factor)?);
                        let row = factor.squeeze(1)?;
                        out.insert(bias.key.clone(), bias.tensor()?.mul(&row)?);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The name of projection `p`'s output scale in layer `layer` (see [`LoraConfig::scales`]).
pub fn scale_name(layer: usize, p: Projection) -> String {
    format!("encoder.layer.{layer}.{}.ia3_scale", p.module())
}

/// The name of projection `p`'s LoRA factor `which` (`a`, or `b` with the scaling in) in layer
/// `layer` (see [`LoraConfig::factors`]).
pub fn factor_name(layer: usize, p: Projection, which: &str) -> String {
    format!("encoder.layer.{layer}.{}.lora_factor_{which}", p.module())
}
