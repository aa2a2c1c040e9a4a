//! What one forward pass reads: the base's typed modules with a task's trained copies put in their
//! place, resolved once per forward (never per op), and each layer's adapter sites.

use super::checkpoint::{FusedQkv, LayerNorm, Linear, Param, ParamValue};
use super::BaseModel;
use crate::adapter::lora::{factor_name, scale_name, Projection};
use crate::adapter::prefix::prefix_key_name;
use crate::adapter::AdapterConfig;
use crate::adapter::{BottleneckAdapter, Site};
use crate::error::{Error, Result};
use crate::kernels::{LinearView, NormView, WeightRef};
use crate::keys::ParamKey;
use candle_core::Tensor;
use std::collections::BTreeMap;

/// One layer's shared weights (attention and FFN) as this forward uses them.
#[derive(Debug, Clone, Copy)]
pub struct LayerView<'a> {
    /// `attention.self.query`.
    pub query: LinearView<'a>,
    /// `attention.self.key`.
    pub key: LinearView<'a>,
    /// `attention.self.value`.
    pub value: LinearView<'a>,
    /// The base's concatenated q, k, v, when the task trains none of them.
    pub qkv: Option<LinearView<'a>>,
    /// `attention.output.dense`.
    pub attention_out: LinearView<'a>,
    /// `intermediate.dense`.
    pub intermediate: LinearView<'a>,
    /// `output.dense`.
    pub output: LinearView<'a>,
    /// The task's learned key and value prefixes [heads, P, dh] (prefix tuning), if any.
    pub prefix: Option<(&'a Tensor, &'a Tensor)>,
    /// Per-channel output scales of the projections, in [`Projection::ALL`] order ((IA)³ while
    /// training; merged into the weights for inference).
    pub scales: [Option<&'a Tensor>; 5],
    /// LoRA's factors `(A, (α/r)·B)` per projection, in [`Projection::ALL`] order (while
    /// training; merged into the weights for inference).
    pub lora: [Option<(&'a Tensor, &'a Tensor)>; 5],
}

impl LayerView<'_> {
    /// LoRA's update `x·Aᵀ·Bᵀ` of projection `p`'s output for the projection's input `x`, if the
    /// task adapts `p` with LoRA.
    pub fn lora_delta(&self, p: Projection, x: &Tensor) -> Result<Option<Tensor>> {
        let Some((a, b)) = self.lora[p as usize] else {
            return Ok(None);
        };
        Ok(Some(
            x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?,
        ))
    }

    /// LoRA's updates of the q, k and v outputs as one [.., 3d] tensor (zeros for a projection
    /// without LoRA), if any of the three has LoRA.
    pub fn qkv_delta(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let parts = [Projection::Query, Projection::Key, Projection::Value]
            .into_iter()
            .map(|p| self.lora_delta(p, x))
            .collect::<Result<Vec<_>>>()?;
        if parts.iter().all(Option::is_none) {
            return Ok(None);
        }
        let zeros = x.zeros_like()?;
        let parts: Vec<Tensor> = parts
            .into_iter()
            .map(|d| d.unwrap_or_else(|| zeros.clone()))
            .collect();
        Ok(Some(Tensor::cat(&parts, candle_core::D::Minus1)?))
    }

    /// The q|k|v output scales as one [3d] vector (ones where a projection is not scaled), if any
    /// of the three is scaled.
    pub fn qkv_scale(&self, d: usize) -> Result<Option<Tensor>> {
        let [q, k, v, ..] = self.scales;
        let Some(any) = q.or(k).or(v) else {
            return Ok(None);
        };
        let ones = Tensor::ones(d, any.dtype(), any.device())?;
        let parts: Vec<&Tensor> = [q, k, v].iter().map(|s| s.unwrap_or(&ones)).collect();
        Ok(Some(Tensor::cat(&parts, 0)?))
    }
}

impl LayerView<'_> {
    fn same(&self, other: &LayerView<'_>) -> bool {
        self.query.same(other.query)
            && self.key.same(other.key)
            && self.value.same(other.value)
            && self.attention_out.same(other.attention_out)
            && self.intermediate.same(other.intermediate)
            && self.output.same(other.output)
            && match (self.prefix, other.prefix) {
                (None, None) => true,
                (Some(a), Some(b)) => std::ptr::eq(a.0, b.0) && std::ptr::eq(a.1, b.1),
                _ => false,
            }
            && self
                .scales
                .iter()
                .zip(&other.scales)
                .all(|(a, b)| match (a, b) {
                    (None, None) => true,
                    (Some(a), Some(b)) => std::ptr::eq(*a, *b),
                    _ => false,
                })
            // LoRA's q, k, v and intermediate updates run per row group (`Routing::updates`);
            // an update of the FFN's output projection cannot, so it must be the same.
            && match (
                self.lora[Projection::Output as usize],
                other.lora[Projection::Output as usize],
            ) {
                (None, None) => true,
                (Some(a), Some(b)) => std::ptr::eq(a.0, b.0) && std::ptr::eq(a.1, b.1),
                _ => false,
            }
    }
}

