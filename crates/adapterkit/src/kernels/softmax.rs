//! The attention softmax (scale, additive mask, softmax in one pass) with its backward, and the
//! composed softmax reference.

use super::{
    activation::fast_exp, f32_slice, rows_per_task, wide, wide_fn, Backend, CResult, Wide,
};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Attention probabilities softmax(scale · scores + mask) for [batch, heads, q, k] scores and an
/// additive [batch, k] mask: fused, or composed.
pub fn attention_softmax(
    backend: Backend,
    scores: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if backend.fuses(&[scores, mask]) {
        return Ok(attention_softmax_fused(scores, mask, scale)?);
    }
    let (b, _, _, k) = scores.dims4()?;
    softmax_last_dim(&(scores * scale)?.broadcast_add(&mask.reshape((b, 1, 1, k))?)?)
}

/// Softmax over the last dimension; the max is detached because its gradient contributions cancel.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// softmax(scale · scores + mask) over the last dimension of [batch, heads, q, k] scores, with an
/// additive [batch, k] mask.
pub(crate) struct AttentionSoftmax {
    pub(crate) scale: f32,
    pub(crate) heads_q: usize,
}

impl CustomOp2 for AttentionSoftmax {
    fn name(&self) -> &'static str {
        "fused-attention-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let scores = f32_slice(s1, l1, "attention softmax")?;
        let mask = f32_slice(s2, l2, "attention softmax")?;
        let k = *l1.dims().last().unwrap_or(&1);
        let mut p = super::zeros(scores.len());
        let rows_task = rows_per_task(k);
        let chunk = rows_task * k;
        p.par_chunks_mut(chunk)
            .zip(scores.par_chunks(chunk))
            .enumerate()
            .for_each(|(t, (p, s))| {
                wide(SoftmaxRows {
                    p,
                    s,
                    mask,
                    k,
                    row0: t * rows_task,
                    heads_q: self.heads_q,
                    scale: self.scale,
                })
            });
        Ok((CpuStorage::F32(p), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _s: &Tensor,
        _m: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let ds =
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward { scale: self.scale })?;
        Ok((Some(ds), None))
    }
}

/// Softmax rows `row0..` of one parallel task (a [`Wide`] body, so it is compiled per width).
struct SoftmaxRows<'a> {
    p: &'a mut [f32],
    s: &'a [f32],
    mask: &'a [f32],
    k: usize,
    row0: usize,
    heads_q: usize,
    scale: f32,
}

impl Wide for SoftmaxRows<'_> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let k = self.k;
        for (r, (p, s)) in self
            .p
            .chunks_exact_mut(k)
            .zip(self.s.chunks_exact(k))
            .enumerate()
        {
            let b = (self.row0 + r) / self.heads_q;
            softmax_row(p, s, &self.mask[b * k..(b + 1) * k], self.scale);
        }
    }
}

wide_fn!(
    /// [`softmax_rows`] as a [`Wide`] body.
    pub(crate) HeadSoftmaxRows<'a>((&'a mut [f32], &'a [f32], &'a [f32], f32)) -> () = softmax_rows
);

wide_fn!(
    /// [`softmax_backward_rows`] as a [`Wide`] body.
    pub(crate) SoftmaxBackwardRows<'a>((&'a mut [f32], &'a [f32], &'a [f32], usize, f32)) -> () = softmax_backward_rows
);

/// `p = softmax(scale · s + m)` for every row of `p` and `s` (the row length is `m`'s): one
/// sequence's head of attention scores, all rows under the same mask.
#[inline(always)]
pub(crate) fn softmax_rows((p, s, m, scale): (&mut [f32], &[f32], &[f32], f32)) {
    let k = m.len().max(1);
    for (p, s) in p.chunks_exact_mut(k).zip(s.chunks_exact(k)) {
        softmax_row(p, s, m, scale);
    }
}

/// Lanes of the row loops' partial maxima and sums: one AVX-512 register. Separate partials per
/// lane let the compiler vectorise the reductions (a single running sum is a serial chain it may
/// not reorder), which made this op a fifth of an inference step when it ran scalar.
const LANES: usize = 16;

