//! Inverted dropout: the counter-based fused kernel (mask recomputed in backward) and the
//! composed reference with a seeded mask.

use super::{f32_slice, Backend, CResult, MIN_TASK_ELEMS};
use crate::error::Result;
use crate::rng::Rng;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Inverted dropout with drop probability `p`, its mask drawn from `rng`; identity when `p` is 0.
/// The fused kernel and the reference draw different masks from the same generator state.
pub fn dropout(backend: Backend, x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if backend.fuses(&[x]) {
        return Ok(dropout_fused(x, p, rng.next_u64())?);
    }
    dropout_reference(x, p, rng)
}

/// Dropout composed from candle primitives: a mask tensor drawn element by element.
pub fn dropout_reference(x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
    let n = x.elem_count();
    let scale = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..n)
        .map(|_| if rng.uniform() < p { 0.0 } else { scale })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(x.mul(&mask)?)
}

/// Whether element `i` survives dropout with keep probability `keep` under `seed`: a counter-based
/// hash (SplitMix64 finaliser), so any thread can decide any element and backward can recompute the
/// mask instead of storing it.
#[inline]
fn keeps(seed: u64, i: usize, keep_threshold: u32) -> bool {
    let mut z = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 32) as u32) < keep_threshold
}

pub(crate) struct Dropout {
    seed: u64,
    keep_threshold: u32,
    scale: f32,
}

impl Dropout {
    /// The mask of drop probability `p` under `seed`.
    pub(crate) fn new(p: f64, seed: u64) -> Self {
        let keep = 1.0 - p;
        Dropout {
            seed,
            keep_threshold: (keep * 4_294_967_296.0).min(4_294_967_295.0) as u32,
            scale: (1.0 / keep) as f32,
        }
    }

    pub(crate) fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut y = super::zeros(x.len());
        y.par_chunks_mut(MIN_TASK_ELEMS)
            .zip(x.par_chunks(MIN_TASK_ELEMS))
            .enumerate()
            .for_each(|(c, (y, x))| {
                let base = c * MIN_TASK_ELEMS;
                for (j, (y, &x)) in y.iter_mut().zip(x).enumerate() {
                    if keeps(self.seed, base + j, self.keep_threshold) {
                        *y = x * self.scale;
                    }
                }
            });
        y
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "dropout")?;
        Ok((CpuStorage::F32(self.apply(x)), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// Inverted dropout with drop probability `p`; the mask is a pure function of `seed` and the
/// element index, computed in parallel and recomputed (not stored) for the backward pass.
pub(crate) fn dropout_fused(x: &Tensor, p: f64, seed: u64) -> CResult<Tensor> {
    x.contiguous()?.apply_op1(Dropout::new(p, seed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::Var;

    #[test]
    fn dropout_drops_the_right_share_and_backward_uses_the_same_mask() {
        let x = Var::from_tensor(
            &randn(&[200, 500], 7, 1.0)
                .abs()
                .unwrap()
                .affine(1.0, 0.1)
                .unwrap(),
        )
        .unwrap();
        let y = dropout_fused(x.as_tensor(), 0.1, 1234).unwrap();
        let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dropped = yv.iter().filter(|&&v| v == 0.0).count() as f64 / yv.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped {dropped}");
        let again = dropout_fused(x.as_tensor(), 0.1, 1234)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(yv, again);
        let other = dropout_fused(x.as_tensor(), 0.1, 1235)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(yv, other);
        let g = y.sum_all().unwrap().backward().unwrap();
        let gv = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (gi, yi) in gv.iter().zip(&yv) {
            let want = if *yi == 0.0 { 0.0 } else { 1.0 / 0.9 };
            assert!((gi - want).abs() < 1e-6);
        }
    }
}
