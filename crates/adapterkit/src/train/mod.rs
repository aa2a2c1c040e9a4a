//! The trainer: one loop for every trainable set (AdamW, warm-up + linear decay, clipping, seeded
//! order and dropout, length bucketing, dev evaluation each epoch keeping the best).

use crate::data::{bucketed_batches, LabelledSet, TaskData};
use crate::encoder::{BaseModel, Batch, ForwardOptions, LayerCuts};
use crate::error::{Error, Result};
use crate::head::HeadKind;
use crate::kernels::{cross_entropy, mse};
use crate::metrics::{classification, pearson, ClassMetrics};
use crate::rng::Rng;
use crate::task::TaskModel;
use candle_core::{Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

pub mod checkpoint;
pub use checkpoint::Checkpointing;
use checkpoint::{Progress, Snapshot};

/// Optimisation settings; defaults follow the Houlsby reference code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Passes over the training set.
    pub epochs: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Decoupled weight decay (not applied to LayerNorms and biases).
    pub weight_decay: f64,
    /// Adam β₁.
    pub beta1: f64,
    /// Adam β₂.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
    /// Fraction of steps with linear warm-up.
    pub warmup_frac: f64,
    /// Global gradient-norm clip.
    pub max_grad_norm: f64,
    /// Seed of data order and dropout (init is seeded when the task is made).
    pub seed: u64,
    /// Stop after this many steps (for smoke tests); `None` runs all epochs.
    pub max_steps: Option<usize>,
    /// Batch size for evaluation.
    pub eval_batch_size: usize,
    /// When the lowest k layers hold nothing the task trains (no adapters there, LayerNorms
    /// frozen), compute their output once per training example and start every step at layer k.
    /// Those layers then run without dropout.
    #[serde(default)]
    pub cache_frozen_prefix: bool,
}

impl TrainConfig {
    /// Checks every setting before any work: the error names the setting and its range.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, message: String| Err(Error::config("train", field, message));
        if self.batch_size == 0 || self.epochs == 0 || self.eval_batch_size == 0 {
            return bad("epochs/batch_size", "must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("{} must be a positive number", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "weight_decay",
                format!("{} must be a number of at least 0", self.weight_decay),
            );
        }
        if self.lr * self.weight_decay >= 1.0 {
            return bad(
                "weight_decay",
                format!(
                    "lr {} × weight_decay {} = {} must be below 1: AdamW shrinks each weight by \
                     that fraction per step",
                    self.lr,
                    self.weight_decay,
                    self.lr * self.weight_decay
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.warmup_frac) {
            return bad(
                "warmup",
                format!(
                    "{} is a fraction of the steps: expected 0 to 1",
                    self.warmup_frac
                ),
            );
        }
        for (field, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(field, format!("{b} must be in [0, 1)"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", format!("{} must be a positive number", self.eps));
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm <= 0.0 {
            return bad(
                "max_grad_norm",
                format!("{} must be a positive number", self.max_grad_norm),
            );
        }
        if self.max_steps == Some(0) {
            return bad("max_steps", "must be at least 1".into());
        }
        Ok(())
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 3,
            batch_size: 32,
            lr: 1e-3,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            warmup_frac: 0.1,
            max_grad_norm: 1.0,
            seed: 42,
            max_steps: None,
            eval_batch_size: 64,
            cache_frozen_prefix: false,
        }
    }
}

/// Quality of predictions on one set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EvalMetrics {
    /// Classification metrics.
    Class(ClassMetrics),
    /// Regression metrics.
    Regression {
        /// Pearson correlation.
        pearson: f64,
        /// Mean squared error.
        mse: f64,
        /// Number of examples.
        n: usize,
    },
}

impl EvalMetrics {
    /// The number that selects the best epoch (accuracy, or Pearson r for regression).
    pub fn primary(&self) -> f64 {
        match self {
            EvalMetrics::Class(m) => m.accuracy,
            EvalMetrics::Regression { pearson, .. } => *pearson,
        }
    }
}

/// Predictions and metrics on one set.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Metrics.
    pub metrics: EvalMetrics,
    /// Predicted class (classification) per example, in set order.
    pub predicted: Vec<usize>,
    /// Raw outputs (probabilities or value) per example.
    pub outputs: Vec<Vec<f32>>,
}

/// One finished epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochReport {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Dev metrics after the epoch.
    pub dev: EvalMetrics,
    /// Seconds spent training in the epoch (evaluation excluded).
    pub train_seconds: f64,
    /// Training throughput.
    pub examples_per_second: f64,
}

/// What a training run did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    /// Per-epoch results.
    pub epochs: Vec<EpochReport>,
    /// Epoch whose parameters were kept (best dev).
    pub best_epoch: usize,
    /// Dev metrics of the kept parameters.
    pub best_dev: EvalMetrics,
    /// Optimiser steps taken.
    pub steps: usize,
    /// Wall time of the whole run, evaluation included.
    pub seconds: f64,
}