/// One adapter site's exit as a task sees it: the sub-layer's LayerNorm (the task's copy when it
/// trains LayerNorms) and the task's adapter there, if any.
#[derive(Debug, Clone)]
pub struct SiteView<'a> {
    /// The original residual + LayerNorm of the sub-layer.
    pub layer_norm: NormView<'a>,
    /// The adapter at this site.
    pub adapter: Option<BottleneckAdapter<'a>>,
}

/// What of a task the encoder reads: its name, its trained tensors (which replace the base's of
/// the same name) and its adapter configuration.
#[derive(Debug, Clone, Copy)]
pub struct TaskParts<'a> {
    /// The task's name (it prefixes its adapter tensors' names).
    pub name: &'a str,
    /// Every tensor the task trains.
    pub params: &'a BTreeMap<ParamKey, Tensor>,
    /// Its adapters, if it has any.
    pub adapter: Option<&'a AdapterConfig>,
    /// Whether its forward reads derived weights (LoRA, Compacter), which must then come in
    /// `derived`.
    pub derives: bool,
    /// Weights derived from the task's tensors for this forward (LoRA merged into projections,
    /// Compacter's PHM projections), which replace the tensors of the same name.
    pub derived: Option<&'a BTreeMap<ParamKey, Tensor>>,
    /// The task's projections held ready at merge, which replace the base's (and any of the same
    /// name in `params` or `derived`).
    pub merged: Option<&'a MergedWeights>,
}

/// A task's projections that differ from the base's, held the way the fused products read them
/// (packed where our kernel packs): built once at [`crate::TaskModel::merge`], so that no forward
/// concatenates, unpacks or packs them.
#[derive(Debug, Clone, Default)]
pub struct MergedWeights {
    /// Per layer, q, k and v fused.
    pub qkv: BTreeMap<usize, FusedQkv>,
    /// The attention-output and FFN weights, by checkpoint name.
    pub dense: BTreeMap<ParamKey, ParamValue>,
}

