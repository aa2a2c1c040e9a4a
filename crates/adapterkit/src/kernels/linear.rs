//! Linear layers `x · Wᵀ + b`: with frozen weights, the product runs outside the autograd graph and
//! joins it through a node whose backward yields only the input gradient; the reference is candle's
//! matmul, whose backward also computes (and keeps) a gradient for the weight.

use super::activation::{Gelu, GeluBackward};
use super::matmul::{matmul_2d, matmul_tn, Affine};
use super::{attach, supported, Backend, CResult, FrozenWeight, InputGradient, LinearView};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};

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
    let fused = backend == Backend::Fused;
    let y = if frozen && fused && x2.track_op() && x2.device().is_cpu() {
        let out = linear_reference(&x2.detach(), w, b)?;
        let w = FrozenWeight::Tensor(w.clone());
        attach(&x2, out, FrozenLinear { w })?
    } else if let Some(b) = b.filter(|b| fused && [&x2, w, b].iter().all(|t| supported(t))) {
        x2.apply_op3(&w.contiguous()?, &b.contiguous()?, TrainedAffine)?
    } else {
        linear_reference(&x2, w, b)?
    };
    let mut out_dims = dims;
    out_dims[last] = w.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

/// [`linear`] for a layer as a forward reads it: a frozen base weight held as panels runs its
/// product and its input gradient on the panels; any other weight goes to [`linear`].
pub fn linear_view(backend: Backend, x: &Tensor, lin: LinearView<'_>) -> Result<Tensor> {
    let Some(panels) = lin
        .w
        .whole_panels()
        .filter(|_| backend == Backend::Fused && !lin.b.track_op() && supported(x))
    else {
        return linear(backend, x, &lin.w.tensor()?, Some(lin.b));
    };
    let dims = x.dims().to_vec();
    let last = dims.len() - 1;
    let x2 = x.reshape((dims[..last].iter().product::<usize>(), dims[last]))?;
    let out = panels.affine(&x2.detach(), lin.b)?;
    let w = FrozenWeight::Panels(panels.clone());
    let y = attach(&x2, out, FrozenLinear { w })?;
    let mut out_dims = dims;
    out_dims[last] = panels.dims().0;
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

/// `x · Wᵀ + b` with trained W and b as one graph node: the forward on the fused GEMM with the
/// bias as the product's starting value, the backward three products' worth of work in ours
/// (`dx = g · W`, `dW = gᵀ · x`, `db = Σ rows of g`). Through candle's matmul the same layer ran
/// its AVX2 `gemm`, a transposed copy for `Wᵀ` and separate broadcast and sum passes for the bias.
struct TrainedAffine;

impl CustomOp3 for TrainedAffine {
    fn name(&self) -> &'static str {
        "trained-affine"
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
        Affine.cpu_fwd(s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dx = x.track_op().then(|| matmul_2d(&g, w)).transpose()?;
        let dw = matmul_tn(&g, &x.contiguous()?)?;
        let db = super::sum_rows(&g)?;
        Ok((dx, Some(dw), Some(db)))
    }
}

/// `gelu(pre) · Wᵀ + b` with trained W and b, for the FFN's second projection: the graph keeps
/// only the pre-activation, and the backward recomputes the activation for W's gradient. As a
/// GELU node and a linear node the graph kept both, one [rows, 4d] tensor more per layer.
pub(crate) fn gelu_linear(pre: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = pre.dims().to_vec();
    let last = dims.len() - 1;
    let pre2 = pre.reshape((dims[..last].iter().product::<usize>(), dims[last]))?;
    let y = pre2
        .contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, TrainedGeluAffine)?;
    let mut out_dims = dims;
    out_dims[last] = w.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

/// The node of [`gelu_linear`].
struct TrainedGeluAffine;

impl CustomOp3 for TrainedGeluAffine {
    fn name(&self) -> &'static str {
        "trained-gelu-affine"
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
        let (act, shape) = Gelu.cpu_fwd(s1, l1)?;
        Affine.cpu_fwd(&act, &Layout::contiguous(shape), s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        pre: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let act = pre.apply_op1_no_bwd(&Gelu)?;
        let dw = matmul_tn(&g, &act)?;
        drop(act);
        let db = super::sum_rows(&g)?;
        let dpre = pre
            .track_op()
            .then(|| pre.apply_op2_no_bwd(&matmul_2d(&g, w)?, &GeluBackward))
            .transpose()?;
        Ok((dpre, Some(dw), Some(db)))
    }
}

/// A frozen linear layer's backward: `grad · w` for the input, nothing for the weights.
struct FrozenLinear {
    w: FrozenWeight,
}

impl InputGradient for FrozenLinear {
    const NAME: &'static str = "frozen-linear";

    fn input_gradient(&self, _input: &Tensor, grad: &Tensor) -> CResult<Tensor> {
        // The input is 2-D ([`linear`] flattens), so the product takes the fused kernels.
        self.w.input_gradient(grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;

    #[test]
    fn gelu_linear_matches_gelu_then_linear_with_all_three_gradients() {
        for (case, dims) in [vec![5, 24], vec![3, 37, 24]].into_iter().enumerate() {
            let seed = 70 + 10 * case as u64;
            let inputs = [
                randn(&dims, seed, 1.5),
                randn(&[50, 24], seed + 1, 0.3),
                randn(&[50], seed + 2, 0.1),
            ];
            let fused = |t: &[Tensor]| gelu_linear(&t[0], &t[1], &t[2]).unwrap();
            let reference = |t: &[Tensor]| {
                let act = super::super::gelu(Backend::Reference, &t[0]).unwrap();
                linear(Backend::Reference, &act, &t[1], Some(&t[2])).unwrap()
            };
            compare(&inputs, &fused, &reference, 1e-5);
        }
    }

    #[test]
    fn trained_linear_matches_candle_matmul_with_all_three_gradients() {
        // Few rows (the packing-free product) and many (the blocked GEMM, row and column tails),
        // 2-D and 3-D inputs.
        for (case, dims) in [vec![5, 24], vec![3, 37, 24]].into_iter().enumerate() {
            let seed = 40 + 10 * case as u64;
            let inputs = [
                randn(&dims, seed, 1.0),
                randn(&[50, 24], seed + 1, 0.3),
                randn(&[50], seed + 2, 0.1),
            ];
            let run = |backend: Backend| {
                move |t: &[Tensor]| linear(backend, &t[0], &t[1], Some(&t[2])).unwrap()
            };
            compare(
                &inputs,
                &run(Backend::Fused),
                &run(Backend::Reference),
                1e-5,
            );
        }
    }
}
