//! Differentiable building blocks composed from candle primitives.
//!
//! candle's fused `layer_norm`/`softmax_last_dim` have no backward pass (gradients are silently
//! dropped), so the encoder uses these compositions, which autograd differentiates exactly. They are
//! also the reference that any future fused kernel is tested against.

use crate::error::Result;
use crate::rng::Rng;
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

thread_local! {
    static FAST: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Chooses the fast fused ops (default) or the composed reference path for model code run on the
/// calling thread; the reference path is what the fast ops are tested against, and what runs on
/// non-CPU devices and non-f32 dtypes.
pub fn use_fast_ops(on: bool) {
    FAST.with(|f| f.set(on));
}

/// Whether the calling thread uses the fast ops (see [`use_fast_ops`]).
pub fn fast_ops() -> bool {
    FAST.with(std::cell::Cell::get)
}

/// `x · wᵀ + b` over the last dimension, for inputs of any rank.
///
/// When the weights are frozen (not tracked by autograd) but the input is, the product is computed
/// outside the graph and attached through [`FrozenLinearGrad`], whose backward yields only the
/// input gradient: candle's matmul backward would also compute (and keep) a gradient for the frozen
/// weight, a third more FLOPs and memory for nothing.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let last = dims.len() - 1;
    let rows: usize = dims[..last].iter().product();
    let x2 = x.reshape((rows, dims[last]))?;
    let frozen = !w.track_op() && !b.is_some_and(Tensor::track_op);
    let y = if frozen && fast_ops() && x2.track_op() && x2.device().is_cpu() {
        let out = linear_2d(&x2.detach(), w, b)?;
        x2.apply_op1(FrozenLinearGrad {
            w: w.clone(),
            out: std::sync::Mutex::new(Some(out)),
        })?
    } else {
        linear_2d(&x2, w, b)?
    };
    let mut out_dims = dims;
    out_dims[last] = w.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

fn linear_2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// Graph node of a linear layer with frozen weights: forward hands over the precomputed product,
/// backward returns `grad · w` for the input and nothing for the weights.
pub struct FrozenLinearGrad {
    w: Tensor,
    // Taken on the forward call so the graph does not keep a second copy of the output alive.
    out: std::sync::Mutex<Option<Tensor>>,
}

impl candle_core::CustomOp1 for FrozenLinearGrad {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        _s: &candle_core::CpuStorage,
        _l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        crate::fused::hand_over(&self.out, "frozen-linear")
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // The input is 2-D ([`linear_2d`] flattens), so the product takes the fused kernels.
        Ok(Some(crate::fused::matmul_2d(grad_res, &self.w)?))
    }
}

/// LayerNorm over the last dimension with learned scale and shift (fused when [`fast_ops`]).
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if fast_ops() && [x, gamma, beta].iter().all(|t| crate::fused::supported(t)) {
        return Ok(crate::fused::layer_norm(x, gamma, beta, eps)?);
    }
    layer_norm_reference(x, gamma, beta, eps)
}

/// Exact (erf) GELU (fused when [`fast_ops`]).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fast_ops() && crate::fused::supported(x) {
        return Ok(crate::fused::gelu(x)?);
    }
    Ok(x.gelu_erf()?)
}

/// Attention probabilities softmax(scale · scores + mask) for [batch, heads, q, k] scores and an
/// additive [batch, k] mask (fused when [`fast_ops`]).
pub fn attention_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    if fast_ops() && crate::fused::supported(scores) && crate::fused::supported(mask) {
        return Ok(crate::fused::attention_softmax(scores, mask, scale)?);
    }
    let (b, _, _, k) = scores.dims4()?;
    softmax_last_dim(&(scores * scale)?.broadcast_add(&mask.reshape((b, 1, 1, k))?)?)
}

/// LayerNorm composed from candle primitives: the reference for the fused kernel.
pub fn layer_norm_reference(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xn.broadcast_mul(gamma)?.broadcast_add(beta)?)
}

/// Softmax over the last dimension; the max is detached because its gradient contributions cancel.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Mean cross-entropy of `logits` [batch, classes] against class indices.
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let (b, c) = logits.dims2()?;
    let mut onehot = vec![0f32; b * c];
    for (i, &l) in labels.iter().enumerate() {
        onehot[i * c + l as usize] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (b, c), logits.device())?.to_dtype(logits.dtype())?;
    let lp = log_softmax_last_dim(logits)?;
    Ok((lp.mul(&onehot)?.sum_all()? * (-1.0 / b as f64))?)
}

/// Mean squared error of `pred` [batch, 1] against targets.
pub fn mse(pred: &Tensor, targets: &[f32]) -> Result<Tensor> {
    let t = Tensor::from_vec(targets.to_vec(), (targets.len(), 1), pred.device())?
        .to_dtype(pred.dtype())?;
    Ok(pred.sub(&t)?.sqr()?.mean_all()?)
}

/// Inverted dropout with a seeded mask; identity when `p` is 0.
pub fn dropout(x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if fast_ops() && crate::fused::supported(x) {
        return Ok(crate::fused::dropout(x, p, rng.next_u64())?);
    }
    let n = x.elem_count();
    let scale = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..n)
        .map(|_| if rng.uniform() < p { 0.0 } else { scale })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(x.mul(&mask)?)
}

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
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Gelu => gelu(x)?,
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

/// Converts a 1-D or N-D tensor to a flat `Vec<f32>`.
pub fn to_vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn softmax_rows_sum_to_one_and_ce_matches_closed_form() {
        let x = Tensor::new(&[[1f32, 2., 3.], [0., 0., 0.]], &Device::Cpu).unwrap();
        let s = softmax_last_dim(&x)
            .unwrap()
            .sum(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-6));
        let ce = cross_entropy(&x, &[2, 0])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let l0 = -(3f32.exp() / (1f32.exp() + 2f32.exp() + 3f32.exp())).ln();
        let l1 = 3f32.ln();
        assert!((ce - (l0 + l1) / 2.0).abs() < 1e-5);
    }

    #[test]
    fn layer_norm_gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0.3f64, -1.2, 2.0, 0.7], [1.0, 0.5, -0.5, 0.1]], &dev).unwrap();
        let g = Var::new(&[1.1f64, 0.9, 1.3, 0.7], &dev).unwrap();
        let b = Var::new(&[0.1f64, -0.2, 0.0, 0.3], &dev).unwrap();
        let w = Tensor::new(&[[0.5f64, -1.0, 2.0, 1.5], [1.0, 1.0, -0.3, 0.2]], &dev).unwrap();
        let f = |g: &Tensor| -> f64 {
            let y = layer_norm(&x, g, b.as_tensor(), 1e-12).unwrap();
            y.mul(&w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let y = layer_norm(&x, g.as_tensor(), b.as_tensor(), 1e-12).unwrap();
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