/// Progress events for a progress bar or a log.
#[derive(Debug, Clone)]
pub enum Event {
    /// An optimiser step finished.
    Step {
        /// Steps done.
        step: usize,
        /// Steps planned.
        total: usize,
        /// Loss of this step.
        loss: f64,
        /// Learning rate used.
        lr: f64,
        /// Examples per second since the epoch began.
        examples_per_second: f64,
    },
    /// An epoch finished and was evaluated.
    Epoch(EpochReport),
}

struct AdamSlot {
    name: String,
    var: Var,
    m: Vec<f32>,
    v: Vec<f32>,
    decay: bool,
}

/// AdamW with decoupled weight decay and global-norm clipping over a task's parameters.
pub struct AdamW {
    slots: Vec<AdamSlot>,
    cfg: TrainConfig,
    t: i32,
}

impl AdamW {
    /// Turns every parameter of `task` into a variable (so autograd tracks it) with fresh moments.
    pub fn new(task: &mut TaskModel, cfg: &TrainConfig) -> Result<Self> {
        let mut slots = Vec::new();
        for (name, t) in task.params.iter_mut() {
            let var = Var::from_tensor(t)?;
            *t = var.as_tensor().clone();
            let n = t.elem_count();
            slots.push(AdamSlot {
                name: name.name().to_string(),
                var,
                m: vec![0.0; n],
                v: vec![0.0; n],
                decay: name.decays(),
            });
        }
        Ok(AdamW {
            slots,
            cfg: cfg.clone(),
            t: 0,
        })
    }

    /// The first and second moments by parameter name, for a checkpoint.
    fn moments(&self) -> Result<[BTreeMap<String, Tensor>; 2]> {
        let mut out: [BTreeMap<String, Tensor>; 2] = Default::default();
        for s in &self.slots {
            let shape = s.var.as_tensor().shape().clone();
            out[0].insert(
                s.name.clone(),
                Tensor::from_slice(&s.m, &shape, &candle_core::Device::Cpu)?,
            );
            out[1].insert(
                s.name.clone(),
                Tensor::from_slice(&s.v, &shape, &candle_core::Device::Cpu)?,
            );
        }
        Ok(out)
    }

    /// Continues from saved moments and step counter (names and shapes checked against `dir`'s).
    fn restore(&mut self, snap: &mut Snapshot, dir: &std::path::Path) -> Result<()> {
        for s in &mut self.slots {
            let dims = s.var.as_tensor().dims().to_vec();
            s.m = to_vec_f32(&checkpoint::take(
                &mut snap.adam_m,
                dir,
                "adam_m",
                &s.name,
                &dims,
            )?)?;
            s.v = to_vec_f32(&checkpoint::take(
                &mut snap.adam_v,
                dir,
                "adam_v",
                &s.name,
                &dims,
            )?)?;
        }
        checkpoint::all_taken(&snap.adam_m, dir, "adam_m")?;
        checkpoint::all_taken(&snap.adam_v, dir, "adam_v")?;
        self.t = snap.progress.adam_t;
        Ok(())
    }

    /// One update at learning rate `lr`; returns the gradient norm before clipping. A parameter
    /// without a gradient in `grads` counts as zero gradient. A norm that is not finite leaves
    /// parameters and moments untouched (the caller stops and says why).
    pub fn step(&mut self, grads: &candle_core::backprop::GradStore, lr: f64) -> Result<f64> {
        self.step_on(grads, lr, true)
    }

