//! The bottleneck adapter at a site: the plain Houlsby adapter (one fused kernel) and every
//! AdapterHub `BnConfig` arrangement, sequential or parallel (composed step by step as AdapterHub's
//! `Adapter` and `ParallelAdapter` modules run).

use super::site::{residual_norm, SiteAdapter, SiteContext};
use super::{AdapterConfig, Part, Residual, Scaling, Site};
use crate::error::{Error, Result};
use crate::kernels::{adapter, dropout, layer_norm, linear};
use crate::kernels::{Backend, NormView};
use crate::keys::ParamKey;
use candle_core::Tensor;
use std::collections::BTreeMap;

/// Epsilon of the LayerNorms inside an adapter (`ln_before` / `ln_after`): PyTorch's default.
const ADAPTER_LN_EPS: f64 = 1e-5;

/// One site's bottleneck adapter with its tensors resolved for a forward pass.
#[derive(Debug, Clone)]
pub struct BottleneckAdapter<'a> {
    config: &'a AdapterConfig,
    /// Down projection (W, b).
    down: (&'a Tensor, &'a Tensor),
    /// Up projection (W, b).
    up: (&'a Tensor, &'a Tensor),
    norm_before: Option<NormView<'a>>,
    norm_after: Option<NormView<'a>>,
    scale: Option<&'a Tensor>,
}

impl<'a> BottleneckAdapter<'a> {
    /// The adapter of configuration `cfg` at `site` of layer `layer`, if `cfg` puts one there,
    /// with its tensors taken from task `task`'s `derived` weights (Compacter's projections) or
    /// else its `params`.
    pub fn resolve(
        cfg: &'a AdapterConfig,
        task: &str,
        params: &'a BTreeMap<ParamKey, Tensor>,
        derived: Option<&'a BTreeMap<ParamKey, Tensor>>,
        layer: usize,
        site: Site,
    ) -> Result<Option<Self>> {
        if !cfg.has_layer(layer) || !cfg.sites().contains(&site) {
            return Ok(None);
        }
        let get = |part: Part| -> Result<&'a Tensor> {
            let name = cfg.param_name(layer, site, task, part);
            derived
                .and_then(|d| d.get(name.as_str()))
                .or_else(|| params.get(name.as_str()))
                .ok_or_else(|| Error::NotFound(format!("the task has no parameter `{name}`")))
        };
        let norm = |on: bool, w: Part, b: Part| -> Result<Option<NormView<'a>>> {
            Ok(if on {
                Some(NormView {
                    gamma: get(w)?,
                    beta: get(b)?,
                })
            } else {
                None
            })
        };
        Ok(Some(BottleneckAdapter {
            config: cfg,
            down: (get(Part::DownWeight)?, get(Part::DownBias)?),
            up: (get(Part::UpWeight)?, get(Part::UpBias)?),
            norm_before: norm(cfg.ln_before, Part::LnBeforeWeight, Part::LnBeforeBias)?,
            norm_after: norm(cfg.ln_after, Part::LnAfterWeight, Part::LnAfterBias)?,
            scale: match cfg.scaling {
                Scaling::Learned | Scaling::Channel => Some(get(Part::Scaling)?),
                Scaling::Fixed(_) => None,
            },
        }))
    }
}

impl BottleneckAdapter<'_> {
    /// The adapter's own path from its input `x`: `ln_before`, down projection, nonlinearity, up
    /// projection, scaling and (in training) dropout; no skip connection.
    fn branch(&self, ctx: &mut SiteContext<'_>, x: &Tensor) -> Result<Tensor> {
        let (cfg, backend) = (self.config, ctx.backend);
        let x = match self.norm_before {
            Some(n) => own_norm(backend, x, n)?,
            None => x.clone(),
        };
        let down = linear(backend, &x, self.down.0, Some(self.down.1))?;
        let down = cfg.nonlinearity.apply(backend, &down)?;
        let up = linear(backend, &down, self.up.0, Some(self.up.1))?;
        let up = match (cfg.scaling, self.scale) {
            (_, Some(s)) => up.broadcast_mul(s)?,
            (Scaling::Fixed(f), None) if f != 1.0 => (up * f)?,
            _ => up,
        };
        match ctx.dropout.as_deref_mut() {
            Some(rng) => dropout(backend, &up, cfg.dropout, rng),
            None => Ok(up),
        }
    }
}

/// A LayerNorm of the adapter's own (`ln_before` / `ln_after`).
fn own_norm(backend: Backend, x: &Tensor, n: NormView<'_>) -> Result<Tensor> {
    layer_norm(backend, x, n.gamma, n.beta, ADAPTER_LN_EPS)
}

impl SiteAdapter for BottleneckAdapter<'_> {
    fn exit(
        &self,
        ctx: &mut SiteContext<'_>,
        sub: &Tensor,
        input: &Tensor,
        norm: NormView<'_>,
    ) -> Result<Tensor> {
        let cfg = self.config;
        let backend = ctx.backend;
        if cfg.is_plain() {
            let adapted = adapter(backend, sub, self.down, self.up, cfg.nonlinearity)?;
            return residual_norm(ctx, &adapted, 0.0, input, norm);
        }
        let eps = ctx.eps;
        let original_norm = |x: &Tensor| layer_norm(backend, x, norm.gamma, norm.beta, eps);
        if cfg.parallel {
            // AdapterHub's ParallelAdapter: the branch reads the block input; its output (after
            // `ln_after`) joins the sub-layer's, then the original residual + LayerNorm.
            let mut out = self.branch(ctx, input)?;
            if let Some(n) = self.norm_after {
                out = own_norm(backend, &out, n)?;
            }
            out = out.add(sub)?;
            return if cfg.original_ln_after {
                original_norm(&out.add(input)?)
            } else {
                Ok(out)
            };
        }
        let mut h = sub.clone();
        let mut residual = (cfg.residual == Residual::Sublayer).then(|| h.clone());
        if cfg.original_ln_before {
            h = h.add(input)?;
            if cfg.residual == Residual::PostAdd {
                residual = Some(h.clone());
            }
            h = original_norm(&h)?;
        }
        let residual = match residual {
            Some(r) => r,
            None => h.clone(),
        };
        let mut out = self.branch(ctx, &h)?;
        if cfg.adapter_residual_before_ln {
            out = out.add(&residual)?;
        }
        if let Some(n) = self.norm_after {
            out = own_norm(backend, &out, n)?;
        }
        if !cfg.adapter_residual_before_ln {
            out = out.add(&residual)?;
        }
        if cfg.original_ln_after {
            out = original_norm(&out.add(input)?)?;
        }
        Ok(out)
    }
}
