//! LayerNorm over the last dimension: the fused forward and backward, and the composed reference.

use super::dropout::Dropout;
use super::{f32_slice, rows_per_task, wide, wide_fn, Backend, CResult};
use crate::error::Result;
use crate::rng::Rng;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// LayerNorm over the last dimension with learned scale and shift: fused, or composed.
pub fn layer_norm(
    backend: Backend,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    if backend.fuses(&[x, gamma, beta]) {
        return Ok(layer_norm_fused(x, gamma, beta, eps)?);
    }
    layer_norm_reference(x, gamma, beta, eps)
}

/// LayerNorm composed from candle primitives: the reference for the fused kernel.
pub fn layer_norm_reference(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xn.broadcast_mul(gamma)?.broadcast_add(beta)?)
}

/// A sub-layer's exit, `LN(dropout(sub) + input)`, dropout drawn from the generator where one is
/// given: fused, or composed. The fused node keeps neither the dropped-out `sub` nor the sum, two
/// [rows, d] tensors per site and layer that the composed ops keep for the backward; its backward
/// recomputes both (the mask is a function of its seed).
pub fn residual_layer_norm(
    backend: Backend,
    sub: &Tensor,
    input: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    eps: f64,
    dropout: Option<(f64, &mut Rng)>,
) -> Result<Tensor> {
    if backend.fuses(&[sub, input, gamma, beta]) && sub.dims() == input.dims() {
        let mask = match dropout {
            Some((p, rng)) if p > 0.0 => Some(Dropout::new(p, rng.next_u64())),
            _ => None,
        };
        return Ok(residual_layer_norm_fused(
            sub, input, gamma, beta, eps, mask,
        )?);
    }
    let sub = match dropout {
        Some((p, rng)) => super::dropout(backend, sub, p, rng)?,
        None => sub.clone(),
    };
    layer_norm(backend, &sub.add(input)?, gamma, beta, eps)
}

/// [`residual_layer_norm`]'s fused node on [rows, d] inputs; γ and β come stacked as [2, d].
struct ResidualNorm {
    eps: f32,
    dropout: Option<Dropout>,
}

impl ResidualNorm {
    /// `x = dropout(sub) + input` for the elements `base..` of a chunk.
    fn sum_into(&self, x: &mut [f32], sub: &[f32], input: &[f32], base: usize) {
        match &self.dropout {
            Some(m) => {
                m.apply_block(x, sub, base);
                for (x, i) in x.iter_mut().zip(input) {
                    *x += i;
                }
            }
            None => {
                for ((x, s), i) in x.iter_mut().zip(sub).zip(input) {
                    *x = s + i;
                }
            }
        }
    }
}

impl CustomOp3 for ResidualNorm {
    fn name(&self) -> &'static str {
        "fused-residual-layer-norm"
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
        let sub = f32_slice(s1, l1, "residual layer norm")?;
        let input = f32_slice(s2, l2, "residual layer norm")?;
        let (gamma, beta) = f32_slice(s3, l3, "residual layer norm")?.split_at(l3.dims()[1]);
        let d = gamma.len();
        let mut y = super::zeros(sub.len());
        let chunk = rows_per_task(d) * d;
        y.par_chunks_mut(chunk)
            .zip(sub.par_chunks(chunk).zip(input.par_chunks(chunk)))
            .enumerate()
            .for_each(|(c, (y, (sub, input)))| {
                let mut x = vec![0f32; y.len()];
                self.sum_into(&mut x, sub, input, c * chunk);
                wide(NormRows((y, &x[..], gamma, beta, self.eps)));
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        sub: &Tensor,
        input: &Tensor,
        gb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let rows = sub.dim(0)?;
        let backward = ResidualNormBackward {
            norm: ResidualNorm {
                eps: self.eps,
                dropout: self.dropout,
            },
            gamma: gb.get(0)?.to_vec1::<f32>()?,
        };
        let all = sub.apply_op3_no_bwd(input, &grad.contiguous()?, &backward)?;
        let dsub = all.narrow(0, 0, rows)?;
        let dinput = all.narrow(0, rows, rows)?;
        let dgb = all.narrow(0, 2 * rows, 2)?;
        Ok((Some(dsub), Some(dinput), Some(dgb)))
    }
}

/// The backward of [`ResidualNorm`] from (sub, input, d output): rows 0..n d(sub), rows n..2n
/// d(input), row 2n dγ, row 2n + 1 dβ.
struct ResidualNormBackward {
    norm: ResidualNorm,
    gamma: Vec<f32>,
}

impl CustomOp3 for ResidualNormBackward {
    fn name(&self) -> &'static str {
        "fused-residual-layer-norm-backward"
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
        let sub = f32_slice(s1, l1, "residual layer norm backward")?;
        let input = f32_slice(s2, l2, "residual layer norm backward")?;
        let dy = f32_slice(s3, l3, "residual layer norm backward")?;
        let gamma = &self.gamma[..];
        let d = gamma.len();
        let rows = sub.len() / d;
        let mut out = vec![0f32; (2 * rows + 2) * d];
        let (dsub, rest) = out.split_at_mut(rows * d);
        let (dinput, tail) = rest.split_at_mut(rows * d);
        let chunk = rows_per_task(d) * d;
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dsub
            .par_chunks_mut(chunk)
            .zip(dinput.par_chunks_mut(chunk))
            .zip(sub.par_chunks(chunk).zip(input.par_chunks(chunk)))
            .zip(dy.par_chunks(chunk))
            .enumerate()
            .map(|(c, (((dsub, dx), (sub, input)), dy))| {
                let mut x = vec![0f32; dx.len()];
                self.norm.sum_into(&mut x, sub, input, c * chunk);
                let partial = wide(NormBackwardRows((
                    &mut *dx,
                    &x[..],
                    dy,
                    gamma,
                    self.norm.eps,
                )));
                // d(sub) is d(sum) through the same mask.
                match &self.norm.dropout {
                    Some(m) => m.apply_block(dsub, dx, c * chunk),
                    None => dsub.copy_from_slice(dx),
                }
                partial
            })
            .collect();
        sum_partials(tail, partials);
        Ok((CpuStorage::F32(out), Shape::from((2 * rows + 2, d))))
    }
}

