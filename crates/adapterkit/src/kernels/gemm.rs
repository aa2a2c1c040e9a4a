//! GEMM dispatch over raw slices: the packing-free skinny product for few rows, our blocked kernel
//! where the CPU has it, the `gemm` crate otherwise.

use rayon::prelude::*;

/// Rows at or below which `x · Wᵀ` skips `gemm`, whose packing of W costs more than the product
/// when few rows use it (measured on MiniLM shapes with 2 threads: faster up to 32 rows, slower
/// from 48; the timing test `time_skinny_vs_gemm` is `#[ignore]`d, run it with `--ignored`).
const SKINNY_ROWS: usize = 32;

/// Output columns (rows of W) per parallel task of the skinny product.
const SKINNY_COLS_PER_TASK: usize = 48;

/// Computes `R` input rows against two weight rows of equal length k: `out[i] = [x_i·w0, x_i·w1]`.
/// Per chunk of k, R + 2 loads feed 2R multiply-adds into 2R independent partial sums, so the loop
/// is bound by the FMA units rather than by loads or by add latency.
trait Tiler: Copy + Sync {
    fn tile<const R: usize>(self, x: [&[f32]; R], w0: &[f32], w1: &[f32]) -> [[f32; 2]; R];
}

/// Portable tiles (what the compiler makes of plain loops for the baseline target).
#[derive(Clone, Copy)]
struct Portable;

impl Tiler for Portable {
    fn tile<const R: usize>(self, x: [&[f32]; R], w0: &[f32], w1: &[f32]) -> [[f32; 2]; R] {
        let mut out = [[0f32; 2]; R];
        for (o, xi) in out.iter_mut().zip(x) {
            let (mut s0, mut s1) = (0f32, 0f32);
            for ((&a, &b), &c) in xi.iter().zip(w0).zip(w1) {
                s0 += a * b;
                s1 += a * c;
            }
            *o = [s0, s1];
        }
        out
    }
}

/// AVX2 + FMA tiles; only constructed after the CPU was checked for both.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx2(());

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    fn detect() -> Option<Self> {
        (std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"))
            .then_some(Avx2(()))
    }
}

