//! Multi-head self-attention with frozen weights as one graph node (hand-written backward, input
//! gradient only), computed per (sequence, head) from the q|k|v product, and the head-layout
//! copies the prefixed path still needs.

use super::dropout::Dropout;
use super::gemm::gemm_crate_into;
use super::linear::linear_view;
use super::matmul::{affine_2d, batched_matmul, bmm};
use super::softmax::{
    attention_softmax, AttentionSoftmax, HeadSoftmaxRows, SoftmaxBackward, SoftmaxBackwardRows,
};
use super::{
    attach, attach2, attach3, f32_slice, wide, Backend, CResult, FrozenWeight, InputGradient,
    InputGradients2, InputGradients3, LinearView,
};
use crate::error::Result;
use crate::rng::Rng;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Head layout conversions between [batch, seq, heads·dh] (token-major, what linears produce) and
/// [batch, heads, seq, dh] (head-major, what batched attention matmuls take), as parallel copies.
#[derive(Clone, Copy)]
struct Heads {
    b: usize,
    s: usize,
    h: usize,
    dh: usize,
}

impl Heads {
    /// The layout of `heads` heads over the hidden states `x` [b, s, d].
    fn of(x: &Tensor, heads: usize) -> CResult<Self> {
        let (b, s, d) = x.dims3()?;
        Ok(Heads {
            b,
            s,
            h: heads,
            dh: d / heads,
        })
    }

    /// [b, s, h, dh] → [b, h, s, dh]
    fn split(&self, src: &[f32]) -> Vec<f32> {
        let Heads { s, h, dh, .. } = *self;
        let mut dst = super::zeros(src.len());
        dst.par_chunks_mut(s * dh)
            .enumerate()
            .for_each(|(bh, block)| {
                let (bi, hi) = (bh / h, bh % h);
                for t in 0..s {
                    let from = ((bi * s + t) * h + hi) * dh;
                    block[t * dh..(t + 1) * dh].copy_from_slice(&src[from..from + dh]);
                }
            });
        dst
    }

    /// [b, h, s, dh] → [b, s, h, dh]
    fn merge(&self, src: &[f32]) -> Vec<f32> {
        let Heads { s, h, dh, .. } = *self;
        let mut dst = super::zeros(src.len());
        dst.par_chunks_mut(h * dh)
            .enumerate()
            .for_each(|(bt, row)| {
                let (bi, t) = (bt / s, bt % s);
                for hi in 0..h {
                    let from = ((bi * h + hi) * s + t) * dh;
                    row[hi * dh..(hi + 1) * dh].copy_from_slice(&src[from..from + dh]);
                }
            });
        dst
    }

    fn split_shape(&self) -> Shape {
        Shape::from((self.b, self.h, self.s, self.dh))
    }

    fn merged_shape(&self) -> Shape {
        Shape::from((self.b * self.s, self.h * self.dh))
    }
}

/// A head-layout copy as a graph-free op (used inside backward passes).
struct Relayout {
    heads: Heads,
    to_split: bool,
}

impl CustomOp1 for Relayout {
    fn name(&self) -> &'static str {
        "relayout-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "relayout")?;
        Ok(if self.to_split {
            (
                CpuStorage::F32(self.heads.split(x)),
                self.heads.split_shape(),
            )
        } else {
            (
                CpuStorage::F32(self.heads.merge(x)),
                self.heads.merged_shape(),
            )
        })
    }
}

/// Copies one of the three [rows, 3·d] column blocks of a fused QKV product into head-major
/// [b, h, s, dh] (part 0 = q, 1 = k, 2 = v).
struct SplitPart {
    heads: Heads,
    part: usize,
}

impl CustomOp1 for SplitPart {
    fn name(&self) -> &'static str {
        "split-qkv-part"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let src = f32_slice(st, l, "split qkv")?;
        let Heads { s, h, dh, .. } = self.heads;
        let d = h * dh;
        let off = self.part * d;
        let mut dst = super::zeros(src.len() / 3);
        dst.par_chunks_mut(s * dh)
            .enumerate()
            .for_each(|(bh, block)| {
                let (bi, hi) = (bh / h, bh % h);
                for t in 0..s {
                    let from = (bi * s + t) * 3 * d + off + hi * dh;
                    block[t * dh..(t + 1) * dh].copy_from_slice(&src[from..from + dh]);
                }
            });
        Ok((CpuStorage::F32(dst), self.heads.split_shape()))
    }
}

/// Attention straight from the fused q|k|v product [rows, 3·d] and the additive [b, s] mask, for
/// inference and training alike: per (sequence, head), the scores, their softmax, attention
/// dropout (training) and the context run in buffers that stay in cache, q, k and v are read
/// where the product wrote them, and the context comes back token-major [rows, d] for the output
/// projection. Nothing is kept: the backward ([`CoreBackward`]) recomputes each head's
/// probabilities from q and k, as flash attention does, instead of reading [b, h, s, s] of them
/// per layer (BERT-base at 16 × 128: 12.6 MB per layer, all alive at the top of the forward).
struct AttentionCore<'a> {
    heads: Heads,
    scale: f32,
    dropout: Option<&'a Dropout>,
}

impl CustomOp2 for AttentionCore<'_> {
    fn name(&self) -> &'static str {
        "attention-core"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let qkv = f32_slice(s1, l1, self.name())?;
        let mask = f32_slice(s2, l2, self.name())?;
        let hs = self.heads;
        let Heads { b, s, h, dh } = hs;
        if qkv.len() != b * s * 3 * h * dh || mask.len() != b * s {
            return Err(candle_core::Error::Msg(format!(
                "attention core: q|k|v {:?} and mask {:?} do not fit {b} × {s} tokens of {h} heads",
                l1.dims(),
                l2.dims()
            )));
        }
        let mut heads_out = super::zeros(b * h * s * dh);
        heads_out.par_chunks_mut(s * dh).enumerate().for_each_init(
            // Per worker, reused across its heads.
            || (vec![0f32; s * s], vec![0f32; s * s]),
            |(scratch, probs), (bh, out)| {
                head_probs(probs, scratch, qkv, mask, hs, bh, self.scale);
                let p: &[f32] = match self.dropout {
                    Some(op) => {
                        op.apply_block(scratch, probs, bh * s * s);
                        scratch
                    }
                    None => probs,
                };
                let v = head_operands(qkv, hs, bh)[2];
                small_product(out, s, dh, s, (p, s as isize, 1), v);
            },
        );
        let ctx = hs.merge(&heads_out);
        Ok((CpuStorage::F32(ctx), hs.merged_shape()))
    }
}

