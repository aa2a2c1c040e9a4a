//! fp16 products `x · Wᵀ + b` with a frozen W, for CPUs with AVX512_FP16: W converted to fp16
//! panels once at load, each row block of x converted as it is packed, the products summed in
//! fp16 for [`FLUSH`] depths at a time and those sums added into f32.
//!
//! Why: on the Xeon the speed issue was filed on, `vfmadd231ph` (32 fp16 lanes) runs at 2.15× the
//! f32 FMA's FLOP rate and bf16's `vdpbf16ps` at 0.49× (`kernels::probe`). Why the flushes:
//! fp16 keeps 11 significant bits, so a whole 384- or 1536-term dot product summed in fp16 would
//! lose about as many bits as it has; 32-term sums lose a few ulps of fp16 each, then f32 carries
//! the total. Why the bound check: fp16 tops out at 65504, so a product whose inputs could make a
//! 32-term sum overflow is not run in fp16 at all ([`HalfPanels::affine`] returns `None` and the
//! caller runs the f32 product).

use rayon::prelude::*;

/// Rows of x per tile.
const MR: usize = 12;
/// Columns of W per tile (two vectors of 32 fp16 lanes).
const NR: usize = 64;
/// Depths summed in fp16 before the sums are added into the f32 output.
pub(crate) const FLUSH: usize = 32;
/// Depths per pass over the panels: a B panel's slice (KC × 64 fp16, 32 KiB) stays in L1 while
/// the row panels of a task go past it.
const KC: usize = 256;
/// Row panels per parallel task. Small, so that the threads finish together (1024 rows in tasks
/// of 8 panels are 11 tasks: one of 2 threads runs 6); each task streams the B panels from L2
/// once, a few microseconds against its 0.1 ms of products.
const TASK_PANELS: usize = 4;
/// Largest magnitude a 32-term fp16 sum may reach: fp16's 65504 with a margin for rounding.
const SUM_LIMIT: f32 = 32_768.0;

/// Whether this CPU runs the fp16 tile.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512fp16") && is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A frozen weight W [n, k] as fp16 panels: per 64 output columns, the depths (padded to a
/// multiple of [`FLUSH`] with zeros) in order, 64 values each.
#[derive(Debug)]
pub struct HalfPanels {
    n: usize,
    k: usize,
    /// `k` rounded up to a multiple of [`FLUSH`].
    kp: usize,
    /// Largest |w| in W: with the largest |x| of a product, bounds every fp16 partial sum.
    max_abs: f32,
    data: Vec<u16>,
}

impl HalfPanels {
    /// Converts W [n, k] (row-major, `w.len() == n * k`) into panels; `None` where the CPU has no
    /// fp16 tile or W holds a value fp16 cannot hold (non-finite or above 65504).
    pub fn transposed(w: &[f32], n: usize, k: usize) -> Option<HalfPanels> {
        if !available() || w.len() != n * k || n == 0 || k == 0 {
            return None;
        }
        let kp = k.div_ceil(FLUSH) * FLUSH;
        let panels = n.div_ceil(NR);
        let mut data = vec![0u16; panels * kp * NR];
        let max_abs = data
            .par_chunks_mut(kp * NR)
            .enumerate()
            .map(|(j, panel)| {
                let mut row = vec![0u16; k];
                let mut max = 0f32;
                for c in 0..NR.min(n - j * NR) {
                    let m = to_half_row(&w[(j * NR + c) * k..][..k], &mut row, 1.0);
                    // NaN must win: `f32::max` would drop it.
                    max = if m.is_nan() || max.is_nan() {
                        f32::NAN
                    } else {
                        max.max(m)
                    };
                    for (p, &h) in row.iter().enumerate() {
                        panel[p * NR + c] = h;
                    }
                }
                max
            })
            .reduce(
                || 0f32,
                |a, b| {
                    if a.is_nan() || b.is_nan() {
                        f32::NAN
                    } else {
                        a.max(b)
                    }
                },
            );
        if max_abs.is_nan() || max_abs > 65_504.0 {
            return None;
        }
        Some(HalfPanels {
            n,
            k,
            kp,
            max_abs,
            data,
        })
    }