/// Everything of the encoder one task's forward reads.
#[derive(Debug, Clone)]
pub struct TaskView<'a> {
    /// Word, position and segment tables.
    pub embeddings: [&'a Tensor; 3],
    /// The embeddings' LayerNorm.
    pub embeddings_norm: NormView<'a>,
    /// Per layer, the shared weights.
    pub layers: Vec<LayerView<'a>>,
    /// Per layer, the attention site and the FFN site.
    pub sites: Vec<[SiteView<'a>; 2]>,
    /// The pooler, when the checkpoint has one.
    pub pooler: Option<LinearView<'a>>,
}

impl<'a> TaskView<'a> {
    /// The view of `task` on `base` (the base alone when `task` is `None`).
    pub fn new(base: &'a BaseModel, task: Option<TaskParts<'a>>) -> Result<Self> {
        if let Some(t) = task.filter(|t| t.derives && t.derived.is_none()) {
            return Err(Error::config(
                "task",
                t.name,
                "derives its weights (LoRA or Compacter), but this forward was given none (merge \
                 the task, or derive them for the forward); running without them would ignore them",
            ));
        }
        // A task's trained or derived copy of a base tensor, which replaces it.
        let task_copy = |p: &'a Param| -> Option<&'a Tensor> {
            task.and_then(|t| {
                t.derived
                    .and_then(|d| d.get(p.key.name()))
                    .or_else(|| t.params.get(p.key.name()))
            })
        };
        let r = |p: &'a Param| -> Result<&'a Tensor> {
            task_copy(p).or(p.as_tensor()).ok_or_else(|| {
                Error::config(
                    "base model",
                    p.key.name(),
                    "is held only as packed panels, but is read here as a tensor (a bug: only \
                     linear weights are packed)",
                )
            })
        };
        let merged = task.and_then(|t| t.merged);
        let lin = |l: &'a Linear| -> Result<LinearView<'a>> {
            let name = l.weight.key.name();
            let w = match (merged.and_then(|m| m.dense.get(name)), task_copy(&l.weight)) {
                (Some(held), _) => held.get(name)?,
                (None, Some(t)) => WeightRef::Tensor(t),
                (None, None) => l.weight.value.get(name)?,
            };
            Ok(LinearView { w, b: r(&l.bias)? })
        };
        let norm = |n: &'a LayerNorm| -> Result<NormView<'a>> {
            Ok(NormView {
                gamma: r(&n.weight)?,
                beta: r(&n.bias)?,
            })
        };
        let w = &base.weights;
        let e = &w.embeddings;
        let mut layers = Vec::with_capacity(w.layers.len());
        let mut sites = Vec::with_capacity(w.layers.len());
        for (l, layer) in w.layers.iter().enumerate() {
            let a = &layer.attention;
            let whole = |f: &'a FusedQkv| -> Result<LinearView<'a>> {
                Ok(LinearView {
                    w: f.weight.get("q|k|v")?,
                    b: &f.bias,
                })
            };
            let part = |f: &'a FusedQkv, i: usize| -> Result<LinearView<'a>> {
                Ok(LinearView {
                    w: f.parts[i].0.get(["query", "key", "value"][i])?,
                    b: &f.parts[i].1,
                })
            };
            let (query, key, value, qkv) = match merged.and_then(|m| m.qkv.get(&l)) {
                Some(f) => (part(f, 0)?, part(f, 1)?, part(f, 2)?, Some(whole(f)?)),
                None => {
                    let (query, key, value) = (lin(&a.query)?, lin(&a.key)?, lin(&a.value)?);
                    let untouched = [(&a.query, query), (&a.key, key), (&a.value, value)]
                        .iter()
                        .all(|(base_lin, v)| {
                            (base_lin.weight.value.get("")).is_ok_and(|base_w| v.w.same(base_w))
                                && base_lin
                                    .bias
                                    .as_tensor()
                                    .is_some_and(|b| std::ptr::eq(v.b, b))
                        });
                    // The base's fused q|k|v only where the task keeps all three.
                    (
                        query,
                        key,
                        value,
                        untouched.then(|| whole(&a.qkv)).transpose()?,
                    )
                }
            };
            layers.push(LayerView {
                query,
                key,
                value,
                qkv,
                attention_out: lin(&layer.attention_output.dense)?,
                intermediate: lin(&layer.intermediate.dense)?,
                output: lin(&layer.output.dense)?,
                prefix: task.and_then(|t| t.derived).and_then(|d| {
                    let k = d.get(prefix_key_name(l, "key").as_str())?;
                    let v = d.get(prefix_key_name(l, "value").as_str())?;
                    Some((k, v))
                }),
                scales: Projection::ALL.map(|p| {
                    task.and_then(|t| t.derived)
                        .and_then(|d| d.get(scale_name(l, p).as_str()))
                }),
                lora: Projection::ALL.map(|p| {
                    let d = task.and_then(|t| t.derived)?;
                    let a = d.get(factor_name(l, p, "a").as_str())?;
                    let b = d.get(factor_name(l, p, "b").as_str())?;
                    Some((a, b))
                }),
            });
            let site = |s: Site, n: &'a LayerNorm| -> Result<SiteView<'a>> {
                let adapter = match task {
                    Some(TaskParts {
                        name,
                        params,
                        adapter: Some(cfg),
                        derived,
                        ..
                    }) => BottleneckAdapter::resolve(cfg, name, params, derived, l, s)?,
                    _ => None,
                };
                Ok(SiteView {
                    layer_norm: norm(n)?,
                    adapter,
                })
            };
            sites.push([
                site(Site::Attention, &layer.attention_output.layer_norm)?,
                site(Site::Ffn, &layer.output.layer_norm)?,
            ]);
        }
        Ok(TaskView {
            embeddings: [r(&e.word)?, r(&e.position)?, r(&e.token_type)?],
            embeddings_norm: norm(&e.layer_norm)?,
            layers,
            sites,
            pooler: w.pooler.as_ref().map(|p| lin(&p.dense)).transpose()?,
        })
    }

    /// Checks that `other` reads the same embedding tables and layer weights, so both can run in
    /// one batch (tasks that train their own copies of those, top-k or full fine-tuning, cannot).
    pub fn shares_encoder_with(&self, other: &TaskView<'_>, other_name: &str) -> Result<()> {
        let same_emb = self
            .embeddings
            .iter()
            .zip(&other.embeddings)
            .all(|(a, b)| std::ptr::eq(*a, *b));
        let same_layers = self
            .layers
            .iter()
            .zip(&other.layers)
            .all(|(a, b)| a.same(b));
        if same_emb && same_layers {
            Ok(())
        } else {
            Err(Error::config(
                "mixed batch",
                other_name,
                "this task has its own embedding, attention or FFN weights or attention prefixes \
                 (top-k or full fine-tuning, LoRA, prefix tuning), so its rows cannot share a \
                 batch with other tasks; run it alone",
            ))
        }
    }
}