/// One (sequence, head)'s attention probabilities [s, s] into `probs`, with `scores` as scratch.
/// The forward and the backward's recompute both run this, so they agree bit for bit.
fn head_probs(
    probs: &mut [f32],
    scores: &mut [f32],
    qkv: &[f32],
    mask: &[f32],
    hs: Heads,
    bh: usize,
    scale: f32,
) {
    let Heads { s, h, dh, .. } = hs;
    let [q, kt, _] = head_operands(qkv, hs, bh);
    small_product(scores, s, s, dh, q, kt);
    let m = &mask[(bh / h) * s..(bh / h + 1) * s];
    wide(HeadSoftmaxRows((probs, &scores[..], m, scale)));
}

/// One (sequence, head)'s q, kᵀ and v as strided operands of the q|k|v rows [rows, 3d]: q and v
/// [s, dh] with row stride 3d, kᵀ [dh, s].
fn head_operands(qkv: &[f32], hs: Heads, bh: usize) -> [(&[f32], isize, isize); 3] {
    let Heads { s, h, dh, .. } = hs;
    let (bi, hi) = (bh / h, bh % h);
    let d = h * dh;
    let row = 3 * d as isize;
    let seq = &qkv[bi * s * 3 * d..(bi + 1) * s * 3 * d];
    [
        (&seq[hi * dh..], row, 1),
        (&seq[d + hi * dh..], 1, row),
        (&seq[2 * d + hi * dh..], row, 1),
    ]
}

/// The backward of [`AttentionCore`]: d(q|k|v) [rows, 3d] from the q|k|v rows, the mask and
/// d(context) [rows, d], per (sequence, head), with the recomputed probabilities and every s × s
/// intermediate (the dropped-out probabilities, their gradient before and after dropout, the
/// scores' gradient) in three reused buffers.
struct CoreBackward<'a> {
    heads: Heads,
    scale: f32,
    dropout: Option<&'a Dropout>,
}

impl CustomOp3 for CoreBackward<'_> {
    fn name(&self) -> &'static str {
        "attention-core-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let qkv = f32_slice(s1, l1, self.name())?;
        let mask = f32_slice(s2, l2, self.name())?;
        let dctx = f32_slice(s3, l3, self.name())?;
        let hs = self.heads;
        let Heads { b, s, h, dh } = hs;
        let d = h * dh;
        if qkv.len() != b * s * 3 * d || mask.len() != b * s || dctx.len() != b * s * d {
            return Err(candle_core::Error::Msg(format!(
                "attention backward: {:?}, {:?}, {:?} do not fit {b} × {s} tokens of {h} heads",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )));
        }
        let n = b * h * s * dh;
        let (mut dq, mut dk, mut dv) = (super::zeros(n), super::zeros(n), super::zeros(n));
        dq.par_chunks_mut(s * dh)
            .zip(dk.par_chunks_mut(s * dh))
            .zip(dv.par_chunks_mut(s * dh))
            .enumerate()
            .for_each_init(
                || (vec![0f32; s * s], vec![0f32; s * s], vec![0f32; s * s]),
                |(p, x, y), (bh, ((dq, dk), dv))| {
                    let (bi, hi) = (bh / h, bh % h);
                    head_probs(p, x, qkv, mask, hs, bh, self.scale);
                    let p = &p[..];
                    let [q, kt, v] = head_operands(qkv, hs, bh);
                    let (k, vt) = ((kt.0, kt.2, kt.1), (v.0, v.2, v.1));
                    let dc = (&dctx[bi * s * d + hi * dh..], d as isize, 1);
                    let base = bh * s * s;
                    // d(dropped-out probabilities) = dctx · vᵀ, into y.
                    small_product(y, s, s, dh, dc, vt);
                    // dv = (dropped-out probabilities)ᵀ · dctx, those probabilities in x.
                    let pd: &[f32] = match self.dropout {
                        Some(op) => {
                            op.apply_block(x, p, base);
                            x
                        }
                        None => p,
                    };
                    small_product(dv, s, dh, s, (pd, 1, s as isize), dc);
                    // Through dropout (the same mask), then the softmax: d(scores) lands in
                    // whichever buffer does not hold d(probabilities).
                    let (dp, ds): (&[f32], &mut [f32]) = match self.dropout {
                        Some(op) => {
                            op.apply_block(x, y, base);
                            (x, y)
                        }
                        None => (y, x),
                    };
                    wide(SoftmaxBackwardRows((&mut *ds, p, dp, s, self.scale)));
                    let ds = &ds[..];
                    small_product(dq, s, dh, s, (ds, s as isize, 1), k);
                    small_product(dk, s, dh, s, (ds, 1, s as isize), q);
                },
            );
        let dqkv = merge_heads3(hs, [&dq, &dk, &dv]);
        Ok((CpuStorage::F32(dqkv), Shape::from((b * s, 3 * d))))
    }
}

/// `dst = lhs · rhs` for one head's product, on one thread (the heads run in parallel): our tile
/// where it takes products this small, the `gemm` crate otherwise, as the batched product does.
fn small_product(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: (&[f32], isize, isize),
    rhs: (&[f32], isize, isize),
) {
    if !super::blocked::gemm(dst, m, n, k, lhs, rhs, false, false) {
        gemm_crate_into(dst, m, n, k, lhs, rhs, false, false);
    }
}

/// Merges head-major dq, dk, dv [b, h, s, dh] into one token-major [rows, 3·d] tensor.
struct MergeQkv {
    heads: Heads,
}

impl CustomOp3 for MergeQkv {
    fn name(&self) -> &'static str {
        "merge-qkv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let parts = [
            f32_slice(s1, l1, "merge qkv")?,
            f32_slice(s2, l2, "merge qkv")?,
            f32_slice(s3, l3, "merge qkv")?,
        ];
        let Heads { b, s, h, dh } = self.heads;
        Ok((
            CpuStorage::F32(merge_heads3(self.heads, parts)),
            Shape::from((b * s, 3 * h * dh)),
        ))
    }
}

/// Head-major q, k, v parts [b, h, s, dh] merged into token-major rows [rows, 3d].
fn merge_heads3(hs: Heads, parts: [&[f32]; 3]) -> Vec<f32> {
    let Heads { b, s, h, dh } = hs;
    let d = h * dh;
    let mut dst = super::zeros(b * s * 3 * d);
    dst.par_chunks_mut(3 * d).enumerate().for_each(|(bt, row)| {
        let (bi, t) = (bt / s, bt % s);
        for (p, src) in parts.iter().enumerate() {
            for hi in 0..h {
                let from = ((bi * h + hi) * s + t) * dh;
                row[p * d + hi * dh..p * d + (hi + 1) * dh].copy_from_slice(&src[from..from + dh]);
            }
        }
    });
    dst
}

