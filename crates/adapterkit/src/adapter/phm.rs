//! Compacter's parameterised hypercomplex multiplication (PHM) layers (Mahabadi et al. 2021) as
//! AdapterHub's `PHMLayer` defines them: a bottleneck projection whose `[in, out]` matrix is
//! `H = Σᵢ Aᵢ ⊗ Wᵢ`, a sum of `n` Kronecker products of small "rule" matrices `Aᵢ` [n, n] and
//! weight blocks `Wᵢ` [in/n, out/n]. Each `Wᵢ` may be a rank-r product (`factorized_phm_W`), the
//! rules may be shared by every layer (`shared_phm_rule`) and factorised, the weights shared too.
//!
//! The encoder never sees these tensors: [`derive`] builds each projection's ordinary weight `Hᵀ`
//! from them, per forward in training (so gradients reach them) and once for inference (merged),
//! and the bottleneck adapter then runs as any other, fused kernel included.

use super::{AdapterConfig, Part};
use crate::error::{Error, Result};
use crate::keys::{Leaf, ParamKey, Role};
use crate::rng::Rng;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which of the adapter's two projections a PHM tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhmProj {
    /// The down projection, hidden → bottleneck (`adapter_down`).
    Down,
    /// The up projection, bottleneck → hidden (`adapter_up`).
    Up,
}

impl PhmProj {
    /// `down` or `up`, as in AdapterHub's shared tensor names (`W_down_left`).
    fn name(self) -> &'static str {
        match self {
            PhmProj::Down => "down",
            PhmProj::Up => "up",
        }
    }
}

/// One tensor of a PHM layer, named as AdapterHub names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhmTensor {
    /// Left factor of the weight blocks [n, in/n, rank] (`W_left`).
    WLeft,
    /// Right factor of the weight blocks [n, rank, out/n] (`W_right`).
    WRight,
    /// Unfactorised weight blocks [n, in/n, out/n] (`W`).
    W,
    /// The rule matrices [n, n, n] (`phm_rule`).
    Rule,
    /// Left factor of the rules [n, n, 1] (`phm_rule_left`).
    RuleLeft,
    /// Right factor of the rules [n, 1, n] (`phm_rule_right`).
    RuleRight,
}

impl PhmTensor {
    /// The tensor's name inside its PHM layer.
    pub fn leaf(self) -> &'static str {
        match self {
            PhmTensor::WLeft => "W_left",
            PhmTensor::WRight => "W_right",
            PhmTensor::W => "W",
            PhmTensor::Rule => "phm_rule",
            PhmTensor::RuleLeft => "phm_rule_left",
            PhmTensor::RuleRight => "phm_rule_right",
        }
    }

    fn is_rule(self) -> bool {
        matches!(
            self,
            PhmTensor::Rule | PhmTensor::RuleLeft | PhmTensor::RuleRight
        )
    }
}

/// How new rule matrices are drawn (`phm_c_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleInit {
    /// Normal: std `phm_init_range` when shared, 0.01 per layer (AdapterHub's choices).
    Normal,
    /// Uniform: in ±1 when shared, ±0.01 per layer.
    Uniform,
}

/// The distribution AdapterHub's config names for the weight blocks (`hypercomplex_nonlinearity`).
/// AdapterHub 1.3 draws every choice as Glorot-normal (its check tests the string for truth), and
/// so do we; the name is kept so that the file round-trips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightInit {
    /// `"glorot-uniform"` (AdapterHub's default).
    GlorotUniform,
    /// `"glorot-normal"`.
    GlorotNormal,
    /// `"normal"`.
    Normal,
    /// `"phm"`.
    Phm,
}

