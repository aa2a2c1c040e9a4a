//! The encoder's forward pass, as the paper's figure draws a layer: attention, the first adapter
//! site, the FFN, the second adapter site; each site run per row group of its own task.

use super::cuts::LayerCuts;
use super::routing::{Routing, RowGroup};
use super::{BaseModel, Batch};
use crate::adapter::lora::Projection;
use crate::adapter::{residual_norm, SiteAdapter, SiteContext};
use crate::error::{Error, Result};
use crate::kernels::ffn::FfnAdapt;
use crate::kernels::{attention, dropout, ffn, layer_norm, AttentionWeights, Backend};
use crate::rng::Rng;
use candle_core::Tensor;

/// Per-call choices of a forward pass.
#[derive(Default)]
pub struct ForwardOptions<'a> {
    /// Training mode: dropout on, drawn from this generator. `None` is inference.
    pub dropout_rng: Option<&'a mut Rng>,
    /// Layers whose adapters are skipped (AdapterDrop-style ablation / faster inference).
    pub skip_adapter_layers: &'a [usize],
    /// `(k, h)`: the hidden states after the first k layers, computed earlier (the frozen-prefix
    /// cache); the encoder starts at layer k instead of the embeddings.
    pub prefix: Option<(usize, Tensor)>,
    /// Stop after this many layers and return their output (to build the frozen-prefix cache).
    pub stop_after: Option<usize>,
    /// Training: cut the graph at each layer's input, so that [`LayerCuts::backward`] frees each
    /// layer's activations as soon as its gradients are taken.
    pub cuts: Option<&'a mut LayerCuts>,
}

/// Dropout with probability `p` in training mode, the identity in inference.
pub fn maybe_dropout(
    backend: Backend,
    x: &Tensor,
    p: f64,
    opts: &mut ForwardOptions<'_>,
) -> Result<Tensor> {
    match opts.dropout_rng.as_deref_mut() {
        Some(rng) => dropout(backend, x, p, rng),
        None => Ok(x.clone()),
    }
}

/// Which of a layer's two adapter sites.
#[derive(Clone, Copy)]
enum SiteIndex {
    Attention = 0,
    Ffn = 1,
}

impl BaseModel {
    /// [`BaseModel::encode`] with each row group of `routing` running its own task's adapters and
    /// LayerNorms over the shared attention and FFN weights. Mixed batches are for inference: they
    /// take no dropout, prefix cache or early stop.
    pub fn encode_routed(
        &self,
        routing: &Routing<'_>,
        batch: &Batch,
        opts: &mut ForwardOptions<'_>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let backend = self.backend;
        let (_, s) = batch.ids.dims2()?;
        if s > cfg.max_position_embeddings {
            return Err(Error::config(
                "input",
                "length",
                format!(
                    "{s} tokens exceed the model's {} positions",
                    cfg.max_position_embeddings
                ),
            ));
        }
        if routing.groups.len() > 1
            && (opts.dropout_rng.is_some()
                || opts.prefix.is_some()
                || opts.stop_after.is_some()
                || opts.cuts.is_some())
        {
            return Err(Error::config(
                "mixed batch",
                "options",
                "a batch of several tasks runs in inference mode only (no dropout, prefix cache, stop_after or cuts)",
            ));
        }
        let shared = routing.shared()?;
        let p_attn = cfg.attention_probs_dropout_prob;

        let (first, mut h) = match opts.prefix.take() {
            Some((k, h)) => (k, h),
            None => (0, self.embed(routing, batch, opts)?),
        };
        // Additive mask: large negative (not -inf, whose gradient arithmetic would give NaN).
        let mask = ((batch.mask.to_dtype(h.dtype())? - 1.0)? * 1e9)?;
        let heads = cfg.num_attention_heads;
        let scale = 1.0 / (cfg.head_dim() as f64).sqrt();
        let last = opts
            .stop_after
            .unwrap_or(cfg.num_hidden_layers)
            .min(cfg.num_hidden_layers);
        for l in first..last {
            if l > first {
                if let Some(cuts) = opts.cuts.as_deref_mut() {
                    h = cuts.cut(h)?;
                }
            }
            let w = &shared.layers[l];
            let qkv_scale = w.qkv_scale(cfg.hidden_size)?;
            let d = cfg.hidden_size;
            let qkv_delta = routing.updates(&h, 3 * d, |g, x| g.view.layers[l].qkv_delta(x))?;
            let weights = AttentionWeights {
                q: w.query,
                k: w.key,
                v: w.value,
                o: w.attention_out,
                qkv: w.qkv,
                prefix: w.prefix,
                qkv_scale: qkv_scale.as_ref(),
                qkv_delta: qkv_delta.as_ref(),
            };
            let attn_dropout = opts.dropout_rng.as_deref_mut().map(|r| (p_attn, r));
            let attn = attention(backend, &h, &weights, &mask, heads, scale, attn_dropout)?;
            h = self.site(routing, l, SiteIndex::Attention, &attn, &h, opts)?;

            let [.., inter_scale, out_scale] = w.scales;
            let inter_delta = routing.updates(&h, cfg.intermediate_size, |g, x| {
                g.view.layers[l].lora_delta(Projection::Intermediate, x)
            })?;
            let adapt = FfnAdapt {
                scale: inter_scale,
                delta: inter_delta.as_ref(),
                out_lora: w.lora[Projection::Output as usize],
            };
            let out = ffn(backend, &h, w.intermediate, w.output, adapt)?;
            let out = match out_scale {
                Some(s) => out.broadcast_mul(s)?,
                None => out,
            };
            h = self.site(routing, l, SiteIndex::Ffn, &out, &h, opts)?;
        }
        Ok(h)
    }