/// The frozen weights of one self-attention block, by role.
pub struct AttentionWeights<'a> {
    /// Query projection.
    pub q: LinearView<'a>,
    /// Key projection.
    pub k: LinearView<'a>,
    /// Value projection.
    pub v: LinearView<'a>,
    /// Output projection (its weight a tensor or the panels packed at load).
    pub o: LinearView<'a>,
    /// q, k, v weights and biases already concatenated ([3d, d], [3d]), when the caller has them.
    pub qkv: Option<LinearView<'a>>,
    /// Learned key and value prefixes [heads, P, dh] (prefix tuning): P more key/value positions
    /// before the sequence's, attended by every query and hidden by no mask.
    pub prefix: Option<(&'a Tensor, &'a Tensor)>,
    /// Per-channel scales of the q, k and v projections' outputs, concatenated [3d] ((IA)³ while
    /// training; ones where a projection is not scaled).
    pub qkv_scale: Option<&'a Tensor>,
    /// Updates added to the q, k and v projections' outputs [b, s, 3d] (LoRA's `x·Aᵀ·Bᵀ` while
    /// training, computed from the block input; zeros where a projection has none).
    pub qkv_delta: Option<&'a Tensor>,
}

/// What the backward needs.
enum AttentionSaved {
    /// Without prefixes: the q|k|v product as the heads read it [rows, 3d] and the additive mask
    /// [b, s]; the backward recomputes the probabilities (see [`AttentionCore`]).
    Rows { qkv: Tensor, mask: Tensor },
    /// With P prefix positions: q [b, h, s, dh]; k and v with the prefix positions first
    /// [b, h, P + s, dh]; the probabilities [b, h, s, P + s].
    HeadMajor {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        probs: Tensor,
        prefix_len: usize,
    },
}

/// `t` [h, P, dh] repeated for every row: [b, h, P, dh].
fn per_row(t: &Tensor, b: usize) -> candle_core::Result<Tensor> {
    let (h, p, dh) = t.dims3()?;
    t.unsqueeze(0)?.broadcast_as((b, h, p, dh))?.contiguous()
}

/// The additive [b, s] mask with `p` always-visible prefix positions in front: [b, p + s].
fn prefixed_mask(mask: &Tensor, p: usize) -> candle_core::Result<Tensor> {
    let b = mask.dim(0)?;
    let zeros = Tensor::zeros((b, p), mask.dtype(), mask.device())?;
    Tensor::cat(&[&zeros, mask], 1)
}

/// Multi-head self-attention with frozen weights as one graph node: the forward keeps q, k, v and
/// the attention probabilities; the backward is written out by hand and yields only the gradient
/// of the block input (no weight gradients, no per-op gradient accumulation in the graph).
struct FrozenAttention {
    /// The q|k|v scales and the unscaled q|k|v product [rows, 3d], when scaled.
    scaled: Option<(Tensor, Tensor)>,
    /// Whether q|k|v updates were added to the product.
    delta: bool,
    wqkv: FrozenWeight,
    wo: FrozenWeight,
    heads: Heads,
    scale: f32,
    dropout: Option<Dropout>,
    saved: AttentionSaved,
}

impl FrozenAttention {
    /// d loss / d block input, and d loss / d the prefixes (summed over rows) or the q|k|v
    /// scales when there are any.
    fn gradients(&self, arg: &Tensor, grad: &Tensor) -> CResult<(Tensor, Option<Prefixed>)> {
        let hs = self.heads;
        let g = grad.reshape((hs.b * hs.s, hs.h * hs.dh))?.contiguous()?;
        let dctx = self.wo.input_gradient(&g)?;
        let (dqkv, dprefix) = match &self.saved {
            AttentionSaved::Rows { qkv, mask } => {
                let op = CoreBackward {
                    heads: hs,
                    scale: self.scale,
                    dropout: self.dropout.as_ref(),
                };
                (qkv.apply_op3_no_bwd(mask, &dctx, &op)?, None)
            }
            AttentionSaved::HeadMajor {
                q,
                k,
                v,
                probs,
                prefix_len: p,
            } => self.head_major_gradients(&dctx, q, k, v, probs, *p)?,
        };
        let (dqkv, dscale) = match &self.scaled {
            Some((scale, unscaled)) => (
                dqkv.broadcast_mul(scale)?.contiguous()?,
                Some(super::sum_rows(&dqkv.mul(unscaled)?)?),
            ),
            None => (dqkv, None),
        };
        let dh = self.wqkv.input_gradient(&dqkv)?.reshape(arg.shape())?;
        let extra = match (dprefix, dscale) {
            (Some(p), _) => Some(Prefixed::Prefix(p)),
            (None, Some(s)) => Some(Prefixed::Scale(s)),
            // The q|k|v updates were added to the product: their gradient is the product's.
            (None, None) if self.delta => Some(Prefixed::Delta(dqkv)),
            (None, None) => None,
        };
        Ok((dh, extra))
    }
    /// d(q|k|v) [rows, 3d] and the prefixes' gradients from the head-major copies the prefixed
    /// forward keeps, given d(context) [rows, d].
    #[allow(clippy::too_many_arguments)]
    fn head_major_gradients(
        &self,
        dctx: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        probs: &Tensor,
        prefix_len: usize,
    ) -> CResult<(Tensor, Option<(Tensor, Tensor)>)> {
        let (hs, p) = (self.heads, &prefix_len);
        let dctx = dctx.apply_op1_no_bwd(&Relayout {
            heads: hs,
            to_split: true,
        })?;
        let probs_d = match &self.dropout {
            Some(d) => probs.apply_op1_no_bwd(d)?,
            None => probs.clone(),
        };
        let dprobs_d = bmm(&dctx, v, false, true)?;
        let dv = bmm(&probs_d, &dctx, true, false)?;
        let dprobs = match &self.dropout {
            Some(d) => dprobs_d.apply_op1_no_bwd(d)?,
            None => dprobs_d,
        };
        let dscores = probs.apply_op2_no_bwd(&dprobs, &SoftmaxBackward { scale: self.scale })?;
        let dq = bmm(&dscores, k, false, false)?;
        let dk = bmm(&dscores, q, true, false)?;
        // The prefix positions' gradients belong to the prefixes (one per head, summed over rows).
        let (dk, dv, dprefix) = if *p > 0 {
            let split = |t: &Tensor| -> CResult<(Tensor, Tensor)> {
                Ok((
                    t.narrow(2, *p, hs.s)?.contiguous()?,
                    t.narrow(2, 0, *p)?.sum(0)?,
                ))
            };
            let ((dk, dpk), (dv, dpv)) = (split(&dk)?, split(&dv)?);
            (dk, dv, Some((dpk, dpv)))
        } else {
            (dk.contiguous()?, dv.contiguous()?, None)
        };
        Ok((
            dq.apply_op3_no_bwd(&dk, &dv, &MergeQkv { heads: hs })?,
            dprefix,
        ))
    }
}