    /// W's shape [n, k].
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes the panels take.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// Panels of W [n, k] (row-major) for the input gradient `g · W` ([`HalfPanels::input_gradient`]):
    /// the panels of Wᵀ, whose output columns are W's k inputs and whose depths are its n outputs.
    pub fn turned(w: &[f32], n: usize, k: usize) -> Option<HalfPanels> {
        if w.len() != n * k {
            return None;
        }
        let mut wt = vec![0f32; n * k];
        for (r, row) in w.chunks_exact(k).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                wt[c * n + r] = v;
            }
        }
        HalfPanels::transposed(&wt, k, n)
    }

    /// `x · Wᵀ + b` for x [m, k] row-major and b [n]; `None` where some row of x is too large for
    /// fp16 sums against this W (or not finite): the caller runs the f32 product instead.
    pub fn affine(&self, x: &[f32], m: usize, b: &[f32]) -> Option<Vec<f32>> {
        if x.len() != m * self.k || b.len() != self.n {
            return None;
        }
        // Unscaled, so that a row's answer does not depend on its batchmates.
        self.product(x, m, super::rows_of(b, m), Scaling::Unit)
    }

    /// `g · W` for g [m, n] row-major, with these the panels of [`HalfPanels::turned`] (so
    /// `self.dims()` is W's [k, n] turned, and g has `self.k` columns); `None` where g holds a
    /// value that is not finite.
    ///
    /// Why the scale: gradients are small (1e-6 and below is common) and fp16's normal range
    /// ends at 6e-5, so unscaled they would lose their bits or vanish. g is multiplied by the
    /// power of two that puts its largest value just under the overflow bound (per task of rows,
    /// which read nothing of each other), and the sums are multiplied back while they are added
    /// into f32; powers of two change no bits in between.
    pub fn input_gradient(&self, g: &[f32], m: usize) -> Option<Vec<f32>> {
        if g.len() != m * self.k {
            return None;
        }
        self.product(g, m, vec![0f32; m * self.n], Scaling::Fit)
    }

    /// Largest |x| (after scaling) a product may take: each term is at most |x|·max|w|, and each
    /// fp16 sum holds FLUSH terms.
    fn x_limit(&self) -> f32 {
        SUM_LIMIT / (FLUSH as f32 * self.max_abs.max(f32::MIN_POSITIVE))
    }

    /// `out [m, n] += (s·x) · Wᵀ / s`, x [m, k] converted to fp16 after scaling by a power of two
    /// s (see [`Scaling`]); `None` where a scaled value of x is above [`HalfPanels::x_limit`] or
    /// not finite.
    fn product(
        &self,
        x: &[f32],
        m: usize,
        mut out: Vec<f32>,
        scaling: Scaling,
    ) -> Option<Vec<f32>> {
        let (n, k) = (self.n, self.k);
        if x.len() != m * k || out.len() != m * n || !available() {
            return None;
        }
        let x_limit = self.x_limit();
        let rows_per_task = TASK_PANELS * MR;
        let fits = out
            .par_chunks_mut(rows_per_task * n)
            .enumerate()
            .map(|(t, out)| {
                let r0 = t * rows_per_task;
                let rows = out.len() / n;
                let x = &x[r0 * k..][..rows * k];
                let scale = match scaling {
                    Scaling::Unit => 1.0,
                    Scaling::Fit => {
                        let max = max_abs(x);
                        if !max.is_finite() {
                            return false;
                        }
                        if max == 0.0 {
                            return true;
                        }
                        // The largest power of two not above the room, within f32's exponents.
                        2f32.powi(((x_limit / max).log2().floor() as i32).clamp(-100, 100))
                    }
                };
                self.task(x, rows, out, x_limit, scale)
            })
            .collect::<Vec<_>>();
        fits.into_iter().all(|ok| ok).then_some(out)
    }

    /// One task's rows: `out` [rows, n] holds the bias and receives the products. `false` (with
    /// `out` partly written) where a value of x exceeds `x_limit`.
    fn task(&self, x: &[f32], rows: usize, out: &mut [f32], x_limit: f32, scale: f32) -> bool {
        let n = self.n;
        let panels = rows.div_ceil(MR);
        let full_cols = n.is_multiple_of(NR);
        // Tiles that run past the last row or column go through a padded copy of the task's
        // output; the others write in place.
        let padded = !full_cols || !rows.is_multiple_of(MR);
        let npad = n.div_ceil(NR) * NR;
        let mut scratch = if padded {
            let mut s = vec![0f32; panels * MR * npad];
            for r in 0..rows {
                s[r * npad..][..n].copy_from_slice(&out[r * n..][..n]);
            }
            s
        } else {
            Vec::new()
        };
        let (c, ldc): (&mut [f32], usize) = if padded {
            (&mut scratch, npad)
        } else {
            (&mut *out, n)
        };
        if !self.run(c, ldc, x, rows, x_limit, scale) {
            return false;
        }
        if padded {
            for r in 0..rows {
                out[r * n..][..n].copy_from_slice(&scratch[r * npad..][..n]);
            }
        }
        true
    }

    /// The tiles of one task: C (`rows` rows padded to MR, stride `ldc`) += (scale·x) · Wᵀ / scale.
    /// `false` where a scaled value of x exceeds `x_limit`.
    fn run(
        &self,
        c: &mut [f32],
        ldc: usize,
        x: &[f32],
        rows: usize,
        x_limit: f32,
        scale: f32,
    ) -> bool {
        let (k, kp) = (self.k, self.kp);
        let panels = rows.div_ceil(MR);
        let npad = self.n.div_ceil(NR) * NR;
        let mut a = vec![0u16; panels * KC * MR];
        let unscale = 1.0 / scale;
        for k0 in (0..kp).step_by(KC) {
            let kc = KC.min(kp - k0);
            if !pack_rows(&mut a, x, rows, (k, k0, kc), x_limit, scale) {
                return false;
            }
            for j in 0..npad / NR {
                let b = &self.data[j * kp * NR + k0 * NR..][..kc * NR];
                for i in 0..panels {
                    let ap = &a[i * kc * MR..][..kc * MR];
                    let ct = &mut c[i * MR * ldc + j * NR..];
                    debug_assert!(ct.len() >= (MR - 1) * ldc + NR);
                    // SAFETY: `available()` held at entry; `ap` holds kc depths of MR values,
                    // `b` kc depths of NR, and `ct` MR rows of NR f32 at stride `ldc` (the
                    // padded copy has whole tiles; in place, rows and n are tile multiples).
                    unsafe { tile(kc, ap.as_ptr(), b.as_ptr(), ct.as_mut_ptr(), ldc, unscale) };
                }
            }
        }
        true
    }
}