    /// [`AdamW::step`], writing parameters in place where they allow it (`in_place`) or always
    /// through copied row blocks (the path of other devices and dtypes, kept testable on the CPU).
    fn step_on(
        &mut self,
        grads: &candle_core::backprop::GradStore,
        lr: f64,
        in_place: bool,
    ) -> Result<f64> {
        let cfg = &self.cfg;
        // The gradients are read where they lie, twice (norm, then update): a copy of all of them
        // beside the GradStore added the size of every trained weight to the peak RSS of full
        // fine-tuning (440 MB on BERT-base, measured).
        let mut sq = 0f64;
        for s in &self.slots {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                // Chunk sums collected in order and added in order: the same norm, bit for bit,
                // on any number of threads (a rayon reduction's tree depends on work stealing).
                let chunks: Vec<f64> = with_f32(g, |g| {
                    g.par_chunks(1 << 15)
                        .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
                        .collect()
                })?;
                sq += chunks.iter().sum::<f64>();
            }
        }
        let norm = sq.sqrt();
        if !norm.is_finite() {
            return Ok(norm);
        }
        let clip = if norm > cfg.max_grad_norm {
            (cfg.max_grad_norm / (norm + 1e-6)) as f32
        } else {
            1.0
        };
        self.t += 1;
        let bc1 = 1.0 - cfg.beta1.powi(self.t);
        let bc2 = 1.0 - cfg.beta2.powi(self.t);
        let (b1, b2) = (cfg.beta1 as f32, cfg.beta2 as f32);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = cfg.eps as f32;
        for s in self.slots.iter_mut() {
            let shrink = if s.decay {
                1.0 - (lr * cfg.weight_decay) as f32
            } else {
                1.0
            };
            let update = |p: &mut [f32], m: &mut [f32], v: &mut [f32], g: Option<&[f32]>| {
                const CHUNK: usize = 1 << 15;
                p.par_chunks_mut(CHUNK)
                    .zip(m.par_chunks_mut(CHUNK))
                    .zip(v.par_chunks_mut(CHUNK))
                    .enumerate()
                    .for_each(|(c, ((p, m), v))| {
                        let g = g.map(|g| &g[c * CHUNK..c * CHUNK + p.len()]);
                        for i in 0..p.len() {
                            // A parameter without a gradient takes a zero-gradient step.
                            let gi = g.map_or(0.0, |g| g[i] * clip);
                            m[i] = b1 * m[i] + (1.0 - b1) * gi;
                            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                            p[i] =
                                p[i] * shrink - step_size * m[i] / (v[i].sqrt() / bc2_sqrt + eps);
                        }
                    });
            };
            let t = s.var.as_tensor().clone();
            let (m, v) = (&mut s.m, &mut s.v);
            // Updated in blocks of rows written back in place: a copy of a whole weight (the
            // word embeddings: 94 MB on BERT-base) sat on top of the peak.
            let mut blocks = |g: Option<&[f32]>| -> Result<()> {
                let rows = t.dims().first().copied().unwrap_or(1).max(1);
                let row_len = t.elem_count() / rows;
                let block_rows = ((1usize << 20) / row_len.max(1)).max(1);
                if t.rank() == 0 || block_rows >= rows {
                    let mut p = to_vec_f32(&t)?;
                    update(&mut p, m, v, g);
                    let src = Tensor::from_vec(p, t.shape().clone(), t.device())?;
                    return Ok(s.var.set(&src.to_dtype(t.dtype())?)?);
                }
                for r0 in (0..rows).step_by(block_rows) {
                    let nr = block_rows.min(rows - r0);
                    let block = t.narrow(0, r0, nr)?;
                    let mut p = to_vec_f32(&block)?;
                    let range = r0 * row_len..(r0 + nr) * row_len;
                    let g = g.map(|g| &g[range.clone()]);
                    update(&mut p, &mut m[range.clone()], &mut v[range], g);
                    let src = Tensor::from_vec(p, block.shape().clone(), t.device())?;
                    t.slice_set(&src.to_dtype(t.dtype())?, 0, r0)?;
                }
                Ok(())
            };
            // A contiguous f32 parameter on the CPU is updated where it lies: copying it out and
            // back in blocks was about 30% of the optimizer's time in a MiniLM full fine-tuning
            // step on an Intel Xeon (`perf`, 2026-12-07).
            let in_place = in_place
                && t.device().is_cpu()
                && t.dtype() == candle_core::DType::F32
                && t.is_contiguous();
            match (grads.get(&t), in_place) {
                (Some(g), true) => with_f32(g, |g| {
                    t.inplace_op1(&InPlace::new(|p: &mut [f32]| update(p, m, v, Some(g))))
                })??,
                (None, true) => {
                    t.inplace_op1(&InPlace::new(|p: &mut [f32]| update(p, m, v, None)))?
                }
                (Some(g), false) => with_f32(g, |g| blocks(Some(g)))??,
                (None, false) => blocks(None)?,
            }
        }
        Ok(norm)
    }
}

/// A closure run on a tensor's own f32 values (contiguous, on the CPU), through candle's in-place
/// op, so the optimizer writes a parameter without a copy.
struct InPlace<F: FnMut(&mut [f32])>(std::cell::RefCell<F>);

impl<F: FnMut(&mut [f32])> InPlace<F> {
    fn new(f: F) -> Self {
        InPlace(std::cell::RefCell::new(f))
    }
}

impl<F: FnMut(&mut [f32])> candle_core::InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        "adamw-in-place"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        match (storage, layout.contiguous_offsets()) {
            (candle_core::CpuStorage::F32(v), Some((a, b))) => {
                (self.0.borrow_mut())(&mut v[a..b]);
                Ok(())
            }
            _ => Err(candle_core::Error::Msg(
                "adamw-in-place: expected a contiguous f32 tensor".into(),
            )),
        }
    }
}

/// Runs `f` on a tensor's values as one f32 slice: in place where the tensor is contiguous f32 on
/// the CPU, else on a converted copy.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.dtype() == candle_core::DType::F32 {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&v[a..b]));
        }
    }
    Ok(f(&to_vec_f32(t)?))
}

