//! A training forward's graph cut between layers, so that the backward runs one layer at a time.
//!
//! candle frees nothing of a graph until `backward()` returns: every activation the forward saved
//! stays alive while the weight gradients accumulate, so the peak holds both in full. PyTorch frees
//! each node's saved tensors as its backward runs. Cutting the graph at each layer's input (a
//! variable holding a copy of the hidden states) and taking the gradients from the top layer down
//! frees each layer's activations once its gradients are taken.

use crate::error::Result;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, Var};

/// The cuts a training forward made between its layers ([`super::ForwardOptions::cuts`]); consumed
/// by [`LayerCuts::backward`].
#[derive(Default)]
pub struct LayerCuts {
    /// Per cut, bottom first: the hidden states the layer below produced (the end of its graph),
    /// and the variable the layer above started from.
    cuts: Vec<(Tensor, Tensor)>,
}

impl LayerCuts {
    /// The tensor the next layer starts from: a variable with `h`'s values where `h` depends on
    /// something trained, else `h` itself (no gradient would flow below it anyway).
    pub(crate) fn cut(&mut self, h: Tensor) -> Result<Tensor> {
        if !h.track_op() || h.is_variable() {
            return Ok(h);
        }
        let above = Var::from_tensor(&h)?.into_inner();
        self.cuts.push((h, above.clone()));
        Ok(above)
    }

    /// How many cuts the forward made.
    pub fn len(&self) -> usize {
        self.cuts.len()
    }

    /// Whether the forward made no cut.
    pub fn is_empty(&self) -> bool {
        self.cuts.is_empty()
    }

    /// The gradients of `loss` with respect to every variable, as `loss.backward()` gives them,
    /// taken from the top layer down; each layer's graph is dropped once its gradients are taken.
    /// `loss` must come from the forward that made these cuts.
    pub fn backward(self, loss: Tensor) -> Result<GradStore> {
        let mut grads = detached(loss.backward()?);
        drop(loss);
        for (below, above) in self.cuts.into_iter().rev() {
            // No gradient reached the cut: nothing above it depended on the layers below.
            let Some(g) = grads.remove(&above) else {
                continue;
            };
            drop(above);
            // The gradient continues as if uncut: a one-element node on `below` whose backward
            // hands `g` over. (`sum(below · g)` gives the same gradient through a product, a sum,
            // a broadcast and three more zero-filled sums over [rows, d], per layer.)
            let part = detached(below.apply_op1(Inject(g))?.backward()?);
            drop(below);
            grads.extend(part)?;
        }
        Ok(grads)
    }
}

/// A one-element graph node on a layer's output whose gradient with respect to that output is
/// the held gradient, whatever reaches the node: [`LayerCuts::backward`]'s way into each layer.
struct Inject(Tensor);

impl CustomOp1 for Inject {
    fn name(&self) -> &'static str {
        "layer-cut-gradient"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

/// `grads` with every gradient cut from the graph. A variable's gradient is never detached by
/// candle's backward, and one computed from a saved activation (x for W's gradient) keeps that
/// activation's whole graph alive for as long as the gradient lives.
fn detached(mut grads: GradStore) -> GradStore {
    let ids: Vec<_> = grads.get_ids().copied().collect();
    for id in ids {
        if let Some(g) = grads.get_id(id).map(Tensor::detach) {
            grads.insert_id(id, g);
        }
    }
    grads
}
