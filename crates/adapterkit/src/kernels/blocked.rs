//! Our f32 matrix product for the large products of training and batched inference: a
//! GotoBLAS-style design with a register tile per instruction set, 12×32 on AVX-512 and 6×16 on
//! AVX2 + FMA.
//!
//! Why it exists: the `gemm` crate runs only its AVX2 kernels on stable Rust, and MKL picks its
//! AVX2 path on AMD CPUs. On a core with two 512-bit FMA pipes (AMD Zen 5, recent Intel server
//! parts) that is half of the machine's f32 peak. On every CPU, `gemm` also packs both operands on
//! every call, while frozen weights never change: here they are packed once at load
//! ([`PackedB`]) and row-major activations are read in place. Both operands are otherwise packed
//! into panels (so any strides work), the depth is blocked so the A panel stays in L1 and a block
//! of B panels in L2, and the output rows are split across the rayon pool.
//!
//! `ADAPTERKIT_GEMM=portable` turns it off (for A/B benchmarks; the caller then uses `gemm`), and
//! `ADAPTERKIT_GEMM=avx2` takes the AVX2 tile on an AVX-512 CPU.

use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

/// The instruction set a register tile is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F: a 12×32 tile in 24 zmm accumulators.
    Avx512,
    /// AVX2 + FMA: a 6×16 tile in 12 ymm accumulators.
    Avx2,
}

impl Isa {
    /// Whether this CPU can run the tile.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Avx512 => is_x86_feature_detected!("avx512f"),
                Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }
}

/// The tile this process uses: the widest the CPU has, unless `ADAPTERKIT_GEMM` says otherwise;
/// `None` where there is none (the caller then uses the `gemm` crate).
pub fn isa() -> Option<Isa> {
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = || [Isa::Avx512, Isa::Avx2].into_iter().find(|i| i.supported());
        let choice = std::env::var("ADAPTERKIT_GEMM").unwrap_or_default();
        match choice.as_str() {
            "portable" => None,
            "avx2" if Isa::Avx2.supported() => Some(Isa::Avx2),
            "" => best(),
            other => {
                // Only the speed depends on it (every path computes the same product), so a value
                // we cannot honour is a warning, not an error.
                tracing::warn!(
                    value = other,
                    "ADAPTERKIT_GEMM: expected `portable`, or `avx2` on a CPU with AVX2 and FMA; \
                     using {}",
                    best().map_or("the gemm crate".to_string(), |i| format!("the {i:?} tile"))
                );
                best()
            }
        }
    })
}

/// Whether this process uses one of our tiles at all.
pub fn enabled() -> bool {
    isa().is_some()
}

/// Every tile this CPU can run (for tests that check each).
#[cfg(test)]
fn available() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .filter(|i| i.supported())
        .collect()
}

/// A register tile: its shape, the cache blocking around it, and its two micro-kernels.
trait Tile {
    /// Rows of the register tile.
    const MR: usize;
    /// Columns of the register tile.
    const NR: usize;
    /// Largest depth block: the depth is split into equal blocks of at most this many steps, so
    /// an MR×KC A panel stays in L1.
    const KC: usize;
    /// B panels per column block, so KC × NR × NC_PANELS floats stay in L2.
    const NC_PANELS: usize;
    /// Whether row-major left operands are read in place rather than packed, on this CPU.
    fn direct_a() -> bool;
    /// Products of fewer multiply-adds (m·n·k) go to the `gemm` crate, where it is faster.
    const MIN_VOLUME: usize;

    /// `c[..h][..w] = [c +] a_panelᵀ · b_panel` over depth kc, prefetching when `PF`.
    ///
    /// # Safety
    /// The CPU must run the tile; `a` must hold kc·MR floats, `b` kc·NR, `c` (h − 1)·ldc + w,
    /// h ≤ MR, w ≤ NR.
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel<const PF: bool>(
        kc: usize,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        ldc: usize,
        h: usize,
        w: usize,
        add: bool,
    );

    /// [`Tile::kernel`] for a full panel of MR rows of A read in place: row r's depth p at
    /// `a[r·lda + p]`.
    ///
    /// # Safety
    /// The CPU must run the tile; `a` must hold (MR − 1)·lda + kc floats, `b` kc·NR, `c`
    /// (MR − 1)·ldc + w, w ≤ NR.
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel_direct(
        kc: usize,
        a: &[f32],
        lda: usize,
        b: &[f32],
        c: &mut [f32],
        ldc: usize,
        w: usize,
        add: bool,
    );
}

/// The AVX-512 tile.
struct Zmm;
/// The AVX2 + FMA tile.
struct Ymm;

/// Runs the generic body `$f::<T>($args)` with the tile type of `$isa`.
macro_rules! on_tile {
    ($isa:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $isa {
            Isa::Avx512 => $f::<Zmm>($($arg),*),
            Isa::Avx2 => $f::<Ymm>($($arg),*),
        }
    };
}

thread_local! {
    // Packing buffers are reused across calls: a fresh multi-MB allocation per product costs
    // page faults comparable to the product itself at these sizes.
    static BUF_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static BUF_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a zeroed-or-garbage scratch buffer of at least `len` floats from `cell`, or a
/// fresh one when the cell is already in use (rayon can re-enter on a waiting thread).
fn with_buf<R>(
    cell: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    let mut f = Some(f);
    let r = cell.with(|c| {
        let Ok(mut v) = c.try_borrow_mut() else {
            return None;
        };
        if v.len() < len {
            v.resize(len, 0.0);
        }
        let f = f.take()?;
        Some(f(&mut v[..len]))
    });
    match (r, f) {
        (Some(r), _) => r,
        (None, Some(f)) => f(&mut vec![0f32; len]),
        (None, None) => unreachable!("the closure ran, so it returned a value"),
    }
}

/// A strided matrix operand: element (r, c) is at `r * rs + c * cs`.
type Operand<'a> = (&'a [f32], isize, isize);

/// `dst (m×n, row-major) = [dst +] lhs · rhs` for `lhs` m×k and `rhs` k×n given as (slice, row
/// stride, column stride). Returns false, touching nothing, when no tile is enabled or the
/// strides are negative; the caller then uses another implementation. The caller has checked
/// that every addressed element lies inside the slices.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand<'_>,
    rhs: Operand<'_>,
    accumulate: bool,
    parallel: bool,
) -> bool {
    match isa() {
        Some(isa) if m * n * k >= on_tile!(isa, min_volume()) => {
            gemm_on(isa, dst, m, n, k, lhs, rhs, accumulate, parallel)
        }
        _ => false,
    }
}

fn min_volume<T: Tile>() -> usize {
    T::MIN_VOLUME
}

/// [`gemm`] on a given tile, which the CPU must support.
#[allow(clippy::too_many_arguments)]
fn gemm_on(
    isa: Isa,
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand<'_>,
    rhs: Operand<'_>,
    accumulate: bool,
    parallel: bool,
) -> bool {
    if !isa.supported() || lhs.1 < 0 || lhs.2 < 0 || rhs.1 < 0 || rhs.2 < 0 || dst.len() < m * n {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return true;
    }
    on_tile!(isa, gemm_tile(dst, m, n, k, lhs, rhs, accumulate, parallel));
    true
}

#[allow(clippy::too_many_arguments)]
fn gemm_tile<T: Tile>(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand<'_>,
    rhs: Operand<'_>,
    accumulate: bool,
    parallel: bool,
) {
    let threads = threads(parallel);
    with_buf(&BUF_B, n.div_ceil(T::NR) * k * T::NR, |bp| {
        pack_b::<T>(bp, rhs, k, n, threads > 1);
        run_packed::<T>(dst, m, n, k, lhs, bp, accumulate, threads);
    });
}

fn threads(parallel: bool) -> usize {
    if parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    }
}

/// The row-parallel part of [`gemm`] once B is packed: each task packs its rows of A (or reads
/// them in place) and runs the blocked loops against all of B.
#[allow(clippy::too_many_arguments)]
fn run_packed<T: Tile>(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand<'_>,
    bp: &[f32],
    accumulate: bool,
    threads: usize,
) {
    let row_panels = m.div_ceil(T::MR);
    let tasks = threads.min(row_panels);
    let per = row_panels.div_ceil(tasks) * T::MR;
    let work = |(t, out): (usize, &mut [f32])| {
        let r0 = t * per;
        let rows = out.len() / n;
        // In place needs rows that do not overlap (a broadcast row, stride 0, is packed).
        if lhs.2 == 1 && lhs.1 >= k as isize && direct_a::<T>() {
            let (src, rs) = (lhs.0, lhs.1 as usize);
            compute_direct::<T>(out, rows, n, k, &src[r0 * rs..], rs, bp, accumulate);
            return;
        }
        let my_panels = rows.div_ceil(T::MR);
        with_buf(&BUF_A, my_panels * k * T::MR, |ap| {
            pack_a::<T>(ap, lhs, r0, rows, k);
            compute::<T>(out, rows, n, k, ap, bp, accumulate);
        });
    };
    let dst = &mut dst[..m * n];
    if tasks > 1 {
        dst.par_chunks_mut(per * n).enumerate().for_each(work);
    } else {
        work((0, dst));
    }
}

