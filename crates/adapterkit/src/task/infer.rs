//! A task over the shared encoder: its view of the weights, its head, and batched inference for
//! one task or for rows of many tasks in one batch.

use super::TaskModel;
use crate::encoder::forward::maybe_dropout;
use crate::encoder::{BaseModel, Batch, ForwardOptions, Routing, RowGroup, TaskParts, TaskView};
use crate::error::{Error, Result};
use crate::head::{HeadKind, Pooling};
use crate::kernels::{linear, linear_view, softmax_last_dim};
use crate::keys::ParamKey;
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

/// One input row for a mixed-task batch: the task it is for and its token and segment ids.
pub type TaskRow<'a> = (&'a TaskModel, &'a (Vec<u32>, Vec<u32>));

impl TaskModel {
    /// What the encoder reads of this task, with `derived` weights for this forward (else the
    /// merged ones, if merged).
    pub fn parts<'a>(&'a self, derived: Option<&'a BTreeMap<ParamKey, Tensor>>) -> TaskParts<'a> {
        // A stale merge (the tensors or the method changed since) is not read: a task that
        // derives weights then fails for want of them instead of running on old ones.
        let merged = (self.merged.as_ref()).filter(|m| derived.is_none() && m.fresh_for(self));
        TaskParts {
            name: &self.name,
            params: &self.params,
            adapter: self.adapter.as_ref(),
            derives: self.derives_weights(),
            derived: derived.or(merged.map(|m| &m.tensors)),
            merged: merged.map(|m| &m.weights),
        }
    }

    /// Whether the forward reads weights derived from the task's tensors rather than the tensors
    /// themselves: LoRA / (IA)³ (projections), Compacter (PHM adapter projections) and prefix
    /// tuning (attention prefixes).
    pub fn derives_weights(&self) -> bool {
        self.lora.is_some()
            || self.prefix.is_some()
            || self.adapter.as_ref().is_some_and(|a| a.phm.is_some())
    }

    /// The derived tensors from the task's tensors as they are (differentiable), as a training
    /// forward reads them: LoRA's factors and (IA)³'s output scales (which the frozen fused
    /// kernels apply beside the base's projections), Compacter's PHM projections, prefix tuning's
    /// prefixes; `None` for a task that derives none.
    pub fn derive(&self, base: &BaseModel) -> Result<Option<BTreeMap<ParamKey, Tensor>>> {
        self.derive_as(base, false)
    }

    /// [`TaskModel::derive`]; with `merged`, LoRA and (IA)³ are folded into the projections'
    /// weights instead (what inference reads: no cost per forward).
    pub(crate) fn derive_as(
        &self,
        base: &BaseModel,
        merged: bool,
    ) -> Result<Option<BTreeMap<ParamKey, Tensor>>> {
        let layers = base.config.num_hidden_layers;
        if let Some(l) = &self.lora {
            if !merged {
                if let Some(scales) = l.scales(&self.name, &self.params, layers)? {
                    return Ok(Some(scales));
                }
                if let Some(factors) = l.factors(&self.name, &self.params, layers)? {
                    return Ok(Some(factors));
                }
            }
            return Ok(Some(l.derive(&self.name, &self.params, base)?));
        }
        if let Some(p) = &self.prefix {
            let c = &base.config;
            return Ok(Some(p.derive(
                &self.name,
                &self.params,
                c.hidden_size,
                c.num_attention_heads,
                layers,
            )?));
        }
        match &self.adapter {
            Some(a) => match &a.phm {
                Some(p) => Ok(Some(crate::adapter::phm::derive(
                    a,
                    p,
                    &self.name,
                    &self.params,
                    layers,
                )?)),
                None => Ok(None),
            },
            None => Ok(None),
        }
    }

    /// The weights a forward of this task must derive itself: `Some` only for a task that derives
    /// weights and is not merged (in training, so that gradients reach its tensors).
    pub fn derive_for_forward(
        &self,
        base: &BaseModel,
    ) -> Result<Option<BTreeMap<ParamKey, Tensor>>> {
        if self.is_merged() {
            Ok(None)
        } else {
            self.derive(base)
        }
    }

