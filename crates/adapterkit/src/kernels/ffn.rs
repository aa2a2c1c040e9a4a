//! The feed-forward block `W2 · gelu(W1 · x + b1) + b2` with what a task may add to it: (IA)³'s
//! per-channel scale of the intermediate activations, LoRA's updates of either projection. With
//! frozen weights one graph node (gradients of the input and of the scale or the intermediate
//! update), else composed from linear layers and GELU.

use super::activation::{gelu, Gelu, GeluBackward};
use super::linear::linear_view;
use super::{
    attach, attach2, Backend, CResult, FrozenWeight, InputGradient, InputGradients2, LinearView,
    WeightRef,
};
use crate::error::Result;
use candle_core::Tensor;

/// What a task adds to the frozen FFN.
#[derive(Debug, Default, Clone, Copy)]
pub struct FfnAdapt<'a> {
    /// Per-channel scale of the intermediate activations before the GELU [i] ((IA)³ on
    /// `intermediate.dense`).
    pub scale: Option<&'a Tensor>,
    /// An update added to the intermediate activations before the GELU [.., i] (LoRA's
    /// `x·Aᵀ·Bᵀ` on `intermediate.dense`, computed from the block input).
    pub delta: Option<&'a Tensor>,
    /// LoRA's factors `(A, (α/r)·B)` on the output projection, applied to the activations.
    pub out_lora: Option<(&'a Tensor, &'a Tensor)>,
}

/// `W2 · gelu((W1 · x + b1 + delta) ⊙ scale) + b2 (+ LoRA's update of W2)` over the last
/// dimension of `x`, with `w1 = (W1, b1)`, `w2 = (W2, b2)` and what `adapt` adds.
pub fn ffn(
    backend: Backend,
    x: &Tensor,
    w1: LinearView<'_>,
    w2: LinearView<'_>,
    adapt: FfnAdapt<'_>,
) -> Result<Tensor> {
    let extra = match (adapt.scale, adapt.delta) {
        (None, None) => Some(Extra::None),
        (Some(s), None) => Some(Extra::Scale(s.detach())),
        (None, Some(_)) => Some(Extra::Delta),
        // A task has one method; both at once run composed.
        (Some(_), Some(_)) => None,
    };
    let extra_fuses = [adapt.scale, adapt.delta]
        .into_iter()
        .flatten()
        .all(|t| backend.fuses(&[t]));
    let frozen = w1.frozen_f32() && w2.frozen_f32();
    if let Some(extra) =
        extra.filter(|_| backend.fuses(&[x]) && extra_fuses && frozen && adapt.out_lora.is_none())
    {
        return Ok(frozen_ffn(x, w1, w2, extra, adapt)?);
    }
    let mut pre = linear_view(backend, x, w1)?;
    // Trained second projection (top-k, full fine-tuning): GELU and the product as one node.
    let plain = adapt.scale.is_none() && adapt.delta.is_none() && adapt.out_lora.is_none();
    if let (true, WeightRef::Tensor(w)) = (plain, w2.w) {
        if w.track_op() && backend.fuses(&[&pre, w, w2.b]) {
            return super::linear::gelu_linear(&pre, w, w2.b);
        }
    }
    if let Some(d) = adapt.delta {
        pre = pre.add(d)?;
    }
    if let Some(s) = adapt.scale {
        pre = pre.broadcast_mul(s)?;
    }
    let act = gelu(backend, &pre)?;
    let out = linear_view(backend, &act, w2)?;
    match adapt.out_lora {
        Some((a, b)) => Ok(out.add(&act.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?)?),
        None => Ok(out),
    }
}

/// What the fused block takes besides its input.
enum Extra {
    /// Nothing.
    None,
    /// The intermediate scale (detached; its gradient is returned).
    Scale(Tensor),
    /// The intermediate update (already added to the kept pre-activation).
    Delta,
}