/// A frozen weight W [n, k] packed once as the right operand `Wᵀ` of `x · Wᵀ`, in the panel
/// layout [`gemm`] would otherwise build on every call. Packing the transposed weight is a strided
/// gather (the slowest packing there is), and base weights never change, so it is done at load.
/// The panels are the weight's only copy: the input gradient `g · W` is built from them by block
/// transposes ([`gemm_packed_transposed`]), and W can be read back ([`PackedB::unpack_rows`]).
#[derive(Debug)]
pub struct PackedB {
    panels: Vec<f32>,
    n: usize,
    k: usize,
    isa: Isa,
}

impl PackedB {
    /// Packs `w` (n rows of k, row-major) as `Wᵀ` for this process's tile; `None` when no tile is
    /// enabled (the panels would never be read) or `w` does not hold n·k elements.
    pub fn transposed(w: &[f32], n: usize, k: usize) -> Option<PackedB> {
        Self::transposed_on(isa()?, w, n, k)
    }

    /// [`PackedB::transposed`] for a given tile; `None` also where the CPU cannot run it.
    fn transposed_on(isa: Isa, w: &[f32], n: usize, k: usize) -> Option<PackedB> {
        if !isa.supported() || w.len() != n * k || n == 0 || k == 0 {
            return None;
        }
        let panels = on_tile!(isa, packed_panels(w, n, k));
        Some(PackedB { panels, n, k, isa })
    }

    /// Output columns (rows of W).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Depth (columns of W).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes the panels take.
    pub fn bytes(&self) -> usize {
        self.panels.len() * std::mem::size_of::<f32>()
    }

    /// Rows `r0..r0 + rows` of W, row-major, read back from the panels (for the few readers of
    /// a frozen weight that need it as a plain matrix); `None` past the last row.
    pub fn unpack_rows(&self, r0: usize, rows: usize) -> Option<Vec<f32>> {
        if r0.checked_add(rows)? > self.n {
            return None;
        }
        let (k, nr) = (self.k, on_tile!(self.isa, panel_width()));
        let mut w = vec![0f32; rows * k];
        for (i, row) in w.chunks_exact_mut(k).enumerate() {
            let j = r0 + i;
            let panel = &self.panels[(j / nr) * k * nr..][..k * nr];
            for (v, line) in row.iter_mut().zip(panel.chunks_exact(nr)) {
                *v = line[j % nr];
            }
        }
        Some(w)
    }
}

fn panel_width<T: Tile>() -> usize {
    T::NR
}

fn packed_panels<T: Tile>(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut panels = vec![0f32; n.div_ceil(T::NR) * k * T::NR];
    // At load, across the pool: the load is not inside a rayon task (nor a once-cell a worker
    // could re-enter), and BERT-base's weights are 340 MB of strided gathers.
    pack_b::<T>(&mut panels, (w, 1, k as isize), k, n, true);
    panels
}

/// `dst (m×n) = [dst +] lhs · Wᵀ` with W packed at load: [`gemm`] without packing B. Returns
/// false, touching nothing, where [`gemm`] would (negative strides, short `dst`).
pub(crate) fn gemm_packed(
    dst: &mut [f32],
    m: usize,
    lhs: Operand<'_>,
    w: &PackedB,
    accumulate: bool,
    parallel: bool,
) -> bool {
    let (n, k) = (w.n, w.k);
    if lhs.1 < 0 || lhs.2 < 0 || dst.len() < m * n {
        return false;
    }
    if m == 0 {
        return true;
    }
    let threads = threads(parallel);
    on_tile!(
        w.isa,
        run_packed_wide(dst, m, n, k, lhs, &w.panels, accumulate, threads)
    );
    true
}

/// [`run_packed`], with the columns split across threads instead of the rows where the rows make
/// too few panels to go round (a sentence or two at inference): one task per block of column
/// panels, each writing its columns of every row to its own buffer.
#[allow(clippy::too_many_arguments)]
fn run_packed_wide<T: Tile>(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand<'_>,
    bp: &[f32],
    accumulate: bool,
    threads: usize,
) {
    let panels = n.div_ceil(T::NR);
    if threads < 2 || m.div_ceil(T::MR) >= 2 * threads || panels < 2 {
        run_packed::<T>(dst, m, n, k, lhs, bp, accumulate, threads);
        return;
    }
    let per = panels.div_ceil(threads.min(panels));
    let parts: Vec<(usize, usize, Vec<f32>)> = (0..panels.div_ceil(per))
        .into_par_iter()
        .map(|t| {
            let (c0, c1) = (t * per * T::NR, ((t + 1) * per * T::NR).min(n));
            let w = c1 - c0;
            let mut part = vec![0f32; m * w];
            if accumulate {
                for (i, row) in part.chunks_exact_mut(w).enumerate() {
                    row.copy_from_slice(&dst[i * n + c0..i * n + c1]);
                }
            }
            let b = &bp[t * per * k * T::NR..];
            run_packed::<T>(&mut part, m, w, k, lhs, b, accumulate, 1);
            (c0, w, part)
        })
        .collect();
    for (c0, w, part) in parts {
        for (i, row) in part.chunks_exact(w).enumerate() {
            dst[i * n + c0..i * n + c0 + w].copy_from_slice(row);
        }
    }
}

/// `dst (m×k) = [dst +] lhs · W` for `lhs` m×n, with W [n, k] held only as its panels: the
/// right operand's panels (depth n, k columns) are built from W's by NR×NR block transposes,
/// both sides contiguous blocks. This is the input gradient through a frozen layer. Returns
/// false, touching nothing, where [`gemm`] would.
pub(crate) fn gemm_packed_transposed(
    dst: &mut [f32],
    m: usize,
    lhs: Operand<'_>,
    w: &PackedB,
    accumulate: bool,
    parallel: bool,
) -> bool {
    if lhs.1 < 0 || lhs.2 < 0 || dst.len() < m * w.k {
        return false;
    }
    if m == 0 {
        return true;
    }
    let threads = threads(parallel);
    on_tile!(
        w.isa,
        transposed_product(dst, m, lhs, w, accumulate, threads)
    );
    true
}

fn transposed_product<T: Tile>(
    dst: &mut [f32],
    m: usize,
    lhs: Operand<'_>,
    w: &PackedB,
    accumulate: bool,
    threads: usize,
) {
    let (n, k) = (w.n, w.k);
    with_buf(&BUF_B, k.div_ceil(T::NR) * n * T::NR, |bp| {
        transpose_panels::<T>(bp, &w.panels, n, k, threads > 1);
        run_packed::<T>(dst, m, k, n, lhs, bp, accumulate, threads);
    });
}

/// Builds the panels of W (depth n, k columns, NR wide) from the panels of Wᵀ (depth k, n
/// columns): block (column panel c, depth block q) of the result is the transpose of block
/// (column panel q, depth block c) of the source.
fn transpose_panels<T: Tile>(bp: &mut [f32], src: &[f32], n: usize, k: usize, parallel: bool) {
    let nr = T::NR;
    let work = |(cp, out): (usize, &mut [f32])| {
        let c0 = cp * nr;
        let cols = nr.min(k - c0);
        for (qb, block) in out.chunks_mut(nr * nr).enumerate() {
            // Source panel qb holds W rows qb·NR.., one depth step (W column) per line of NR.
            let from = &src[qb * k * nr + c0 * nr..][..cols * nr];
            transpose_block(block, from, nr, cols);
        }
    };
    let bp = &mut bp[..k.div_ceil(nr) * n * nr];
    if parallel {
        bp.par_chunks_mut(n * nr).enumerate().for_each(work);
    } else {
        bp.chunks_mut(n * nr).enumerate().for_each(work);
    }
}

/// One block of [`transpose_panels`]: `block[qq·nr + d] = from[d·nr + qq]` for the `cols` lines
/// of `from`, zero for d ≥ cols (`block` is up to nr rows of nr). Only called on a tile
/// the CPU runs, so AVX2 is there; the scalar loop is the reference it is tested against.
fn transpose_block(block: &mut [f32], from: &[f32], nr: usize, cols: usize) {
    #[cfg(target_arch = "x86_64")]
    if nr.is_multiple_of(8) && is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        unsafe { transpose_block_avx2(block, from, nr, cols) };
        return;
    }
    transpose_block_scalar(block, from, nr, cols);
}

/// [`transpose_block`] one float at a time.
fn transpose_block_scalar(block: &mut [f32], from: &[f32], nr: usize, cols: usize) {
    for (qq, row) in block.chunks_exact_mut(nr).enumerate() {
        for (d, line) in row.iter_mut().zip(from.chunks_exact(nr)) {
            *d = line[qq];
        }
        row[cols..].fill(0.0);
    }
}

