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

super::wide_fn!(
    /// [`masked_rows`] as a [`super::Wide`] body.
    MaskedRows<'a>((&'a mut [std::mem::MaybeUninit<f32>], &'a [f32], ChunkMask)) -> () = masked_rows
);

/// One chunk of [`Dropout::apply`]: `y[j] = x[j] · scale` where element `base + j` survives, 0
/// where it is dropped. Branch-free, so it compiles to vector code for the widths of
/// [`super::wide`] (the hash's 64-bit products included); it was a scalar loop over a zeroed
/// buffer before, a few percent of a training step.
#[inline(always)]
fn masked_rows((y, x, m): (&mut [std::mem::MaybeUninit<f32>], &[f32], ChunkMask)) {
    for (j, (y, &x)) in y.iter_mut().zip(x).enumerate() {
        let kept = keeps(m.seed, m.base + j, m.keep_threshold);
        y.write(if kept { x * m.scale } else { 0.0 });
    }
}

/// What [`masked_rows`] needs of the mask for one chunk starting at element `base`.
#[derive(Clone, Copy)]
struct ChunkMask {
    seed: u64,
    base: usize,
    keep_threshold: u32,
    scale: f32,
}

#[derive(Clone, Copy)]
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
        let len = x.len();
        let mut y: Vec<f32> = Vec::with_capacity(len);
        y.spare_capacity_mut()[..len]
            .par_chunks_mut(MIN_TASK_ELEMS)
            .zip(x.par_chunks(MIN_TASK_ELEMS))
            .enumerate()
            .for_each(|(c, (y, x))| {
                let mask = ChunkMask {
                    seed: self.seed,
                    base: c * MIN_TASK_ELEMS,
                    keep_threshold: self.keep_threshold,
                    scale: self.scale,
                };
                super::wide(MaskedRows((y, x, mask)));
            });
        // SAFETY: `masked_rows` wrote each of the first `len` slots (the chunks of `y` and `x`
        // pair up one to one and have equal lengths).
        unsafe { y.set_len(len) };
        y
    }
}

impl Dropout {
    /// `y = dropout(x)` for the elements `base..base + x.len()` of the whole tensor the mask
    /// covers, on this thread: the same mask [`Dropout::apply`] draws for them.
    pub(crate) fn apply_block(&self, y: &mut [f32], x: &[f32], base: usize) {
        let n = y.len().min(x.len());
        // SAFETY: `MaybeUninit<f32>` has the layout of f32, and `masked_rows` writes only
        // initialised values.
        let y = unsafe { &mut *(&mut y[..n] as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
        let mask = ChunkMask {
            seed: self.seed,
            base,
            keep_threshold: self.keep_threshold,
            scale: self.scale,
        };
        super::wide(MaskedRows((y, &x[..n], mask)));
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

    /// The mask applied element by element, one thread, plain scalar code.
    fn apply_scalar(d: &Dropout, x: &[f32]) -> Vec<f32> {
        x.iter()
            .enumerate()
            .map(|(i, &v)| {
                if keeps(d.seed, i, d.keep_threshold) {
                    v * d.scale
                } else {
                    0.0
                }
            })
            .collect()
    }

    #[test]
    fn vector_dropout_gives_the_scalar_masks_bits() {
        // Lengths with a partial last chunk and a partial last vector; negative, zero, NaN and
        // infinite inputs (a dropped one is 0 whatever it held).
        for (len, p, seed) in [
            (1, 0.5, 1),
            (MIN_TASK_ELEMS * 3 + 17, 0.1, 99),
            (1000, 0.9, 5),
        ] {
            let mut x = randn(&[len], seed, 2.0)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (i, v) in [f32::NAN, f32::INFINITY, -0.0, -3.5]
                .into_iter()
                .enumerate()
            {
                if i < len {
                    x[i] = v;
                }
            }
            let d = Dropout::new(p, seed);
            let fast: Vec<u32> = d.apply(&x).iter().map(|v| v.to_bits()).collect();
            let slow: Vec<u32> = apply_scalar(&d, &x).iter().map(|v| v.to_bits()).collect();
            assert_eq!(fast, slow, "len {len}");
        }
    }

    #[test]
    #[ignore]
    fn time_vector_against_scalar_dropout() {
        let x = vec![1.5f32; 2048 * 1536];
        let d = Dropout::new(0.1, 7);
        let time = |f: &dyn Fn() -> Vec<f32>| {
            let mut t: Vec<f64> = (0..9)
                .map(|_| {
                    let s = std::time::Instant::now();
                    std::hint::black_box(f());
                    s.elapsed().as_secs_f64()
                })
                .collect();
            t.sort_by(f64::total_cmp);
            t[4]
        };
        let fast = time(&|| d.apply(&x));
        let slow = time(&|| apply_scalar(&d, &x));
        println!(
            "dropout over 2048×1536: {:.2} ms (pool, vector), {:.2} ms (one thread, scalar)",
            fast * 1e3,
            slow * 1e3
        );
    }

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
