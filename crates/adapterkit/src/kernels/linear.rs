//! Linear layers `x · Wᵀ + b`: with frozen weights, the product runs outside the autograd graph and
//! joins it through a node whose backward yields only the input gradient; the reference is candle's
//! matmul, whose backward also computes (and keeps) a gradient for the weight.

use super::matmul::matmul_2d;
use super::{attach, Backend, CResult, InputGradient};
use crate::error::Result;
use candle_core::Tensor;

/// `x · wᵀ + b` over the last dimension, for inputs of any rank.
///
/// With the fused backend, frozen weights (not tracked by autograd) and a tracked input, the input
/// gradient is all the graph computes: a third fewer FLOPs and no weight-gradient memory.
pub fn linear(backend: Backend, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let last = dims.len() - 1;
    let rows: usize = dims[..last].iter().product();
    let x2 = x.reshape((rows, dims[last]))?;
    let frozen = !w.track_op() && !b.is_some_and(Tensor::track_op);
    let y = if frozen && backend == Backend::Fused && x2.track_op() && x2.device().is_cpu() {
        let out = linear_reference(&x2.detach(), w, b)?;
        attach(&x2, out, FrozenLinear { w: w.clone() })?
    } else {
        linear_reference(&x2, w, b)?
    };
    let mut out_dims = dims;
    out_dims[last] = w.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

/// `x · wᵀ + b` for 2-D `x` through candle's matmul: the reference, differentiated by autograd.
pub fn linear_reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// A frozen linear layer's backward: `grad · w` for the input, nothing for the weights.
struct FrozenLinear {
    w: Tensor,
}

impl InputGradient for FrozenLinear {
    const NAME: &'static str = "frozen-linear";

    fn input_gradient(&self, _input: &Tensor, grad: &Tensor) -> CResult<Tensor> {
        // The input is 2-D ([`linear`] flattens), so the product takes the fused kernels.
        matmul_2d(grad, &self.w)
    }
}

/// Whether a frozen linear layer's weights can feed the fused whole-block kernels: f32 and not
/// tracked by autograd.
pub(crate) fn frozen_f32(w: &Tensor, b: &Tensor) -> bool {
    !w.track_op() && !b.track_op() && w.dtype() == candle_core::DType::F32
}