/// [`transpose_block`] in 8×8 register transposes; one float at a time it was 1.4% of an MR
/// training step in `perf`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn transpose_block_avx2(block: &mut [f32], from: &[f32], nr: usize, cols: usize) {
    use std::arch::x86_64::*;
    // The last block of a panel has fewer rows where n is not a multiple of nr.
    let rows = block.len() / nr;
    assert!(rows <= nr && from.len() >= cols * nr && cols <= nr);
    for a in (0..nr).step_by(8) {
        for b in (0..rows).step_by(8) {
            let line = |i: usize| {
                let at = (a + i) * nr + b;
                if a + i < cols {
                    // SAFETY: line a + i < cols holds nr ≥ b + 8 floats from (a + i)·nr.
                    unsafe { _mm256_loadu_ps(from[at..at + 8].as_ptr()) }
                } else {
                    _mm256_setzero_ps()
                }
            };
            let t = transpose8([
                line(0),
                line(1),
                line(2),
                line(3),
                line(4),
                line(5),
                line(6),
                line(7),
            ]);
            // Full groups of 8 rows store without per-row bounds checks: the single checked loop
            // ran 1.1–1.3× the scalar transpose, this 1.3–1.6× (`time_transposing_pack`).
            if b + 8 <= rows {
                let out = &mut block[b * nr..(b + 8) * nr];
                for (j, t) in t.iter().enumerate() {
                    // SAFETY: row j of these 8 has lanes a..a + 8 ≤ nr.
                    unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(j * nr + a), *t) };
                }
            } else {
                for (j, t) in t.iter().enumerate().take(rows - b) {
                    let at = (b + j) * nr + a;
                    // SAFETY: row b + j < rows of the block has lanes a..a + 8 ≤ nr.
                    unsafe { _mm256_storeu_ps(block[at..at + 8].as_mut_ptr(), *t) };
                }
            }
        }
    }
}

/// Packs `rhs` (k×n) into panels of NR columns, each k×NR row-major, zero-padded past n.
fn pack_b<T: Tile>(bp: &mut [f32], (src, rs, cs): Operand<'_>, k: usize, n: usize, parallel: bool) {
    let pack = |(jp, panel): (usize, &mut [f32])| {
        let j0 = jp * T::NR;
        pack_lines::<T>(
            false,
            panel,
            src,
            j0,
            T::NR.min(n - j0),
            cs as usize,
            rs as usize,
        );
    };
    if parallel {
        bp.par_chunks_mut(k * T::NR).enumerate().for_each(pack);
    } else {
        bp.chunks_mut(k * T::NR).enumerate().for_each(pack);
    }
}

/// Packs rows r0..r0+rows of `lhs` into panels of MR rows, each k×MR (row r of the panel at
/// offset p·MR + r), zero-padded past the last row.
fn pack_a<T: Tile>(ap: &mut [f32], (src, rs, cs): Operand<'_>, r0: usize, rows: usize, k: usize) {
    for (ip, panel) in ap.chunks_exact_mut(k * T::MR).enumerate() {
        let i0 = ip * T::MR;
        pack_lines::<T>(
            true,
            panel,
            src,
            r0 + i0,
            T::MR.min(rows - i0),
            rs as usize,
            cs as usize,
        );
    }
}

/// [`pack_panel`] with the panel width of the tile's A (`rows_of_a`) or B side as a constant.
fn pack_lines<T: Tile>(
    rows_of_a: bool,
    panel: &mut [f32],
    src: &[f32],
    x0: usize,
    lines: usize,
    sx: usize,
    sp: usize,
) {
    match if rows_of_a { T::MR } else { T::NR } {
        6 => pack_panel::<6>(panel, src, x0, lines, sx, sp),
        12 => pack_panel::<12>(panel, src, x0, lines, sx, sp),
        16 => pack_panel::<16>(panel, src, x0, lines, sx, sp),
        32 => pack_panel::<32>(panel, src, x0, lines, sx, sp),
        w => unreachable!("no tile has a side of {w}"),
    }
}

/// Packs one panel of W lines (rows of A, columns of B) starting at line x0, each read along the
/// depth: element (x, p) of `src` is at x·sx + p·sp and goes to `panel[p·W + x − x0]`; lines past
/// `lines` are zero. A unit stride on either side takes a contiguous copy, and the chunked
/// iterators keep the loops free of bounds checks. Only called on a tile the CPU runs, so AVX2 is
/// there for the transposing case ([`pack_transposing`]).
fn pack_panel<const W: usize>(
    panel: &mut [f32],
    src: &[f32],
    x0: usize,
    lines: usize,
    sx: usize,
    sp: usize,
) {
    if sx == 1 {
        for (p, row) in panel.chunks_exact_mut(W).enumerate() {
            let s = p * sp + x0;
            row[..lines].copy_from_slice(&src[s..s + lines]);
            row[lines..].fill(0.0);
        }
        return;
    }
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if sp == 1 && is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected; the caller's lines hold every depth of the panel.
        done = unsafe { pack_transposing::<W>(panel, src, x0, lines, sx) };
    }
    pack_panel_scalar::<W>(&mut panel[done * W..], src, x0, lines, sx, sp, done);
}

/// [`pack_panel`] one float at a time from depth `p0` on (`panel` starts at that depth): the
/// reference [`pack_transposing`] is tested against, and the strided and tail cases.
fn pack_panel_scalar<const W: usize>(
    panel: &mut [f32],
    src: &[f32],
    x0: usize,
    lines: usize,
    sx: usize,
    sp: usize,
    p0: usize,
) {
    // Depth in chunks, so the part of the panel written by the W passes stays in L1: one pass
    // per line over the whole depth touched every cache line of a 74 KiB panel (k = 1536) W
    // times, and packing A took a quarter of the product's time.
    const CHUNK: usize = 64;
    for (c, part) in panel.chunks_mut(CHUNK * W).enumerate() {
        let p0 = p0 + c * CHUNK;
        let len = part.len() / W;
        for x in 0..W {
            let rows = part.chunks_exact_mut(W);
            let base = (x0 + x) * sx + p0 * sp;
            if x >= lines {
                rows.for_each(|d| d[x] = 0.0);
            } else if sp == 1 {
                rows.zip(&src[base..base + len])
                    .for_each(|(d, &v)| d[x] = v);
            } else {
                rows.zip(src[base..].iter().step_by(sp))
                    .for_each(|(d, &v)| d[x] = v);
            }
        }
    }
}

/// [`pack_panel`] for lines contiguous along the depth (`sp` = 1: rows of a row-major A, columns
/// of a transposed weight), eight depths of eight lines at a time through an 8×8 register
/// transpose; one float at a time this was about 4% of an MR training step in `perf`. Panels of 6 take
/// lanes 0..6 of each transposed row: the two extra lanes land on the next depth's first lanes,
/// which its own store then overwrites (the last depth's store is masked). Panels of 12 (the
/// AVX-512 tile's A) store only the low four lanes of their second group. Returns how many
/// depths it packed (a multiple of 8); the rest is the caller's.
///
/// # Safety
/// The CPU must support AVX2; W must be 6 or a multiple of 4; line x0 + lines − 1 must hold
/// `panel.len() / W` depths from its start at (x0 + line)·sx.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack_transposing<const W: usize>(
    panel: &mut [f32],
    src: &[f32],
    x0: usize,
    lines: usize,
    sx: usize,
) -> usize {
    use std::arch::x86_64::*;
    debug_assert!(W == 6 || W.is_multiple_of(4));
    let k = panel.len() / W;
    let full = k / 8 * 8;
    let tail = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
    let out = panel.as_mut_ptr();
    for p0 in (0..full).step_by(8) {
        for g in (0..W).step_by(8) {
            let mut r = [_mm256_setzero_ps(); 8];
            for (i, r) in r.iter_mut().enumerate() {
                if g + i < lines {
                    let at = (x0 + g + i) * sx + p0;
                    *r = _mm256_loadu_ps(src[at..at + 8].as_ptr());
                }
            }
            let t = transpose8(r);
            for (j, t) in t.iter().enumerate() {
                let p = p0 + j;
                // SAFETY: row p < k starts at p·W inside the panel; a group of eight stores
                // lanes g..g + 8 ≤ W, a group of four (W = 12) lanes g..g + 4 = W; W = 6 spills
                // two lanes into row p + 1 < k, or is masked on the last row.
                unsafe {
                    let at = out.add(p * W + g);
                    if W % 8 == 4 && g + 8 > W {
                        _mm_storeu_ps(at, _mm256_castps256_ps128(*t));
                    } else if W >= 8 || p + 1 < k {
                        _mm256_storeu_ps(at, *t);
                    } else {
                        _mm256_maskstore_ps(at, tail, *t);
                    }
                }
            }
        }
    }
    full
}

