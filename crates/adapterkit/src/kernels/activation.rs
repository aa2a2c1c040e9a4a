//! GELU and the adapter's other nonlinearities: fast element-wise math, fused GELU forward and
//! backward, per-element activation values and derivatives for the fused adapter.

use super::{f32_slice, simd, Backend, CResult, MIN_TASK_ELEMS};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// The nonlinearity inside a bottleneck adapter (AdapterHub's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// Exact (erf) GELU, as BERT's FFN and Houlsby's paper.
    Gelu,
    /// max(0, x).
    Relu,
    /// x · sigmoid(x) (AdapterHub's default, also called SiLU).
    Swish,
    /// Hyperbolic tangent.
    Tanh,
    /// The tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    #[serde(rename = "gelu_new")]
    GeluNew,
    /// Logistic sigmoid.
    Sigmoid,
    /// max(x, 0.01 x) (AdapterHub's `leakyrelu`).
    #[serde(rename = "leakyrelu")]
    LeakyRelu,
    /// The identity (`linear`).
    Linear,
}

impl Activation {
    /// Applies the nonlinearity.
    pub fn apply(self, backend: Backend, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Gelu => gelu(backend, x)?,
            Activation::Relu => x.relu()?,
            Activation::Swish => x.silu()?,
            Activation::Tanh => x.tanh()?,
            Activation::GeluNew => x.gelu()?,
            Activation::Sigmoid => (x.neg()?.exp()? + 1.0)?.recip()?,
            Activation::LeakyRelu => x.maximum(&(x * 0.01)?)?,
            Activation::Linear => x.clone(),
        })
    }

    /// Parses AdapterHub's `non_linearity` strings.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "gelu" | "gelu_python" => Some(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluNew),
            "relu" => Some(Activation::Relu),
            "swish" | "silu" => Some(Activation::Swish),
            "tanh" => Some(Activation::Tanh),
            "sigmoid" => Some(Activation::Sigmoid),
            "leakyrelu" | "leaky_relu" => Some(Activation::LeakyRelu),
            "linear" => Some(Activation::Linear),
            _ => None,
        }
    }

    /// The names [`Activation::parse`] accepts, for error messages.
    pub const NAMES: &'static str =
        "gelu, gelu_new (gelu_pytorch_tanh, gelu_fast), relu, swish (silu), tanh, sigmoid, leakyrelu, linear";

    /// The name AdapterHub writes in `non_linearity`.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu",
            Activation::Relu => "relu",
            Activation::Swish => "swish",
            Activation::Tanh => "tanh",
            Activation::GeluNew => "gelu_new",
            Activation::Sigmoid => "sigmoid",
            Activation::LeakyRelu => "leakyrelu",
            Activation::Linear => "linear",
        }
    }
}

/// Exact (erf) GELU: fused forward and backward, or candle's `gelu_erf`.
pub fn gelu(backend: Backend, x: &Tensor) -> Result<Tensor> {
    if backend.fuses(&[x]) {
        return Ok(gelu_fused(x)?);
    }
    Ok(x.gelu_erf()?)
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
    // t = n + 1.5·2²³ exactly, n = round(x·log₂e) ∈ [−126, 127]; its low bits hold n.
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2ⁿ from t's bits, not from `n as i32`: the saturating float-to-int conversion compiled
    // to a scalar convert, compare and select per lane, a third of the attention softmax.
    let biased = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    let y = e * f32::from_bits(biased << 23);
    // Masked attention scores (-1e9) must give exactly 0, as the reference does.
    if x_in < -87.0 {
        0.0
    } else {
        y
    }
}

// erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7); returns (erf(z), exp(-z²)).
#[inline(always)]
pub(crate) fn erf_and_gauss(z: f32) -> (f32, f32) {
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let g = fast_exp(-a * a);
    let e = 1.0 - poly * g;
    (if z < 0.0 { -e } else { e }, g)
}

pub(crate) const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
// 1/sqrt(2π)
pub(crate) const INV_SQRT_2PI: f32 = 0.398_942_3;

pub(crate) struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "gelu")?;
        let mut y = super::zeros(x.len());
        y.par_chunks_mut(MIN_TASK_ELEMS)
            .zip(x.par_chunks(MIN_TASK_ELEMS))
            .for_each(|(y, x)| {
                super::wide(GeluRows((y, x)));
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?,
        ))
    }
}

pub(crate) struct GeluBackward;

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
        let mut dx = super::zeros(x.len());
        dx.par_chunks_mut(MIN_TASK_ELEMS)
            .zip(
                x.par_chunks(MIN_TASK_ELEMS)
                    .zip(g.par_chunks(MIN_TASK_ELEMS)),
            )
            .for_each(|(dx, (x, g))| {
                super::wide(GeluBackwardRows((dx, x, g)));
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

super::wide_fn!(
    /// [`gelu_rows`] as a [`super::Wide`] body.
    GeluRows<'a>((&'a mut [f32], &'a [f32])) -> () = gelu_rows
);

super::wide_fn!(
    /// [`gelu_backward_rows`] as a [`super::Wide`] body.
    GeluBackwardRows<'a>((&'a mut [f32], &'a [f32], &'a [f32])) -> () = gelu_backward_rows
);

/// `y = gelu(x)` over one parallel task's elements.
#[inline(always)]
fn gelu_rows((y, x): (&mut [f32], &[f32])) {
    for (y, &x) in y.iter_mut().zip(x) {
        let (e, _) = erf_and_gauss(x * FRAC_1_SQRT_2);
        *y = 0.5 * x * (1.0 + e);
    }
}

/// `dx = g · gelu'(x)` over one parallel task's elements.
#[inline(always)]
fn gelu_backward_rows((dx, x, g): (&mut [f32], &[f32], &[f32])) {
    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        let (e, gauss) = erf_and_gauss(x * FRAC_1_SQRT_2);
        *dx = g * (0.5 * (1.0 + e) + x * INV_SQRT_2PI * gauss);
    }
}

/// Exact (erf) GELU, fused forward and backward.
fn gelu_fused(x: &Tensor) -> CResult<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

#[inline(always)]
pub(crate) fn act_fwd(act: Activation, z: f32) -> f32 {
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
pub(crate) fn act_grad(act: Activation, z: f32) -> f32 {
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
pub(crate) fn activate(act: Activation, z: &[f32]) -> Vec<f32> {
    fn run(z: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
        let mut out = super::zeros(z.len());
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
pub(crate) fn scale_by_act_grad(act: Activation, g: &mut [f32], z: &[f32]) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;

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
    fn gelu_matches_reference() {
        let x = randn(&[37, 129], 1, 3.0);
        compare(
            &[x],
            &|t| gelu_fused(&t[0]).unwrap(),
            &|t| t[0].gelu_erf().unwrap(),
            1e-5,
        );
    }
}