/// The backward of the fused block: it keeps only the pre-activation (unscaled, update added).
struct FrozenFfn {
    w1: FrozenWeight,
    w2: FrozenWeight,
    pre: Tensor,
    extra: Extra,
}

impl FrozenFfn {
    /// d loss / d input, and d loss / d the scale or the update when there is one.
    fn gradients(&self, arg: &Tensor, grad: &Tensor) -> CResult<(Tensor, Option<Tensor>)> {
        let rows = self.pre.dim(0)?;
        let g = grad.reshape((rows, ()))?.contiguous()?;
        let dact = self.w2.input_gradient(&g)?;
        let (dpre, dextra) = match &self.extra {
            Extra::Scale(s) => {
                let z = self.pre.broadcast_mul(s)?;
                let dz = z.apply_op2_no_bwd(&dact, &GeluBackward)?;
                let dscale = super::sum_rows(&dz.mul(&self.pre)?)?;
                (dz.broadcast_mul(s)?, Some(dscale))
            }
            Extra::Delta => {
                let dpre = self.pre.apply_op2_no_bwd(&dact, &GeluBackward)?;
                (dpre.clone(), Some(dpre))
            }
            Extra::None => (self.pre.apply_op2_no_bwd(&dact, &GeluBackward)?, None),
        };
        let dx = self.w1.input_gradient(&dpre)?.reshape(arg.shape())?;
        Ok((dx, dextra))
    }
}

impl InputGradient for FrozenFfn {
    const NAME: &'static str = "frozen-ffn";

    fn input_gradient(&self, arg: &Tensor, grad: &Tensor) -> CResult<Tensor> {
        Ok(self.gradients(arg, grad)?.0)
    }
}

impl InputGradients2 for FrozenFfn {
    const NAME: &'static str = "frozen-ffn-adapted";

    fn input_gradients(&self, [x, e]: [&Tensor; 2], grad: &Tensor) -> CResult<[Option<Tensor>; 2]> {
        let (dx, de) = self.gradients(x, grad)?;
        let de = match de {
            Some(d) => Some(d.reshape(e.shape())?),
            None => None,
        };
        Ok([Some(dx), de])
    }
}

/// The fused block of [`ffn`] for frozen f32 weights (no LoRA on the output projection).
fn frozen_ffn(
    x: &Tensor,
    w1: LinearView<'_>,
    w2: LinearView<'_>,
    extra: Extra,
    adapt: FfnAdapt<'_>,
) -> CResult<Tensor> {
    let dims = x.dims().to_vec();
    let d = *dims.last().unwrap_or(&1);
    let x2 = x.detach().reshape(((), d))?;
    let mut pre = w1.affine(&x2)?.contiguous()?;
    if let Some(delta) = adapt.delta {
        pre = pre
            .add(&delta.detach().reshape(pre.shape())?)?
            .contiguous()?;
    }
    let act = match &extra {
        Extra::Scale(s) => pre.broadcast_mul(s)?.apply_op1_no_bwd(&Gelu)?,
        _ => pre.apply_op1_no_bwd(&Gelu)?,
    };
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = w2.w.rows()?;
    }
    let out = w2.affine(&act)?.reshape(out_dims)?;
    let backward = FrozenFfn {
        w1: w1.w.owned()?,
        w2: w2.w.owned()?,
        pre,
        extra,
    };
    match adapt.scale.or(adapt.delta) {
        Some(e) => attach2([x, e], out, backward),
        None => attach(x, out, backward),
    }
}

/// [`ffn`]'s fused block without additions (for tests of other blocks).
#[cfg(test)]
pub(crate) fn frozen_ffn_plain(
    x: &Tensor,
    w1: (&Tensor, &Tensor),
    w2: (&Tensor, &Tensor),
) -> CResult<Tensor> {
    frozen_ffn(
        x,
        LinearView::new(w1.0, w1.1),
        LinearView::new(w2.0, w2.1),
        Extra::None,
        FfnAdapt::default(),
    )
}