/// Lane j of result i is lane i of row j.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn transpose8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// The blocked loops over one task's rows.
#[allow(clippy::too_many_arguments)]
fn compute<T: Tile>(
    out: &mut [f32],
    rows: usize,
    n: usize,
    k: usize,
    ap: &[f32],
    bp: &[f32],
    accumulate: bool,
) {
    compute_with::<T>(out, rows, n, k, ap, bp, accumulate, Blocking::of::<T>())
}

/// Cache blocking of [`compute`]: depth block, row panels per row block, B panels per column
/// block, whether B panels (true) or A panels (false) are the inner loop, and whether the
/// kernel prefetches its C tile and the panels' next lines.
#[derive(Clone, Copy, Debug)]
struct Blocking {
    kc: usize,
    mc_panels: usize,
    nc_panels: usize,
    b_inner: bool,
    prefetch: bool,
}

impl Blocking {
    fn of<T: Tile>() -> Blocking {
        Blocking {
            kc: T::KC,
            mc_panels: usize::MAX,
            nc_panels: T::NC_PANELS,
            b_inner: true,
            prefetch: true,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn compute_with<T: Tile>(
    out: &mut [f32],
    rows: usize,
    n: usize,
    k: usize,
    ap: &[f32],
    bp: &[f32],
    accumulate: bool,
    bl: Blocking,
) {
    let (mr, nr) = (T::MR, T::NR);
    let row_panels = rows.div_ceil(mr);
    let panels = n.div_ceil(nr);
    assert!(
        out.len() >= rows * n && ap.len() >= row_panels * k * mr && bp.len() >= panels * k * nr
    );
    // Loop order (outer to inner): depth block, row block, column block, then A panel and B
    // panel in the order `b_inner` says. `time_phases` compares orders and block sizes on one
    // core; on the Xeon they were within 10% of each other, prefetching added about 5%, and the
    // kernel alone with its panels in L1 reached 110 GFLOP/s against about 88 here.
    let blocks = k.div_ceil(bl.kc);
    let kc_even = k.div_ceil(blocks);
    let mut pc = 0;
    while pc < k {
        let kc = kc_even.min(k - pc);
        let add = accumulate || pc > 0;
        let mut ic = 0;
        while ic < row_panels {
            let ic_end = row_panels.min(ic.saturating_add(bl.mc_panels));
            let mut jc = 0;
            while jc < panels {
                let jc_end = panels.min(jc.saturating_add(bl.nc_panels));
                let mut tile = |ip: usize, jp: usize| {
                    let w = nr.min(n - jp * nr);
                    let b = &bp[jp * k * nr + pc * nr..][..kc * nr];
                    let h = mr.min(rows - ip * mr);
                    let a = &ap[ip * k * mr + pc * mr..][..kc * mr];
                    let c = &mut out[ip * mr * n + jp * nr..];
                    // SAFETY: the caller chose a tile the CPU runs; `a` and `b` hold kc·MR and
                    // kc·NR floats; `c` holds rows h with stride n and w ≤ n − jp·NR valid
                    // columns, the last row ending inside `out` (asserted above).
                    unsafe {
                        if bl.prefetch {
                            T::kernel::<true>(kc, a, b, c, n, h, w, add)
                        } else {
                            T::kernel::<false>(kc, a, b, c, n, h, w, add)
                        }
                    };
                };
                if bl.b_inner {
                    for ip in ic..ic_end {
                        for jp in jc..jc_end {
                            tile(ip, jp);
                        }
                    }
                } else {
                    for jp in jc..jc_end {
                        for ip in ic..ic_end {
                            tile(ip, jp);
                        }
                    }
                }
                jc = jc_end;
            }
            ic = ic_end;
        }
        pc += kc;
    }
}

/// Whether row-major left operands are read in place ([`compute_direct`]) instead of packed:
/// the tile's choice for this CPU, unless `ADAPTERKIT_GEMM_A` is `pack` or `direct` (for A/B
/// benchmarks).
fn direct_a<T: Tile>() -> bool {
    static CHOICE: OnceLock<Option<bool>> = OnceLock::new();
    let forced = *CHOICE.get_or_init(|| match std::env::var("ADAPTERKIT_GEMM_A").as_deref() {
        Ok("pack") => Some(false),
        Ok("direct") => Some(true),
        Ok(other) => {
            // Only the speed depends on it, as with `ADAPTERKIT_GEMM`.
            tracing::warn!(
                value = other,
                "ADAPTERKIT_GEMM_A: expected `pack` or `direct`; using the tile's choice for this CPU"
            );
            None
        }
        Err(_) => None,
    });
    forced.unwrap_or_else(T::direct_a)
}

/// Whether the CPU is an Intel one (its vendor string through `cpuid`).
fn intel() -> bool {
    static INTEL: OnceLock<bool> = OnceLock::new();
    *INTEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let id = std::arch::x86_64::__cpuid(0);
            [id.ebx, id.edx, id.ecx]
                .iter()
                .flat_map(|r| r.to_le_bytes())
                .eq(*b"GenuineIntel")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// [`compute`] for a left operand with unit column stride (activations, row-major), read where it
/// lies: rows `a[r·lda ..]`. A full panel of MR rows goes to [`Tile::kernel_direct`]; the last,
/// partial one is packed (it is at most one panel in a task's rows).
#[allow(clippy::too_many_arguments)]
fn compute_direct<T: Tile>(
    out: &mut [f32],
    rows: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    bp: &[f32],
    accumulate: bool,
) {
    let (mr, nr) = (T::MR, T::NR);
    let row_panels = rows.div_ceil(mr);
    let panels = n.div_ceil(nr);
    assert!(out.len() >= rows * n && bp.len() >= panels * k * nr && lda >= k);
    assert!(rows == 0 || a.len() >= (rows - 1) * lda + k);
    let full = rows / mr;
    let blocks = k.div_ceil(T::KC);
    let kc_even = k.div_ceil(blocks);
    let mut tail = Vec::new();
    if full < row_panels {
        tail = vec![0f32; k * mr];
        pack_a::<T>(
            &mut tail,
            (a, lda as isize, 1),
            full * mr,
            rows - full * mr,
            k,
        );
    }
    let mut pc = 0;
    while pc < k {
        let kc = kc_even.min(k - pc);
        let add = accumulate || pc > 0;
        let mut jc = 0;
        while jc < panels {
            let jc_end = panels.min(jc + T::NC_PANELS);
            for ip in 0..row_panels {
                let h = mr.min(rows - ip * mr);
                for jp in jc..jc_end {
                    let w = nr.min(n - jp * nr);
                    let b = &bp[jp * k * nr + pc * nr..][..kc * nr];
                    let c = &mut out[ip * mr * n + jp * nr..];
                    // SAFETY: the caller chose a tile the CPU runs; a full panel's MR rows of kc
                    // floats from column pc lie inside `a` (asserted above: the last row ends at
                    // (rows−1)·lda + k); the tail panel holds kc·MR floats from pc·MR; `c` holds
                    // h rows of stride n with w valid columns, inside `out`.
                    unsafe {
                        if ip < full {
                            let a = &a[ip * mr * lda + pc..];
                            T::kernel_direct(kc, a, lda, b, c, n, w, add)
                        } else {
                            let a = &tail[pc * mr..][..kc * mr];
                            T::kernel::<true>(kc, a, b, c, n, h, w, add)
                        }
                    };
                }
            }
            jc = jc_end;
        }
        pc += kc;
    }
}

/// The [`Tile`] micro-kernels as calls into `$m`, a module of target-feature functions (only on
/// x86_64; no tile is ever enabled elsewhere).
macro_rules! micro_kernels {
    ($m:ident) => {
        unsafe fn kernel<const PF: bool>(
            kc: usize,
            a: &[f32],
            b: &[f32],
            c: &mut [f32],
            ldc: usize,
            h: usize,
            w: usize,
            add: bool,
        ) {
            // SAFETY: forwarded from the caller.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                $m::kernel::<PF>(kc, a, b, c, ldc, h, w, add)
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("no tile off x86_64 {:?}", (kc, a, b, c, ldc, h, w, add))
        }

        unsafe fn kernel_direct(
            kc: usize,
            a: &[f32],
            lda: usize,
            b: &[f32],
            c: &mut [f32],
            ldc: usize,
            w: usize,
            add: bool,
        ) {
            // SAFETY: forwarded from the caller.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                $m::kernel_direct(kc, a, lda, b, c, ldc, w, add)
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("no tile off x86_64 {:?}", (kc, a, lda, b, c, ldc, w, add))
        }
    };
}

impl Tile for Zmm {
    const MR: usize = 12;
    const NR: usize = 32;
    // A 12×512 A panel is 24 KiB (L1 is 48 KiB); 8 B panels of 512×32 are 512 KiB (L2 ≥ 1 MiB).
    const KC: usize = 512;
    const NC_PANELS: usize = 8;
    // Rows read in place ran at 1.0–1.4× packed panels on an AMD EPYC Zen 5, but at 0.66–0.9×
    // on an Intel Xeon (family 6 model 207) at MiniLM's products (`time_direct_vs_packed_a`,
    // `bench/results/2026-12-07-direct-a-xeon.txt`).
    fn direct_a() -> bool {
        !intel()
    }
    const MIN_VOLUME: usize = 0;

    micro_kernels!(zmm);
}

impl Tile for Ymm {
    const MR: usize = 6;
    const NR: usize = 16;
    // A 6×512 A panel is 12 KiB (L1 is 32 KiB on Zen 3) and 8 B panels of 512×16 are 256 KiB
    // (L2 is 512 KiB there). On a Zen 3 core (`time_phases`) this beat depth blocks of 128,
    // 192 and 256 by 5–15%: the deeper the block, the fewer times each C tile is reloaded.
    const KC: usize = 512;
    const NC_PANELS: usize = 8;
    // On a Zen 3 core six in-place row streams ran at 0.8–0.95× packed panels
    // (`time_direct_vs_packed_a`), and whole products at 0.93× the `gemm` crate against 1.07–1.19×
    // packed (`time_against_gemm_crate`, `ADAPTERKIT_GEMM_A=pack`).
    fn direct_a() -> bool {
        false
    }
    // One head's attention products (32×32×32 to 128×128×32) ran 1.2–1.8× as fast on the `gemm`
    // crate on a Zen 3 core (`time_against_gemm_crate`): our per-call packing and the tile's
    // C traffic dominate at depths of 32; the smallest model product above this is 1024×384×384.
    const MIN_VOLUME: usize = 1 << 21;

    micro_kernels!(ymm);
}

/// Runs `step(p)` for p in 0..kc, four depths per loop turn. The loop's own instructions
/// (index, compare, branch) otherwise share the six cycles of one depth's 12 FMAs: in L1 on
/// a Zen 3 core the tile ran at 73–75 GFLOP/s one depth per turn and 84–86 four per turn,
/// against 88 for independent FMAs alone; whole products 3–14% faster (the probe of commit
/// de51602, `bench/results/2026-12-07-gemm-unroll-zen3.txt`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn unrolled(kc: usize, mut step: impl FnMut(usize)) {
    let mut p = 0;
    while p + 4 <= kc {
        step(p);
        step(p + 1);
        step(p + 2);
        step(p + 3);
        p += 4;
    }
    while p < kc {
        step(p);
        p += 1;
    }
}

/// The 12×32 AVX-512 micro-kernels.
#[cfg(target_arch = "x86_64")]
mod zmm {
    use super::unrolled;
    use std::arch::x86_64::*;

    const MR: usize = 12;
    const NR: usize = 32;

    /// [`kernel`] reading a full 12-row panel of A in place: row r's depth p at `a[r·lda + p]`.
    /// The rows are addressed from four bases three rows apart, so each broadcast is one load with a
    /// scaled index (x86 addressing reaches base + lda and base + 2·lda).
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `a` must hold 11·lda + kc elements, `b` kc·NR, `c`
    /// (MR − 1)·ldc + w, w ≤ NR.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kernel_direct(
        kc: usize,
        a: &[f32],
        lda: usize,
        b: &[f32],
        c: &mut [f32],
        ldc: usize,
        w: usize,
        add: bool,
    ) {
        debug_assert!(a.len() >= (MR - 1) * lda + kc && b.len() >= kc * NR && w <= NR);
        debug_assert!(c.len() >= (MR - 1) * ldc + w);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let bp = b.as_ptr();
        let base = a.as_ptr();
        let bases = [
            base,
            base.add(3 * lda),
            base.add(6 * lda),
            base.add(9 * lda),
        ];
        for r in 0..MR {
            let row = c.as_ptr().add(r * ldc) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(row);
            _mm_prefetch::<_MM_HINT_T0>(row.add(64));
        }
        let step = |acc: &mut [[__m512; 2]; MR], p: usize| {
            _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add((p + 8) * NR) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add((p + 8) * NR + 16) as *const i8);
            // SAFETY: p < kc, and the panel holds kc·NR floats.
            let (b0, b1) = unsafe {
                (
                    _mm512_loadu_ps(bp.add(p * NR)),
                    _mm512_loadu_ps(bp.add(p * NR + 16)),
                )
            };
            for (g, rows) in acc.chunks_exact_mut(3).enumerate() {
                let at = bases[g].add(p);
                for (i, acc) in rows.iter_mut().enumerate() {
                    // SAFETY: row 3g + i < MR at depth p < kc lies inside `a`.
                    let av = _mm512_set1_ps(unsafe { *at.add(i * lda) });
                    acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
                }
            }
        };
        unrolled(kc, |p| step(&mut acc, p));
        store_tile(&acc, c, ldc, MR, w, add);
    }

    /// Writes (or adds) the accumulated tile's h rows and w columns into `c`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `c` must hold (h − 1)·ldc + w elements, h ≤ MR, w ≤ NR.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_tile(
        acc: &[[__m512; 2]; MR],
        c: &mut [f32],
        ldc: usize,
        h: usize,
        w: usize,
        add: bool,
    ) {
        let lanes = |v: usize| -> __mmask16 {
            if v >= 16 {
                0xffff
            } else {
                ((1u32 << v) - 1) as __mmask16
            }
        };
        let (m0, m1) = (lanes(w), lanes(w.saturating_sub(16)));
        let cp = c.as_mut_ptr();
        for (r, acc) in acc.iter().enumerate().take(h) {
            // SAFETY: row r < h starts at r·ldc and the masks cover only its w valid columns.
            unsafe {
                let row = cp.add(r * ldc);
                let (mut v0, mut v1) = (acc[0], acc[1]);
                if add {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
                }
                _mm512_mask_storeu_ps(row, m0, v0);
                _mm512_mask_storeu_ps(row.add(16), m1, v1);
            }
        }
    }