/// The gradient of what a block reads besides its input: prefixes, q|k|v scales or updates.
enum Prefixed {
    /// Of the key and the value prefixes [heads, P, dh].
    Prefix((Tensor, Tensor)),
    /// Of the q|k|v scales [3d].
    Scale(Tensor),
    /// Of the q|k|v updates [rows, 3d].
    Delta(Tensor),
}

impl InputGradient for FrozenAttention {
    const NAME: &'static str = "frozen-attention";

    fn input_gradient(&self, arg: &Tensor, grad: &Tensor) -> CResult<Tensor> {
        Ok(self.gradients(arg, grad)?.0)
    }
}

impl InputGradients3 for FrozenAttention {
    const NAME: &'static str = "frozen-attention-prefixed";

    fn input_gradients(
        &self,
        [h, _, _]: [&Tensor; 3],
        grad: &Tensor,
    ) -> CResult<[Option<Tensor>; 3]> {
        let (dh, dprefix) = self.gradients(h, grad)?;
        let (dk, dv) = match dprefix {
            Some(Prefixed::Prefix((k, v))) => (Some(k), Some(v)),
            _ => (None, None),
        };
        Ok([Some(dh), dk, dv])
    }
}

impl InputGradients2 for FrozenAttention {
    const NAME: &'static str = "frozen-attention-scaled";

    fn input_gradients(&self, [h, e]: [&Tensor; 2], grad: &Tensor) -> CResult<[Option<Tensor>; 2]> {
        let (dh, dscale) = self.gradients(h, grad)?;
        let dextra = match dscale {
            Some(Prefixed::Scale(s)) => Some(s),
            Some(Prefixed::Delta(d)) => Some(d.reshape(e.shape())?),
            _ => None,
        };
        Ok([Some(dh), dextra])
    }
}

/// Multi-head self-attention of `h [b, s, d]` with an additive [b, s] mask, and attention dropout
/// `(p, generator)` in training; returns the output projection [b, s, d] (before the block's own
/// dropout). With the fused backend and frozen f32 weights the whole block is one graph node.
pub fn attention(
    backend: Backend,
    h: &Tensor,
    w: &AttentionWeights<'_>,
    mask: &Tensor,
    heads: usize,
    scale: f64,
    dropout: Option<(f64, &mut Rng)>,
) -> Result<Tensor> {
    let frozen = [w.q, w.k, w.v, w.o].iter().all(|l| l.frozen_f32());
    let prefix_fuses = w.prefix.is_none_or(|(k, v)| backend.fuses(&[k, v]));
    let extras_fuse = [w.qkv_scale, w.qkv_delta]
        .into_iter()
        .flatten()
        .all(|t| backend.fuses(&[t]));
    // One graph node takes prefixes, scales or updates (a task has one method), not two.
    let extras = [
        w.prefix.is_some(),
        w.qkv_scale.is_some(),
        w.qkv_delta.is_some(),
    ];
    let one_extra = extras.iter().filter(|&&e| e).count() <= 1;
    if frozen && prefix_fuses && extras_fuse && one_extra && backend.fuses(&[h]) {
        let seed = dropout.map(|(p, rng)| (p, rng.next_u64()));
        return Ok(frozen_attention(h, w, mask, heads, scale, seed)?);
    }
    let plain = w.prefix.is_none() && w.qkv_scale.is_none() && w.qkv_delta.is_none();
    if plain && backend.fuses(&[h, mask]) {
        let seed = dropout.map(|(p, rng)| (p, rng.next_u64()));
        return trained_attention(backend, h, w, mask, heads, scale, seed);
    }
    attention_composed(backend, h, w, mask, heads, scale, dropout)
}

