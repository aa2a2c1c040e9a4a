//! The adapter-site interface: the two places per layer (after the attention output projection,
//! after the FFN output projection) where a sub-layer's output meets its residual and LayerNorm,
//! and where an adapter method plugs in.
//!
//! A batch may carry rows of several tasks: the encoder hands each row group to its own task's
//! site (see `encoder::Routing`), so a method only ever sees the rows it owns.

use crate::error::Result;
use crate::kernels::NormView;
use crate::kernels::{layer_norm, Backend};
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

/// A site without an adapter: the original residual + LayerNorm, `LN(sub + input)`.
pub fn residual_norm(
    ctx: &SiteContext<'_>,
    sub: &Tensor,
    input: &Tensor,
    norm: NormView<'_>,
) -> Result<Tensor> {
    layer_norm(
        ctx.backend,
        &sub.add(input)?,
        norm.gamma,
        norm.beta,
        ctx.eps,
    )
}