/// The PHM options of a Compacter adapter: AdapterHub's `BnConfig` keys with their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhmConfig {
    /// n: the number of Kronecker products, and the rules' size (`phm_dim`).
    #[serde(default = "default_dim")]
    pub phm_dim: usize,
    /// One set of rules for every layer and site (`shared_phm_rule`).
    #[serde(default = "default_true")]
    pub shared_phm_rule: bool,
    /// Rules as products of [n, n, 1] and [n, 1, n] factors (`factorized_phm_rule`).
    #[serde(default)]
    pub factorized_phm_rule: bool,
    /// Weight blocks as products of rank-`phm_rank` factors (`factorized_phm_W`).
    #[serde(default = "default_true", rename = "factorized_phm_W")]
    pub factorized_phm_w: bool,
    /// One set of weight blocks for every layer and site (`shared_W_phm`).
    #[serde(default, rename = "shared_W_phm")]
    pub shared_w_phm: bool,
    /// Rank of the weight blocks' factors (`phm_rank`).
    #[serde(default = "default_rank")]
    pub phm_rank: usize,
    /// Whether the projections have biases (`phm_bias`).
    #[serde(default = "default_true")]
    pub phm_bias: bool,
    /// How new rules are drawn (`phm_c_init`).
    #[serde(default = "default_rule_init")]
    pub phm_c_init: RuleInit,
    /// Std of new shared rules drawn from a normal (`phm_init_range`).
    #[serde(default = "default_init_range")]
    pub phm_init_range: f64,
    /// The weight blocks' named distribution (`hypercomplex_nonlinearity`; see [`WeightInit`]).
    #[serde(default = "default_weight_init")]
    pub hypercomplex_nonlinearity: WeightInit,
}

fn default_dim() -> usize {
    4
}
fn default_true() -> bool {
    true
}
fn default_rank() -> usize {
    1
}
fn default_rule_init() -> RuleInit {
    RuleInit::Normal
}
fn default_init_range() -> f64 {
    1e-4
}
fn default_weight_init() -> WeightInit {
    WeightInit::GlorotUniform
}

impl Default for PhmConfig {
    fn default() -> Self {
        PhmConfig {
            phm_dim: default_dim(),
            shared_phm_rule: true,
            factorized_phm_rule: false,
            factorized_phm_w: true,
            shared_w_phm: false,
            phm_rank: default_rank(),
            phm_bias: true,
            phm_c_init: RuleInit::Normal,
            phm_init_range: default_init_range(),
            hypercomplex_nonlinearity: WeightInit::GlorotUniform,
        }
    }
}