    /// This task's view of `base`: its trained copies in place of the base's, its adapters at
    /// their sites, LoRA in its projections (`derived`, from [`TaskModel::derive_for_forward`]).
    pub fn view<'a>(
        &'a self,
        base: &'a BaseModel,
        derived: Option<&'a BTreeMap<ParamKey, Tensor>>,
    ) -> Result<TaskView<'a>> {
        TaskView::new(base, Some(self.parts(derived)))
    }
}

impl BaseModel {
    /// Runs the encoder and returns the last hidden state [batch, seq, hidden]. With a task, its
    /// adapters run at their sites and its own copies of any base parameter replace the base's.
    pub fn encode(
        &self,
        task: Option<&TaskModel>,
        batch: &Batch,
        opts: &mut ForwardOptions<'_>,
    ) -> Result<Tensor> {
        let derived = task
            .map(|t| t.derive_for_forward(self))
            .transpose()?
            .flatten();
        let view = TaskView::new(self, task.map(|t| t.parts(derived.as_ref())))?;
        let name = task.map_or("<base>", |t| t.name.as_str());
        let routing = Routing::single(view, name, batch.size());
        self.encode_routed(&routing, batch, opts)
    }

    /// The hidden states after the first `k` layers, per row without padding ([len, hidden] each),
    /// in inference mode (no dropout): what the frozen-prefix cache stores.
    pub fn encode_prefix(&self, task: &TaskModel, batch: &Batch, k: usize) -> Result<Vec<Tensor>> {
        let mut opts = ForwardOptions {
            stop_after: Some(k),
            ..ForwardOptions::default()
        };
        let h = self.encode(Some(task), batch, &mut opts)?;
        batch
            .lengths
            .iter()
            .enumerate()
            .map(|(i, &len)| Ok(h.get(i)?.narrow(0, 0, len)?.detach().contiguous()?))
            .collect()
    }
    /// The checkpoint's pooler (a task's copy when it trains one): tanh(W · h[CLS] + b),
    /// [batch, hidden].
    pub fn pooler(&self, task: Option<&TaskModel>, hidden: &Tensor) -> Result<Tensor> {
        let derived = task
            .map(|t| t.derive_for_forward(self))
            .transpose()?
            .flatten();
        let view = TaskView::new(self, task.map(|t| t.parts(derived.as_ref())))?;
        self.pooler_of(&view, hidden)
    }

    /// [`BaseModel::pooler`] through a resolved view.
    fn pooler_of(&self, view: &TaskView<'_>, hidden: &Tensor) -> Result<Tensor> {
        let p = view.pooler.ok_or_else(|| {
            Error::NotFound("the head pools with the pooler, but the checkpoint has none".into())
        })?;
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(linear_view(self.backend, &cls, p)?.tanh()?)
    }

    /// One vector per row, as `task`'s head expects, from its rows' hidden states and mask.
    fn pool(
        &self,
        task: &TaskModel,
        view: &TaskView<'_>,
        hidden: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        match task.head.pooling {
            Pooling::Cls => Ok(hidden.narrow(1, 0, 1)?.squeeze(1)?),
            Pooling::Pooler => self.pooler_of(view, hidden),
            Pooling::Mean => {
                let m = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
                let sum = hidden.broadcast_mul(&m)?.sum(1)?;
                Ok(sum.broadcast_div(&m.sum(1)?)?)
            }
        }
    }

    /// `task`'s head over pooled vectors (dropout before each dense layer in training).
    fn head(
        &self,
        task: &TaskModel,
        pooled: Tensor,
        opts: &mut ForwardOptions<'_>,
    ) -> Result<Tensor> {
        let p = self.config.hidden_dropout_prob;
        let mut x = pooled;
        for layer in task.head.dense_layers(&task.name, self.config.hidden_size) {
            x = maybe_dropout(self.backend, &x, p, opts)?;
            let get = |leaf: &str| -> Result<&Tensor> {
                let name = format!("{}.{leaf}", layer.prefix);
                task.params
                    .get(name.as_str())
                    .ok_or_else(|| Error::NotFound(format!("the task has no parameter `{name}`")))
            };
            let b = if layer.bias { Some(get("bias")?) } else { None };
            x = linear(self.backend, &x, get("weight")?, b)?;
            if let (true, Some(act)) = (layer.activation, task.head.activation) {
                x = act.apply(self.backend, &x)?;
            }
        }
        Ok(x)
    }