/// `p = softmax(scale · s + m)` for one row.
#[inline(always)]
fn softmax_row(p: &mut [f32], s: &[f32], m: &[f32], scale: f32) {
    let k = p.len().min(s.len()).min(m.len());
    let (p, s, m) = (&mut p[..k], &s[..k], &m[..k]);
    let full = k - k % LANES;
    for ((p, &s), &m) in p.iter_mut().zip(s).zip(m) {
        *p = s * scale + m;
    }
    // A separate pass, and a compare-and-select rather than `f32::max`: fused into the loop above,
    // `max`'s NaN rule kept the compiler from vectorising either (it ran one float at a time).
    let mut mx = [f32::NEG_INFINITY; LANES];
    for pc in p[..full].chunks_exact(LANES) {
        for l in 0..LANES {
            mx[l] = if pc[l] > mx[l] { pc[l] } else { mx[l] };
        }
    }
    for &v in &p[full..] {
        mx[0] = if v > mx[0] { v } else { mx[0] };
    }
    let max = mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sums = [0f32; LANES];
    for pc in p[..full].chunks_exact_mut(LANES) {
        for l in 0..LANES {
            pc[l] = fast_exp(pc[l] - max);
            sums[l] += pc[l];
        }
    }
    for v in &mut p[full..] {
        *v = fast_exp(*v - max);
        sums[0] += *v;
    }
    let inv = 1.0 / sums.iter().sum::<f32>();
    p.iter_mut().for_each(|v| *v *= inv);
}

/// d(scores) = scale · P ⊙ (dP − Σ dP ⊙ P), row-wise.
pub(crate) struct SoftmaxBackward {
    pub(crate) scale: f32,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let p = f32_slice(s1, l1, "softmax backward")?;
        let dp = f32_slice(s2, l2, "softmax backward")?;
        let k = *l1.dims().last().unwrap_or(&1);
        let mut ds = super::zeros(p.len());
        let chunk = rows_per_task(k) * k;
        ds.par_chunks_mut(chunk)
            .zip(p.par_chunks(chunk).zip(dp.par_chunks(chunk)))
            .for_each(|(ds, (p, dp))| {
                wide(SoftmaxBackwardRows((ds, p, dp, k, self.scale)));
            });
        Ok((CpuStorage::F32(ds), l1.shape().clone()))
    }
}

/// `ds = scale · p ⊙ (dp − p · dp)` for each row of one parallel task.
#[inline(always)]
pub(crate) fn softmax_backward_rows(
    (ds, p, dp, k, scale): (&mut [f32], &[f32], &[f32], usize, f32),
) {
    for ((ds, p), dp) in ds
        .chunks_exact_mut(k)
        .zip(p.chunks_exact(k))
        .zip(dp.chunks_exact(k))
    {
        let dot = dot(p, dp);
        for i in 0..k {
            ds[i] = scale * p[i] * (dp[i] - dot);
        }
    }
}

/// `a · b` with per-lane partial sums (see [`LANES`]).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let k = a.len().min(b.len());
    let full = k - k % LANES;
    let mut sums = [0f32; LANES];
    for (ac, bc) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
    {
        for l in 0..LANES {
            sums[l] += ac[l] * bc[l];
        }
    }
    let tail: f32 = a[full..k].iter().zip(&b[full..k]).map(|(x, y)| x * y).sum();
    sums.iter().sum::<f32>() + tail
}

/// Attention probabilities softmax(scale · scores + mask) for [batch, heads, q, k] scores and an
/// additive [batch, k] mask; the gradient flows to the scores only.
fn attention_softmax_fused(scores: &Tensor, mask: &Tensor, scale: f64) -> CResult<Tensor> {
    let (_, h, q, _) = scores.dims4()?;
    scores.contiguous()?.apply_op2(
        &mask.contiguous()?,
        AttentionSoftmax {
            scale: scale as f32,
            heads_q: h * q,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::Device;

    #[test]
    fn attention_softmax_matches_reference() {
        let (b, h, q, k) = (3, 4, 19, 19);
        let scores = randn(&[b, h, q, k], 5, 4.0);
        // Row 0 full length, rows 1 and 2 padded.
        let mut m = vec![0f32; b * k];
        for j in 15..k {
            m[k + j] = -1e9;
        }
        for j in 5..k {
            m[2 * k + j] = -1e9;
        }
        let mask = Tensor::from_vec(m, (b, k), &Device::Cpu).unwrap();
        let scale = 0.125;
        let reference = |t: &[Tensor]| {
            softmax_last_dim(
                &(&t[0] * scale)
                    .unwrap()
                    .broadcast_add(&t[1].reshape((b, 1, 1, k)).unwrap())
                    .unwrap(),
            )
            .unwrap()
        };
        let fast = |t: &[Tensor]| attention_softmax_fused(&t[0], &t[1].detach(), scale).unwrap();
        compare(
            &[scores, mask.clone()],
            &fast,
            &|t| reference(&[t[0].clone(), t[1].detach()]),
            1e-5,
        );
        let p = attention_softmax_fused(&randn(&[b, h, q, k], 6, 1.0), &mask, scale).unwrap();
        let masked = p.narrow(0, 2, 1).unwrap().narrow(3, 5, k - 5).unwrap();
        assert_eq!(
            masked
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}