impl PhmConfig {
    /// Checks the options against a hidden width and every bottleneck size they will meet;
    /// `per_layer` is whether bottleneck sizes differ between layers.
    pub fn validate(
        &self,
        hidden: usize,
        bottlenecks: &[usize],
        per_layer: bool,
    ) -> std::result::Result<(), (&'static str, String)> {
        let n = self.phm_dim;
        if n == 0 {
            return Err(("phm_dim", "must be at least 1".into()));
        }
        if !hidden.is_multiple_of(n) {
            return Err((
                "phm_dim",
                format!("{n} does not divide the hidden size {hidden}"),
            ));
        }
        if let Some(m) = bottlenecks.iter().find(|m| !m.is_multiple_of(n)) {
            return Err((
                "phm_dim",
                format!("{n} does not divide the bottleneck size {m}; pick a reduction factor that leaves a multiple of {n}"),
            ));
        }
        if self.phm_rank == 0 || self.phm_rank > hidden {
            return Err((
                "phm_rank",
                format!("{} must be in 1..={hidden}", self.phm_rank),
            ));
        }
        if !(self.phm_init_range.is_finite() && self.phm_init_range >= 0.0) {
            return Err(("phm_init_range", "must be a finite number ≥ 0".into()));
        }
        if self.shared_w_phm && !self.factorized_phm_w {
            return Err((
                "shared_W_phm",
                "shared weights need factorized_phm_W = true (AdapterHub 1.3 itself fails on \
                 unfactorised shared weights)"
                    .into(),
            ));
        }
        if self.shared_w_phm && per_layer {
            return Err((
                "shared_W_phm",
                "shared weights need one bottleneck size for every layer, not a per-layer \
                 reduction_factor"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The tensors of projection `proj` ([in, out] = `dims`) that live at each site, with shapes.
    pub fn site_tensors(&self, dims: (usize, usize)) -> Vec<(PhmTensor, Vec<usize>)> {
        let n = self.phm_dim;
        let (p, q) = (dims.0 / n, dims.1 / n);
        let mut v = Vec::new();
        if !self.shared_w_phm {
            if self.factorized_phm_w {
                v.push((PhmTensor::WLeft, vec![n, p, self.phm_rank]));
                v.push((PhmTensor::WRight, vec![n, self.phm_rank, q]));
            } else {
                v.push((PhmTensor::W, vec![n, p, q]));
            }
        }
        if !self.shared_phm_rule {
            v.extend(self.rule_tensors());
        }
        v
    }

    fn rule_tensors(&self) -> Vec<(PhmTensor, Vec<usize>)> {
        let n = self.phm_dim;
        if self.factorized_phm_rule {
            vec![
                (PhmTensor::RuleLeft, vec![n, n, 1]),
                (PhmTensor::RuleRight, vec![n, 1, n]),
            ]
        } else {
            vec![(PhmTensor::Rule, vec![n, n, n])]
        }
    }

    /// The tensors every layer shares (`shared_parameters.{task}.…`): leaf name, what it is, shape.
    /// `m` is the bottleneck size, `d` the hidden width.
    pub fn shared_tensors(
        &self,
        d: usize,
        m: usize,
    ) -> Vec<(String, Option<PhmProj>, PhmTensor, Vec<usize>)> {
        let mut v = Vec::new();
        if self.shared_w_phm {
            let (n, r) = (self.phm_dim, self.phm_rank);
            for (proj, (i, o)) in [(PhmProj::Down, (d, m)), (PhmProj::Up, (m, d))] {
                let name = proj.name();
                v.push((
                    format!("W_{name}_left"),
                    Some(proj),
                    PhmTensor::WLeft,
                    vec![n, i / n, r],
                ));
                v.push((
                    format!("W_{name}_right"),
                    Some(proj),
                    PhmTensor::WRight,
                    vec![n, r, o / n],
                ));
            }
        }
        if self.shared_phm_rule {
            for (t, shape) in self.rule_tensors() {
                v.push((t.leaf().to_string(), None, t, shape));
            }
        }
        v
    }

    /// Values of a new PHM tensor of `shape`: weight blocks Glorot-normal per block, rules by
    /// `phm_c_init` (`shared` selects AdapterHub's scale for shared rules), drawn from `rng`.
    pub fn init_values(
        &self,
        t: PhmTensor,
        shape: &[usize],
        shared: bool,
        rng: &mut Rng,
    ) -> Vec<f32> {
        let n: usize = shape.iter().product();
        if t.is_rule() {
            let (std, bound) = if shared {
                (self.phm_init_range, 1.0)
            } else {
                (0.01, 0.01)
            };
            return (0..n)
                .map(|_| match self.phm_c_init {
                    RuleInit::Normal => (rng.normal() * std) as f32,
                    RuleInit::Uniform => ((2.0 * rng.uniform() - 1.0) * bound) as f32,
                })
                .collect();
        }
        // torch's xavier_normal_ on each [rows, cols] block: std = sqrt(2 / (rows + cols)).
        let (rows, cols) = (shape[1], shape[2]);
        let std = (2.0 / (rows + cols) as f64).sqrt();
        (0..n).map(|_| (rng.normal() * std) as f32).collect()
    }
}

/// `Hᵀ` [out, in] for rules `rule` [n, n, n] and weight blocks `w` [n, in/n, out/n], where
/// `H[(a,c), (b,d)] = Σᵢ rule[i,a,b] · w[i,c,d]` (`H = Σᵢ ruleᵢ ⊗ wᵢ`): one product over `i`, then
/// a reshuffle of axes. Differentiable.
pub fn kron_weight(rule: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, p, q) = w.dims3()?;
    let r = rule.reshape((n, n * n))?.t()?.contiguous()?;
    let m = r.matmul(&w.reshape((n, p * q))?)?;
    Ok(m.reshape((n, n, p, q))?
        .permute((1, 3, 0, 2))?
        .contiguous()?
        .reshape((n * q, n * p))?)
}

/// [`kron_weight`] by its definition, element by element, on the CPU: the reference it is tested
/// against.
pub fn kron_weight_slow(rule: &[f32], w: &[f32], n: usize, p: usize, q: usize) -> Vec<f32> {
    let (rows, cols) = (n * q, n * p);
    let mut out = vec![0.0f32; rows * cols];
    for i in 0..n {
        for a in 0..n {
            for b in 0..n {
                let r = rule[(i * n + a) * n + b];
                for c in 0..p {
                    for d in 0..q {
                        // Hᵀ[(b, d), (a, c)]
                        out[(b * q + d) * cols + a * p + c] += r * w[(i * p + c) * q + d];
                    }
                }
            }
        }
    }
    out
}

/// The down and up projections' weights (and zero biases when `phm_bias` is off) of every site of
/// adapter configuration `cfg`, built from task `task`'s PHM tensors and keyed as the plain
/// adapter's tensors they stand for. Built from the tensors as they are, so a loss over a forward
/// that reads them has gradients for the PHM tensors.
pub fn derive(
    cfg: &AdapterConfig,
    phm: &PhmConfig,
    task: &str,
    params: &BTreeMap<ParamKey, Tensor>,
    layers: usize,
) -> Result<BTreeMap<ParamKey, Tensor>> {
    let get = |name: &str| -> Result<&Tensor> {
        params
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("the task has no parameter `{name}`")))
    };
    let shared = |leaf: &str| get(&shared_name(task, leaf));
    let product = |l: &Tensor, r: &Tensor| -> Result<Tensor> { Ok(l.matmul(r)?) };
    let shared_rule = match (phm.shared_phm_rule, phm.factorized_phm_rule) {
        (false, _) => None,
        (true, false) => Some(shared("phm_rule")?.clone()),
        (true, true) => Some(product(
            shared("phm_rule_left")?,
            shared("phm_rule_right")?,
        )?),
    };
    let mut shared_w = BTreeMap::new();
    if phm.shared_w_phm {
        for proj in [PhmProj::Down, PhmProj::Up] {
            let name = proj.name();
            let w = product(
                shared(&format!("W_{name}_left"))?,
                shared(&format!("W_{name}_right"))?,
            )?;
            shared_w.insert(name, w);
        }
    }
    let mut out = BTreeMap::new();
    for l in (0..layers).filter(|&l| cfg.has_layer(l)) {
        for &site in cfg.sites() {
            for (proj, weight, bias) in [
                (PhmProj::Down, Part::DownWeight, Part::DownBias),
                (PhmProj::Up, Part::UpWeight, Part::UpBias),
            ] {
                let local = |t: PhmTensor| get(&cfg.param_name(l, site, task, Part::Phm(proj, t)));
                let rule = match &shared_rule {
                    Some(r) => r.clone(),
                    None if phm.factorized_phm_rule => {
                        product(local(PhmTensor::RuleLeft)?, local(PhmTensor::RuleRight)?)?
                    }
                    None => local(PhmTensor::Rule)?.clone(),
                };
                let w = match shared_w.get(proj.name()) {
                    Some(w) => w.clone(),
                    None if phm.factorized_phm_w => {
                        product(local(PhmTensor::WLeft)?, local(PhmTensor::WRight)?)?
                    }
                    None => local(PhmTensor::W)?.clone(),
                };
                let h = kron_weight(&rule.to_dtype(w.dtype())?, &w)?;
                if !phm.phm_bias {
                    let zeros = Tensor::zeros(h.dim(0)?, h.dtype(), h.device())?;
                    out.insert(cfg.param_key(l, site, task, bias), zeros);
                }
                out.insert(cfg.param_key(l, site, task, weight), h);
            }
        }
    }
    Ok(out)
}

/// The checkpoint name of a tensor every layer shares (without `bert.`).
pub fn shared_name(task: &str, leaf: &str) -> String {
    format!("shared_parameters.{task}.{leaf}")
}

/// The typed key of a shared tensor; it changes the adapters of every layer from `first_layer`.
pub fn shared_key(task: &str, leaf: &str, first_layer: usize) -> ParamKey {
    ParamKey::new(
        shared_name(task, leaf),
        Role::Adapter { layer: first_layer },
        Leaf::Weight,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn kron_weight_is_the_sum_of_kronecker_products() {
        let mut rng = Rng::new(7);
        for (n, p, q) in [(1, 3, 2), (2, 4, 3), (4, 8, 2), (3, 1, 5)] {
            let rule: Vec<f32> = (0..n * n * n).map(|_| rng.normal() as f32).collect();
            let w: Vec<f32> = (0..n * p * q).map(|_| rng.normal() as f32).collect();
            let dev = Device::Cpu;
            let fast = kron_weight(
                &Tensor::from_vec(rule.clone(), (n, n, n), &dev).unwrap(),
                &Tensor::from_vec(w.clone(), (n, p, q), &dev).unwrap(),
            )
            .unwrap();
            assert_eq!(fast.dims(), &[n * q, n * p]);
            let fast = fast.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let slow = kron_weight_slow(&rule, &w, n, p, q);
            let d = fast
                .iter()
                .zip(&slow)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "n={n} p={p} q={q}: differs by {d}");
        }
    }
}
