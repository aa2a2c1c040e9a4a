//! Multi-head self-attention with frozen weights as one graph node (hand-written backward, input
//! gradient only), and the head-layout copies it needs.

use super::dropout::Dropout;
use super::linear::{frozen_f32, linear};
use super::matmul::{affine_2d, batched_matmul, bmm, matmul_2d};
use super::softmax::{attention_softmax, AttentionSoftmax, SoftmaxBackward};
use super::{attach, f32_slice, Backend, CResult, InputGradient};
use crate::error::Result;
use crate::rng::Rng;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
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
        let d = h * dh;
        let mut dst = super::zeros(b * s * 3 * d);
        dst.par_chunks_mut(3 * d).enumerate().for_each(|(bt, row)| {
            let (bi, t) = (bt / s, bt % s);
            for (p, src) in parts.iter().enumerate() {
                for hi in 0..h {
                    let from = ((bi * h + hi) * s + t) * dh;
                    row[p * d + hi * dh..p * d + (hi + 1) * dh]
                        .copy_from_slice(&src[from..from + dh]);
                }
            }
        });
        Ok((CpuStorage::F32(dst), Shape::from((b * s, 3 * d))))
    }
}

/// The frozen weights of one self-attention block, by role.
pub struct AttentionWeights<'a> {
    /// Query projection weight and bias.
    pub q: (&'a Tensor, &'a Tensor),
    /// Key projection weight and bias.
    pub k: (&'a Tensor, &'a Tensor),
    /// Value projection weight and bias.
    pub v: (&'a Tensor, &'a Tensor),
    /// Output projection weight and bias.
    pub o: (&'a Tensor, &'a Tensor),
    /// q, k, v weights and biases already concatenated ([3d, d], [3d]), when the caller has them.
    pub qkv: Option<(&'a Tensor, &'a Tensor)>,
}

struct AttentionSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    probs: Tensor,
}

/// Multi-head self-attention with frozen weights as one graph node: the forward keeps q, k, v and
/// the attention probabilities; the backward is written out by hand and yields only the gradient
/// of the block input (no weight gradients, no per-op gradient accumulation in the graph).
struct FrozenAttention {
    wqkv: Tensor,
    wo: Tensor,
    heads: Heads,
    scale: f32,
    dropout: Option<Dropout>,
    saved: AttentionSaved,
}

impl InputGradient for FrozenAttention {
    const NAME: &'static str = "frozen-attention";

    fn input_gradient(&self, arg: &Tensor, grad: &Tensor) -> CResult<Tensor> {
        let hs = self.heads;
        let AttentionSaved { q, k, v, probs } = &self.saved;
        let g = grad.reshape((hs.b * hs.s, hs.h * hs.dh))?.contiguous()?;
        let dctx = matmul_2d(&g, &self.wo)?.apply_op1_no_bwd(&Relayout {
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
        let dqkv = dq.apply_op3_no_bwd(
            &dk.contiguous()?,
            &dv.contiguous()?,
            &MergeQkv { heads: hs },
        )?;
        matmul_2d(&dqkv, &self.wqkv)?.reshape(arg.shape())
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
    let frozen = [w.q, w.k, w.v, w.o].iter().all(|(w, b)| frozen_f32(w, b));
    if frozen && backend.fuses(&[h]) {
        let seed = dropout.map(|(p, rng)| (p, rng.next_u64()));
        return Ok(frozen_attention(h, w, mask, heads, scale, seed)?);
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
    let project = |(wt, bt): (&Tensor, &Tensor)| -> Result<Tensor> {
        let t = linear(backend, h, wt, Some(bt))?;
        Ok(t.reshape((b, s, heads, dh))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let (q, k, v) = (project(w.q)?, project(w.k)?, project(w.v)?);
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
    linear(backend, &ctx, w.o.0, Some(w.o.1))
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
    let hs = Heads {
        b,
        s,
        h: heads,
        dh: d / heads,
    };
    let (wqkv, bqkv) = match w.qkv {
        Some((wt, bt)) => (wt.clone(), bt.clone()),
        None => (
            Tensor::cat(&[w.q.0, w.k.0, w.v.0], 0)?,
            Tensor::cat(&[w.q.1, w.k.1, w.v.1], 0)?,
        ),
    };
    let x = h.detach().reshape((b * s, d))?;
    let qkv = affine_2d(&x, &wqkv, &bqkv)?.contiguous()?;
    let part = |p| qkv.apply_op1_no_bwd(&SplitPart { heads: hs, part: p });
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    let scale32 = scale as f32;
    let probs = bmm(&q, &k, false, true)?.apply_op2_no_bwd(
        &mask.contiguous()?,
        &AttentionSoftmax {
            scale: scale32,
            heads_q: heads * s,
        },
    )?;
    let drop = dropout
        .filter(|(p, _)| *p > 0.0)
        .map(|(p, seed)| Dropout::new(p, seed));
    let probs_d = match &drop {
        Some(op) => probs.apply_op1_no_bwd(op)?,
        None => probs.clone(),
    };
    let ctx = bmm(&probs_d, &v, false, false)?.apply_op1_no_bwd(&Relayout {
        heads: hs,
        to_split: false,
    })?;
    let out = affine_2d(&ctx, w.o.0, w.o.1)?.reshape((b, s, d))?;
    let backward = FrozenAttention {
        wqkv,
        wo: w.o.0.clone(),
        heads: hs,
        scale: scale32,
        dropout: drop,
        saved: AttentionSaved { q, k, v, probs },
    };
    attach(h, out, backward)
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
            q: (&w[0], &bias[0]),
            k: (&w[1], &bias[1]),
            v: (&w[2], &bias[2]),
            o: (&w[3], &bias[3]),
            qkv: None,
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
            &|t| crate::kernels::ffn::frozen_ffn(&t[0], (&w1, &b1), (&w_out, &bias[3])).unwrap(),
            &|t| ffn_ref(&t[0]),
            1e-5,
        );
    }
}
