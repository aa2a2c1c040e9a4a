//! The feed-forward block `W2 · gelu(W1 · x + b1) + b2`: with frozen weights one graph node
//! (input gradient only), else composed from linear layers and GELU.

use super::activation::{gelu, Gelu, GeluBackward};
use super::linear::{frozen_f32, linear};
use super::matmul::{affine_2d, matmul_2d};
use super::{attach, Backend, CResult, InputGradient};
use crate::error::Result;
use candle_core::Tensor;

/// `W2 · gelu(W1 · x + b1) + b2` over the last dimension of `x`, with `w1 = (W1, b1)` and
/// `w2 = (W2, b2)`.
pub fn ffn(
    backend: Backend,
    x: &Tensor,
    w1: (&Tensor, &Tensor),
    w2: (&Tensor, &Tensor),
) -> Result<Tensor> {
    if backend.fuses(&[x]) && frozen_f32(w1.0, w1.1) && frozen_f32(w2.0, w2.1) {
        return Ok(frozen_ffn(x, w1, w2)?);
    }
    let inter = gelu(backend, &linear(backend, x, w1.0, Some(w1.1))?)?;
    linear(backend, &inter, w2.0, Some(w2.1))
}

/// The backward of the fused block: it keeps only the pre-activation.
struct FrozenFfn {
    w1: Tensor,
    w2: Tensor,
    pre: Tensor,
}

impl InputGradient for FrozenFfn {
    const NAME: &'static str = "frozen-ffn";

    fn input_gradient(&self, arg: &Tensor, grad: &Tensor) -> CResult<Tensor> {
        let rows = self.pre.dim(0)?;
        let g = grad.reshape((rows, ()))?.contiguous()?;
        let dact = matmul_2d(&g, &self.w2)?;
        let dpre = self.pre.apply_op2_no_bwd(&dact, &GeluBackward)?;
        matmul_2d(&dpre, &self.w1)?.reshape(arg.shape())
    }
}

/// The fused block of [`ffn`] for frozen f32 weights.
pub(crate) fn frozen_ffn(
    x: &Tensor,
    w1: (&Tensor, &Tensor),
    w2: (&Tensor, &Tensor),
) -> CResult<Tensor> {
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
    let backward = FrozenFfn {
        w1: w1.0.clone(),
        w2: w2.0.clone(),
        pre,
    };
    attach(x, out, backward)
}
