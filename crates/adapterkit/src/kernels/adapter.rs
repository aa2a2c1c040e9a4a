//! The bottleneck adapter `x + W_up · f(W_down · x + b_down) + b_up` as one fused graph node.

use super::activation::{activate, scale_by_act_grad, Activation};
use super::gemm::gemm_into;
use super::linear::linear;
use super::{column_sums, f32_slice, Backend, CResult};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The plain bottleneck adapter `x + W_up · f(W_down · x + b_down) + b_up` over the last dimension
/// of `x`, with `down = (W_down, b_down)` and `up = (W_up, b_up)`: fused forward and backward
/// (gradients for the input and all four adapter tensors), or composed.
pub fn adapter(
    backend: Backend,
    x: &Tensor,
    down: (&Tensor, &Tensor),
    up: (&Tensor, &Tensor),
    act: Activation,
) -> Result<Tensor> {
    if backend.fuses(&[x, down.0, down.1, up.0, up.1]) {
        return Ok(adapter_fused(x, down, up, act)?);
    }
    let z = act.apply(backend, &linear(backend, x, down.0, Some(down.1))?)?;
    Ok(x.add(&linear(backend, &z, up.0, Some(up.1))?)?)
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

/// The fused kernel of [`adapter`].
fn adapter_fused(
    x: &Tensor,
    down: (&Tensor, &Tensor),
    up: (&Tensor, &Tensor),
    act: Activation,
) -> CResult<Tensor> {
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
    use crate::kernels::testing::*;

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
                    other => other.apply(Backend::Reference, &z).unwrap(),
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
                &|t| adapter_fused(&t[0], (&t[1], &t[2]), (&t[3], &t[4]), act).unwrap(),
                &composed,
                2e-5,
            );
        }
    }
}