#[cfg(target_arch = "x86_64")]
impl Tiler for Avx2 {
    fn tile<const R: usize>(self, x: [&[f32]; R], w0: &[f32], w1: &[f32]) -> [[f32; 2]; R] {
        // SAFETY: an `Avx2` value exists only when the CPU has AVX2 and FMA (see `detect`).
        unsafe { tile_avx2(x, w0, w1) }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize>(x: [&[f32]; R], w0: &[f32], w1: &[f32]) -> [[f32; 2]; R] {
    use std::arch::x86_64::*;
    let k = w0.len().min(w1.len());
    assert!(x.iter().all(|xi| xi.len() >= k));
    let full = k - k % 8;
    let mut a0 = [_mm256_setzero_ps(); R];
    let mut a1 = [_mm256_setzero_ps(); R];
    let mut o = 0;
    while o < full {
        // SAFETY: o + 8 <= full <= k, and every operand holds at least k elements (asserted).
        let (wa, wb) = (
            _mm256_loadu_ps(w0.as_ptr().add(o)),
            _mm256_loadu_ps(w1.as_ptr().add(o)),
        );
        for i in 0..R {
            let xi = _mm256_loadu_ps(x[i].as_ptr().add(o));
            a0[i] = _mm256_fmadd_ps(xi, wa, a0[i]);
            a1[i] = _mm256_fmadd_ps(xi, wb, a1[i]);
        }
        o += 8;
    }
    let hsum = |v: __m256| {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        lanes.iter().sum::<f32>()
    };
    let mut out = [[0f32; 2]; R];
    for i in 0..R {
        let (mut s0, mut s1) = (hsum(a0[i]), hsum(a1[i]));
        for t in full..k {
            s0 += x[i][t] * w0[t];
            s1 += x[i][t] * w1[t];
        }
        out[i] = [s0, s1];
    }
    out
}

/// `out[j][i] = x_i · w_j` for `rows` weight rows starting every `ws` elements of `w` (the first k
/// of each are used) and all m rows of `x`.
#[allow(clippy::too_many_arguments)]
fn skinny_block<T: Tiler>(
    t: T,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    ws: usize,
    rows: usize,
    out: &mut [f32],
) {
    let xr = |i: usize| &x[i * k..(i + 1) * k];
    let mut j = 0;
    while j < rows {
        // Two weight rows at a time; an odd last row is paired with itself.
        let j1 = if j + 1 < rows { j + 1 } else { j };
        let (w0, w1) = (&w[j * ws..j * ws + k], &w[j1 * ws..j1 * ws + k]);
        let mut put = |i: usize, v: [f32; 2]| {
            out[j * m + i] = v[0];
            if j1 != j {
                out[j1 * m + i] = v[1];
            }
        };
        let mut i = 0;
        while i + 4 <= m {
            let r = t.tile([xr(i), xr(i + 1), xr(i + 2), xr(i + 3)], w0, w1);
            for (d, v) in r.into_iter().enumerate() {
                put(i + d, v);
            }
            i += 4;
        }
        match m - i {
            3 => {
                let r = t.tile([xr(i), xr(i + 1), xr(i + 2)], w0, w1);
                for (d, v) in r.into_iter().enumerate() {
                    put(i + d, v);
                }
            }
            2 => {
                let r = t.tile([xr(i), xr(i + 1)], w0, w1);
                for (d, v) in r.into_iter().enumerate() {
                    put(i + d, v);
                }
            }
            1 => put(i, t.tile([xr(i)], w0, w1)[0]),
            _ => {}
        }
        j = j1 + 1;
    }
}

/// `dst (m×n) = [dst +] x (m×k, row-major) · Wᵀ` for W with n rows of k used elements every `ws`
/// elements (row-major, possibly padded), without packing.
#[allow(clippy::too_many_arguments)]
pub(crate) fn skinny_xwt(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    (w, ws): (&[f32], usize),
    accumulate: bool,
    parallel: bool,
) {
    #[cfg(target_arch = "x86_64")]
    let avx2 = Avx2::detect();
    let block = |first: usize, rows: usize, out: &mut [f32]| {
        let w = &w[first * ws..];
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = avx2 {
            skinny_block(t, x, m, k, w, ws, rows, out);
            return;
        }
        skinny_block(Portable, x, m, k, w, ws, rows, out);
    };
    // Column-major partial results: task t owns columns t·C.. of every row.
    let mut cols = vec![0f32; n * m];
    let c = SKINNY_COLS_PER_TASK;
    if parallel && n > c {
        cols.par_chunks_mut(c * m)
            .enumerate()
            .for_each(|(t, out)| block(t * c, out.len() / m, out));
    } else {
        block(0, n, &mut cols);
    }
    for (i, row) in dst.chunks_exact_mut(n).take(m).enumerate() {
        for (j, d) in row.iter_mut().enumerate() {
            let v = cols[j * m + i];
            *d = if accumulate { *d + v } else { v };
        }
    }
}

/// Panics unless every element that m×k and k×n operands address through their strides lies
/// inside their slices and `dst` holds m·n: the products below rely on it for memory safety.
fn check_operands(
    dst_len: usize,
    m: usize,
    n: usize,
    k: usize,
    lhs: (&[f32], isize, isize),
    rhs: (&[f32], isize, isize),
) {
    let span = |rs: isize, cs: isize, r: usize, c: usize| {
        (r.max(1) - 1) as isize * rs + (c.max(1) - 1) as isize * cs + 1
    };
    assert!(dst_len >= m * n);
    assert!(lhs.0.len() as isize >= span(lhs.1, lhs.2, m, k));
    assert!(rhs.0.len() as isize >= span(rhs.1, rhs.2, k, n));
}

/// `dst (m×n, row-major) = [dst +] lhs · rhs`, operands given by pointer-free slices and (row
/// stride, column stride): the packing-free path for few rows, our blocked kernel where the CPU
/// has it, `gemm` otherwise.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: (&[f32], isize, isize),
    rhs: (&[f32], isize, isize),
    accumulate: bool,
    parallel: bool,
) {
    check_operands(dst.len(), m, n, k, lhs, rhs);
    let ki = k as isize;
    if (1..=SKINNY_ROWS).contains(&m)
        && k > 0
        && n > 0
        && lhs.1 == ki
        && lhs.2 == 1
        && rhs.1 == 1
        && rhs.2 >= ki
    {
        skinny_xwt(
            dst,
            m,
            n,
            k,
            lhs.0,
            (rhs.0, rhs.2 as usize),
            accumulate,
            parallel,
        );
        return;
    }
    if super::blocked::gemm(dst, m, n, k, lhs, rhs, accumulate, parallel) {
        return;
    }
    gemm_crate_into(dst, m, n, k, lhs, rhs, accumulate, parallel);
}

/// [`gemm_into`]'s product through the `gemm` crate (its AVX2 kernels), for CPUs without AVX2
/// (or `ADAPTERKIT_GEMM=portable`) and as the yardstick of our kernel's timing test.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_crate_into(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: (&[f32], isize, isize),
    rhs: (&[f32], isize, isize),
    accumulate: bool,
    parallel: bool,
) {
    check_operands(dst.len(), m, n, k, lhs, rhs);
    let par = if parallel {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above check that every element addressed through the given strides for
    // m×k, k×n and m×n operands lies inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2,
            lhs.1,
            rhs.0.as_ptr(),
            rhs.2,
            rhs.1,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::affine_2d;
    use crate::kernels::testing::*;

    #[test]
    fn skinny_product_matches_gemm_and_the_affine_op_matches_matmul() {
        for &(m, n, k, pad) in &[
            (1, 7, 5, 0),
            (2, 100, 67, 1),
            (13, 1536, 384, 0),
            (16, 97, 33, 3),
            (17, 50, 40, 0),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let ws = k + pad;
            let w: Vec<f32> = (0..n * ws)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                .collect();
            let mut want = vec![0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] = (0..k)
                        .map(|t| x[i * k + t] as f64 * w[j * ws + t] as f64)
                        .sum::<f64>() as f32;
                }
            }
            for parallel in [false, true] {
                let mut got = vec![1f32; m * n];
                gemm_into(
                    &mut got,
                    m,
                    n,
                    k,
                    (&x, k as isize, 1),
                    (&w, 1, ws as isize),
                    true,
                    parallel,
                );
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - 1.0 - w).abs() < 1e-4,
                        "{m}x{n}x{k}: {g} vs {}",
                        w + 1.0
                    );
                }
            }
        }
        let x = randn(&[3, 40], 90, 1.0);
        let w = randn(&[24, 40], 91, 0.5);
        let b = randn(&[24], 92, 0.5);
        let got = affine_2d(&x, &w, &b).unwrap();
        let want = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(rel(&got, &want) < 1e-5);
    }
}

