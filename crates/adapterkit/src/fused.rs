//! Fused CPU kernels with hand-written backward passes: GELU, LayerNorm and the attention softmax.
//!
//! Each replaces a chain of candle primitives (each a full pass over memory, most single-threaded)
//! with one parallel pass forward and one backward. The composed versions in [`crate::ops`] stay as
//! the reference these are tested against, and as the path for other devices and dtypes.

use crate::ops::Activation;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

// Rows per parallel task is chosen so each task handles at least this many elements.
const MIN_TASK_ELEMS: usize = 16 * 1024;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        return Err(candle_core::Error::Msg(format!("{what}: expected f32")));
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: expected a contiguous tensor")))?;
    Ok(&v[a..b])
}

fn rows_per_task(d: usize) -> usize {
    MIN_TASK_ELEMS.div_ceil(d.max(1)).max(1)
}

/// Whether `t` can take the fused path.
pub fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// e^x without a libm call, so loops over it vectorise: range reduction x = n·ln2 + r, Cephes'
/// degree-6 polynomial for e^r, 2^n through the exponent bits. Relative error ≲ 2e-7 on
/// [-87, 88]; inputs below underflow to 0, above saturate.
#[inline(always)]
pub fn fast_exp(x_in: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer with plain float arithmetic.
    const ROUND: f32 = 12_582_912.0;
    let x = x_in.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let y = e * f32::from_bits(((n as i32 + 127) << 23) as u32);
    // Masked attention scores (-1e9) must give exactly 0, as the reference does.
    if x_in < -87.0 {
        0.0
    } else {
        y
    }
}

// erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7); returns (erf(z), exp(-z²)).
/// Runs `f` compiled for AVX2 + FMA when the CPU has them: the element-wise loops inside are then
/// vectorised 8 wide with fused multiply-adds instead of the 4-wide SSE2 of the baseline target.
#[inline(always)]
fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { wide(f) };
        }
    }
    f()
}

#[inline(always)]
fn erf_and_gauss(z: f32) -> (f32, f32) {
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let g = fast_exp(-a * a);
    let e = 1.0 - poly * g;
    (if z < 0.0 { -e } else { e }, g)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
// 1/sqrt(2π)
const INV_SQRT_2PI: f32 = 0.398_942_3;

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "gelu")?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(MIN_TASK_ELEMS)
            .zip(x.par_chunks(MIN_TASK_ELEMS))
            .for_each(|(y, x)| {
                simd(|| {
                    for (y, &x) in y.iter_mut().zip(x) {
                        let (e, _) = erf_and_gauss(x * FRAC_1_SQRT_2);
                        *y = 0.5 * x * (1.0 + e);
                    }
                })
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?,
        ))
    }
}

struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "fused-gelu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "gelu backward")?;
        let g = f32_slice(s2, l2, "gelu backward")?;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(MIN_TASK_ELEMS)
            .zip(
                x.par_chunks(MIN_TASK_ELEMS)
                    .zip(g.par_chunks(MIN_TASK_ELEMS)),
            )
            .for_each(|(dx, (x, g))| {
                simd(|| {
                    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                        let (e, gauss) = erf_and_gauss(x * FRAC_1_SQRT_2);
                        *dx = g * (0.5 * (1.0 + e) + x * INV_SQRT_2PI * gauss);
                    }
                })
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Exact (erf) GELU, fused forward and backward.
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let x = f32_slice(s1, l1, "layer norm")?;
        let gamma = f32_slice(s2, l2, "layer norm")?;
        let beta = f32_slice(s3, l3, "layer norm")?;
        let d = gamma.len();
        let mut y = vec![0f32; x.len()];
        let chunk = rows_per_task(d) * d;
        y.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(y, x)| {
                simd(|| {
                    for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                        let (mean, rstd) = moments(x, self.eps);
                        for i in 0..d {
                            y[i] = (x[i] - mean) * rstd * gamma[i] + beta[i];
                        }
                    }
                })
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let rows = x.dim(0)?;
        let all = x.apply_op3_no_bwd(
            gamma,
            &grad.contiguous()?,
            &LayerNormBackward { eps: self.eps },
        )?;
        let dx = all.narrow(0, 0, rows)?;
        let dgamma = all.narrow(0, rows, 1)?.squeeze(0)?;
        let dbeta = all.narrow(0, rows + 1, 1)?.squeeze(0)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = x.iter().sum::<f32>() / d;
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Output rows 0..n: dx; row n: dgamma; row n+1: dbeta.
struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "fused-layer-norm-backward"
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
        let x = f32_slice(s1, l1, "layer norm backward")?;
        let gamma = f32_slice(s2, l2, "layer norm backward")?;
        let dy = f32_slice(s3, l3, "layer norm backward")?;
        let d = gamma.len();
        let rows = x.len() / d;
        let mut out = vec![0f32; (rows + 2) * d];
        let (dx, tail) = out.split_at_mut(rows * d);
        let chunk = rows_per_task(d) * d;
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
            .map(|(dx, (x, dy))| {
                simd(|| {
                    let mut dg = vec![0f32; d];
                    let mut db = vec![0f32; d];
                    let mut xhat = vec![0f32; d];
                    for ((dx, x), dy) in dx
                        .chunks_exact_mut(d)
                        .zip(x.chunks_exact(d))
                        .zip(dy.chunks_exact(d))
                    {
                        let (mean, rstd) = moments(x, self.eps);
                        let (mut s1, mut s2) = (0f32, 0f32);
                        for i in 0..d {
                            xhat[i] = (x[i] - mean) * rstd;
                            let g = dy[i] * gamma[i];
                            s1 += g;
                            s2 += g * xhat[i];
                            dg[i] += dy[i] * xhat[i];
                            db[i] += dy[i];
                        }
                        let (m1, m2) = (s1 / d as f32, s2 / d as f32);
                        for i in 0..d {
                            dx[i] = rstd * (dy[i] * gamma[i] - m1 - xhat[i] * m2);
                        }
                    }
                    (dg, db)
                })
            })
            .collect();
        let (dgamma, dbeta) = tail.split_at_mut(d);
        for (dg, db) in partials {
            for i in 0..d {
                dgamma[i] += dg[i];
                dbeta[i] += db[i];
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, d))))
    }
}

/// LayerNorm over the last dimension, fused forward and backward (gradients for x, γ and β).
pub fn layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let d = *dims.last().unwrap_or(&1);
    let x2 = x.reshape(((), d))?.contiguous()?;
    let y = x2.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )?;
    y.reshape(dims)
}