    /// Head outputs [batch, classes] (logits) or [batch, 1] (regression) for a task.
    pub fn logits(
        &self,
        task: &TaskModel,
        batch: &Batch,
        opts: &mut ForwardOptions<'_>,
    ) -> Result<Tensor> {
        let derived = task.derive_for_forward(self)?;
        let routing = Routing::single(task.view(self, derived.as_ref())?, &task.name, batch.size());
        let hidden = self.encode_routed(&routing, batch, opts)?;
        let pooled = self.pool(task, &routing.groups[0].view, &hidden, &batch.mask)?;
        self.head(task, pooled, opts)
    }

    /// Head outputs per row group of a mixed batch, group i by the head of `tasks[i]` (inference).
    pub fn logits_routed(
        &self,
        routing: &Routing<'_>,
        tasks: &[&TaskModel],
        batch: &Batch,
    ) -> Result<Vec<Tensor>> {
        if tasks.len() != routing.groups.len() {
            return Err(Error::config(
                "mixed batch",
                "tasks",
                format!(
                    "{} row groups but {} tasks: give one task per group",
                    routing.groups.len(),
                    tasks.len()
                ),
            ));
        }
        let mut opts = ForwardOptions::default();
        let hidden = self.encode_routed(routing, batch, &mut opts)?;
        routing
            .groups
            .iter()
            .zip(tasks)
            .map(|(g, task)| {
                let (start, len) = (g.rows.start, g.rows.len());
                let h = hidden.narrow(0, start, len)?;
                let m = batch.mask.narrow(0, start, len)?;
                let pooled = self.pool(task, &g.view, &h, &m)?;
                self.head(task, pooled, &mut opts)
            })
            .collect()
    }