    /// The 12×32 register tile: `c[..h][..w] = [c +] a_panelᵀ · b_panel` over depth kc.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `c` must hold (h − 1)·ldc + w elements, h ≤ MR, w ≤ NR.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kernel<const PF: bool>(
        kc: usize,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        ldc: usize,
        h: usize,
        w: usize,
        add: bool,
    ) {
        debug_assert!(a.len() >= kc * MR && b.len() >= kc * NR && h <= MR && w <= NR);
        debug_assert!(c.len() >= (h - 1) * ldc + w);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        if PF {
            for r in 0..h {
                let row = c.as_ptr().add(r * ldc) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(row);
                _mm_prefetch::<_MM_HINT_T0>(row.add(64));
            }
        }
        let step = |acc: &mut [[__m512; 2]; MR], p: usize| {
            if PF {
                // The panels are padded, so reading ahead stays inside the buffer or is dropped
                // (a prefetch never faults).
                _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add((p + 16) * MR) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add((p + 8) * NR) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add((p + 8) * NR + 16) as *const i8);
            }
            // SAFETY: p < kc, and the panels hold kc·NR and kc·MR floats.
            let (b0, b1) = unsafe {
                (
                    _mm512_loadu_ps(bp.add(p * NR)),
                    _mm512_loadu_ps(bp.add(p * NR + 16)),
                )
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                let av = _mm512_set1_ps(unsafe { *ap.add(p * MR + r) });
                acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
            }
        };
        unrolled(kc, |p| step(&mut acc, p));
        store_tile(&acc, c, ldc, h, w, add);
    }
}

/// The 6×16 AVX2 + FMA micro-kernels: 12 ymm accumulators, two for the B row and one for the
/// broadcast of A fill 15 of the 16 registers.
#[cfg(target_arch = "x86_64")]
mod ymm {
    use super::unrolled;
    use std::arch::x86_64::*;

    const MR: usize = 6;
    const NR: usize = 16;