/// softmax(scale · scores + mask) over the last dimension of [batch, heads, q, k] scores, with an
/// additive [batch, k] mask.
struct AttentionSoftmax {
    scale: f32,
    heads_q: usize,
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
        let mut p = vec![0f32; scores.len()];
        let rows_task = rows_per_task(k);
        let chunk = rows_task * k;
        p.par_chunks_mut(chunk)
            .zip(scores.par_chunks(chunk))
            .enumerate()
            .for_each(|(t, (p, s))| {
                simd(|| {
                    for (r, (p, s)) in p.chunks_exact_mut(k).zip(s.chunks_exact(k)).enumerate() {
                        let row = t * rows_task + r;
                        let b = row / self.heads_q;
                        let m = &mask[b * k..(b + 1) * k];
                        let mut max = f32::NEG_INFINITY;
                        for i in 0..k {
                            p[i] = s[i] * self.scale + m[i];
                            max = max.max(p[i]);
                        }
                        let mut sum = 0f32;
                        for v in p.iter_mut() {
                            *v = fast_exp(*v - max);
                            sum += *v;
                        }
                        let inv = 1.0 / sum;
                        p.iter_mut().for_each(|v| *v *= inv);
                    }
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

/// d(scores) = scale · P ⊙ (dP − Σ dP ⊙ P), row-wise.
struct SoftmaxBackward {
    scale: f32,
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
        let mut ds = vec![0f32; p.len()];
        let chunk = rows_per_task(k) * k;
        ds.par_chunks_mut(chunk)
            .zip(p.par_chunks(chunk).zip(dp.par_chunks(chunk)))
            .for_each(|(ds, (p, dp))| {
                simd(|| {
                    for ((ds, p), dp) in ds
                        .chunks_exact_mut(k)
                        .zip(p.chunks_exact(k))
                        .zip(dp.chunks_exact(k))
                    {
                        let dot: f32 = p.iter().zip(dp).map(|(a, b)| a * b).sum();
                        for i in 0..k {
                            ds[i] = self.scale * p[i] * (dp[i] - dot);
                        }
                    }
                })
            });
        Ok((CpuStorage::F32(ds), l1.shape().clone()))
    }
}

/// Attention probabilities softmax(scale · scores + mask) for [batch, heads, q, k] scores and an
/// additive [batch, k] mask; the gradient flows to the scores only.
pub fn attention_softmax(
    scores: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (_, h, q, _) = scores.dims4()?;
    scores.contiguous()?.apply_op2(
        &mask.contiguous()?,
        AttentionSoftmax {
            scale: scale as f32,
            heads_q: h * q,
        },
    )
}

/// Whether element `i` survives dropout with keep probability `keep` under `seed`: a counter-based
/// hash (SplitMix64 finaliser), so any thread can decide any element and backward can recompute the
/// mask instead of storing it.
#[inline]
fn keeps(seed: u64, i: usize, keep_threshold: u32) -> bool {
    let mut z = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 32) as u32) < keep_threshold
}

struct Dropout {
    seed: u64,
    keep_threshold: u32,
    scale: f32,
}

impl Dropout {
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(MIN_TASK_ELEMS)
            .zip(x.par_chunks(MIN_TASK_ELEMS))
            .enumerate()
            .for_each(|(c, (y, x))| {
                let base = c * MIN_TASK_ELEMS;
                for (j, (y, &x)) in y.iter_mut().zip(x).enumerate() {
                    if keeps(self.seed, base + j, self.keep_threshold) {
                        *y = x * self.scale;
                    }
                }
            });
        y
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "dropout")?;
        Ok((CpuStorage::F32(self.apply(x)), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let mask_again = Dropout {
            seed: self.seed,
            keep_threshold: self.keep_threshold,
            scale: self.scale,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&mask_again)?))
    }
}

/// Inverted dropout with drop probability `p`; the mask is a pure function of `seed` and the
/// element index, computed in parallel and recomputed (not stored) for the backward pass.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> candle_core::Result<Tensor> {
    let keep = 1.0 - p;
    let op = Dropout {
        seed,
        keep_threshold: (keep * 4_294_967_296.0).min(4_294_967_295.0) as u32,
        scale: (1.0 / keep) as f32,
    };
    x.contiguous()?.apply_op1(op)
}

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
        let mut dst = vec![0f32; src.len()];
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
        let mut dst = vec![0f32; src.len()];
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

fn take_out(out: &std::sync::Mutex<Option<Tensor>>, what: &str) -> CResult<Tensor> {
    out.lock()
        .map_err(|_| candle_core::Error::Msg(format!("{what}: poisoned lock")))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: forward ran twice")))?
        .contiguous()
}

/// The forward of a graph node whose output was computed outside the graph: hands the stored
/// output over as the node's storage (taken, so the graph does not keep a second copy).
pub(crate) fn hand_over(
    out: &std::sync::Mutex<Option<Tensor>>,
    what: &str,
) -> CResult<(CpuStorage, Shape)> {
    let out = take_out(out, what)?;
    let shape = out.shape().clone();
    let (storage, layout) = out.storage_and_layout();
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: output not contiguous")))?;
    match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => {
            Ok((CpuStorage::F32(v[a..b].to_vec()), shape))
        }
        candle_core::Storage::Cpu(CpuStorage::F64(v)) => {
            Ok((CpuStorage::F64(v[a..b].to_vec()), shape))
        }
        _ => Err(candle_core::Error::Msg(format!(
            "{what}: only f32/f64 on CPU"
        ))),
    }
}

/// `x · Wᵀ + b` for [rows, k] inputs and frozen W [n, k]: the bias is the product's starting value
/// (no separate broadcast pass), and few-row inputs take the packing-free path of [`gemm_into`].
fn affine_2d(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if [x, w, b].iter().all(|t| supported(t)) {
        return x.apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &Affine);
    }
    x.matmul(&w.t()?)?.broadcast_add(b)
}

/// `g · w` for [rows, k] and [k, n] operands, without autograd, through [`gemm_into`] (so an input
/// gradient through a frozen weight gets the same kernels as the forward products); candle's
/// matmul for other devices and dtypes.
pub fn matmul_2d(g: &Tensor, w: &Tensor) -> CResult<Tensor> {
    if supported(g) && supported(w) && g.rank() == 2 && w.rank() == 2 {
        return g
            .contiguous()?
            .apply_op2_no_bwd(&w.contiguous()?, &PlainProduct);
    }
    g.matmul(w)
}

/// The forward-only product of [`matmul_2d`].
struct PlainProduct;