/// [`residual_layer_norm`]'s fused path: inputs of any shape [.., d].
fn residual_layer_norm_fused(
    sub: &Tensor,
    input: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    dropout: Option<Dropout>,
) -> CResult<Tensor> {
    let dims = sub.dims().to_vec();
    let d = *dims.last().unwrap_or(&1);
    let gb = Tensor::stack(&[gamma, beta], 0)?.contiguous()?;
    let y = sub.reshape(((), d))?.contiguous()?.apply_op3(
        &input.reshape(((), d))?.contiguous()?,
        &gb,
        ResidualNorm {
            eps: eps as f32,
            dropout,
        },
    )?;
    y.reshape(dims)
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
        let mut y = super::zeros(x.len());
        let chunk = rows_per_task(d) * d;
        y.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(y, x)| {
                wide(NormRows((y, x, gamma, beta, self.eps)));
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

/// Mean and 1/σ of a row. The sums keep one partial per vector lane: a single running sum is a
/// serial chain of adds the compiler may not reorder, which kept LayerNorm scalar.
#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = lane_sum(x, |v| v) / d;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Σ f(x_i) with one partial sum per vector lane.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let full = x.len() - x.len() % LANES;
    let mut acc = [0f32; LANES];
    for c in x[..full].chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] += f(c[l]);
        }
    }
    acc.iter().sum::<f32>() + x[full..].iter().map(|&v| f(v)).sum::<f32>()
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
            .map(|(dx, (x, dy))| wide(NormBackwardRows((dx, x, dy, gamma, self.eps))))
            .collect();
        sum_partials(tail, partials);
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, d))))
    }
}

/// The parallel tasks' partial dγ and dβ added, in task order, into `tail` ([dγ | dβ]).
fn sum_partials(tail: &mut [f32], partials: Vec<(Vec<f32>, Vec<f32>)>) {
    let (dgamma, dbeta) = tail.split_at_mut(tail.len() / 2);
    for (dg, db) in partials {
        for i in 0..dgamma.len() {
            dgamma[i] += dg[i];
            dbeta[i] += db[i];
        }
    }
}

wide_fn!(
    /// [`norm_rows`] as a [`Wide`] body.
    NormRows<'a>((&'a mut [f32], &'a [f32], &'a [f32], &'a [f32], f32)) -> () = norm_rows
);

wide_fn!(
    /// [`norm_backward_rows`] as a [`Wide`] body.
    NormBackwardRows<'a>((&'a mut [f32], &'a [f32], &'a [f32], &'a [f32], f32)) -> (Vec<f32>, Vec<f32>) = norm_backward_rows
);