/// [`attention`] composed op by op (each op still on `backend`): the path for trained attention
/// weights, other devices and dtypes, and the reference of the fused block.
fn attention_composed(
    backend: Backend,
    h: &Tensor,
    w: &AttentionWeights<'_>,
    mask: &Tensor,
    heads: usize,
    scale: f64,
    dropout: Option<(f64, &mut Rng)>,
) -> Result<Tensor> {
    let (b, s, d) = h.dims3()?;
    let dh = d / heads;
    let project = |lin: LinearView<'_>| -> Result<Tensor> {
        let t = linear_view(backend, h, lin)?;
        Ok(t.reshape((b, s, heads, dh))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let scaled = |i: usize, lin: LinearView<'_>| -> Result<Tensor> {
        if w.qkv_scale.is_none() && w.qkv_delta.is_none() {
            return project(lin);
        }
        let mut t = linear_view(backend, h, lin)?;
        if let Some(delta) = w.qkv_delta {
            t = t.add(&delta.narrow(2, i * d, d)?)?;
        }
        if let Some(sc) = w.qkv_scale {
            t = t.broadcast_mul(&sc.narrow(0, i * d, d)?)?;
        }
        Ok(t.reshape((b, s, heads, dh))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let (q, k, v) = (scaled(0, w.q)?, scaled(1, w.k)?, scaled(2, w.v)?);
    let (k, v, mask) = match w.prefix {
        Some((pk, pv)) => (
            Tensor::cat(&[&per_row(pk, b)?, &k], 2)?,
            Tensor::cat(&[&per_row(pv, b)?, &v], 2)?,
            prefixed_mask(mask, pk.dim(1)?)?,
        ),
        None => (k, v, mask.clone()),
    };
    let mask = &mask;
    let fast = backend.fuses(&[&q]);
    let scores = if fast {
        batched_matmul(&q, &k, false, true)?
    } else {
        q.matmul(&k.t()?)?
    };
    let probs = attention_softmax(backend, &scores, mask, scale)?;
    let probs = match dropout {
        Some((p, rng)) => super::dropout(backend, &probs, p, rng)?,
        None => probs,
    };
    let ctx = if fast {
        batched_matmul(&probs, &v, false, false)?
    } else {
        probs.matmul(&v)?
    };
    let ctx = ctx.transpose(1, 2)?.contiguous()?.reshape((b, s, d))?;
    linear_view(backend, &ctx, w.o)
}

/// [`attention`] with trained q, k, v or o weights (top-k and full fine-tuning): the projections
/// are trained graph nodes, and scores, softmax, dropout and context one node between them that
/// keeps only the q|k|v product (and the mask). Composed op by op, the same block kept
/// the scores, the probabilities before and after dropout and per-head copies of q, k, v and the
/// context for the backward.
fn trained_attention(
    backend: Backend,
    h: &Tensor,
    w: &AttentionWeights<'_>,
    mask: &Tensor,
    heads: usize,
    scale: f64,
    dropout: Option<(f64, u64)>,
) -> Result<Tensor> {
    let (b, s, d) = h.dims3()?;
    let hs = Heads::of(h, heads)?;
    let x = h.reshape((b * s, d))?;
    let qkv = match w.qkv {
        Some(lin) => linear_view(backend, &x, lin)?,
        None => {
            let wqkv = Tensor::cat(&[w.q.w.tensor()?, w.k.w.tensor()?, w.v.w.tensor()?], 0)?;
            let bqkv = Tensor::cat(&[w.q.b, w.k.b, w.v.b], 0)?;
            super::linear(backend, &x, &wqkv, Some(&bqkv))?
        }
    };
    let drop = dropout
        .filter(|(p, _)| *p > 0.0)
        .map(|(p, seed)| Dropout::new(p, seed));
    let ctx = attention_core(&qkv.contiguous()?, mask, hs, scale as f32, drop)?;
    Ok(linear_view(backend, &ctx, w.o)?.reshape((b, s, d))?)
}

/// [`AttentionCore`] joined to the graph: the context [rows, d] of the q|k|v product [rows, 3d],
/// whose backward gives d(q|k|v) from d(context).
fn attention_core(
    qkv: &Tensor,
    mask: &Tensor,
    heads: Heads,
    scale: f32,
    dropout: Option<Dropout>,
) -> Result<Tensor> {
    let saved = qkv.detach();
    let mask = mask.contiguous()?;
    let core = AttentionCore {
        heads,
        scale,
        dropout: dropout.as_ref(),
    };
    let ctx = saved.apply_op2_no_bwd(&mask, &core)?;
    let backward = CoreGradient {
        heads,
        scale,
        dropout,
        qkv: saved,
        mask,
    };
    Ok(attach(qkv, ctx, backward)?)
}

/// The backward of [`attention_core`].
struct CoreGradient {
    heads: Heads,
    scale: f32,
    dropout: Option<Dropout>,
    qkv: Tensor,
    mask: Tensor,
}

impl InputGradient for CoreGradient {
    const NAME: &'static str = "attention-core";

    fn input_gradient(&self, _qkv: &Tensor, grad: &Tensor) -> CResult<Tensor> {
        let op = CoreBackward {
            heads: self.heads,
            scale: self.scale,
            dropout: self.dropout.as_ref(),
        };
        self.qkv
            .apply_op3_no_bwd(&self.mask, &grad.contiguous()?, &op)
    }
}

/// The fused block of [`attention`], with attention dropout `(p, seed)`.
fn frozen_attention(
    h: &Tensor,
    w: &AttentionWeights<'_>,
    mask: &Tensor,
    heads: usize,
    scale: f64,
    dropout: Option<(f64, u64)>,
) -> CResult<Tensor> {
    let (b, s, d) = h.dims3()?;
    let hs = Heads::of(h, heads)?;
    let x = h.detach().reshape((b * s, d))?;
    let (wqkv, mut qkv) = match w.qkv {
        Some(lin) => (lin.w.owned()?, lin.affine(&x)?),
        None => {
            let parts = [w.q.w.tensor()?, w.k.w.tensor()?, w.v.w.tensor()?];
            let wqkv = Tensor::cat(&parts, 0)?;
            let bqkv = Tensor::cat(&[w.q.b, w.k.b, w.v.b], 0)?;
            let qkv = affine_2d(&x, &wqkv, &bqkv)?;
            (FrozenWeight::Tensor(wqkv), qkv)
        }
    };
    qkv = qkv.contiguous()?;
    if let Some(delta) = w.qkv_delta {
        qkv = qkv
            .add(&delta.detach().reshape(qkv.shape())?)?
            .contiguous()?;
    }
    let (qkv, scaled) = match w.qkv_scale {
        Some(sc) => {
            let sc = sc.detach();
            (qkv.broadcast_mul(&sc)?.contiguous()?, Some((sc, qkv)))
        }
        None => (qkv, None),
    };
    let scale32 = scale as f32;
    let no_dropout = dropout.is_none_or(|(p, _)| p <= 0.0);
    let tracked = [Some(h), w.qkv_scale, w.qkv_delta]
        .into_iter()
        .flatten()
        .any(Tensor::track_op);
    if w.prefix.is_none() && no_dropout && !tracked {
        // Nothing to differentiate: no head-major copies, no probabilities kept.
        let core = AttentionCore {
            heads: hs,
            scale: scale32,
            dropout: None,
        };
        let ctx = qkv.apply_op2_no_bwd(&mask.contiguous()?, &core)?;
        return w.o.affine(&ctx)?.reshape((b, s, d));
    }
    let drop = dropout
        .filter(|(p, _)| *p > 0.0)
        .map(|(p, seed)| Dropout::new(p, seed));
    let (ctx, saved) = match w.prefix {
        None => {
            let mask = mask.contiguous()?;
            let core = AttentionCore {
                heads: hs,
                scale: scale32,
                dropout: drop.as_ref(),
            };
            let ctx = qkv.apply_op2_no_bwd(&mask, &core)?;
            (ctx, AttentionSaved::Rows { qkv, mask })
        }
        Some((pk, pv)) => {
            let part = |p| qkv.apply_op1_no_bwd(&SplitPart { heads: hs, part: p });
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            let prefix_len = pk.dim(1)?;
            let k = Tensor::cat(&[&per_row(&pk.detach(), b)?, &k], 2)?;
            let v = Tensor::cat(&[&per_row(&pv.detach(), b)?, &v], 2)?;
            let mask = prefixed_mask(mask, prefix_len)?;
            let probs = bmm(&q, &k, false, true)?.apply_op2_no_bwd(
                &mask.contiguous()?,
                &AttentionSoftmax {
                    scale: scale32,
                    heads_q: heads * s,
                },
            )?;
            let probs_d = match &drop {
                Some(op) => probs.apply_op1_no_bwd(op)?,
                None => probs.clone(),
            };
            let ctx = bmm(&probs_d, &v, false, false)?.apply_op1_no_bwd(&Relayout {
                heads: hs,
                to_split: false,
            })?;
            let saved = AttentionSaved::HeadMajor {
                q,
                k,
                v,
                probs,
                prefix_len,
            };
            (ctx, saved)
        }
    };
    let out = w.o.affine(&ctx)?.reshape((b, s, d))?;
    let backward = FrozenAttention {
        scaled,
        delta: w.qkv_delta.is_some(),
        wqkv,
        wo: w.o.w.owned()?,
        heads: hs,
        scale: scale32,
        dropout: drop,
        saved,
    };
    match (w.prefix, w.qkv_scale.or(w.qkv_delta)) {
        (Some((pk, pv)), _) => attach3([h, pk, pv], out, backward),
        (None, Some(e)) => attach2([h, e], out, backward),
        (None, None) => attach(h, out, backward),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::Device;

    #[test]
    fn frozen_blocks_match_composed_ops_with_dropout_and_padding() {
        let (b, s, d, heads) = (2, 7, 16, 4);
        let w: Vec<Tensor> = (0..4).map(|i| randn(&[d, d], 20 + i, 0.3)).collect();
        let bias: Vec<Tensor> = (0..4).map(|i| randn(&[d], 30 + i, 0.1)).collect();
        let mut m = vec![0f32; b * s];
        for j in 4..s {
            m[s + j] = -1e9;
        }
        let mask = Tensor::from_vec(m, (b, s), &Device::Cpu).unwrap();
        let scale = 0.5;
        let seed = 77;
        let weights = AttentionWeights {
            q: LinearView::new(&w[0], &bias[0]),
            k: LinearView::new(&w[1], &bias[1]),
            v: LinearView::new(&w[2], &bias[2]),
            o: LinearView::new(&w[3], &bias[3]),
            qkv: None,
            prefix: None,
            qkv_scale: None,
            qkv_delta: None,
        };
        let composed = |h: &Tensor| {
            let lin = |x: &Tensor, i: usize| {
                x.broadcast_matmul(&w[i].t().unwrap())
                    .unwrap()
                    .broadcast_add(&bias[i])
                    .unwrap()
            };
            let split = |t: Tensor| {
                t.reshape((b, s, heads, d / heads))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (q, k, v) = (split(lin(h, 0)), split(lin(h, 1)), split(lin(h, 2)));
            let p = attention_softmax(
                Backend::Fused,
                &q.matmul(&k.t().unwrap()).unwrap(),
                &mask,
                scale,
            )
            .unwrap();
            let p = super::super::dropout::dropout_fused(&p, 0.25, seed).unwrap();
            let ctx = p
                .matmul(&v)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((b, s, d))
                .unwrap();
            lin(&ctx, 3)
        };
        let h = randn(&[b, s, d], 40, 1.0);
        compare(
            std::slice::from_ref(&h),
            &|t| {
                frozen_attention(&t[0], &weights, &mask, heads, scale, Some((0.25, seed))).unwrap()
            },
            &|t| composed(&t[0]),
            1e-5,
        );
        let w1 = randn(&[3 * d, d], 50, 0.3);
        let b1 = randn(&[3 * d], 51, 0.1);
        let w_out = randn(&[d, 3 * d], 52, 0.3);
        let ffn_ref = |x: &Tensor| {
            let a = crate::kernels::gelu(
                Backend::Fused,
                &x.broadcast_matmul(&w1.t().unwrap())
                    .unwrap()
                    .broadcast_add(&b1)
                    .unwrap(),
            )
            .unwrap();
            a.broadcast_matmul(&w_out.t().unwrap())
                .unwrap()
                .broadcast_add(&bias[3])
                .unwrap()
        };
        compare(
            &[h],
            &|t| {
                crate::kernels::ffn::frozen_ffn_plain(&t[0], (&w1, &b1), (&w_out, &bias[3]))
                    .unwrap()
            },
            &|t| ffn_ref(&t[0]),
            1e-5,
        );
    }

    #[test]
    fn trained_block_matches_composed_ops_with_dropout_and_padding() {
        // Trained q, k, v, o (full fine-tuning): values and the gradients of the input, every
        // weight and every bias against the block composed op by op, with the same dropout mask.
        let (b, s, d, heads) = (2, 7, 16, 4);
        let mut m = vec![0f32; b * s];
        for j in 4..s {
            m[s + j] = -1e9;
        }
        let mask = Tensor::from_vec(m, (b, s), &Device::Cpu).unwrap();
        let (scale, seed) = (0.5, 78);
        let mut inputs = vec![randn(&[b, s, d], 60, 1.0)];
        inputs.extend((0..4).map(|i| randn(&[d, d], 61 + i, 0.3)));
        inputs.extend([0, 2, 3].map(|i| randn(&[d], 65 + i, 0.1)));
        // The key's bias shifts every score of a query alike, which softmax ignores: its
        // gradient is zero up to rounding, so it stays a constant here.
        let bk = randn(&[d], 66, 0.1);
        let weights = |t: &[Tensor]| -> Vec<(Tensor, Tensor)> {
            let biases = [t[5].clone(), bk.clone(), t[6].clone(), t[7].clone()];
            (0..4)
                .map(|i| (t[1 + i].clone(), biases[i].clone()))
                .collect()
        };
        let fused = |t: &[Tensor]| {
            let wb = weights(t);
            let view = |i: usize| LinearView::new(&wb[i].0, &wb[i].1);
            let w = AttentionWeights {
                q: view(0),
                k: view(1),
                v: view(2),
                o: view(3),
                qkv: None,
                prefix: None,
                qkv_scale: None,
                qkv_delta: None,
            };
            assert!(!w.q.frozen_f32(), "the weights must be trained here");
            let seed = Some((0.25, seed));
            trained_attention(Backend::Fused, &t[0], &w, &mask, heads, scale, seed).unwrap()
        };
        let composed = |t: &[Tensor]| {
            let wb = weights(t);
            let lin = |x: &Tensor, i: usize| {
                x.broadcast_matmul(&wb[i].0.t().unwrap())
                    .unwrap()
                    .broadcast_add(&wb[i].1)
                    .unwrap()
            };
            let split = |t: Tensor| {
                t.reshape((b, s, heads, d / heads))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let h = &t[0];
            let (q, k, v) = (split(lin(h, 0)), split(lin(h, 1)), split(lin(h, 2)));
            let scores = q.matmul(&k.t().unwrap()).unwrap();
            let p = attention_softmax(Backend::Reference, &scores, &mask, scale).unwrap();
            let p = super::super::dropout::dropout_fused(&p, 0.25, seed).unwrap();
            let ctx = p.matmul(&v).unwrap().transpose(1, 2).unwrap();
            lin(&ctx.contiguous().unwrap().reshape((b, s, d)).unwrap(), 3)
        };
        compare(&inputs, &fused, &composed, 1e-5);
    }

    #[test]
    fn inference_core_matches_composed_ops_with_padding_and_scales() {
        // Untracked input and no dropout: the fused block takes the cache-resident core. Two
        // sequences, the second padded after 4 of 9 tokens; once plain, once with (IA)³-style
        // q|k|v scales.
        let (b, s, d, heads) = (2, 9, 16, 4);
        let w: Vec<Tensor> = (0..4).map(|i| randn(&[d, d], 120 + i, 0.3)).collect();
        let bias: Vec<Tensor> = (0..4).map(|i| randn(&[d], 130 + i, 0.1)).collect();
        let mut m = vec![0f32; b * s];
        for j in 4..s {
            m[s + j] = -1e9;
        }
        let mask = Tensor::from_vec(m, (b, s), &Device::Cpu).unwrap();
        let h = randn(&[b, s, d], 140, 1.0);
        let scales = randn(&[3 * d], 141, 0.5).affine(1.0, 1.0).unwrap();
        for with_scales in [false, true] {
            let weights = AttentionWeights {
                q: LinearView::new(&w[0], &bias[0]),
                k: LinearView::new(&w[1], &bias[1]),
                v: LinearView::new(&w[2], &bias[2]),
                o: LinearView::new(&w[3], &bias[3]),
                qkv: None,
                prefix: None,
                qkv_scale: with_scales.then_some(&scales),
                qkv_delta: None,
            };
            let run = |backend| attention(backend, &h, &weights, &mask, heads, 0.5, None).unwrap();
            let (fused, reference) = (run(Backend::Fused), run(Backend::Reference));
            assert!(!h.track_op());
            let err = rel(&fused, &reference);
            assert!(err < 1e-5, "scales={with_scales}: relative error {err}");
        }
    }

    /// Times `old` and `new` interleaved, `rounds` times each, and prints their medians.
    fn interleaved<A, B>(what: &str, rounds: usize, old: impl Fn() -> A, new: impl Fn() -> B) {
        let (mut a, mut c) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let t = std::time::Instant::now();
            std::hint::black_box(old());
            a.push(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            std::hint::black_box(new());
            c.push(t.elapsed().as_secs_f64());
        }
        a.sort_by(f64::total_cmp);
        c.sort_by(f64::total_cmp);
        let (a, c) = (a[rounds / 2], c[rounds / 2]);
        println!(
            "{what}: head-major {:.2} ms, core {:.2} ms ({:.2}x)",
            a * 1e3,
            c * 1e3,
            a / c
        );
    }

    #[test]
    #[ignore]
    fn time_inference_core_against_head_major_copies() {
        // One MiniLM layer's attention between the q|k|v product and the output projection,
        // interleaved A B A B on 2 threads: the head-major path the training forward takes
        // (three splits, scores, softmax, context, merge) against the inference core.
        for (b, s) in [(16, 128), (32, 32), (32, 64)] {
            let (heads, dh) = (12, 32);
            let d = heads * dh;
            let hs = Heads { b, s, h: heads, dh };
            let qkv = randn(&[b * s, 3 * d], 1, 1.0)
                .to_dtype(candle_core::DType::F32)
                .unwrap();
            let mask = Tensor::zeros((b, s), candle_core::DType::F32, &Device::Cpu).unwrap();
            let scale = 1.0 / (dh as f32).sqrt();
            let old = || {
                let part = |p| {
                    qkv.apply_op1_no_bwd(&SplitPart { heads: hs, part: p })
                        .unwrap()
                };
                let (q, k, v) = (part(0), part(1), part(2));
                let sm = AttentionSoftmax {
                    scale,
                    heads_q: heads * s,
                };
                let probs = bmm(&q, &k, false, true)
                    .unwrap()
                    .apply_op2_no_bwd(&mask, &sm);
                bmm(&probs.unwrap(), &v, false, false)
                    .unwrap()
                    .apply_op1_no_bwd(&Relayout {
                        heads: hs,
                        to_split: false,
                    })
                    .unwrap()
            };
            let new = || {
                let core = AttentionCore {
                    heads: hs,
                    scale,
                    dropout: None,
                };
                qkv.apply_op2_no_bwd(&mask, &core).unwrap()
            };
            assert!(rel(&old(), &new()) < 1e-5);
            interleaved(&format!("{b}x{s}"), 30, old, new);
        }
    }

    #[test]
    #[ignore]
    fn time_training_core_against_head_major_copies() {
        // One MiniLM layer's attention between the q|k|v product and the output projection,
        // forward and backward with attention dropout 0.1, interleaved A B A B on 2 threads: the
        // head-major ops (splits, scores, softmax, dropout, context, merge, and their backward)
        // against the training core and its backward.
        for (b, s) in [(16, 128), (32, 32), (32, 64)] {
            let (heads, dh) = (12, 32);
            let d = heads * dh;
            let hs = Heads { b, s, h: heads, dh };
            let qkv = randn(&[b * s, 3 * d], 1, 1.0);
            let dctx = randn(&[b * s, d], 2, 1.0);
            let mask = Tensor::zeros((b, s), candle_core::DType::F32, &Device::Cpu).unwrap();
            let scale = 1.0 / (dh as f32).sqrt();
            let drop = Dropout::new(0.1, 9);
            let old = || {
                let part = |p| {
                    qkv.apply_op1_no_bwd(&SplitPart { heads: hs, part: p })
                        .unwrap()
                };
                let (q, k, v) = (part(0), part(1), part(2));
                let sm = AttentionSoftmax {
                    scale,
                    heads_q: heads * s,
                };
                let probs = bmm(&q, &k, false, true)
                    .unwrap()
                    .apply_op2_no_bwd(&mask, &sm);
                let probs = probs.unwrap();
                let probs_d = probs.apply_op1_no_bwd(&drop).unwrap();
                let relayout = |to_split| Relayout {
                    heads: hs,
                    to_split,
                };
                let ctx = bmm(&probs_d, &v, false, false).unwrap();
                let ctx = ctx.apply_op1_no_bwd(&relayout(false)).unwrap();
                let dc = dctx.apply_op1_no_bwd(&relayout(true)).unwrap();
                let probs_d = probs.apply_op1_no_bwd(&drop).unwrap();
                let dprobs_d = bmm(&dc, &v, false, true).unwrap();
                let dv = bmm(&probs_d, &dc, true, false).unwrap();
                let dprobs = dprobs_d.apply_op1_no_bwd(&drop).unwrap();
                let sb = SoftmaxBackward { scale };
                let dscores = probs.apply_op2_no_bwd(&dprobs, &sb).unwrap();
                let dq = bmm(&dscores, &k, false, false).unwrap();
                let dk = bmm(&dscores, &q, true, false).unwrap();
                let dqkv = dq.apply_op3_no_bwd(&dk, &dv, &MergeQkv { heads: hs });
                (ctx, dqkv.unwrap())
            };
            let new = || {
                let core = AttentionCore {
                    heads: hs,
                    scale,
                    dropout: Some(&drop),
                };
                let ctx = qkv.apply_op2_no_bwd(&mask, &core).unwrap();
                let back = CoreBackward {
                    heads: hs,
                    scale,
                    dropout: Some(&drop),
                };
                (ctx, qkv.apply_op3_no_bwd(&mask, &dctx, &back).unwrap())
            };
            let ((c0, g0), (c1, g1)) = (old(), new());
            assert!(rel(&c0, &c1) < 1e-5 && rel(&g0, &g1) < 1e-5);
            interleaved(&format!("{b}x{s}"), 20, old, new);
        }
    }

    #[test]
    fn prefixed_attention_matches_composed_ops_with_prefix_gradients() {
        let (b, s, d, heads, p) = (3, 5, 16, 4, 3);
        let dh = d / heads;
        let w: Vec<Tensor> = (0..4).map(|i| randn(&[d, d], 60 + i, 0.3)).collect();
        let bias: Vec<Tensor> = (0..4).map(|i| randn(&[d], 70 + i, 0.1)).collect();
        let mut m = vec![0f32; b * s];
        for j in 2..s {
            m[s + j] = -1e9;
        }
        let mask = Tensor::from_vec(m, (b, s), &Device::Cpu).unwrap();
        let inputs = [
            randn(&[b, s, d], 80, 1.0),
            randn(&[heads, p, dh], 81, 1.0),
            randn(&[heads, p, dh], 82, 1.0),
        ];
        let run = |t: &[Tensor], backend: Backend| {
            let weights = AttentionWeights {
                q: LinearView::new(&w[0], &bias[0]),
                k: LinearView::new(&w[1], &bias[1]),
                v: LinearView::new(&w[2], &bias[2]),
                o: LinearView::new(&w[3], &bias[3]),
                qkv: None,
                prefix: Some((&t[1], &t[2])),
                qkv_scale: None,
                qkv_delta: None,
            };
            attention(backend, &t[0], &weights, &mask, heads, 0.5, None).unwrap()
        };
        compare(
            &inputs,
            &|t| run(t, Backend::Fused),
            &|t| run(t, Backend::Reference),
            1e-5,
        );
        // The prefix changes the output: without it, every row moves.
        let plain = AttentionWeights {
            q: LinearView::new(&w[0], &bias[0]),
            k: LinearView::new(&w[1], &bias[1]),
            v: LinearView::new(&w[2], &bias[2]),
            o: LinearView::new(&w[3], &bias[3]),
            qkv: None,
            prefix: None,
            qkv_scale: None,
            qkv_delta: None,
        };
        let without = frozen_attention(&inputs[0], &plain, &mask, heads, 0.5, None).unwrap();
        let with = run(&inputs, Backend::Fused);
        assert!(rel(&with, &without) > 1e-2);
    }

    /// What a method feeds the frozen blocks besides their input.
    #[derive(Clone, Copy)]
    enum Extra {
        /// (IA)³: q|k|v scales [3d], the intermediate scale [i].
        Scale,
        /// LoRA: q|k|v updates [b, s, 3d], the intermediate update [b, s, i].
        Update,
    }

    /// The fused attention and FFN against the composed ops, values and the gradients of the
    /// input and of what `extra` adds.
    fn blocks_with(extra: Extra, seed: u64) {
        let (b, s, d, heads, i) = (2, 5, 16, 4, 24);
        let w: Vec<Tensor> = (0..4).map(|k| randn(&[d, d], seed + k, 0.3)).collect();
        let bias: Vec<Tensor> = (0..4).map(|k| randn(&[d], seed + 5 + k, 0.1)).collect();
        let mut m = vec![0f32; b * s];
        m[s + 4] = -1e9;
        let mask = Tensor::from_vec(m, (b, s), &Device::Cpu).unwrap();
        let added = |shape: &[usize], k: u64| match extra {
            Extra::Scale => (randn(shape, seed + k, 0.3) + 1.0).unwrap(),
            Extra::Update => randn(shape, seed + k, 0.5),
        };
        let shape = |width: usize| match extra {
            Extra::Scale => vec![width],
            Extra::Update => vec![b, s, width],
        };
        let inputs = [randn(&[b, s, d], seed + 10, 1.0), added(&shape(3 * d), 11)];
        let run = |t: &[Tensor], backend: Backend| {
            let (qkv_scale, qkv_delta) = match extra {
                Extra::Scale => (Some(&t[1]), None),
                Extra::Update => (None, Some(&t[1])),
            };
            let weights = AttentionWeights {
                q: LinearView::new(&w[0], &bias[0]),
                k: LinearView::new(&w[1], &bias[1]),
                v: LinearView::new(&w[2], &bias[2]),
                o: LinearView::new(&w[3], &bias[3]),
                qkv: None,
                prefix: None,
                qkv_scale,
                qkv_delta,
            };
            attention(backend, &t[0], &weights, &mask, heads, 0.5, None).unwrap()
        };
        compare(
            &inputs,
            &|t| run(t, Backend::Fused),
            &|t| run(t, Backend::Reference),
            1e-5,
        );
        let w1 = randn(&[i, d], seed + 20, 0.3);
        let b1 = randn(&[i], seed + 21, 0.1);
        let w2 = randn(&[d, i], seed + 22, 0.3);
        let b2 = randn(&[d], seed + 23, 0.1);
        let inputs = [randn(&[b, s, d], seed + 24, 1.0), added(&shape(i), 25)];
        let run = |t: &[Tensor], backend: Backend| {
            let adapt = match extra {
                Extra::Scale => crate::kernels::ffn::FfnAdapt {
                    scale: Some(&t[1]),
                    ..Default::default()
                },
                Extra::Update => crate::kernels::ffn::FfnAdapt {
                    delta: Some(&t[1]),
                    ..Default::default()
                },
            };
            let (w1, w2) = (LinearView::new(&w1, &b1), LinearView::new(&w2, &b2));
            crate::kernels::ffn(backend, &t[0], w1, w2, adapt).unwrap()
        };
        compare(
            &inputs,
            &|t| run(t, Backend::Fused),
            &|t| run(t, Backend::Reference),
            1e-5,
        );
    }

    #[test]
    fn scaled_attention_and_ffn_match_composed_ops_with_scale_gradients() {
        blocks_with(Extra::Scale, 90);
    }

    #[test]
    fn updated_attention_and_ffn_match_composed_ops_with_update_gradients() {
        blocks_with(Extra::Update, 120);
    }
}