#[cfg(test)]
mod skinny_timing {
    use super::*;
    #[test]
    #[ignore]
    fn time_skinny_vs_gemm() {
        for m in [13usize, 24, 32, 48, 64] {
            let (n, k) = (1536usize, 384usize);
            let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32).collect();
            let mut dst = vec![0f32; m * n];
            for (name, skinny) in [("skinny", true), ("gemm", false)] {
                for par in [false, true] {
                    let t = std::time::Instant::now();
                    for _ in 0..200 {
                        if skinny {
                            skinny_xwt(&mut dst, m, n, k, &x, (&w, k), false, par);
                        } else {
                            let p = if par {
                                gemm::Parallelism::Rayon(2)
                            } else {
                                gemm::Parallelism::None
                            };
                            unsafe {
                                gemm::gemm(
                                    m,
                                    n,
                                    k,
                                    dst.as_mut_ptr(),
                                    1,
                                    n as isize,
                                    false,
                                    x.as_ptr(),
                                    1,
                                    k as isize,
                                    w.as_ptr(),
                                    k as isize,
                                    1,
                                    1.0,
                                    1.0,
                                    false,
                                    false,
                                    false,
                                    p,
                                );
                            }
                        }
                    }
                    let us = t.elapsed().as_secs_f64() / 200.0 * 1e6;
                    println!(
                        "m={m} {name} par={par}: {us:.1} us, {:.1} GFLOP/s",
                        2.0 * (m * n * k) as f64 / us / 1e3
                    );
                }
            }
        }
    }
}