/// A tensor's values as a flat `Vec<f32>`.
fn to_vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Linear warm-up then linear decay to zero, as a multiplier of the peak rate.
pub fn lr_factor(step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        (step + 1) as f64 / warmup as f64
    } else if total > warmup {
        ((total - step) as f64 / (total - warmup) as f64).max(0.0)
    } else {
        1.0
    }
}

/// Tokenized inputs of a set, computed once.
pub fn tokenize_set(
    base: &BaseModel,
    set: &LabelledSet,
    max_len: usize,
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    base.tokenizer.encode_all(&set.inputs, max_len)
}

/// Evaluates a task on tokenized inputs of `set`.
pub fn evaluate_encoded(
    base: &BaseModel,
    task: &TaskModel,
    set: &LabelledSet,
    encoded: &[(Vec<u32>, Vec<u32>)],
    batch_size: usize,
    skip_adapter_layers: &[usize],
) -> Result<Evaluation> {
    let outputs = base.predict_encoded(task, encoded, batch_size, skip_adapter_layers)?;
    Ok(match task.head.kind {
        HeadKind::Classification => {
            let predicted: Vec<usize> = outputs.iter().map(|r| argmax(r)).collect();
            let metrics = EvalMetrics::Class(classification(
                &predicted,
                &set.labels,
                task.head.labels.len(),
            ));
            Evaluation {
                metrics,
                predicted,
                outputs,
            }
        }
        HeadKind::Regression => {
            let pred: Vec<f32> = outputs
                .iter()
                .map(|r| r.first().copied().unwrap_or(0.0))
                .collect();
            let mse = pred
                .iter()
                .zip(&set.targets)
                .map(|(p, t)| ((p - t) as f64).powi(2))
                .sum::<f64>()
                / pred.len().max(1) as f64;
            Evaluation {
                metrics: EvalMetrics::Regression {
                    pearson: pearson(&pred, &set.targets),
                    mse,
                    n: pred.len(),
                },
                predicted: vec![],
                outputs,
            }
        }
    })
}

/// Tokenizes `set` and evaluates the task on it.
pub fn evaluate(
    base: &BaseModel,
    task: &TaskModel,
    set: &LabelledSet,
    batch_size: usize,
    skip_adapter_layers: &[usize],
) -> Result<Evaluation> {
    let enc = tokenize_set(base, set, task.max_len)?;
    evaluate_encoded(base, task, set, &enc, batch_size, skip_adapter_layers)
}

/// Index of the largest value.
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// The loss of one batch in training mode (dropout drawn from `rng`).
pub fn batch_loss(
    base: &BaseModel,
    task: &TaskModel,
    encoded: &[(Vec<u32>, Vec<u32>)],
    set: &LabelledSet,
    rows: &[usize],
    rng: Option<&mut Rng>,
) -> Result<Tensor> {
    let opts = TrainForward {
        rng,
        ..TrainForward::default()
    };
    batch_loss_from(base, task, encoded, set, rows, opts)
}

/// What a training forward draws on besides its batch.
#[derive(Default)]
pub struct TrainForward<'a> {
    /// Dropout's generator; `None` runs without dropout.
    pub rng: Option<&'a mut Rng>,
    /// The frozen-prefix cache to start from, if the task has one.
    pub cache: Option<&'a PrefixCache>,
    /// Where to record the graph's cuts between layers, for [`LayerCuts::backward`].
    pub cuts: Option<&'a mut LayerCuts>,
}

/// The cached outputs of the frozen lowest layers, one [len, hidden] tensor per training example.
pub struct PrefixCache {
    /// Layers the cache covers (the step starts at this layer).
    pub layers: usize,
    /// Per example, in training-set order.
    pub rows: Vec<Tensor>,
}

impl PrefixCache {
    /// Runs the frozen lowest `layers` layers once over `encoded` (inference mode).
    pub fn build(
        base: &BaseModel,
        task: &TaskModel,
        encoded: &[(Vec<u32>, Vec<u32>)],
        layers: usize,
        batch_size: usize,
    ) -> Result<Self> {
        let frozen = task.detached();
        let mut rows: Vec<Option<Tensor>> = vec![None; encoded.len()];
        let mut order: Vec<usize> = (0..encoded.len()).collect();
        order.sort_by_key(|&i| encoded[i].0.len());
        for chunk in order.chunks(batch_size.max(1)) {
            let batch = Batch::select(encoded, chunk, base.config.pad_token_id, &base.device)?;
            for (&i, t) in chunk
                .iter()
                .zip(base.encode_prefix(&frozen, &batch, layers)?)
            {
                rows[i] = Some(t);
            }
        }
        let rows = rows
            .into_iter()
            .map(|r| r.ok_or_else(|| Error::NotFound("prefix cache row".into())))
            .collect::<Result<_>>()?;
        Ok(PrefixCache { layers, rows })
    }