    /// The embedding layer's output [batch, seq, hidden]: word + position + segment, each row
    /// group's LayerNorm, dropout in training.
    fn embed(
        &self,
        routing: &Routing<'_>,
        batch: &Batch,
        opts: &mut ForwardOptions<'_>,
    ) -> Result<Tensor> {
        let (b, s) = batch.ids.dims2()?;
        let d = self.config.hidden_size;
        let [word, position, token_type] = routing.shared()?.embeddings;
        let words = word
            .index_select(&batch.ids.flatten_all()?, 0)?
            .reshape((b, s, d))?;
        let types = token_type
            .index_select(&batch.type_ids.flatten_all()?, 0)?
            .reshape((b, s, d))?;
        let pos = position.narrow(0, 0, s)?;
        let emb = words.add(&types)?.broadcast_add(&pos)?;
        let eps = self.config.layer_norm_eps;
        let h = routing.per_group(&[&emb], |g, t| {
            let n = g.view.embeddings_norm;
            layer_norm(self.backend, &t[0], n.gamma, n.beta, eps)
        })?;
        maybe_dropout(self.backend, &h, self.config.hidden_dropout_prob, opts)
    }

    /// One sub-layer's exit: per row group, the sub-layer's hidden dropout (in training), that
    /// task's adapter at this site (if any, and not skipped) and the original residual +
    /// LayerNorm. Without an adapter the dropout runs inside the residual LayerNorm's node.
    fn site(
        &self,
        routing: &Routing<'_>,
        layer: usize,
        site: SiteIndex,
        sub: &Tensor,
        input: &Tensor,
        opts: &mut ForwardOptions<'_>,
    ) -> Result<Tensor> {
        let skip = opts.skip_adapter_layers.contains(&layer);
        // One group's exit: its adapter (unless skipped) and its residual + LayerNorm.
        let (backend, eps) = (self.backend, self.config.layer_norm_eps);
        let p = self.config.hidden_dropout_prob;
        let exit = |g: &RowGroup<'_>, t: &[Tensor], ctx: &mut SiteContext<'_>| {
            let at = &g.view.sites[layer][site as usize];
            match &at.adapter {
                Some(a) if !skip => {
                    let sub = match ctx.dropout.as_deref_mut() {
                        Some(rng) => dropout(backend, &t[0], p, rng)?,
                        None => t[0].clone(),
                    };
                    a.exit(ctx, &sub, &t[1], at.layer_norm)
                }
                _ => residual_norm(ctx, &t[0], p, &t[1], at.layer_norm),
            }
        };
        if opts.dropout_rng.is_none() && routing.groups.len() > 1 {
            return routing.per_group_concurrent(&[sub, input], |g, t| {
                let mut ctx = SiteContext {
                    backend,
                    eps,
                    dropout: None,
                };
                exit(g, t, &mut ctx)
            });
        }
        let mut ctx = SiteContext {
            backend,
            eps,
            dropout: opts.dropout_rng.as_deref_mut(),
        };
        routing.per_group(&[sub, input], |g, t| exit(g, t, &mut ctx))
    }
}