impl CustomOp2 for PlainProduct {
    fn name(&self) -> &'static str {
        "plain-product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let a = f32_slice(s1, l1, self.name())?;
        let b = f32_slice(s2, l2, self.name())?;
        let ((m, k), (k2, n)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        if k != k2 {
            return Err(candle_core::Error::Msg(format!(
                "plain product: [{m}, {k}] · [{k2}, {n}] do not fit"
            )));
        }
        let mut out = vec![0f32; m * n];
        gemm_into(
            &mut out,
            m,
            n,
            k,
            (a, k as isize, 1),
            (b, n as isize, 1),
            false,
            true,
        );
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// The forward-only product of [`affine_2d`].
struct Affine;

impl CustomOp3 for Affine {
    fn name(&self) -> &'static str {
        "affine"
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
        let x = f32_slice(s1, l1, "affine")?;
        let w = f32_slice(s2, l2, "affine")?;
        let b = f32_slice(s3, l3, "affine")?;
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 || b.len() != n {
            return Err(candle_core::Error::Msg(format!(
                "affine: shapes {:?}, {:?}, {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )));
        }
        let mut out = vec![0f32; m * n];
        out.par_chunks_mut(n.max(1))
            .for_each(|r| r.copy_from_slice(b));
        gemm_into(
            &mut out,
            m,
            n,
            k,
            (x, k as isize, 1),
            (w, 1, k as isize),
            true,
            true,
        );
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// Batched product of small matrices `op(a[i]) · op(b[i])` for [batch, rows, cols] operands, with
/// the batch spread over threads and each product single-threaded: candle parallelises inside each
/// small product instead, and synchronising threads 192 times per call left attention products at
/// about a third of the machine's GEMM rate (measured: 65–90 vs 233 GFLOP/s).
struct BatchedMatmul {
    trans_a: bool,
    trans_b: bool,
}

impl CustomOp2 for BatchedMatmul {
    fn name(&self) -> &'static str {
        "batched-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let a = f32_slice(s1, l1, "batched matmul")?;
        let b = f32_slice(s2, l2, "batched matmul")?;
        let (da, db) = (l1.dims(), l2.dims());
        let rank = da.len();
        if rank < 3 || db.len() != rank {
            return Err(candle_core::Error::Msg(
                "batched matmul: expected [.., rows, cols] operands".into(),
            ));
        }
        let batch: usize = da[..rank - 2].iter().product();
        let (ar, ac) = (da[rank - 2], da[rank - 1]);
        let (br, bc) = (db[rank - 2], db[rank - 1]);
        let (m, k) = if self.trans_a { (ac, ar) } else { (ar, ac) };
        let (k2, n) = if self.trans_b { (bc, br) } else { (br, bc) };
        if k != k2 || db[..rank - 2].iter().product::<usize>() != batch {
            return Err(candle_core::Error::Msg(format!(
                "batched matmul: shapes {da:?} and {db:?} do not fit"
            )));
        }
        // Row-major strides of op(x): (row stride, column stride).
        let (a_rs, a_cs) = if self.trans_a {
            (1, ac as isize)
        } else {
            (ac as isize, 1)
        };
        let (b_rs, b_cs) = if self.trans_b {
            (1, bc as isize)
        } else {
            (bc as isize, 1)
        };
        let mut out = vec![0f32; batch * m * n];
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, dst)| {
            let lhs = &a[i * ar * ac..(i + 1) * ar * ac];
            let rhs = &b[i * br * bc..(i + 1) * br * bc];
            let (lhs, rhs) = ((lhs, a_rs, a_cs), (rhs, b_rs, b_cs));
            if !crate::gemm512::gemm(dst, m, n, k, lhs, rhs, false, false) {
                gemm_crate_into(dst, m, n, k, lhs, rhs, false, false);
            }
        });
        let mut shape = da.to_vec();
        shape[rank - 2] = m;
        shape[rank - 1] = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dc: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = match (self.trans_a, self.trans_b) {
            (false, false) => (bmm(dc, b, false, true)?, bmm(a, dc, true, false)?),
            (false, true) => (bmm(dc, b, false, false)?, bmm(dc, a, true, false)?),
            (true, false) => (bmm(b, dc, false, true)?, bmm(a, dc, false, false)?),
            (true, true) => (bmm(b, dc, true, true)?, bmm(dc, a, true, true)?),
        };
        Ok((Some(da), Some(db)))
    }
}

/// `op(a) · op(b)` over the leading (batch) dimensions, without autograd.
fn bmm(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> candle_core::Result<Tensor> {
    a.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &BatchedMatmul { trans_a, trans_b })
}

/// `op(a) · op(b)` over the leading (batch) dimensions of [.., rows, cols] operands, batch-parallel,
/// with gradients for both operands.
pub fn batched_matmul(
    a: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
) -> candle_core::Result<Tensor> {
    a.contiguous()?
        .apply_op2(&b.contiguous()?, BatchedMatmul { trans_a, trans_b })
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
        let mut dst = vec![0f32; src.len() / 3];
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
        let mut dst = vec![0f32; b * s * 3 * d];
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
    out: std::sync::Mutex<Option<Tensor>>,
}

impl CustomOp1 for FrozenAttention {
    fn name(&self) -> &'static str {
        "frozen-attention"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> CResult<(CpuStorage, Shape)> {
        hand_over(&self.out, self.name())
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
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
        Ok(Some(matmul_2d(&dqkv, &self.wqkv)?.reshape(arg.shape())?))
    }
}

/// Self-attention of `h [b, s, d]` with frozen weights, additive [b, s] mask and optional attention
/// dropout `(p, seed)`; returns the output projection [b, s, d] (before the block's own dropout).
pub fn frozen_attention(
    h: &Tensor,
    w: &AttentionWeights<'_>,
    mask: &Tensor,
    heads: usize,
    scale: f64,
    dropout: Option<(f64, u64)>,
) -> candle_core::Result<Tensor> {
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
    let drop = dropout.filter(|(p, _)| *p > 0.0).map(|(p, seed)| {
        let keep = 1.0 - p;
        Dropout {
            seed,
            keep_threshold: (keep * 4_294_967_296.0).min(4_294_967_295.0) as u32,
            scale: (1.0 / keep) as f32,
        }
    });
    let probs_d = match &drop {
        Some(op) => probs.apply_op1_no_bwd(op)?,
        None => probs.clone(),
    };
    let ctx = bmm(&probs_d, &v, false, false)?.apply_op1_no_bwd(&Relayout {
        heads: hs,
        to_split: false,
    })?;
    let out = affine_2d(&ctx, w.o.0, w.o.1)?.reshape((b, s, d))?;
    if !h.track_op() {
        return Ok(out);
    }
    h.apply_op1(FrozenAttention {
        wqkv,
        wo: w.o.0.clone(),
        heads: hs,
        scale: scale32,
        dropout: drop,
        saved: AttentionSaved { q, k, v, probs },
        out: std::sync::Mutex::new(Some(out)),
    })
}

/// The feed-forward block `W2 · gelu(W1 · x + b1) + b2` with frozen weights as one graph node,
/// keeping only the pre-activation for its hand-written backward (input gradient only).
struct FrozenFfn {
    w1: Tensor,
    w2: Tensor,
    pre: Tensor,
    out: std::sync::Mutex<Option<Tensor>>,
}

impl CustomOp1 for FrozenFfn {
    fn name(&self) -> &'static str {
        "frozen-ffn"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> CResult<(CpuStorage, Shape)> {
        hand_over(&self.out, self.name())
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let rows = self.pre.dim(0)?;
        let g = grad.reshape((rows, ()))?.contiguous()?;
        let dact = matmul_2d(&g, &self.w2)?;
        let dpre = self.pre.apply_op2_no_bwd(&dact, &GeluBackward)?;
        Ok(Some(matmul_2d(&dpre, &self.w1)?.reshape(arg.shape())?))
    }
}

/// `W2 · gelu(W1 · x + b1) + b2` over the last dimension of `x`, for frozen weights.
pub fn frozen_ffn(
    x: &Tensor,
    w1: (&Tensor, &Tensor),
    w2: (&Tensor, &Tensor),
) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let d = *dims.last().unwrap_or(&1);
    let x2 = x.detach().reshape(((), d))?;
    let pre = affine_2d(&x2, w1.0, w1.1)?.contiguous()?;
    let act = pre.apply_op1_no_bwd(&Gelu)?;
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = w2.0.dim(0)?;
    }
    let out = affine_2d(&act, w2.0, w2.1)?.reshape(out_dims)?;
    if !x.track_op() {
        return Ok(out);
    }
    x.apply_op1(FrozenFfn {
        w1: w1.0.clone(),
        w2: w2.0.clone(),
        pre,
        out: std::sync::Mutex::new(Some(out)),
    })
}

/// Rows at or below which `x · Wᵀ` skips `gemm`, whose packing of W costs more than the product
/// when few rows use it (measured on MiniLM shapes with 2 threads: faster up to 32 rows, slower
/// from 48; the timing test `time_skinny_vs_gemm` is `#[ignore]`d, run it with `--ignored`).
const SKINNY_ROWS: usize = 32;

/// Output columns (rows of W) per parallel task of the skinny product.
const SKINNY_COLS_PER_TASK: usize = 48;

/// Computes `R` input rows against two weight rows of equal length k: `out[i] = [x_i·w0, x_i·w1]`.
/// Per chunk of k, R + 2 loads feed 2R multiply-adds into 2R independent partial sums, so the loop
/// is bound by the FMA units rather than by loads or by add latency.
trait Tiler: Copy + Sync {
    fn tile<const R: usize>(self, x: [&[f32]; R], w0: &[f32], w1: &[f32]) -> [[f32; 2]; R];
}

/// Portable tiles (what the compiler makes of plain loops for the baseline target).
#[derive(Clone, Copy)]
struct Portable;

impl Tiler for Portable {
    fn tile<const R: usize>(self, x: [&[f32]; R], w0: &[f32], w1: &[f32]) -> [[f32; 2]; R] {
        let mut out = [[0f32; 2]; R];
        for (o, xi) in out.iter_mut().zip(x) {
            let (mut s0, mut s1) = (0f32, 0f32);
            for ((&a, &b), &c) in xi.iter().zip(w0).zip(w1) {
                s0 += a * b;
                s1 += a * c;
            }
            *o = [s0, s1];
        }
        out
    }
}

/// AVX2 + FMA tiles; only constructed after the CPU was checked for both.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx2(());

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    fn detect() -> Option<Self> {
        (std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"))
            .then_some(Avx2(()))
    }
}

#[cfg(target_arch = "x86_64")]
impl Tiler for Avx2 {
    fn tile<const R: usize>(self, x: [&[f32]; R], w0: &[f32], w1: &[f32]) -> [[f32; 2]; R] {
        // SAFETY: an `Avx2` value exists only when the CPU has AVX2 and FMA (see `detect`).
        unsafe { tile_avx2(x, w0, w1) }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize>(x: [&[f32]; R], w0: &[f32], w1: &[f32]) -> [[f32; 2]; R] {
    use std::arch::x86_64::*;
    let k = w0.len().min(w1.len());
    assert!(x.iter().all(|xi| xi.len() >= k));
    let full = k - k % 8;
    let mut a0 = [_mm256_setzero_ps(); R];
    let mut a1 = [_mm256_setzero_ps(); R];
    let mut o = 0;
    while o < full {
        // SAFETY: o + 8 <= full <= k, and every operand holds at least k elements (asserted).
        let (wa, wb) = (
            _mm256_loadu_ps(w0.as_ptr().add(o)),
            _mm256_loadu_ps(w1.as_ptr().add(o)),
        );
        for i in 0..R {
            let xi = _mm256_loadu_ps(x[i].as_ptr().add(o));
            a0[i] = _mm256_fmadd_ps(xi, wa, a0[i]);
            a1[i] = _mm256_fmadd_ps(xi, wb, a1[i]);
        }
        o += 8;
    }
    let hsum = |v: __m256| {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        lanes.iter().sum::<f32>()
    };
    let mut out = [[0f32; 2]; R];
    for i in 0..R {
        let (mut s0, mut s1) = (hsum(a0[i]), hsum(a1[i]));
        for t in full..k {
            s0 += x[i][t] * w0[t];
            s1 += x[i][t] * w1[t];
        }
        out[i] = [s0, s1];
    }
    out
}

/// `out[j][i] = x_i · w_j` for `rows` weight rows starting every `ws` elements of `w` (the first k
/// of each are used) and all m rows of `x`.
#[allow(clippy::too_many_arguments)]
fn skinny_block<T: Tiler>(
    t: T,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    ws: usize,
    rows: usize,
    out: &mut [f32],
) {
    let xr = |i: usize| &x[i * k..(i + 1) * k];
    let mut j = 0;
    while j < rows {
        // Two weight rows at a time; an odd last row is paired with itself.
        let j1 = if j + 1 < rows { j + 1 } else { j };
        let (w0, w1) = (&w[j * ws..j * ws + k], &w[j1 * ws..j1 * ws + k]);
        let mut put = |i: usize, v: [f32; 2]| {
            out[j * m + i] = v[0];
            if j1 != j {
                out[j1 * m + i] = v[1];
            }
        };
        let mut i = 0;
        while i + 4 <= m {
            let r = t.tile([xr(i), xr(i + 1), xr(i + 2), xr(i + 3)], w0, w1);
            for (d, v) in r.into_iter().enumerate() {
                put(i + d, v);
            }
            i += 4;
        }
        match m - i {
            3 => {
                let r = t.tile([xr(i), xr(i + 1), xr(i + 2)], w0, w1);
                for (d, v) in r.into_iter().enumerate() {
                    put(i + d, v);
                }
            }
            2 => {
                let r = t.tile([xr(i), xr(i + 1)], w0, w1);
                for (d, v) in r.into_iter().enumerate() {
                    put(i + d, v);
                }
            }
            1 => put(i, t.tile([xr(i)], w0, w1)[0]),
            _ => {}
        }
        j = j1 + 1;
    }
}

/// `dst (m×n) = [dst +] x (m×k, row-major) · Wᵀ` for W with n rows of k used elements every `ws`
/// elements (row-major, possibly padded), without packing.
#[allow(clippy::too_many_arguments)]
fn skinny_xwt(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    (w, ws): (&[f32], usize),
    accumulate: bool,
    parallel: bool,
) {
    #[cfg(target_arch = "x86_64")]
    let avx2 = Avx2::detect();
    let block = |first: usize, rows: usize, out: &mut [f32]| {
        let w = &w[first * ws..];
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = avx2 {
            skinny_block(t, x, m, k, w, ws, rows, out);
            return;
        }
        skinny_block(Portable, x, m, k, w, ws, rows, out);
    };
    // Column-major partial results: task t owns columns t·C.. of every row.
    let mut cols = vec![0f32; n * m];
    let c = SKINNY_COLS_PER_TASK;
    if parallel && n > c {
        cols.par_chunks_mut(c * m)
            .enumerate()
            .for_each(|(t, out)| block(t * c, out.len() / m, out));
    } else {
        block(0, n, &mut cols);
    }
    for (i, row) in dst.chunks_exact_mut(n).take(m).enumerate() {
        for (j, d) in row.iter_mut().enumerate() {
            let v = cols[j * m + i];
            *d = if accumulate { *d + v } else { v };
        }
    }
}

/// Panics unless every element that m×k and k×n operands address through their strides lies
/// inside their slices and `dst` holds m·n: the products below rely on it for memory safety.
fn check_operands(
    dst_len: usize,
    m: usize,
    n: usize,
    k: usize,
    lhs: (&[f32], isize, isize),
    rhs: (&[f32], isize, isize),
) {
    let span = |rs: isize, cs: isize, r: usize, c: usize| {
        (r.max(1) - 1) as isize * rs + (c.max(1) - 1) as isize * cs + 1
    };
    assert!(dst_len >= m * n);
    assert!(lhs.0.len() as isize >= span(lhs.1, lhs.2, m, k));
    assert!(rhs.0.len() as isize >= span(rhs.1, rhs.2, k, n));
}

/// `dst (m×n, row-major) = [dst +] lhs · rhs`, operands given by pointer-free slices and (row
/// stride, column stride): the packing-free path for few rows, the AVX-512 kernel where the CPU
/// has it, `gemm` otherwise.
#[allow(clippy::too_many_arguments)]
fn gemm_into(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: (&[f32], isize, isize),
    rhs: (&[f32], isize, isize),
    accumulate: bool,
    parallel: bool,
) {
    check_operands(dst.len(), m, n, k, lhs, rhs);
    let ki = k as isize;
    if (1..=SKINNY_ROWS).contains(&m)
        && k > 0
        && n > 0
        && lhs.1 == ki
        && lhs.2 == 1
        && rhs.1 == 1
        && rhs.2 >= ki
    {
        skinny_xwt(
            dst,
            m,
            n,
            k,
            lhs.0,
            (rhs.0, rhs.2 as usize),
            accumulate,
            parallel,
        );
        return;
    }
    if crate::gemm512::gemm(dst, m, n, k, lhs, rhs, accumulate, parallel) {
        return;
    }
    gemm_crate_into(dst, m, n, k, lhs, rhs, accumulate, parallel);
}

/// [`gemm_into`]'s product through the `gemm` crate (its AVX2 kernels), for CPUs without AVX-512
/// and as the yardstick of the AVX-512 kernel's timing test.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_crate_into(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: (&[f32], isize, isize),
    rhs: (&[f32], isize, isize),
    accumulate: bool,
    parallel: bool,
) {
    check_operands(dst.len(), m, n, k, lhs, rhs);
    let par = if parallel {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above check that every element addressed through the given strides for
    // m×k, k×n and m×n operands lies inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2,
            lhs.1,
            rhs.0.as_ptr(),
            rhs.2,
            rhs.1,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[inline(always)]
fn act_fwd(act: Activation, z: f32) -> f32 {
    match act {
        Activation::Gelu => 0.5 * z * (1.0 + erf_and_gauss(z * FRAC_1_SQRT_2).0),
        Activation::Relu => z.max(0.0),
        Activation::Swish => z / (1.0 + fast_exp(-z)),
        Activation::Tanh => z.tanh(),
        Activation::GeluNew => {
            let u = GELU_NEW_C * (z + 0.044715 * z * z * z);
            0.5 * z * (1.0 + u.tanh())
        }
        Activation::Sigmoid => 1.0 / (1.0 + fast_exp(-z)),
        Activation::LeakyRelu => {
            if z > 0.0 {
                z
            } else {
                0.01 * z
            }
        }
        Activation::Linear => z,
    }
}

/// sqrt(2 / pi), the constant of the tanh approximation of GELU.
const GELU_NEW_C: f32 = 0.797_884_6;

#[inline(always)]
fn act_grad(act: Activation, z: f32) -> f32 {
    match act {
        Activation::Gelu => {
            let (e, gauss) = erf_and_gauss(z * FRAC_1_SQRT_2);
            0.5 * (1.0 + e) + z * INV_SQRT_2PI * gauss
        }
        Activation::Relu => {
            if z > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Swish => {
            let sig = 1.0 / (1.0 + fast_exp(-z));
            sig * (1.0 + z * (1.0 - sig))
        }
        Activation::Tanh => 1.0 - z.tanh() * z.tanh(),
        Activation::GeluNew => {
            let u = GELU_NEW_C * (z + 0.044715 * z * z * z);
            let t = u.tanh();
            0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * GELU_NEW_C * (1.0 + 3.0 * 0.044715 * z * z)
        }
        Activation::Sigmoid => {
            let sig = 1.0 / (1.0 + fast_exp(-z));
            sig * (1.0 - sig)
        }
        Activation::LeakyRelu => {
            if z > 0.0 {
                1.0
            } else {
                0.01
            }
        }
        Activation::Linear => 1.0,
    }
}

/// f(z) element-wise, in parallel chunks; the match on the activation sits outside the inner loop
/// so each arm vectorises.
fn activate(act: Activation, z: &[f32]) -> Vec<f32> {
    fn run(z: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
        let mut out = vec![0f32; z.len()];
        out.par_chunks_mut(MIN_TASK_ELEMS)
            .zip(z.par_chunks(MIN_TASK_ELEMS))
            .for_each(|(o, z)| simd(|| o.iter_mut().zip(z).for_each(|(o, &z)| *o = f(z))));
        out
    }
    match act {
        Activation::Gelu => run(z, |v| act_fwd(Activation::Gelu, v)),
        Activation::Relu => run(z, |v| act_fwd(Activation::Relu, v)),
        Activation::Swish => run(z, |v| act_fwd(Activation::Swish, v)),
        Activation::Tanh => run(z, |v| act_fwd(Activation::Tanh, v)),
        Activation::GeluNew => run(z, |v| act_fwd(Activation::GeluNew, v)),
        Activation::Sigmoid => run(z, |v| act_fwd(Activation::Sigmoid, v)),
        Activation::LeakyRelu => run(z, |v| act_fwd(Activation::LeakyRelu, v)),
        Activation::Linear => run(z, |v| act_fwd(Activation::Linear, v)),
    }
}

/// g ← g ⊙ f'(z), in parallel chunks (see [`activate`]).
fn scale_by_act_grad(act: Activation, g: &mut [f32], z: &[f32]) {
    fn run(g: &mut [f32], z: &[f32], f: impl Fn(f32) -> f32 + Sync) {
        g.par_chunks_mut(MIN_TASK_ELEMS)
            .zip(z.par_chunks(MIN_TASK_ELEMS))
            .for_each(|(g, z)| simd(|| g.iter_mut().zip(z).for_each(|(g, &z)| *g *= f(z))));
    }
    match act {
        Activation::Gelu => run(g, z, |v| act_grad(Activation::Gelu, v)),
        Activation::Relu => run(g, z, |v| act_grad(Activation::Relu, v)),
        Activation::Swish => run(g, z, |v| act_grad(Activation::Swish, v)),
        Activation::Tanh => run(g, z, |v| act_grad(Activation::Tanh, v)),
        Activation::GeluNew => run(g, z, |v| act_grad(Activation::GeluNew, v)),
        Activation::Sigmoid => run(g, z, |v| act_grad(Activation::Sigmoid, v)),
        Activation::LeakyRelu => run(g, z, |v| act_grad(Activation::LeakyRelu, v)),
        Activation::Linear => run(g, z, |v| act_grad(Activation::Linear, v)),
    }
}

fn column_sums(x: &[f32], cols: usize) -> Vec<f32> {
    x.par_chunks(rows_per_task(cols) * cols)
        .map(|chunk| {
            let mut acc = vec![0f32; cols];
            for row in chunk.chunks_exact(cols) {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .reduce(
            || vec![0f32; cols],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// A whole bottleneck adapter `x + W_up · f(W_down · x + b_down) + b_up` as one graph node over
/// `x [rows, d]`, `down = [W_down | b_down] [m, d+1]` and `up = [W_up | b_up] [d, m+1]`.
struct Adapter {
    act: Activation,
    pre: std::sync::Mutex<Option<Vec<f32>>>,
}

impl CustomOp3 for Adapter {
    fn name(&self) -> &'static str {
        "fused-adapter"
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
        let x = f32_slice(s1, l1, "adapter")?;
        let down = f32_slice(s2, l2, "adapter")?;
        let up = f32_slice(s3, l3, "adapter")?;
        let (rows, d) = l1.shape().dims2()?;
        let m = l2.dims()[0];
        // z = x · W_downᵀ + b_down
        let mut z = vec![0f32; rows * m];
        let bias: Vec<f32> = (0..m).map(|j| down[j * (d + 1) + d]).collect();
        z.par_chunks_mut(m).for_each(|r| r.copy_from_slice(&bias));
        gemm_into(
            &mut z,
            rows,
            m,
            d,
            (x, d as isize, 1),
            (down, 1, (d + 1) as isize),
            true,
            true,
        );
        let a = activate(self.act, &z);
        // y = x + b_up + a · W_upᵀ
        let bias_up: Vec<f32> = (0..d).map(|j| up[j * (m + 1) + m]).collect();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
            for ((y, &x), &b) in y.iter_mut().zip(x).zip(&bias_up) {
                *y = x + b;
            }
        });
        gemm_into(
            &mut y,
            rows,
            d,
            m,
            (&a, m as isize, 1),
            (up, 1, (m + 1) as isize),
            true,
            true,
        );
        if let Ok(mut g) = self.pre.lock() {
            *g = Some(z);
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        down: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let z = self
            .pre
            .lock()
            .map_err(|_| candle_core::Error::Msg("adapter: poisoned lock".into()))?
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("adapter: backward before forward".into()))?;
        let (rows, d) = x.dims2()?;
        let m = down.dim(0)?;
        let op = AdapterBackward {
            act: self.act,
            z,
            rows,
            d,
            m,
        };
        let all = x.apply_op3_no_bwd(
            &grad.contiguous()?,
            &Tensor::cat(&[down.flatten_all()?, up.flatten_all()?], 0)?,
            &op,
        )?;
        let dx = all.narrow(0, 0, rows * d)?.reshape((rows, d))?;
        let ddown = all.narrow(0, rows * d, m * (d + 1))?.reshape((m, d + 1))?;
        let dup = all
            .narrow(0, rows * d + m * (d + 1), d * (m + 1))?
            .reshape((d, m + 1))?;
        Ok((Some(dx), Some(ddown), Some(dup)))
    }
}

/// Output, flattened: dx [rows·d], d(down) [m·(d+1)], d(up) [d·(m+1)].
struct AdapterBackward {
    act: Activation,
    z: Vec<f32>,
    rows: usize,
    d: usize,
    m: usize,
}

impl CustomOp3 for AdapterBackward {
    fn name(&self) -> &'static str {
        "fused-adapter-backward"
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
        let x = f32_slice(s1, l1, "adapter backward")?;
        let dy = f32_slice(s2, l2, "adapter backward")?;
        let packed = f32_slice(s3, l3, "adapter backward")?;
        let (rows, d, m) = (self.rows, self.d, self.m);
        let (down, up) = packed.split_at(m * (d + 1));
        let a = activate(self.act, &self.z);
        let mut out = vec![0f32; rows * d + m * (d + 1) + d * (m + 1)];
        let (dx, rest) = out.split_at_mut(rows * d);
        let (ddown, dup) = rest.split_at_mut(m * (d + 1));
        // d(up): dW_up = dyᵀ · a, db_up = Σ dy
        let mut dwu = vec![0f32; d * m];
        gemm_into(
            &mut dwu,
            d,
            m,
            rows,
            (dy, 1, d as isize),
            (&a, m as isize, 1),
            false,
            true,
        );
        let dbu = column_sums(dy, d);
        for j in 0..d {
            dup[j * (m + 1)..j * (m + 1) + m].copy_from_slice(&dwu[j * m..(j + 1) * m]);
            dup[j * (m + 1) + m] = dbu[j];
        }
        // dz = f'(z) ⊙ (dy · W_up)
        let mut dz = vec![0f32; rows * m];
        gemm_into(
            &mut dz,
            rows,
            m,
            d,
            (dy, d as isize, 1),
            (up, (m + 1) as isize, 1),
            false,
            true,
        );
        scale_by_act_grad(self.act, &mut dz, &self.z);
        // d(down): dW_down = dzᵀ · x, db_down = Σ dz
        let mut dwd = vec![0f32; m * d];
        gemm_into(
            &mut dwd,
            m,
            d,
            rows,
            (&dz, 1, m as isize),
            (x, d as isize, 1),
            false,
            true,
        );
        let dbd = column_sums(&dz, m);
        for i in 0..m {
            ddown[i * (d + 1)..i * (d + 1) + d].copy_from_slice(&dwd[i * d..(i + 1) * d]);
            ddown[i * (d + 1) + d] = dbd[i];
        }
        // dx = dy + dz · W_down
        dx.copy_from_slice(dy);
        gemm_into(
            dx,
            rows,
            d,
            m,
            (&dz, m as isize, 1),
            (down, (d + 1) as isize, 1),
            true,
            true,
        );
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

/// A bottleneck adapter over the last dimension of `x`, fused forward and backward (gradients for
/// the input and all four adapter tensors).
pub fn adapter(
    x: &Tensor,
    down: (&Tensor, &Tensor),
    up: (&Tensor, &Tensor),
    act: Activation,
) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let d = *dims.last().unwrap_or(&1);
    let x2 = x.reshape(((), d))?.contiguous()?;
    let down_p = Tensor::cat(&[down.0, &down.1.unsqueeze(1)?], 1)?;
    let up_p = Tensor::cat(&[up.0, &up.1.unsqueeze(1)?], 1)?;
    let y = x2.apply_op3(
        &down_p,
        &up_p,
        Adapter {
            act,
            pre: std::sync::Mutex::new(None),
        },
    )?;
    y.reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{layer_norm_reference, softmax_last_dim};
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64, scale: f64) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (rng.normal() * scale) as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Max |a-b| relative to max |b|.
    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let diff = a
            .sub(b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-12)
    }

    /// Values and gradients of `fast` and `reference` on the same inputs, via loss = Σ out ⊙ w.
    fn compare(
        inputs: &[Tensor],
        fast: &dyn Fn(&[Tensor]) -> Tensor,
        reference: &dyn Fn(&[Tensor]) -> Tensor,
        tol: f32,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let yf = fast(&ts);
        let yr = reference(&ts);
        assert!(rel(&yf, &yr) < tol, "values differ: {}", rel(&yf, &yr));
        let w = randn(yf.dims(), 99, 1.0);
        let gf = yf.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = yr.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, t) in ts.iter().enumerate() {
            match (gf.get(t), gr.get(t)) {
                (Some(a), Some(b)) => {
                    assert!(rel(a, b) < tol, "gradient {i} differs: {}", rel(a, b))
                }
                (None, None) => {}
                (a, b) => panic!(
                    "gradient {i}: fast {} vs reference {}",
                    a.is_some(),
                    b.is_some()
                ),
            }
        }
    }

    #[test]
    fn dropout_drops_the_right_share_and_backward_uses_the_same_mask() {
        let x = Var::from_tensor(
            &randn(&[200, 500], 7, 1.0)
                .abs()
                .unwrap()
                .affine(1.0, 0.1)
                .unwrap(),
        )
        .unwrap();
        let y = dropout(x.as_tensor(), 0.1, 1234).unwrap();
        let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dropped = yv.iter().filter(|&&v| v == 0.0).count() as f64 / yv.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped {dropped}");
        let again = dropout(x.as_tensor(), 0.1, 1234)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(yv, again);
        let other = dropout(x.as_tensor(), 0.1, 1235)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(yv, other);
        let g = y.sum_all().unwrap().backward().unwrap();
        let gv = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (gi, yi) in gv.iter().zip(&yv) {
            let want = if *yi == 0.0 { 0.0 } else { 1.0 / 0.9 };
            assert!((gi - want).abs() < 1e-6);
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            if x < -86.9 {
                x += 0.0137;
                continue;
            }
            let want = f64::from(x).exp();
            let got = f64::from(fast_exp(x));
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(fast_exp(-1e4), 0.0);
    }

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
            let p = attention_softmax(&q.matmul(&k.t().unwrap()).unwrap(), &mask, scale).unwrap();
            let p = dropout(&p, 0.25, seed).unwrap();
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
            let a = gelu(
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
            &|t| frozen_ffn(&t[0], (&w1, &b1), (&w_out, &bias[3])).unwrap(),
            &|t| ffn_ref(&t[0]),
            1e-5,
        );
    }

    #[test]
    fn batched_matmul_matches_candle_in_every_transpose_mode() {
        let a = randn(&[3, 2, 5, 7], 60, 1.0);
        let b = randn(&[3, 2, 7, 4], 61, 1.0);
        let at = a.transpose(2, 3).unwrap().contiguous().unwrap();
        let bt = b.transpose(2, 3).unwrap().contiguous().unwrap();
        let want = a.matmul(&b).unwrap();
        for (x, y, ta, tb) in [
            (&a, &b, false, false),
            (&at, &b, true, false),
            (&a, &bt, false, true),
            (&at, &bt, true, true),
        ] {
            let got = bmm(x, y, ta, tb).unwrap();
            assert!(rel(&got, &want) < 1e-6, "trans ({ta}, {tb})");
        }
        assert!(bmm(&a, &a, false, false).is_err());
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let x = if ta { at.clone() } else { a.clone() };
            let y = if tb { bt.clone() } else { b.clone() };
            let reference = |t: &[Tensor]| {
                let l = if ta {
                    t[0].transpose(2, 3).unwrap()
                } else {
                    t[0].clone()
                };
                let r = if tb {
                    t[1].transpose(2, 3).unwrap()
                } else {
                    t[1].clone()
                };
                l.matmul(&r).unwrap()
            };
            compare(
                &[x, y],
                &|t| batched_matmul(&t[0], &t[1], ta, tb).unwrap(),
                &reference,
                1e-5,
            );
        }
    }

    #[test]
    fn adapter_matches_composed_ops_for_every_activation() {
        let (rows, d, m) = (37, 24, 6);
        for act in [
            Activation::Gelu,
            Activation::Relu,
            Activation::Swish,
            Activation::Tanh,
            Activation::GeluNew,
            Activation::Sigmoid,
            Activation::LeakyRelu,
            Activation::Linear,
        ] {
            let inputs = [
                randn(&[rows, d], 70, 1.0),
                randn(&[m, d], 71, 0.3),
                randn(&[m], 72, 0.3),
                randn(&[d, m], 73, 0.3),
                randn(&[d], 74, 0.3),
            ];
            let composed = |t: &[Tensor]| {
                let z = t[0]
                    .matmul(&t[1].t().unwrap())
                    .unwrap()
                    .broadcast_add(&t[2])
                    .unwrap();
                let a = match act {
                    Activation::Gelu => z.gelu_erf().unwrap(),
                    Activation::Relu => z.relu().unwrap(),
                    Activation::Swish => z.silu().unwrap(),
                    Activation::Tanh => z.tanh().unwrap(),
                    other => other.apply(&z).unwrap(),
                };
                let up = a
                    .matmul(&t[3].t().unwrap())
                    .unwrap()
                    .broadcast_add(&t[4])
                    .unwrap();
                t[0].add(&up).unwrap()
            };
            compare(
                &inputs,
                &|t| adapter(&t[0], (&t[1], &t[2]), (&t[3], &t[4]), act).unwrap(),
                &composed,
                2e-5,
            );
        }
    }

    #[test]
    fn skinny_product_matches_gemm_and_the_affine_op_matches_matmul() {
        for &(m, n, k, pad) in &[
            (1, 7, 5, 0),
            (2, 100, 67, 1),
            (13, 1536, 384, 0),
            (16, 97, 33, 3),
            (17, 50, 40, 0),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let ws = k + pad;
            let w: Vec<f32> = (0..n * ws)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                .collect();
            let mut want = vec![0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] = (0..k)
                        .map(|t| x[i * k + t] as f64 * w[j * ws + t] as f64)
                        .sum::<f64>() as f32;
                }
            }
            for parallel in [false, true] {
                let mut got = vec![1f32; m * n];
                gemm_into(
                    &mut got,
                    m,
                    n,
                    k,
                    (&x, k as isize, 1),
                    (&w, 1, ws as isize),
                    true,
                    parallel,
                );
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - 1.0 - w).abs() < 1e-4,
                        "{m}x{n}x{k}: {g} vs {}",
                        w + 1.0
                    );
                }
            }
        }
        let x = randn(&[3, 40], 90, 1.0);
        let w = randn(&[24, 40], 91, 0.5);
        let b = randn(&[24], 92, 0.5);
        let got = affine_2d(&x, &w, &b).unwrap();
        let want = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(rel(&got, &want) < 1e-5);
    }

    #[test]
    fn gelu_matches_reference() {
        let x = randn(&[37, 129], 1, 3.0);
        compare(
            &[x],
            &|t| gelu(&t[0]).unwrap(),
            &|t| t[0].gelu_erf().unwrap(),
            1e-5,
        );
    }

    #[test]
    fn layer_norm_matches_reference() {
        let x = randn(&[3, 41, 96], 2, 2.0).affine(1.0, 0.5).unwrap();
        let g = randn(&[96], 3, 0.3).affine(1.0, 1.0).unwrap();
        let b = randn(&[96], 4, 0.3);
        compare(
            &[x, g, b],
            &|t| layer_norm(&t[0], &t[1], &t[2], 1e-12).unwrap(),
            &|t| layer_norm_reference(&t[0], &t[1], &t[2], 1e-12).unwrap(),
            1e-5,
        );
    }

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
        let fast = |t: &[Tensor]| attention_softmax(&t[0], &t[1].detach(), scale).unwrap();
        compare(
            &[scores, mask.clone()],
            &fast,
            &|t| reference(&[t[0].clone(), t[1].detach()]),
            1e-5,
        );
        let p = attention_softmax(&randn(&[b, h, q, k], 6, 1.0), &mask, scale).unwrap();
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
#[cfg(test)]
mod skinny_timing {
    use super::*;
    #[test]
    #[ignore]
    fn time_skinny_vs_gemm() {
        for m in [13usize, 24, 32, 48, 64] {
            let (n, k) = (1536usize, 384usize);
            let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32).collect();
            let mut dst = vec![0f32; m * n];
            for (name, skinny) in [("skinny", true), ("gemm", false)] {
                for par in [false, true] {
                    let t = std::time::Instant::now();
                    for _ in 0..200 {
                        if skinny {
                            skinny_xwt(&mut dst, m, n, k, &x, (&w, k), false, par);
                        } else {
                            let p = if par {
                                gemm::Parallelism::Rayon(2)
                            } else {
                                gemm::Parallelism::None
                            };
                            unsafe {
                                gemm::gemm(
                                    m,
                                    n,
                                    k,
                                    dst.as_mut_ptr(),
                                    1,
                                    n as isize,
                                    false,
                                    x.as_ptr(),
                                    1,
                                    k as isize,
                                    w.as_ptr(),
                                    k as isize,
                                    1,
                                    1.0,
                                    1.0,
                                    false,
                                    false,
                                    false,
                                    p,
                                );
                            }
                        }
                    }
                    let us = t.elapsed().as_secs_f64() / 200.0 * 1e6;
                    println!(
                        "m={m} {name} par={par}: {us:.1} us, {:.1} GFLOP/s",
                        2.0 * (m * n * k) as f64 / us / 1e3
                    );
                }
            }
        }
    }
}