/// `y = (x − mean) / σ · γ + β` for each row of one parallel task.
#[inline(always)]
fn norm_rows((y, x, gamma, beta, eps): (&mut [f32], &[f32], &[f32], &[f32], f32)) {
    let d = gamma.len().min(beta.len());
    for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let (mean, rstd) = moments(x, eps);
        for i in 0..d {
            y[i] = (x[i] - mean) * rstd * gamma[i] + beta[i];
        }
    }
}

/// The input gradient of each row of one parallel task into `dx`; returns the task's partial
/// sums of the γ and β gradients.
#[inline(always)]
fn norm_backward_rows(
    (dx, x, dy, gamma, eps): (&mut [f32], &[f32], &[f32], &[f32], f32),
) -> (Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    let mut dg = vec![0f32; d];
    let mut db = vec![0f32; d];
    let mut xhat = vec![0f32; d];
    for ((dx, x), dy) in dx
        .chunks_exact_mut(d)
        .zip(x.chunks_exact(d))
        .zip(dy.chunks_exact(d))
    {
        let (mean, rstd) = moments(x, eps);
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
}

/// LayerNorm over the last dimension, fused forward and backward (gradients for x, γ and β).
fn layer_norm_fused(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> CResult<Tensor> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::{Device, Var};

    #[test]
    fn layer_norm_matches_reference() {
        let x = randn(&[3, 41, 96], 2, 2.0).affine(1.0, 0.5).unwrap();
        let g = randn(&[96], 3, 0.3).affine(1.0, 1.0).unwrap();
        let b = randn(&[96], 4, 0.3);
        compare(
            &[x, g, b],
            &|t| layer_norm_fused(&t[0], &t[1], &t[2], 1e-12).unwrap(),
            &|t| layer_norm_reference(&t[0], &t[1], &t[2], 1e-12).unwrap(),
            1e-5,
        );
    }

    #[test]
    fn residual_layer_norm_matches_dropout_add_and_layer_norm_with_all_four_gradients() {
        // 4 × 100 rows of 96 span three parallel chunks, so the mask's offsets are exercised.
        let inputs = [
            randn(&[4, 100, 96], 2, 2.0),
            randn(&[4, 100, 96], 5, 1.0).affine(1.0, 0.5).unwrap(),
            randn(&[96], 3, 0.3).affine(1.0, 1.0).unwrap(),
            randn(&[96], 4, 0.3),
        ];
        for p in [None, Some(0.3)] {
            let seed = 77;
            compare(
                &inputs,
                &|t| {
                    let mask = p.map(|p| Dropout::new(p, seed));
                    residual_layer_norm_fused(&t[0], &t[1], &t[2], &t[3], 1e-12, mask).unwrap()
                },
                &|t| {
                    let sub = match p {
                        Some(p) => super::super::dropout::dropout_fused(&t[0], p, seed).unwrap(),
                        None => t[0].clone(),
                    };
                    let x = sub.add(&t[1]).unwrap();
                    layer_norm_reference(&x, &t[2], &t[3], 1e-12).unwrap()
                },
                1e-5,
            );
        }
    }

    #[test]
    fn layer_norm_gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0.3f64, -1.2, 2.0, 0.7], [1.0, 0.5, -0.5, 0.1]], &dev).unwrap();
        let g = Var::new(&[1.1f64, 0.9, 1.3, 0.7], &dev).unwrap();
        let b = Var::new(&[0.1f64, -0.2, 0.0, 0.3], &dev).unwrap();
        let w = Tensor::new(&[[0.5f64, -1.0, 2.0, 1.5], [1.0, 1.0, -0.3, 0.2]], &dev).unwrap();
        let f = |g: &Tensor| -> f64 {
            let y = layer_norm(Backend::Fused, &x, g, b.as_tensor(), 1e-12).unwrap();
            y.mul(&w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let y = layer_norm(Backend::Fused, &x, g.as_tensor(), b.as_tensor(), 1e-12).unwrap();
        let loss = y.mul(&w).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let gg = grads.get(g.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        let base = g.as_tensor().to_vec1::<f64>().unwrap();
        for i in 0..4 {
            let mut plus = base.clone();
            plus[i] += 1e-6;
            let mut minus = base.clone();
            minus[i] -= 1e-6;
            let fd = (f(&Tensor::new(plus.as_slice(), &dev).unwrap())
                - f(&Tensor::new(minus.as_slice(), &dev).unwrap()))
                / 2e-6;
            assert!((fd - gg[i]).abs() < 1e-6, "{i}: fd {fd} vs {}", gg[i]);
        }
    }
}