    /// [`kernel`] reading a full 6-row panel of A in place: row r's depth p at `a[r·lda + p]`,
    /// from two bases three rows apart (x86 addressing reaches base + lda and base + 2·lda).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `a` must hold 5·lda + kc elements, `b` kc·NR, `c`
    /// (MR − 1)·ldc + w, w ≤ NR.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel_direct(
        kc: usize,
        a: &[f32],
        lda: usize,
        b: &[f32],
        c: &mut [f32],
        ldc: usize,
        w: usize,
        add: bool,
    ) {
        debug_assert!(a.len() >= (MR - 1) * lda + kc && b.len() >= kc * NR && w <= NR);
        debug_assert!(c.len() >= (MR - 1) * ldc + w);
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let bp = b.as_ptr();
        let bases = [a.as_ptr(), a.as_ptr().add(3 * lda)];
        for r in 0..MR {
            _mm_prefetch::<_MM_HINT_T0>(c.as_ptr().add(r * ldc) as *const i8);
        }
        let step = |acc: &mut [[__m256; 2]; MR], p: usize| {
            _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add((p + 8) * NR) as *const i8);
            // SAFETY: p < kc, and the panel holds kc·NR floats.
            let (b0, b1) = unsafe {
                (
                    _mm256_loadu_ps(bp.add(p * NR)),
                    _mm256_loadu_ps(bp.add(p * NR + 8)),
                )
            };
            for (g, rows) in acc.chunks_exact_mut(3).enumerate() {
                let at = bases[g].add(p);
                for (i, acc) in rows.iter_mut().enumerate() {
                    // SAFETY: row 3g + i < MR at depth p < kc lies inside `a`.
                    let av = _mm256_set1_ps(unsafe { *at.add(i * lda) });
                    acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
                }
            }
        };
        unrolled(kc, |p| step(&mut acc, p));
        store_tile(&acc, c, ldc, MR, w, add);
    }

    /// Writes (or adds) the accumulated tile's h rows and w columns into `c`.
    ///
    /// # Safety
    /// The CPU must support AVX2; `c` must hold (h − 1)·ldc + w elements, h ≤ MR, w ≤ NR.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store_tile(
        acc: &[[__m256; 2]; MR],
        c: &mut [f32],
        ldc: usize,
        h: usize,
        w: usize,
        add: bool,
    ) {
        for (r, acc) in acc.iter().enumerate().take(h) {
            let row = &mut c[r * ldc..r * ldc + w];
            if w == NR {
                // SAFETY: the row holds NR = 16 floats.
                unsafe {
                    let p = row.as_mut_ptr();
                    let (mut v0, mut v1) = (acc[0], acc[1]);
                    if add {
                        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(p));
                        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(p.add(8)));
                    }
                    _mm256_storeu_ps(p, v0);
                    _mm256_storeu_ps(p.add(8), v1);
                }
            } else {
                // A column tail (at most one per row of tiles): through a buffer.
                let mut lanes = [0f32; NR];
                // SAFETY: `lanes` holds 16 floats.
                unsafe {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
                    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[1]);
                }
                for (d, &v) in row.iter_mut().zip(&lanes) {
                    *d = if add { v + *d } else { v };
                }
            }
        }
    }

    /// The 6×16 register tile: `c[..h][..w] = [c +] a_panelᵀ · b_panel` over depth kc.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `c` must hold (h − 1)·ldc + w elements, h ≤ MR,
    /// w ≤ NR.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel<const PF: bool>(
        kc: usize,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        ldc: usize,
        h: usize,
        w: usize,
        add: bool,
    ) {
        debug_assert!(a.len() >= kc * MR && b.len() >= kc * NR && h <= MR && w <= NR);
        debug_assert!(c.len() >= (h - 1) * ldc + w);
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        if PF {
            for r in 0..h {
                _mm_prefetch::<_MM_HINT_T0>(c.as_ptr().add(r * ldc) as *const i8);
            }
        }
        let step = |acc: &mut [[__m256; 2]; MR], p: usize| {
            if PF {
                // The panels are padded, so reading ahead stays inside the buffer or is dropped
                // (a prefetch never faults). One B row is one 64-byte line.
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add((p + 8) * NR) as *const i8);
            }
            // SAFETY: p < kc, and the panels hold kc·NR and kc·MR floats.
            let (b0, b1) = unsafe {
                (
                    _mm256_loadu_ps(bp.add(p * NR)),
                    _mm256_loadu_ps(bp.add(p * NR + 8)),
                )
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                let av = _mm256_set1_ps(unsafe { *ap.add(p * MR + r) });
                acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
            }
        };
        unrolled(kc, |p| step(&mut acc, p));
        store_tile(&acc, c, ldc, h, w, add);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(m: usize, n: usize, k: usize, lhs: Operand<'_>, rhs: Operand<'_>) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let a = lhs.0[(i as isize * lhs.1 + p as isize * lhs.2) as usize];
                    let b = rhs.0[(p as isize * rhs.1 + j as isize * rhs.2) as usize];
                    s += a as f64 * b as f64;
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    fn med(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    /// The MiniLM products of a 16×128 forward (m, n, k), weights [out, in] as stored.
    const FORWARD_SHAPES: [(usize, usize, usize); 4] = [
        (2048, 1152, 384),
        (2048, 384, 384),
        (2048, 1536, 384),
        (2048, 384, 1536),
    ];

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::Rng::derive(seed, "gemm512-test");
        (0..len).map(|_| r.normal() as f32).collect()
    }

    #[test]
    fn transposing_pack_matches_the_scalar_pack() {
        fn check<const W: usize>() {
            // Depths with and without a tail of 8, lines short of the panel, strided lines.
            for (k, lines, sx) in [
                (8, W, 8),
                (37, W, 40),
                (64, W - 1, 70),
                (17, 1, 17),
                (3, 2, 5),
            ] {
                let src = values(lines * sx + k, (W * 1000 + k) as u64);
                let x0 = 1.min(lines - 1);
                let lines = lines - x0;
                // NaN-filled panels show any float the pack forgot to write.
                // The floats past the panel must stay as they were.
                let (mut fast, mut slow) = (vec![f32::NAN; W * k + 8], vec![f32::NAN; W * k]);
                pack_panel::<W>(&mut fast[..W * k], &src, x0, lines, sx, 1);
                assert!(
                    fast.split_off(W * k).iter().all(|v| v.is_nan()),
                    "W {W} k {k}: past the panel"
                );
                pack_panel_scalar::<W>(&mut slow, &src, x0, lines, sx, 1, 0);
                assert!(
                    slow.iter().all(|v| !v.is_nan()),
                    "W {W} k {k}: scalar left a gap"
                );
                assert_eq!(
                    fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    slow.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "W {W}, k {k}, lines {lines}, sx {sx}"
                );
            }
        }
        check::<6>();
        check::<12>();
        check::<16>();
        check::<32>();
    }

    #[test]
    fn register_block_transpose_matches_the_scalar_one() {
        for (nr, rows) in [(16, 16), (32, 32), (16, 5), (32, 13)] {
            for cols in [nr, nr - 1, 3, 1] {
                let from = values(cols * nr, (nr + cols) as u64);
                let (mut fast, mut slow) = (vec![f32::NAN; rows * nr], vec![f32::NAN; rows * nr]);
                transpose_block(&mut fast, &from, nr, cols);
                transpose_block_scalar(&mut slow, &from, nr, cols);
                assert!(slow.iter().all(|v| !v.is_nan()));
                assert_eq!(
                    fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    slow.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "nr {nr}, cols {cols}"
                );
            }
        }
    }

    #[test]
    fn matches_a_float64_reference_for_every_layout_and_tail() {
        for isa in available() {
            matches_reference_on(isa);
        }
    }

    fn matches_reference_on(isa: Isa) {
        // Shapes with row and column tails, a depth above one KC block, and more column panels
        // than one NC block.
        let shapes = [
            (1, 1, 1),
            (13, 33, 7),
            (12, 32, 384),
            (25, 300, 385),
            (100, 64, 800),
            (37, 2, 19),
        ];
        for (case, &(m, n, k)) in shapes.iter().enumerate() {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let a = values(m * k, case as u64);
                let b = values(k * n, 100 + case as u64);
                let lhs = if ta {
                    (&a[..], 1, m as isize)
                } else {
                    (&a[..], k as isize, 1)
                };
                let rhs = if tb {
                    (&b[..], 1, k as isize)
                } else {
                    (&b[..], n as isize, 1)
                };
                let want = reference(m, n, k, lhs, rhs);
                for accumulate in [false, true] {
                    for parallel in [false, true] {
                        let init = values(m * n, 7);
                        let mut dst = init.clone();
                        assert!(gemm_on(
                            isa, &mut dst, m, n, k, lhs, rhs, accumulate, parallel
                        ));
                        for (i, (&d, &w)) in dst.iter().zip(&want).enumerate() {
                            let w = w + if accumulate { init[i] as f64 } else { 0.0 };
                            let tol = 1e-5 * (1.0 + w.abs()) * (k as f64).sqrt();
                            assert!(
                                (d as f64 - w).abs() < tol,
                                "{isa:?} {m}x{n}x{k} ta={ta} tb={tb} acc={accumulate} \
                                 par={parallel} at {i}: {d} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Products that hold W only as its panels: few rows (columns split across threads), the
    /// input gradient `g · W` (block transposes) and W itself read back.
    fn few_rows_and_input_gradients_on(isa: Isa) {
        // Row counts below, at and above the column-split threshold; n and k with tails and
        // without; a depth above one KC block.
        for (case, &(m, n, k)) in [
            (1, 300, 385),
            (5, 33, 19),
            (14, 384, 384),
            (16, 1536, 384),
            (40, 64, 600),
            (3, 16, 1),
        ]
        .iter()
        .enumerate()
        {
            let w = values(n * k, 70 + case as u64);
            let packed = PackedB::transposed_on(isa, &w, n, k).expect("the CPU runs the tile");
            assert_eq!(
                packed.unpack_rows(0, n).as_deref(),
                Some(&w[..]),
                "{isa:?} unpack"
            );
            let tail = packed.unpack_rows(n - 1, 1).expect("the last row");
            assert_eq!(tail[..], w[(n - 1) * k..], "{isa:?} unpack last row");
            assert!(packed.unpack_rows(n, 1).is_none() && packed.unpack_rows(1, n).is_none());
            let x = values(m * k, 80 + case as u64);
            let g = values(m * n, 90 + case as u64);
            let fwd = reference(m, n, k, (&x, k as isize, 1), (&w, 1, k as isize));
            let bwd = reference(m, k, n, (&g, n as isize, 1), (&w, k as isize, 1));
            for accumulate in [false, true] {
                for parallel in [false, true] {
                    let init = values(m * n.max(k), 7);
                    let mut y = init[..m * n].to_vec();
                    assert!(gemm_packed(
                        &mut y,
                        m,
                        (&x, k as isize, 1),
                        &packed,
                        accumulate,
                        parallel
                    ));
                    let mut dx = init[..m * k].to_vec();
                    let lhs = (&g[..], n as isize, 1);
                    assert!(gemm_packed_transposed(
                        &mut dx, m, lhs, &packed, accumulate, parallel
                    ));
                    for (what, got, want, depth) in [("x·Wᵀ", &y, &fwd, k), ("g·W", &dx, &bwd, n)]
                    {
                        for (i, (&d, &r)) in got.iter().zip(want).enumerate() {
                            let r = r + if accumulate { init[i] as f64 } else { 0.0 };
                            let tol = 1e-5 * (1.0 + r.abs()) * (depth as f64).sqrt();
                            assert!(
                                (d as f64 - r).abs() < tol,
                                "{isa:?} {what} {m}x{n}x{k} acc={accumulate} par={parallel} \
                                 at {i}: {d} vs {r}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn empty_depth_clears_or_keeps_the_output() {
        for isa in available() {
            empty_depth_on(isa);
        }
    }

    fn empty_depth_on(isa: Isa) {
        let mut dst = vec![3f32; 6];
        assert!(gemm_on(
            isa,
            &mut dst,
            2,
            3,
            0,
            (&[], 0, 1),
            (&[], 3, 1),
            true,
            false
        ));
        assert_eq!(dst, vec![3f32; 6]);
        assert!(gemm_on(
            isa,
            &mut dst,
            2,
            3,
            0,
            (&[], 0, 1),
            (&[], 3, 1),
            false,
            false
        ));
        assert_eq!(dst, vec![0f32; 6]);
    }

    #[test]
    fn packed_weights_and_in_place_rows_match_the_reference() {
        for isa in available() {
            on_tile!(isa, packed_and_in_place_on(isa));
        }
    }

    fn packed_and_in_place_on<T: Tile>(isa: Isa) {
        // Row tails (25 = two panels + 1), column tails, two depth blocks, and rows of A with
        // a stride beyond the depth (a view into a wider matrix).
        for (case, &(m, n, k, pad)) in [
            (25, 300, 385, 3),
            (12, 32, 7, 0),
            (100, 64, 800, 1),
            (5, 33, 19, 2),
        ]
        .iter()
        .enumerate()
        {
            let lda = k + pad;
            let a = values(m * lda, case as u64);
            let w = values(n * k, 50 + case as u64);
            let lhs = (&a[..], lda as isize, 1);
            let want = reference(m, n, k, lhs, (&w, 1, k as isize));
            let packed = PackedB::transposed_on(isa, &w, n, k).expect("the CPU runs the tile");
            for accumulate in [false, true] {
                for parallel in [false, true] {
                    let init = values(m * n, 7);
                    let mut dst = init.clone();
                    assert!(gemm_packed(&mut dst, m, lhs, &packed, accumulate, parallel));
                    for (i, (&d, &r)) in dst.iter().zip(&want).enumerate() {
                        let r = r + if accumulate { init[i] as f64 } else { 0.0 };
                        let tol = 1e-5 * (1.0 + r.abs()) * (k as f64).sqrt();
                        assert!(
                            (d as f64 - r).abs() < tol,
                            "{isa:?} {m}x{n}x{k} at {i}: {d} vs {r}"
                        );
                    }
                }
            }
            // Reading A in place does the same multiply-adds in the same order as packing it.
            let mut ap = vec![0f32; m.div_ceil(T::MR) * k * T::MR];
            pack_a::<T>(&mut ap, lhs, 0, m, k);
            let (mut via_pack, mut in_place) = (vec![0f32; m * n], vec![0f32; m * n]);
            compute::<T>(&mut via_pack, m, n, k, &ap, &packed.panels, false);
            compute_direct::<T>(&mut in_place, m, n, k, &a, lda, &packed.panels, false);
            assert!(
                via_pack
                    .iter()
                    .zip(&in_place)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{isa:?} {m}x{n}x{k}: in-place rows differ from packed rows"
            );
        }
        assert!(
            PackedB::transposed_on(isa, &[0.0; 6], 2, 4).is_none(),
            "wrong length"
        );
        few_rows_and_input_gradients_on(isa);
        // One row broadcast to every row (row stride 0) cannot be read in place; it is packed.
        let (m, n, k) = (30, 40, 9);
        let (row, b) = (values(k, 3), values(k * n, 4));
        let (lhs, rhs) = ((&row[..], 0, 1), (&b[..], n as isize, 1));
        let mut dst = vec![0f32; m * n];
        assert!(gemm_on(isa, &mut dst, m, n, k, lhs, rhs, false, true));
        for (i, (&d, &r)) in dst.iter().zip(&reference(m, n, k, lhs, rhs)).enumerate() {
            assert!(
                (d as f64 - r).abs() < 1e-4,
                "broadcast row at {i}: {d} vs {r}"
            );
        }
    }

    #[test]
    #[ignore]
    fn time_transposing_pack() {
        // Packing a row-major A into 6- and 12-row panels and a [1536, 384] weight into 16- and 32-column
        // panels of Wᵀ, and W's panels from Wᵀ's, one thread, interleaved, medians of 15.
        fn time<const W: usize>(what: &str, m: usize, k: usize) {
            let src = values(m * k, 5);
            let mut panel = vec![0f32; k * W];
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            for _ in 0..15 {
                let t = std::time::Instant::now();
                for x0 in (0..m).step_by(W) {
                    pack_panel::<W>(&mut panel, &src, x0, W.min(m - x0), k, 1);
                }
                fast.push(t.elapsed().as_secs_f64());
                let t = std::time::Instant::now();
                for x0 in (0..m).step_by(W) {
                    pack_panel_scalar::<W>(&mut panel, &src, x0, W.min(m - x0), k, 1, 0);
                }
                slow.push(t.elapsed().as_secs_f64());
            }
            let (fast, slow) = (med(fast), med(slow));
            println!(
                "{what} {m}x{k} into panels of {W}: transposing {:.3} ms, scalar {:.3} ms ({:.1}x)",
                fast * 1e3,
                slow * 1e3,
                slow / fast
            );
        }
        // The block transposes that build W's panels from Wᵀ's for a [1536, 384] weight.
        for nr in [16, 32] {
            let from = values(nr * nr, 6);
            let mut block = vec![0f32; nr * nr];
            let blocks = (1536 / nr) * (384 / nr);
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            for _ in 0..15 {
                let t = std::time::Instant::now();
                for _ in 0..blocks {
                    transpose_block(&mut block, std::hint::black_box(&from), nr, nr);
                }
                fast.push(t.elapsed().as_secs_f64());
                let t = std::time::Instant::now();
                for _ in 0..blocks {
                    transpose_block_scalar(&mut block, std::hint::black_box(&from), nr, nr);
                }
                slow.push(t.elapsed().as_secs_f64());
            }
            let (fast, slow) = (med(fast), med(slow));
            println!(
                "W panels of 1536x384 from its transpose's, blocks of {nr}: registers {:.3} ms, \
                 scalar {:.3} ms ({:.1}x)",
                fast * 1e3,
                slow * 1e3,
                slow / fast
            );
        }
        time::<6>("A", 2048, 384);
        time::<6>("A", 2048, 1536);
        time::<12>("A", 2048, 384);
        time::<12>("A", 2048, 1536);
        time::<16>("W", 1536, 384);
        time::<32>("W", 1536, 384);
    }

    #[test]
    #[ignore]
    fn time_kernel_in_l1() {
        for isa in available() {
            on_tile!(isa, time_kernel_on(isa));
        }
    }

    fn time_kernel_on<T: Tile>(isa: Isa) {
        let (mr, nr) = (T::MR, T::NR);
        for kc in [64, 128, 256] {
            let a = values(kc * mr, 1);
            let b = values(kc * nr, 2);
            let mut c = vec![0f32; mr * nr];
            let calls = 200_000_000 / kc;
            let t = std::time::Instant::now();
            for _ in 0..calls {
                // SAFETY: the CPU runs the tile (`available`), and the buffers fit it.
                unsafe { T::kernel::<false>(kc, &a, &b, &mut c, nr, mr, nr, true) };
            }
            let dt = t.elapsed().as_secs_f64();
            println!(
                "{isa:?} kc {kc}: {:.0} GFLOP/s",
                2.0 * (calls * kc * mr * nr) as f64 / dt / 1e9
            );
        }
        // The same tile with B panels streaming from L2 (one A panel against 8 B panels, as the
        // B-inner loop runs) and with A panels streaming (24 A panels against one B panel).
        let kc = 512;
        for (a_panels, b_panels) in [(1, 8), (24, 1), (24, 8)] {
            let a = values(kc * mr * a_panels, 1);
            let b = values(kc * nr * b_panels, 2);
            let mut c = vec![0f32; a_panels * mr * b_panels * nr];
            let ldc = b_panels * nr;
            let rounds = 200_000_000 / (kc * a_panels * b_panels);
            let t = std::time::Instant::now();
            for _ in 0..rounds {
                for ip in 0..a_panels {
                    for jp in 0..b_panels {
                        let (ap, bp) =
                            (&a[ip * kc * mr..][..kc * mr], &b[jp * kc * nr..][..kc * nr]);
                        let cp = &mut c[ip * mr * ldc + jp * nr..];
                        // SAFETY: as above; `cp` holds mr rows of stride ldc from the tile on.
                        unsafe { T::kernel::<true>(kc, ap, bp, cp, ldc, mr, nr, true) };
                    }
                }
            }
            let dt = t.elapsed().as_secs_f64();
            println!(
                "{isa:?} kc {kc}, {a_panels} A x {b_panels} B panels: {:.0} GFLOP/s",
                2.0 * (rounds * a_panels * b_panels * kc * mr * nr) as f64 / dt / 1e9
            );
        }
    }

    #[test]
    #[ignore]
    fn time_phases() {
        for isa in available() {
            on_tile!(isa, time_phases_on(isa));
        }
    }

    fn time_phases_on<T: Tile>(isa: Isa) {
        // Single-threaded: where one product's time goes (packing B, packing A, the tiles), at
        // the MiniLM products of a 16×128 forward, weights [out, in] as the model stores them.
        let (mr, nr) = (T::MR, T::NR);
        for (m, n, k) in FORWARD_SHAPES {
            let a = values(m * k, 1);
            let w = values(n * k, 2);
            let rhs = (&w[..], 1, k as isize);
            let lhs = (&a[..], k as isize, 1);
            let panels = n.div_ceil(nr);
            let mut bp = vec![0f32; panels * k * nr];
            let mut ap = vec![0f32; m.div_ceil(mr) * k * mr];
            let mut dst = vec![0f32; m * n];
            let mut variants = Vec::new();
            for prefetch in [true] {
                for (kc, mc_panels, nc_panels, b_inner) in [
                    (T::KC, 10_000, T::NC_PANELS, true),
                    (128, 32, 10_000, false),
                    (192, 32, 10_000, false),
                    (128, 10_000, 32, true),
                    (512, 10_000, 8, true),
                    (384, 24, 10_000, false),
                    (256, 24, 10_000, false),
                    (384, 10_000, 8, false),
                ] {
                    variants.push(Blocking {
                        kc,
                        mc_panels,
                        nc_panels,
                        b_inner,
                        prefetch,
                    });
                }
            }
            let mut times = vec![Vec::new(); variants.len()];
            let (mut tb, mut ta) = (Vec::new(), Vec::new());
            for _ in 0..9 {
                let t = std::time::Instant::now();
                pack_b::<T>(&mut bp, rhs, k, n, false);
                tb.push(t.elapsed().as_secs_f64());
                let t = std::time::Instant::now();
                pack_a::<T>(&mut ap, lhs, 0, m, k);
                ta.push(t.elapsed().as_secs_f64());
                for (v, bl) in variants.iter().enumerate() {
                    let t = std::time::Instant::now();
                    compute_with::<T>(&mut dst, m, n, k, &ap, &bp, false, *bl);
                    times[v].push(t.elapsed().as_secs_f64());
                }
            }
            let flop = 2.0 * (m * n * k) as f64;
            println!(
                "{isa:?} {m}x{n}x{k}: pack B {:.2} ms, pack A {:.2} ms",
                med(tb) * 1e3,
                med(ta) * 1e3
            );
            for (bl, t) in variants.iter().zip(times) {
                println!("  {bl:?}: {:.0} GFLOP/s in tiles", flop / med(t) / 1e9);
            }
        }
    }

    #[test]
    #[ignore]
    fn time_direct_vs_packed_a() {
        for isa in available() {
            on_tile!(isa, time_direct_on(isa));
        }
    }

    fn time_direct_on<T: Tile>(isa: Isa) {
        // Single-threaded, B packed beforehand (as frozen weights are): A packed then the tiles,
        // against A read in place, at the MiniLM products of a 16×128 forward and the attention
        // products of one head (interleaved, medians of 15).
        let attention = [(128, 128, 32), (128, 32, 128)];
        for (m, n, k) in FORWARD_SHAPES.into_iter().chain(attention) {
            let a = values(m * k, 1);
            let w = values(n * k, 2);
            let packed = PackedB::transposed_on(isa, &w, n, k).expect("the CPU runs the tile");
            let lhs = (&a[..], k as isize, 1);
            let mut ap = vec![0f32; m.div_ceil(T::MR) * k * T::MR];
            let mut dst = vec![0f32; m * n];
            let (mut tp, mut td) = (Vec::new(), Vec::new());
            let reps = (1 << 28) / (m * n * k) + 1;
            for _ in 0..15 {
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    pack_a::<T>(&mut ap, lhs, 0, m, k);
                    compute::<T>(&mut dst, m, n, k, &ap, &packed.panels, false);
                }
                tp.push(t.elapsed().as_secs_f64() / reps as f64);
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    compute_direct::<T>(&mut dst, m, n, k, &a, k, &packed.panels, false);
                }
                td.push(t.elapsed().as_secs_f64() / reps as f64);
            }
            let flop = 2.0 * (m * n * k) as f64;
            println!(
                "{isa:?} {m}x{n}x{k}: packed A {:.0} GFLOP/s, in place {:.0} GFLOP/s",
                flop / med(tp) / 1e9,
                flop / med(td) / 1e9
            );
        }
    }

    #[test]
    #[ignore]
    fn time_against_gemm_crate() {
        // (m, n, k, rhs transposed): the MiniLM training products at 32×32 tokens, on 2 threads.
        for (m, n, k, tb) in [
            (1024, 1536, 384, true),
            (1024, 384, 1536, true),
            (1024, 384, 384, true),
            (1024, 1536, 384, false),
            (1024, 384, 1536, false),
            (2048, 3072, 768, false),
        ] {
            against_gemm_crate(m, n, k, tb, true, 7);
        }
        // One head's attention products (q·kᵀ, p·v) at 32 and 128 tokens, on one thread each, as
        // the batched product runs them.
        for (m, n, k, tb) in [
            (32, 32, 32, true),
            (32, 32, 32, false),
            (128, 128, 32, true),
            (128, 32, 128, false),
        ] {
            against_gemm_crate(m, n, k, tb, false, 201);
        }
    }

    fn against_gemm_crate(m: usize, n: usize, k: usize, tb: bool, parallel: bool, reps: usize) {
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let rhs = if tb {
            (&b[..], 1, k as isize)
        } else {
            (&b[..], n as isize, 1)
        };
        let mut dst = vec![0f32; m * n];
        let flop = 2.0 * (m * n * k) as f64;
        // Small products are timed in batches of calls so the clock's resolution does not count.
        let calls = (1 << 24) / (m * n * k) + 1;
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = std::time::Instant::now();
            for _ in 0..calls {
                let lhs = (&a[..], k as isize, 1);
                let isa = isa().expect("a tile is enabled");
                assert!(gemm_on(isa, &mut dst, m, n, k, lhs, rhs, false, parallel));
            }
            ours.push(t.elapsed().as_secs_f64() / calls as f64);
            let t = std::time::Instant::now();
            for _ in 0..calls {
                let lhs = (&a[..], k as isize, 1);
                crate::kernels::gemm::gemm_crate_into(&mut dst, m, n, k, lhs, rhs, false, parallel);
            }
            theirs.push(t.elapsed().as_secs_f64() / calls as f64);
        }
        let (ours, theirs) = (med(ours), med(theirs));
        println!(
            "{m}x{n}x{k} tb={tb} parallel={parallel}: ours ({:?}) {:.0} GFLOP/s, gemm crate {:.0} \
             GFLOP/s ({:.2} us against {:.2} us)",
            isa(),
            flop / ours / 1e9,
            flop / theirs / 1e9,
            ours * 1e6,
            theirs * 1e6
        );
    }
}