    /// The padded [batch, seq, hidden] start state of `rows`.
    fn batch(&self, rows: &[usize], seq: usize) -> Result<Tensor> {
        let padded = rows
            .iter()
            .map(|&i| {
                let t = &self.rows[i];
                let (len, d) = t.dims2()?;
                Ok(if len < seq {
                    Tensor::cat(
                        &[t, &Tensor::zeros((seq - len, d), t.dtype(), t.device())?],
                        0,
                    )?
                } else {
                    t.clone()
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&padded, 0)?)
    }
}

/// [`batch_loss`] with every option of a training forward: the frozen-prefix cache to start from,
/// the layer cuts to record.
pub fn batch_loss_from(
    base: &BaseModel,
    task: &TaskModel,
    encoded: &[(Vec<u32>, Vec<u32>)],
    set: &LabelledSet,
    rows: &[usize],
    train: TrainForward<'_>,
) -> Result<Tensor> {
    let batch = Batch::select(encoded, rows, base.config.pad_token_id, &base.device)?;
    let prefix = match train.cache {
        Some(c) => Some((c.layers, c.batch(rows, batch.ids.dim(1)?)?)),
        None => None,
    };
    let mut opts = ForwardOptions {
        dropout_rng: train.rng,
        prefix,
        cuts: train.cuts,
        ..ForwardOptions::default()
    };
    // Labels are checked before the forward pass: a bad one must not cost a step.
    let labels = match task.head.kind {
        HeadKind::Classification => Some(batch_labels(
            set,
            rows,
            task.head.num_outputs(),
            "training",
        )?),
        HeadKind::Regression => None,
    };
    let logits = base.logits(task, &batch, &mut opts)?;
    match labels {
        Some(labels) => cross_entropy(&logits, &labels),
        None => {
            let t: Vec<f32> = rows.iter().map(|&i| set.targets[i]).collect();
            mse(&logits, &t)
        }
    }
}

/// The class labels of `rows` of `set`, each checked against the head's `classes`; the error names
/// the set (`what`) and the example.
fn batch_labels(set: &LabelledSet, rows: &[usize], classes: usize, what: &str) -> Result<Vec<u32>> {
    rows.iter()
        .map(|&i| match set.labels.get(i) {
            Some(&l) if l < classes => Ok(l as u32),
            found => Err(Error::Label {
                set: what.into(),
                example: i,
                label: found.copied().unwrap_or(usize::MAX),
                classes,
            }),
        })
        .collect()
}

/// Trains `task` on `data.train`, evaluating on `data.dev` after each epoch and keeping the best
/// epoch's parameters in `task`. Only the task's parameters get gradients and optimiser state.
pub fn train(
    base: &BaseModel,
    task: &mut TaskModel,
    data: &TaskData,
    cfg: &TrainConfig,
    on_event: &mut dyn FnMut(&Event),
) -> Result<TrainReport> {
    train_with(base, task, data, cfg, None, on_event)
}

/// The best epoch so far: its number, dev metrics and parameters.
type Best = (usize, EvalMetrics, BTreeMap<crate::task::ParamKey, Tensor>);

/// [`train`], saving a resumable checkpoint as `ckpt` says, or continuing from one. A resumed run
/// ends with the same parameters, bit for bit, as the run it continues would have.
pub fn train_with(
    base: &BaseModel,
    task: &mut TaskModel,
    data: &TaskData,
    cfg: &TrainConfig,
    ckpt: Option<&Checkpointing>,
    on_event: &mut dyn FnMut(&Event),
) -> Result<TrainReport> {
    // Training changes the LoRA tensors: forwards derive LoRA's weights from them each step.
    task.unmerge();
    if data.train.is_empty() || data.dev.is_empty() {
        return Err(Error::config(
            "data",
            "train/dev",
            "training and dev sets must not be empty",
        ));
    }
    cfg.validate()?;
    if task.head.kind == HeadKind::Classification {
        let classes = task.head.num_outputs();
        for (set, what) in [(&data.train, "training"), (&data.dev, "dev")] {
            let all: Vec<usize> = (0..set.labels.len()).collect();
            batch_labels(set, &all, classes, what)?;
        }
    }
    // A checkpoint to resume is read and checked before the expensive work starts.
    let mut resumed = match ckpt {
        Some(c) if c.resume => Some(Snapshot::load(&c.dir, &c.run)?),
        _ => None,
    };
    let start = Instant::now();
    let train_enc = tokenize_set(base, &data.train, task.max_len)?;
    let dev_enc = tokenize_set(base, &data.dev, task.max_len)?;
    let lengths: Vec<usize> = train_enc.iter().map(|e| e.0.len()).collect();

    let mut best: Option<Best> = None;
    if let (Some(snap), Some(c)) = (resumed.as_mut(), ckpt) {
        best = restore_params(task, snap, &c.dir)?;
    }
    let mut opt = AdamW::new(task, cfg)?;
    let mut p = match (resumed, ckpt) {
        (Some(mut snap), Some(c)) => {
            opt.restore(&mut snap, &c.dir)?;
            snap.progress
        }
        _ => Progress {
            format: 1,
            run: ckpt.map(|c| c.run.clone()).unwrap_or_default(),
            step: 0,
            epoch: 1,
            batches_done: 0,
            order_rng: Rng::derive(cfg.seed, "order").state(),
            dropout_rng: Rng::derive(cfg.seed, "dropout").state(),
            loss_sum: 0.0,
            seen: 0,
            epoch_seconds: 0.0,
            seconds: 0.0,
            adam_t: 0,
            epochs: Vec::new(),
            best: None,
        },
    };
    let seconds_before = p.seconds;
    let layers = base.config.num_hidden_layers;
    let cache = match (cfg.cache_frozen_prefix, task.frozen_prefix_layers(layers)) {
        (true, k) if k > 0 => Some(PrefixCache::build(
            base,
            task,
            &train_enc,
            k,
            cfg.eval_batch_size,
        )?),
        _ => None,
    };

    let steps_per_epoch = lengths.len().div_ceil(cfg.batch_size);
    let mut total = steps_per_epoch * cfg.epochs;
    if let Some(ms) = cfg.max_steps {
        total = total.min(ms);
    }
    let warmup = ((total as f64) * cfg.warmup_frac).round() as usize;
    let mut order_rng = Rng::from_state(p.order_rng);
    let mut dropout_rng = Rng::from_state(p.dropout_rng);
    let save =
        |p: &mut Progress, dropout: &Rng, opt: &AdamW, task: &TaskModel, best: &Option<Best>| {
            let Some(c) = ckpt else { return Ok(()) };
            p.dropout_rng = dropout.state();
            p.adam_t = opt.t;
            p.seconds = seconds_before + start.elapsed().as_secs_f64();
            p.best = best.as_ref().map(|b| (b.0, b.1));
            let [adam_m, adam_v] = opt.moments()?;
            let names = |m: &BTreeMap<crate::task::ParamKey, Tensor>| {
                m.iter()
                    .map(|(k, v)| (k.name().to_string(), v.clone()))
                    .collect::<BTreeMap<_, _>>()
            };
            Snapshot {
                progress: p.clone(),
                params: names(&task.params),
                adam_m,
                adam_v,
                best: best.as_ref().map(|b| names(&b.2)).unwrap_or_default(),
            }
            .save(&c.dir)
        };

    while p.epoch <= cfg.epochs && p.step < total {
        let epoch = p.epoch;
        p.order_rng = order_rng.state();
        let batches = bucketed_batches(&lengths, cfg.batch_size, &mut order_rng);
        let t0 = Instant::now();
        let epoch_seconds = |p: &Progress| p.epoch_seconds + t0.elapsed().as_secs_f64();
        let seconds_at_start = p.epoch_seconds;
        for rows in batches.iter().skip(p.batches_done) {
            if p.step >= total {
                break;
            }
            let mut cuts = LayerCuts::default();
            let forward = TrainForward {
                rng: Some(&mut dropout_rng),
                cache: cache.as_ref(),
                cuts: Some(&mut cuts),
            };
            let loss = batch_loss_from(base, task, &train_enc, &data.train, rows, forward)?;
            let loss_v = f64::from(loss.to_scalar::<f32>()?);
            let lr = cfg.lr * lr_factor(p.step, total, warmup);
            if !loss_v.is_finite() {
                return Err(divergence(
                    p.step, "loss", loss_v, task, data, rows, cfg, lr, ckpt,
                ));
            }
            // Consumes the loss: each layer's saved activations go as its gradients are taken,
            // and none are left by the update.
            let grads = cuts.backward(loss)?;
            let norm = opt.step(&grads, lr)?;
            if !norm.is_finite() {
                return Err(divergence(
                    p.step,
                    "gradient norm",
                    norm,
                    task,
                    data,
                    rows,
                    cfg,
                    lr,
                    ckpt,
                ));
            }
            drop(grads);
            p.step += 1;
            p.batches_done += 1;
            p.seen += rows.len();
            p.loss_sum += loss_v;
            let run_seconds = t0.elapsed().as_secs_f64();
            on_event(&Event::Step {
                step: p.step,
                total,
                loss: loss_v,
                lr,
                examples_per_second: p.seen as f64 / (seconds_at_start + run_seconds).max(1e-9),
            });
            if ckpt.is_some_and(|c| c.every > 0 && p.step % c.every == 0) {
                let mut saved = p.clone();
                saved.epoch_seconds = epoch_seconds(&p);
                save(&mut saved, &dropout_rng, &opt, task, &best)?;
            }
        }
        if p.batches_done == 0 {
            break;
        }
        let train_seconds = epoch_seconds(&p);
        let frozen = task.detached();
        let dev =
            evaluate_encoded(base, &frozen, &data.dev, &dev_enc, cfg.eval_batch_size, &[])?.metrics;
        let report = EpochReport {
            epoch,
            train_loss: p.loss_sum / p.batches_done as f64,
            dev,
            train_seconds,
            examples_per_second: p.seen as f64 / train_seconds.max(1e-9),
        };
        tracing::info!(
            epoch,
            train_loss = report.train_loss,
            dev = dev.primary(),
            examples_per_second = report.examples_per_second,
            "epoch finished"
        );
        on_event(&Event::Epoch(report.clone()));
        if best.as_ref().is_none_or(|b| dev.primary() > b.1.primary()) {
            let snapshot = frozen
                .params
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.copy()?)))
                .collect::<Result<BTreeMap<_, _>>>()?;
            best = Some((epoch, dev, snapshot));
        }
        p.epochs.push(report);
        p.epoch += 1;
        p.batches_done = 0;
        p.loss_sum = 0.0;
        p.seen = 0;
        p.epoch_seconds = 0.0;
        if p.epoch <= cfg.epochs && p.step < total {
            // The next epoch starts from here: its batches are drawn from the order state now.
            p.order_rng = order_rng.state();
            save(&mut p, &dropout_rng, &opt, task, &best)?;
        }
    }
    let (best_epoch, best_dev, params) =
        best.ok_or_else(|| Error::config("train", "max_steps", "no training step was taken"))?;
    task.params = params;
    Ok(TrainReport {
        epochs: p.epochs,
        best_epoch,
        best_dev,
        steps: p.step,
        seconds: seconds_before + start.elapsed().as_secs_f64(),
    })
}

