//! The adapter-site interface: the two places per layer (after the attention output projection,
//! after the FFN output projection) where a sub-layer's output meets its residual and LayerNorm,
//! and where an adapter method plugs in.
//!
//! A batch may carry rows of several tasks: the encoder hands each row group to its own task's
//! site (see `encoder::Routing`), so a method only ever sees the rows it owns.

use crate::error::Result;
use crate::kernels::NormView;
use crate::kernels::{residual_layer_norm, Backend};
use crate::rng::Rng;
use candle_core::Tensor;

/// What a site's computation needs from the forward pass besides its tensors.
pub struct SiteContext<'r> {
    /// Fused kernels or the reference.
    pub backend: Backend,
    /// Epsilon of the base's LayerNorms.
    pub eps: f64,
    /// Training mode: dropout drawn from this generator. `None` is inference.
    pub dropout: Option<&'r mut Rng>,
}

/// A method that runs at an adapter site.
pub trait SiteAdapter {
    /// The site's output from the sub-layer's output `sub` [rows, seq, d], the block input `input`
    /// (the residual) and the sub-layer's own LayerNorm `norm`.
    fn exit(
        &self,
        ctx: &mut SiteContext<'_>,
        sub: &Tensor,
        input: &Tensor,
        norm: NormView<'_>,
    ) -> Result<Tensor>;
}

/// The original residual + LayerNorm, `LN(dropout(sub) + input)`: a site without an adapter
/// (the sub-layer's hidden dropout `p` applied in training), or an adapter's exit (`p` = 0, its
/// output already dropped out). One fused node that keeps no copy of the sum.
pub fn residual_norm(
    ctx: &mut SiteContext<'_>,
    sub: &Tensor,
    p: f64,
    input: &Tensor,
    norm: NormView<'_>,
) -> Result<Tensor> {
    let dropout = ctx.dropout.as_deref_mut().map(|rng| (p, rng));
    residual_layer_norm(
        ctx.backend,
        sub,
        input,
        (norm.gamma, norm.beta),
        ctx.eps,
        dropout,
    )
}