/// How a product scales x before converting it to fp16.
#[derive(Debug, Clone, Copy)]
enum Scaling {
    /// Not at all: a row's answer then depends on nothing but the row.
    Unit,
    /// By the power of two that puts the largest |x| of each task's rows under the bound.
    Fit,
}

/// The largest |value| of `src`, NaN if any is NaN.
fn max_abs(src: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: every CPU with AVX512_FP16 has AVX-512F.
        return unsafe { max_abs_avx512(src) };
    }
    src.iter().fold(0f32, |a, &v| {
        if v.is_nan() || a.is_nan() {
            f32::NAN
        } else {
            a.max(v.abs())
        }
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_abs_avx512(src: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (mut max, mut nan) = (_mm512_setzero_ps(), 0u16);
    let mut chunks = src.chunks_exact(16);
    for c in &mut chunks {
        let v = _mm512_loadu_ps(c.as_ptr());
        nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        max = _mm512_max_ps(max, _mm512_abs_ps(v));
    }
    let tail = chunks.remainder();
    let v = _mm512_maskz_loadu_ps((1u16 << tail.len()) - 1, tail.as_ptr());
    nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    max = _mm512_max_ps(max, _mm512_abs_ps(v));
    if nan != 0 {
        f32::NAN
    } else {
        _mm512_reduce_max_ps(max)
    }
}

/// Packs depths `k0..k0 + kc` of `rows` rows of x [rows, k], times `scale`, into fp16 row panels
/// (per panel, per depth, MR values; rows past the end and depths past k are zeros). `false`
/// where a scaled value is above `limit` in magnitude or not finite.
fn pack_rows(
    a: &mut [u16],
    x: &[f32],
    rows: usize,
    (k, k0, kc): (usize, usize, usize),
    limit: f32,
    scale: f32,
) -> bool {
    let panels = rows.div_ceil(MR);
    let a = &mut a[..panels * kc * MR];
    a.fill(0);
    let depth = k.saturating_sub(k0).min(kc);
    let mut row = vec![0u16; depth];
    for r in 0..rows {
        let (i, rr) = (r / MR, r % MR);
        let max = to_half_row(&x[r * k + k0..][..depth], &mut row, scale);
        if max.is_nan() || max > limit {
            return false;
        }
        let panel = &mut a[i * kc * MR..][..kc * MR];
        for (p, &h) in row.iter().enumerate() {
            panel[p * MR + rr] = h;
        }
    }
    true
}

/// Converts `scale · src` to fp16 bits in `dst[..src.len()]` (round to nearest even) and returns
/// the largest |scaled value|, NaN if any value is NaN.
fn to_half_row(src: &[f32], dst: &mut [u16], scale: f32) -> f32 {
    let dst = &mut dst[..src.len()];
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: every CPU with AVX512_FP16 (checked by `available()` before any conversion)
        // has AVX-512F and F16C.
        unsafe { to_half_row_avx512(src, dst, scale) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = scale;
        dst.fill(0);
        f32::NAN
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
unsafe fn to_half_row_avx512(src: &[f32], dst: &mut [u16], scale: f32) -> f32 {
    use std::arch::x86_64::*;
    let mut max = _mm512_setzero_ps();
    let scale = _mm512_set1_ps(scale);
    let mut nan: u16 = 0;
    for (s, d) in src.chunks(16).zip(dst.chunks_mut(16)) {
        let mask: u16 = if s.len() == 16 {
            0xffff
        } else {
            (1u16 << s.len()) - 1
        };
        let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, s.as_ptr()), scale);
        nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        max = _mm512_max_ps(max, _mm512_abs_ps(v));
        let h = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
        let mut bits = [0u16; 16];
        _mm256_storeu_si256(bits.as_mut_ptr().cast(), h);
        d.copy_from_slice(&bits[..d.len()]);
    }
    if nan != 0 {
        f32::NAN
    } else {
        _mm512_reduce_max_ps(max)
    }
}

/// Two fp16 FMAs (one per 32-column half of the tile) of the A panel value at byte `$off`.
#[rustfmt::skip]
macro_rules! fma_row {
    ($lo:literal, $hi:literal, $off:literal) => {
        concat!(
            "vfmadd231ph zmm", $lo, ", zmm24, word ptr [{a} + ", $off, "]{{1to32}}\n",
            "vfmadd231ph zmm", $hi, ", zmm25, word ptr [{a} + ", $off, "]{{1to32}}\n",
        )
    };
}

/// Adds the fp16 sums of tile row `r` (accumulators `$lo`, `$hi`), times the unscale in zmm28,
/// into that row of C in f32, zeroes them, and steps `{cr}` to the next row.
#[rustfmt::skip]
macro_rules! flush_row {
    ($lo:literal, $hi:literal) => {
        concat!(
            "vcvtph2psx zmm26, ymm", $lo, "\n",
            "vextracti64x4 ymm27, zmm", $lo, ", 1\n",
            "vcvtph2psx zmm27, ymm27\n",
            "vfmadd213ps zmm26, zmm28, zmmword ptr [{cr}]\n",
            "vfmadd213ps zmm27, zmm28, zmmword ptr [{cr} + 64]\n",
            "vmovups zmmword ptr [{cr}], zmm26\n",
            "vmovups zmmword ptr [{cr} + 64], zmm27\n",
            "vcvtph2psx zmm26, ymm", $hi, "\n",
            "vextracti64x4 ymm27, zmm", $hi, ", 1\n",
            "vcvtph2psx zmm27, ymm27\n",
            "vfmadd213ps zmm26, zmm28, zmmword ptr [{cr} + 128]\n",
            "vfmadd213ps zmm27, zmm28, zmmword ptr [{cr} + 192]\n",
            "vmovups zmmword ptr [{cr} + 128], zmm26\n",
            "vmovups zmmword ptr [{cr} + 192], zmm27\n",
            "vpxord zmm", $lo, ", zmm", $lo, ", zmm", $lo, "\n",
            "vpxord zmm", $hi, ", zmm", $hi, ", zmm", $hi, "\n",
            "add {cr}, {ldc}\n",
        )
    };
}

/// The MR × NR tile: C[MR, NR] (f32, row stride `ldc` floats) += `unscale` · A panel · B panel
/// over `kc` depths (a multiple of [`FLUSH`]), summed in fp16 for FLUSH depths at a time.
///
/// # Safety
/// The CPU has AVX512_FP16 and AVX512BW; `a` holds `kc * MR` and `b` `kc * NR` values; `c`
/// points at MR rows of NR writable f32 each, `ldc` apart.
#[cfg(target_arch = "x86_64")]
unsafe fn tile(kc: usize, a: *const u16, b: *const u16, c: *mut f32, ldc: usize, unscale: f32) {
    debug_assert!(kc.is_multiple_of(FLUSH) && kc > 0);
    std::arch::asm!(
        "vbroadcastss zmm28, dword ptr [{unscale}]",
        "vpxord zmm0, zmm0, zmm0", "vpxord zmm1, zmm1, zmm1", "vpxord zmm2, zmm2, zmm2",
        "vpxord zmm3, zmm3, zmm3", "vpxord zmm4, zmm4, zmm4", "vpxord zmm5, zmm5, zmm5",
        "vpxord zmm6, zmm6, zmm6", "vpxord zmm7, zmm7, zmm7", "vpxord zmm8, zmm8, zmm8",
        "vpxord zmm9, zmm9, zmm9", "vpxord zmm10, zmm10, zmm10", "vpxord zmm11, zmm11, zmm11",
        "vpxord zmm12, zmm12, zmm12", "vpxord zmm13, zmm13, zmm13", "vpxord zmm14, zmm14, zmm14",
        "vpxord zmm15, zmm15, zmm15", "vpxord zmm16, zmm16, zmm16", "vpxord zmm17, zmm17, zmm17",
        "vpxord zmm18, zmm18, zmm18", "vpxord zmm19, zmm19, zmm19", "vpxord zmm20, zmm20, zmm20",
        "vpxord zmm21, zmm21, zmm21", "vpxord zmm22, zmm22, zmm22", "vpxord zmm23, zmm23, zmm23",
        "2:",
        "mov {inner}, {flush}",
        "3:",
        "vmovdqu16 zmm24, zmmword ptr [{b}]",
        "vmovdqu16 zmm25, zmmword ptr [{b} + 64]",
        fma_row!("0", "1", "0"),
        fma_row!("2", "3", "2"),
        fma_row!("4", "5", "4"),
        fma_row!("6", "7", "6"),
        fma_row!("8", "9", "8"),
        fma_row!("10", "11", "10"),
        fma_row!("12", "13", "12"),
        fma_row!("14", "15", "14"),
        fma_row!("16", "17", "16"),
        fma_row!("18", "19", "18"),
        fma_row!("20", "21", "20"),
        fma_row!("22", "23", "22"),
        "add {a}, 24",
        "add {b}, 128",
        "dec {inner}",
        "jnz 3b",
        "mov {cr}, {c}",
        flush_row!("0", "1"),
        flush_row!("2", "3"),
        flush_row!("4", "5"),
        flush_row!("6", "7"),
        flush_row!("8", "9"),
        flush_row!("10", "11"),
        flush_row!("12", "13"),
        flush_row!("14", "15"),
        flush_row!("16", "17"),
        flush_row!("18", "19"),
        flush_row!("20", "21"),
        flush_row!("22", "23"),
        "sub {blocks}, 1",
        "jnz 2b",
        // The Rust around this block is compiled for SSE2: with the upper halves of the vector
        // registers left dirty, its legacy SSE instructions would each wait on a merge.
        "vzeroupper",
        a = inout(reg) a => _,
        b = inout(reg) b => _,
        c = in(reg) c,
        cr = out(reg) _,
        ldc = in(reg) ldc * 4,
        inner = out(reg) _,
        blocks = inout(reg) kc / FLUSH => _,
        flush = const FLUSH,
        unscale = in(reg) &unscale,
        out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
        out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
        out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
        out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
        out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
        out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
        out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
        out("zmm28") _,
        options(nostack),
    );
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile(_: usize, _: *const u16, _: *const u16, _: *mut f32, _: usize, _: f32) {
    unreachable!("the fp16 tile runs only where `available()` holds (x86_64)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_half(v: f32) -> u16 {
        let mut h = [0u16];
        to_half_row(&[v], &mut h, 1.0);
        h[0]
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::Rng::derive(seed, "half-test");
        (0..len).map(|_| r.normal() as f32).collect()
    }

    /// x · Wᵀ + b in f64 from the fp16-rounded inputs: what the tile computes, but for its fp16
    /// partial sums.
    fn reference(x: &[f32], w: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let h = |v: f32| f64::from(from_half(to_half(v)));
        let mut out = vec![0f64; m * n];
        for r in 0..m {
            for c in 0..n {
                let dot: f64 = (0..k).map(|p| h(x[r * k + p]) * h(w[c * k + p])).sum();
                out[r * n + c] = dot + f64::from(b[c]);
            }
        }
        out
    }

    /// The f32 value of fp16 bits (the test's own decoding, independent of the hardware's).
    fn from_half(h: u16) -> f32 {
        let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let exp = i32::from((h >> 10) & 0x1f);
        let frac = f32::from(h & 0x3ff);
        match exp {
            0 => sign * frac * 2f32.powi(-24),
            31 => sign * f32::INFINITY,
            e => sign * (1.0 + frac / 1024.0) * 2f32.powi(e - 15),
        }
    }

    #[test]
    fn to_half_rounds_to_nearest() {
        if !available() {
            return;
        }
        assert_eq!(to_half(1.0), 0x3c00);
        assert_eq!(to_half(-2.0), 0xc000);
        assert_eq!(to_half(65504.0), 0x7bff);
        // 1 + 2^-11 is halfway between 1 and the next fp16: ties go to the even one, 1.
        assert_eq!(to_half(1.0 + 2f32.powi(-11)), 0x3c00);
        assert_eq!(to_half(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        assert_eq!(from_half(to_half(0.333_251_95)), 0.333_251_95);
    }

    #[test]
    fn products_match_the_rounded_inputs_reference() {
        if !available() {
            return;
        }
        // Shapes on and off the tile: rows and columns past a tile, depths past a flush and a
        // pass, several tasks.
        for (m, n, k) in [(12, 64, 32), (7, 70, 45), (100, 128, 300), (250, 192, 513)] {
            let x = values(m * k, 1);
            let w: Vec<f32> = values(n * k, 2).iter().map(|v| v * 0.05).collect();
            let b = values(n, 3);
            let panels = HalfPanels::transposed(&w, n, k).expect("fp16 panels");
            let got = panels.affine(&x, m, &b).expect("in range");
            let want = reference(&x, &w, &b, m, n, k);
            // The typical |x · w| over k depths, and fp16's relative step (2^-11): each 32-term
            // fp16 sum rounds 32 times, a few steps of the sum in all; a wrong tile (a row,
            // column or depth off) is off by the order of `scale` itself.
            let scale = (k as f64).sqrt() * 0.05;
            let mut total = 0.0;
            for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                let err = (f64::from(g) - e).abs();
                total += err;
                assert!(err <= 8e-3 * scale, "{m}x{n}x{k} [{i}]: {g} against {e}");
            }
            let mean = total / got.len() as f64;
            assert!(mean <= 1e-3 * scale, "{m}x{n}x{k}: mean error {mean}");
        }
    }

    #[test]
    fn input_gradients_match_the_rounded_inputs_reference_at_any_magnitude() {
        if !available() {
            return;
        }
        // g · W for W [n, k]: the output has W's k columns, the depth is W's n rows. Gradients
        // of 1e-7 would be fp16 subnormals or zeros unscaled; 1e3 would overflow 32-term sums.
        for (m, n, k, size) in [(7, 70, 45, 1.0), (100, 384, 128, 1e-7), (250, 96, 200, 1e3)] {
            let g: Vec<f32> = values(m * n, 4).iter().map(|v| v * size).collect();
            let w: Vec<f32> = values(n * k, 5).iter().map(|v| v * 0.05).collect();
            let panels = HalfPanels::turned(&w, n, k).expect("fp16 panels");
            assert_eq!(panels.dims(), (k, n));
            let got = panels.input_gradient(&g, m).expect("finite");
            let max = g.iter().fold(0f32, |a, v| a.max(v.abs()));
            let s = 2f32.powi((panels.x_limit() / max).log2().floor() as i32);
            let h = |v: f32| f64::from(from_half(to_half(v)));
            let scale = (n as f64).sqrt() * 0.05 * f64::from(size);
            let mut total = 0.0;
            for r in 0..m {
                for c in 0..k {
                    let want: f64 = (0..n)
                        .map(|p| h(g[r * n + p] * s) * h(w[p * k + c]))
                        .sum::<f64>()
                        / f64::from(s);
                    let err = (f64::from(got[r * k + c]) - want).abs();
                    total += err;
                    assert!(
                        err <= 8e-3 * scale,
                        "{m}x{n}x{k} [{r},{c}]: {} against {want}",
                        got[r * k + c]
                    );
                }
            }
            let mean = total / (m * k) as f64;
            assert!(mean <= 1e-3 * scale, "{m}x{n}x{k}: mean error {mean}");
        }
        let (m, n, k) = (3, 64, 32);
        let w = values(n * k, 6);
        let panels = HalfPanels::turned(&w, n, k).expect("fp16 panels");
        assert_eq!(
            panels.input_gradient(&vec![0.0; m * n], m),
            Some(vec![0.0; m * k])
        );
        let mut g = values(m * n, 7);
        g[5] = f32::INFINITY;
        assert!(panels.input_gradient(&g, m).is_none());
        g[5] = f32::NAN;
        assert!(panels.input_gradient(&g, m).is_none());
    }

    #[test]
    fn inputs_too_large_for_fp16_sums_are_refused() {
        if !available() {
            return;
        }
        let (m, n, k) = (5, 64, 40);
        let w = vec![1.0f32; n * k];
        let b = vec![0.0f32; n];
        let panels = HalfPanels::transposed(&w, n, k).expect("fp16 panels");
        let mut x = vec![1.0f32; m * k];
        assert!(panels.affine(&x, m, &b).is_some());
        // 32 products of 2000 would sum to 64000: refused before the tile runs.
        x[3 * k + 7] = 2000.0;
        assert!(panels.affine(&x, m, &b).is_none());
        x[3 * k + 7] = f32::NAN;
        assert!(panels.affine(&x, m, &b).is_none());
        assert!(HalfPanels::transposed(&[1e6f32; 64], 1, 64).is_none());
    }

    /// Median seconds of `a` and of `b` over 9 interleaved calls each.
    fn interleaved_medians<T>(mut a: impl FnMut() -> T, mut b: impl FnMut() -> T) -> (f64, f64) {
        let (mut ta, mut tb) = (Vec::new(), Vec::new());
        for _ in 0..9 {
            for (f, times) in [
                (&mut a as &mut dyn FnMut() -> T, &mut ta),
                (&mut b, &mut tb),
            ] {
                let t = std::time::Instant::now();
                std::hint::black_box(f());
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let med = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        (med(ta), med(tb))
    }

    /// The fp16 product against the f32 one of our blocked GEMM (2 threads) at MiniLM's forward
    /// shapes: `cargo test --release -p adapterkit --lib kernels::half -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn time_against_f32() {
        if !available() {
            println!("no AVX512_FP16");
            return;
        }
        for (m, n, k) in [(1024, 1152, 384), (1024, 1536, 384), (1024, 384, 1536)] {
            let x = values(m * k, 1);
            let w: Vec<f32> = values(n * k, 2).iter().map(|v| v * 0.05).collect();
            let b = values(n, 3);
            let half = HalfPanels::transposed(&w, n, k).expect("fp16 panels");
            let full = super::super::blocked::PackedB::transposed(&w, n, k).expect("f32 panels");
            let flop = 2.0 * (m * n * k) as f64;
            let report = |what: &str, (h, f): (f64, f64)| {
                println!(
                    "{m}x{n}x{k} {what}: fp16 {:.0} GFLOP/s, f32 {:.0} GFLOP/s, {:.2}×",
                    flop / h / 1e9,
                    flop / f / 1e9,
                    f / h
                );
            };
            let forward = interleaved_medians(
                || half.affine(&x, m, &b).expect("in range"),
                || {
                    let mut y = super::super::rows_of(&b, m);
                    let lhs = (&x[..], k as isize, 1);
                    super::super::blocked::gemm_packed(&mut y, m, lhs, &full, true, true);
                    y
                },
            );
            report("x·Wᵀ", forward);
            // The input gradient g [m, n] · W through the same weight.
            let turned = HalfPanels::turned(&w, n, k).expect("fp16 panels");
            let g: Vec<f32> = values(m * n, 4).iter().map(|v| v * 1e-5).collect();
            let gradient = interleaved_medians(
                || turned.input_gradient(&g, m).expect("finite"),
                || {
                    let mut y = super::super::zeros(m * k);
                    let lhs = (&g[..], n as isize, 1);
                    super::super::blocked::gemm_packed_transposed(
                        &mut y, m, lhs, &full, false, true,
                    );
                    y
                },
            );
            report("g·W", gradient);
        }
    }
}