    /// Inference over rows of several tasks in one batch: each row runs its own task's adapters,
    /// LayerNorms and head over the shared encoder weights. Returns one output row per input row,
    /// in input order (probabilities for classification when `probabilities`, else raw outputs).
    pub fn predict_mixed(
        &self,
        rows: &[TaskRow<'_>],
        probabilities: bool,
    ) -> Result<Vec<Vec<f32>>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // Rows of one task become one contiguous group; the first appearance orders the groups.
        let mut tasks: Vec<&TaskModel> = Vec::new();
        let mut task_of = Vec::with_capacity(rows.len());
        for (t, _) in rows {
            let i = match tasks.iter().position(|k| std::ptr::eq(*k, *t)) {
                Some(i) => i,
                None => {
                    tasks.push(t);
                    tasks.len() - 1
                }
            };
            task_of.push(i);
        }
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| task_of[i]);
        let derived = tasks
            .iter()
            .map(|t| t.derive_for_forward(self))
            .collect::<Result<Vec<_>>>()?;
        let mut groups = Vec::with_capacity(tasks.len());
        let mut start = 0;
        for (ti, (task, derived)) in tasks.iter().zip(&derived).enumerate() {
            let n = task_of.iter().filter(|&&k| k == ti).count();
            groups.push(RowGroup {
                rows: start..start + n,
                name: &task.name,
                view: task.view(self, derived.as_ref())?,
            });
            start += n;
        }
        let routing = Routing::mixed(groups)?;
        let pieces: Vec<(&[u32], &[u32])> = order
            .iter()
            .map(|&i| (rows[i].1 .0.as_slice(), rows[i].1 .1.as_slice()))
            .collect();
        let batch = Batch::new(&pieces, self.config.pad_token_id, &self.device)?;
        let logits = self.logits_routed(&routing, &tasks, &batch)?;
        let mut out = vec![Vec::new(); rows.len()];
        let mut sorted = order.iter();
        for (task, l) in tasks.iter().zip(logits) {
            for r in head_rows(task, l, probabilities)? {
                if let Some(&i) = sorted.next() {
                    out[i] = r;
                }
            }
        }
        Ok(out)
    }

    /// Tokenizes `(text, pair)` inputs and runs inference in length-sorted batches; returns one row of
    /// outputs per input, in input order (probabilities for classification, the value for regression).
    pub fn predict(
        &self,
        task: &TaskModel,
        inputs: &[(String, Option<String>)],
        max_len: usize,
        batch_size: usize,
        skip_adapter_layers: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        let encoded = self.tokenizer.encode_all(inputs, max_len)?;
        self.predict_encoded(task, &encoded, batch_size, skip_adapter_layers)
    }

    /// [`BaseModel::predict`] on already tokenized inputs.
    pub fn predict_encoded(
        &self,
        task: &TaskModel,
        encoded: &[(Vec<u32>, Vec<u32>)],
        batch_size: usize,
        skip_adapter_layers: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        self.run_encoded(task, encoded, batch_size, skip_adapter_layers, true)
    }

    /// The head's raw outputs (logits before softmax) on already tokenized inputs, in input order.
    pub fn logits_encoded(
        &self,
        task: &TaskModel,
        encoded: &[(Vec<u32>, Vec<u32>)],
        batch_size: usize,
        skip_adapter_layers: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        self.run_encoded(task, encoded, batch_size, skip_adapter_layers, false)
    }

    fn run_encoded(
        &self,
        task: &TaskModel,
        encoded: &[(Vec<u32>, Vec<u32>)],
        batch_size: usize,
        skip_adapter_layers: &[usize],
        probabilities: bool,
    ) -> Result<Vec<Vec<f32>>> {
        let layers = self.config.num_hidden_layers;
        if let Some(l) = skip_adapter_layers.iter().find(|&&l| l >= layers) {
            return Err(Error::config(
                "skip_adapter_layers",
                "layer",
                format!(
                    "layer {l} does not exist: the model has layers 0 to {}",
                    layers - 1
                ),
            ));
        }
        if task.adapter.is_none() && !skip_adapter_layers.is_empty() {
            return Err(Error::config(
                "skip_adapter_layers",
                "layer",
                if task.lora.is_some() {
                    format!(
                        "task `{}` has LoRA, which is merged into the weights: only bottleneck \
                         adapters can be skipped",
                        task.name
                    )
                } else if task.prefix.is_some() {
                    format!(
                        "task `{}` has prefix tuning: only bottleneck adapters can be skipped",
                        task.name
                    )
                } else {
                    format!("task `{}` has no adapters to skip", task.name)
                },
            ));
        }
        // Merged once for all batches: LoRA then costs nothing per forward.
        let mut frozen = task.detached();
        if !frozen.is_merged() {
            frozen.merge(self)?;
        }
        let mut order: Vec<usize> = (0..encoded.len()).collect();
        order.sort_by_key(|&i| encoded[i].0.len());
        let mut out = vec![Vec::new(); encoded.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let batch = Batch::select(encoded, chunk, self.config.pad_token_id, &self.device)?;
            let mut opts = ForwardOptions {
                dropout_rng: None,
                skip_adapter_layers,
                ..ForwardOptions::default()
            };
            let logits = self.logits(&frozen, &batch, &mut opts)?;
            for (&i, r) in chunk.iter().zip(head_rows(task, logits, probabilities)?) {
                out[i] = r;
            }
        }
        Ok(out)
    }
}

/// A head's output tensor as rows of f32: softmax probabilities for classification when asked.
fn head_rows(task: &TaskModel, logits: Tensor, probabilities: bool) -> Result<Vec<Vec<f32>>> {
    Ok(match task.head.kind {
        HeadKind::Classification if probabilities => softmax_last_dim(&logits)?,
        _ => logits,
    }
    .to_dtype(DType::F32)?
    .to_vec2::<f32>()?)
}