/// Puts a checkpoint's trained values into `task` and returns its best epoch so far.
fn restore_params(
    task: &mut TaskModel,
    snap: &mut Snapshot,
    dir: &std::path::Path,
) -> Result<Option<Best>> {
    for (key, t) in task.params.iter_mut() {
        *t = checkpoint::take(&mut snap.params, dir, "param", key.name(), t.dims())?;
    }
    checkpoint::all_taken(&snap.params, dir, "param")?;
    let Some((epoch, dev)) = snap.progress.best else {
        return Ok(None);
    };
    let params = task
        .params
        .iter()
        .map(|(key, t)| {
            let v = checkpoint::take(&mut snap.best, dir, "best", key.name(), t.dims())?;
            Ok((key.clone(), v))
        })
        .collect::<Result<BTreeMap<_, _>>>()?;
    checkpoint::all_taken(&snap.best, dir, "best")?;
    Ok(Some((epoch, dev, params)))
}

/// Why training produced a non-finite `what` (`value`) at `step`: names the first non-finite
/// trained parameter, else a bad regression target of the batch, else the learning rate.
#[allow(clippy::too_many_arguments)]
fn divergence(
    step: usize,
    what: &str,
    value: f64,
    task: &TaskModel,
    data: &TaskData,
    rows: &[usize],
    cfg: &TrainConfig,
    lr: f64,
    ckpt: Option<&Checkpointing>,
) -> Error {
    let kept = match ckpt {
        Some(c) if c.dir.join(checkpoint::STATE).is_file() => {
            format!(" The last checkpoint, in {}, is kept.", c.dir.display())
        }
        _ => String::new(),
    };
    let bad_param = task.params.iter().find_map(|(k, t)| {
        let v = to_vec_f32(t).ok()?;
        v.iter()
            .position(|x| !x.is_finite())
            .map(|i| (k.name().to_string(), i, v[i]))
    });
    let message = if let Some((name, i, x)) = bad_param {
        format!(
            "the {what} is {value} because trained parameter `{name}` holds {x} (element {i}); \
             it was finite when training started, so an update overflowed: lower the learning \
             rate (peak {:e}, {lr:.3e} at this step).{kept}",
            cfg.lr
        )
    } else if let Some((row, t)) = task
        .head
        .kind
        .eq(&HeadKind::Regression)
        .then(|| {
            rows.iter()
                .map(|&r| (r, data.train.targets.get(r).copied().unwrap_or(0.0)))
                .find(|(_, t)| !t.is_finite() || f64::from(*t).abs() > 1e19)
        })
        .flatten()
    {
        format!(
            "the {what} is {value} because training example {row} has target {t:e}; the squared \
             error overflows in f32: remove or rescale that target.{kept}"
        )
    } else {
        format!(
            "the {what} is {value} with finite parameters and targets: the optimisation diverged. \
             Lower the learning rate (peak {:e}, {lr:.3e} at this step).{kept}",
            cfg.lr
        )
    };
    Error::Diverged { step, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AdamW in f64, element by element, as the paper and PyTorch's `AdamW` define it, with the
    /// global-norm clipping of `clip_grad_norm_`.
    struct ReferenceAdamW {
        params: Vec<Vec<f64>>,
        m: Vec<Vec<f64>>,
        v: Vec<Vec<f64>>,
        t: i32,
    }

    impl ReferenceAdamW {
        fn step(&mut self, grads: &[Option<Vec<f64>>], decay: &[bool], cfg: &TrainConfig) {
            let sq: f64 = grads.iter().flatten().flatten().map(|g| g * g).sum();
            let norm = sq.sqrt();
            let clip = if norm > cfg.max_grad_norm {
                cfg.max_grad_norm / (norm + 1e-6)
            } else {
                1.0
            };
            self.t += 1;
            let (bc1, bc2) = (1.0 - cfg.beta1.powi(self.t), 1.0 - cfg.beta2.powi(self.t));
            for (i, p) in self.params.iter_mut().enumerate() {
                let shrink = if decay[i] {
                    1.0 - cfg.lr * cfg.weight_decay
                } else {
                    1.0
                };
                for j in 0..p.len() {
                    let g = grads[i].as_ref().map_or(0.0, |g| g[j] * clip);
                    let (m, v) = (&mut self.m[i][j], &mut self.v[i][j]);
                    *m = cfg.beta1 * *m + (1.0 - cfg.beta1) * g;
                    *v = cfg.beta2 * *v + (1.0 - cfg.beta2) * g * g;
                    p[j] = p[j] * shrink - cfg.lr / bc1 * *m / ((*v).sqrt() / bc2.sqrt() + cfg.eps);
                }
            }
        }
    }

    #[test]
    fn adamw_matches_the_reference_with_clipping_blocks_and_a_missing_gradient() {
        for in_place in [true, false] {
            adamw_matches_the_reference(in_place);
        }
    }

    fn adamw_matches_the_reference(in_place: bool) {
        let dev = candle_core::Device::Cpu;
        // [2300, 1000] spans three row blocks of the in-place update, the last one partial.
        let shapes: [&[usize]; 3] = [&[2300, 1000], &[7], &[5, 3]];
        let decay = [true, false, true];
        let cfg = TrainConfig {
            lr: 1e-2,
            weight_decay: 0.1,
            max_grad_norm: 50.0,
            ..TrainConfig::default()
        };
        let mut rng = crate::rng::Rng::new(11);
        let mut slots = Vec::new();
        let mut reference = ReferenceAdamW {
            params: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
            t: 0,
        };
        for (i, shape) in shapes.iter().enumerate() {
            let n: usize = shape.iter().product();
            let p: Vec<f32> = (0..n).map(|_| rng.uniform() as f32 - 0.5).collect();
            reference
                .params
                .push(p.iter().map(|&x| f64::from(x)).collect());
            reference.m.push(vec![0.0; n]);
            reference.v.push(vec![0.0; n]);
            let t = Tensor::from_vec(p, *shape, &dev).unwrap();
            slots.push(AdamSlot {
                name: format!("p{i}"),
                var: Var::from_tensor(&t).unwrap(),
                m: vec![0.0; n],
                v: vec![0.0; n],
                decay: decay[i],
            });
        }
        let mut opt = AdamW {
            slots,
            cfg: cfg.clone(),
            t: 0,
        };
        // Step 1 is clipped (gradients of scale 1 over 2.3M entries), steps 2 and 3 are not.
        for (step, scale) in [1.0f32, 1e-3, 2e-3].into_iter().enumerate() {
            let mut loss = Tensor::zeros((), candle_core::DType::F32, &dev).unwrap();
            let mut ref_grads = Vec::new();
            for (i, s) in opt.slots.iter().enumerate() {
                if i == 2 {
                    ref_grads.push(None);
                    continue;
                }
                let n = s.m.len();
                let g: Vec<f32> = (0..n)
                    .map(|_| (rng.uniform() as f32 - 0.5) * scale)
                    .collect();
                ref_grads.push(Some(g.iter().map(|&x| f64::from(x)).collect::<Vec<_>>()));
                let g = Tensor::from_vec(g, shapes[i], &dev).unwrap();
                // d/dp of sum(p · g) is g.
                let term = s.var.as_tensor().mul(&g).unwrap().sum_all().unwrap();
                loss = loss.add(&term).unwrap();
            }
            let grads = loss.backward().unwrap();
            let norm = opt.step_on(&grads, cfg.lr, in_place).unwrap();
            let ref_norm = ref_grads
                .iter()
                .flatten()
                .flatten()
                .map(|g| g * g)
                .sum::<f64>()
                .sqrt();
            assert!(
                (norm - ref_norm).abs() <= 1e-9 * ref_norm,
                "step {step}: norm"
            );
            assert_eq!(norm > cfg.max_grad_norm, step == 0, "step {step}: clipping");
            reference.step(&ref_grads, &decay, &cfg);
            for (i, s) in opt.slots.iter().enumerate() {
                let got = to_vec_f32(s.var.as_tensor()).unwrap();
                let worst = got
                    .iter()
                    .zip(&reference.params[i])
                    .map(|(&a, &b)| (f64::from(a) - b).abs())
                    .fold(0.0, f64::max);
                assert!(
                    worst < 1e-5,
                    "step {step} p{i} (in place {in_place}): off by {worst}"
                );
            }
        }
    }
}
