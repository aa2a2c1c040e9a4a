//! The feed-forward block `W2 · gelu((W1 · x + b1) ⊙ s) + b2`: with frozen weights one graph node
//! (gradients of the input and of the optional per-channel scale `s`, (IA)³'s), else composed from
//! linear layers and GELU.

use super::activation::{gelu, Gelu, GeluBackward};
use super::linear::{frozen_f32, linear};
use super::matmul::{affine_2d, matmul_2d};
use super::{attach, attach2, Backend, CResult, InputGradient, InputGradients2};
use crate::error::Result;
use candle_core::Tensor;

/// `W2 · gelu((W1 · x + b1) ⊙ scale) + b2` over the last dimension of `x`, with `w1 = (W1, b1)`,
/// `w2 = (W2, b2)` and an optional per-channel `scale` of the intermediate activations (before the
/// GELU, as (IA)³ rescales `intermediate.dense`'s output).
pub fn ffn(
    backend: Backend,
    x: &Tensor,
    w1: (&Tensor, &Tensor),
    w2: (&Tensor, &Tensor),
    scale: Option<&Tensor>,
) -> Result<Tensor> {
    let scale_fuses = scale.is_none_or(|s| backend.fuses(&[s]));
    if backend.fuses(&[x]) && scale_fuses && frozen_f32(w1.0, w1.1) && frozen_f32(w2.0, w2.1) {
        return Ok(frozen_ffn(x, w1, w2, scale)?);
    }
    let pre = linear(backend, x, w1.0, Some(w1.1))?;
    let pre = match scale {
        Some(s) => pre.broadcast_mul(s)?,
        None => pre,
    };
    linear(backend, &gelu(backend, &pre)?, w2.0, Some(w2.1))
}

/// The backward of the fused block: it keeps only the (unscaled) pre-activation.
struct FrozenFfn {
    w1: Tensor,
    w2: Tensor,
    pre: Tensor,
    scale: Option<Tensor>,
}

impl FrozenFfn {
    /// d loss / d input, and d loss / d scale when there is one.
    fn gradients(&self, arg: &Tensor, grad: &Tensor) -> CResult<(Tensor, Option<Tensor>)> {
        let rows = self.pre.dim(0)?;
        let g = grad.reshape((rows, ()))?.contiguous()?;
        let dact = matmul_2d(&g, &self.w2)?;
        let (dpre, dscale) = match &self.scale {
            Some(s) => {
                let z = self.pre.broadcast_mul(s)?;
                let dz = z.apply_op2_no_bwd(&dact, &GeluBackward)?;
                let dscale = dz.mul(&self.pre)?.sum(0)?;
                (dz.broadcast_mul(s)?, Some(dscale))
            }
            None => (self.pre.apply_op2_no_bwd(&dact, &GeluBackward)?, None),
        };
        let dx = matmul_2d(&dpre.contiguous()?, &self.w1)?.reshape(arg.shape())?;
        Ok((dx, dscale))
    }
}

impl InputGradient for FrozenFfn {
    const NAME: &'static str = "frozen-ffn";

    fn input_gradient(&self, arg: &Tensor, grad: &Tensor) -> CResult<Tensor> {
        Ok(self.gradients(arg, grad)?.0)
    }
}

impl InputGradients2 for FrozenFfn {
    const NAME: &'static str = "frozen-ffn-scaled";

    fn input_gradients(&self, [x, _]: [&Tensor; 2], grad: &Tensor) -> CResult<[Option<Tensor>; 2]> {
        let (dx, dscale) = self.gradients(x, grad)?;
        Ok([Some(dx), dscale])
    }
}

/// The fused block of [`ffn`] for frozen f32 weights.
pub(crate) fn frozen_ffn(
    x: &Tensor,
    w1: (&Tensor, &Tensor),
    w2: (&Tensor, &Tensor),
    scale: Option<&Tensor>,
) -> CResult<Tensor> {
    let dims = x.dims().to_vec();
    let d = *dims.last().unwrap_or(&1);
    let x2 = x.detach().reshape(((), d))?;
    let pre = affine_2d(&x2, w1.0, w1.1)?.contiguous()?;
    let act = match scale {
        Some(s) => pre.broadcast_mul(&s.detach())?.apply_op1_no_bwd(&Gelu)?,
        None => pre.apply_op1_no_bwd(&Gelu)?,
    };
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = w2.0.dim(0)?;
    }
    let out = affine_2d(&act, w2.0, w2.1)?.reshape(out_dims)?;
    let backward = FrozenFfn {
        w1: w1.0.clone(),
        w2: w2.0.clone(),
        pre,
        scale: scale.map(Tensor::detach),
    };
    match scale {
        Some(s) => attach2([x, s], out, backward),
        None => attach(x, out, backward),
    }
}
