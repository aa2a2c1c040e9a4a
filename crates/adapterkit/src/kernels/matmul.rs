//! Tensor-level products on the fused GEMMs: `x · Wᵀ + b` (affine), `g · w` (plain) and the
//! batch-parallel batched product used by attention.

use super::blocked::PackedB;
use super::gemm::{gemm_crate_into, gemm_into};
use super::half::HalfPanels;
use super::{f32_slice, supported, CResult};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// `x · Wᵀ + b` for [rows, k] inputs and frozen W [n, k]: the bias is the product's starting value
/// (no separate broadcast pass), and few-row inputs take the packing-free path of [`super::gemm::gemm_into`].
pub(crate) fn affine_2d(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if [x, w, b].iter().all(|t| supported(t)) {
        return x.apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &Affine);
    }
    x.matmul(&w.t()?)?.broadcast_add(b)
}

/// A frozen weight W [n, k] packed once for our blocked product `x · Wᵀ` (see
/// [`super::blocked::PackedB`]), shared by every forward that reads the same W; in the fp16
/// precision ([`super::Precision::F16`]) also as fp16 panels, which the products read.
#[derive(Debug, Clone)]
pub struct PackedWeight(Arc<PackedB>, Option<Arc<Half>>);

/// A weight's fp16 panels: for the forward `x · Wᵀ`, and for the input gradient `g · W`, built
/// at the first backward (inference never needs them, and they take 2 bytes per weight).
#[derive(Debug)]
pub struct Half {
    forward: HalfPanels,
    turned: std::sync::OnceLock<Option<HalfPanels>>,
}

impl Half {
    /// The panels for `g · W`, built from the f32 ones on first use; `None` where they cannot be
    /// built (see [`HalfPanels::turned`]).
    fn turned(&self, f32_panels: &PackedB) -> Option<&HalfPanels> {
        self.turned
            .get_or_init(|| {
                let (n, k) = (f32_panels.n(), f32_panels.k());
                HalfPanels::turned(&f32_panels.unpack_rows(0, n)?, n, k)
            })
            .as_ref()
    }
}

impl PackedWeight {
    /// Packs `w` [n, k] (f32 on the CPU); `None` where no product would read the panels (another
    /// dtype or device, or our kernel off).
    pub fn of(w: &Tensor) -> candle_core::Result<Option<PackedWeight>> {
        if !supported(w) || w.rank() != 2 || !super::blocked::enabled() {
            return Ok(None);
        }
        let (n, k) = w.dims2()?;
        // Read in place: a copy of every weight at load added tens of MB to the peak RSS of a
        // BERT-base process (the allocator keeps freed memory mapped).
        let w = w.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*storage else {
            return Ok(None);
        };
        let data = f32_slice(s, layout, "packed weight")?;
        Ok(PackedB::transposed(data, n, k).map(|p| PackedWeight(Arc::new(p), None)))
    }

    /// The same weight whose forward products `x · Wᵀ + b` run in fp16 ([`super::half`]), or
    /// only in f32 (`half: false`). `None` where fp16 panels cannot be built: a CPU without
    /// AVX512_FP16, or a value of W beyond fp16's range.
    pub fn with_half(&self, half: bool) -> candle_core::Result<Option<PackedWeight>> {
        if !half {
            return Ok(Some(PackedWeight(self.0.clone(), None)));
        }
        if self.1.is_some() {
            return Ok(Some(self.clone()));
        }
        let (n, k) = self.dims();
        let Some(w) = self.0.unpack_rows(0, n) else {
            return Ok(None);
        };
        Ok(HalfPanels::transposed(&w, n, k).map(|forward| {
            let half = Half {
                forward,
                turned: std::sync::OnceLock::new(),
            };
            PackedWeight(self.0.clone(), Some(Arc::new(half)))
        }))
    }

    /// Whether the products read fp16 panels.
    pub fn is_half(&self) -> bool {
        self.1.is_some()
    }

    /// Whether these are the panels of a weight of W's shape (a cheap guard against pairing a
    /// packed weight with another tensor).
    pub fn fits(&self, w: &Tensor) -> bool {
        w.dims() == [self.0.n(), self.0.k()]
    }

    /// Bytes the panels take (f32 and, in fp16 precision, fp16).
    pub fn bytes(&self) -> usize {
        let half = self.1.as_ref().map_or(0, |h| {
            h.forward.bytes()
                + h.turned
                    .get()
                    .and_then(Option::as_ref)
                    .map_or(0, HalfPanels::bytes)
        });
        self.0.bytes() + half
    }

    /// W's shape [n, k].
    pub fn dims(&self) -> (usize, usize) {
        (self.0.n(), self.0.k())
    }

    /// Rows `r0..r0 + rows` of W as a plain f32 tensor [rows, k] on the CPU (a fresh copy, for
    /// the few readers that need W as a matrix).
    pub fn unpack_rows(&self, r0: usize, rows: usize) -> candle_core::Result<Tensor> {
        let w = self.0.unpack_rows(r0, rows).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "packed weight: rows {r0}..{} of {}",
                r0 + rows,
                self.0.n()
            ))
        })?;
        Tensor::from_vec(w, (rows, self.0.k()), &candle_core::Device::Cpu)
    }

    /// `x · Wᵀ + b` for 2-D `x`, from the panels (the fp16 ones where held, unless x is too
    /// large for fp16 sums).
    pub(crate) fn affine(&self, x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op2_no_bwd(
            &b.contiguous()?,
            &PanelAffine(&self.0, self.1.as_deref().map(|h| &h.forward)),
        )
    }

    /// `g · W` for 2-D `g` [rows, n] (the input gradient through the frozen layer), from the
    /// panels (the fp16 ones in fp16 precision, unless g holds a value that is not finite).
    pub(crate) fn input_gradient(&self, g: &Tensor) -> candle_core::Result<Tensor> {
        let half = self.1.as_deref().and_then(|h| h.turned(&self.0));
        g.contiguous()?
            .apply_op1_no_bwd(&PanelInputGradient(&self.0, half))
    }
}

/// The forward-only product `x · Wᵀ + b` of [`PackedWeight::affine`]: f32 panels, and fp16 ones
/// that are tried first where present.
struct PanelAffine<'a>(&'a PackedB, Option<&'a HalfPanels>);

impl CustomOp2 for PanelAffine<'_> {
    fn name(&self) -> &'static str {
        "panel-affine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let b = f32_slice(s2, l2, self.name())?;
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = (self.0.n(), self.0.k());
        if k != k2 || b.len() != n {
            return Err(candle_core::Error::Msg(format!(
                "panel affine: [{m}, {k}] · [{n}, {k2}]ᵀ + [{}] do not fit",
                b.len()
            )));
        }
        if let Some(out) = self.1.and_then(|h| h.affine(x, m, b)) {
            return Ok((CpuStorage::F32(out), Shape::from((m, n))));
        }
        let mut out = super::rows_of(b, m);
        if !super::blocked::gemm_packed(&mut out, m, (x, k as isize, 1), self.0, true, true) {
            return Err(candle_core::Error::Msg("panel affine: no tile".into()));
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// The forward-only product `g · W` of [`PackedWeight::input_gradient`]: f32 panels, and fp16
/// ones (of Wᵀ) that are tried first where present.
struct PanelInputGradient<'a>(&'a PackedB, Option<&'a HalfPanels>);

impl candle_core::CustomOp1 for PanelInputGradient<'_> {
    fn name(&self) -> &'static str {
        "panel-input-gradient"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let g = f32_slice(s, l, self.name())?;
        let (m, n) = l.shape().dims2()?;
        let (n2, k) = (self.0.n(), self.0.k());
        if n != n2 {
            return Err(candle_core::Error::Msg(format!(
                "panel input gradient: [{m}, {n}] · [{n2}, {k}] do not fit"
            )));
        }
        if let Some(out) = self.1.and_then(|h| h.input_gradient(g, m)) {
            return Ok((CpuStorage::F32(out), Shape::from((m, k))));
        }
        let mut out = super::zeros(m * k);
        let lhs = (g, n as isize, 1);
        if !super::blocked::gemm_packed_transposed(&mut out, m, lhs, self.0, false, true) {
            return Err(candle_core::Error::Msg(
                "panel input gradient: no tile".into(),
            ));
        }
        Ok((CpuStorage::F32(out), Shape::from((m, k))))
    }
}

/// `g · w` for [rows, k] and [k, n] operands, without autograd, through [`super::gemm::gemm_into`] (so an input
/// gradient through a frozen weight gets the same kernels as the forward products); candle's
/// matmul for other devices and dtypes.
pub fn matmul_2d(g: &Tensor, w: &Tensor) -> CResult<Tensor> {
    if supported(g) && supported(w) && g.rank() == 2 && w.rank() == 2 {
        return g
            .contiguous()?
            .apply_op2_no_bwd(&w.contiguous()?, &PlainProduct { trans_a: false });
    }
    g.matmul(w)
}

/// `aᵀ · b` for [rows, m] and [rows, n] operands, without autograd: the weight gradient
/// `gᵀ · x` of a linear layer, with the rows (tokens) as the depth, on the fused GEMM.
pub(crate) fn matmul_tn(a: &Tensor, b: &Tensor) -> CResult<Tensor> {
    if supported(a) && supported(b) && a.rank() == 2 && b.rank() == 2 {
        return a
            .contiguous()?
            .apply_op2_no_bwd(&b.contiguous()?, &PlainProduct { trans_a: true });
    }
    a.t()?.matmul(b)
}

/// The forward-only product of [`matmul_2d`] (`a · b`) and [`matmul_tn`] (`aᵀ · b`).
struct PlainProduct {
    trans_a: bool,
}

impl CustomOp2 for PlainProduct {
    fn name(&self) -> &'static str {
        "plain-product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let a = f32_slice(s1, l1, self.name())?;
        let b = f32_slice(s2, l2, self.name())?;
        let ((ar, ac), (k2, n)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        // op(a) is m×k; stored [k, m] (row stride 1, column stride m) when transposed.
        let ((m, k), lhs) = if self.trans_a {
            ((ac, ar), (a, 1, ac as isize))
        } else {
            ((ar, ac), (a, ac as isize, 1))
        };
        if k != k2 {
            return Err(candle_core::Error::Msg(format!(
                "plain product: [{m}, {k}] · [{k2}, {n}] do not fit"
            )));
        }
        let mut out = super::zeros(m * n);
        gemm_into(&mut out, m, n, k, lhs, (b, n as isize, 1), false, true);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// The forward-only product of [`affine_2d`].
pub(crate) struct Affine;

impl CustomOp3 for Affine {
    fn name(&self) -> &'static str {
        "affine"
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
        let x = f32_slice(s1, l1, "affine")?;
        let w = f32_slice(s2, l2, "affine")?;
        let b = f32_slice(s3, l3, "affine")?;
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 || b.len() != n {
            return Err(candle_core::Error::Msg(format!(
                "affine: shapes {:?}, {:?}, {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )));
        }
        let mut out = super::rows_of(b, m);
        let ki = k as isize;
        gemm_into(&mut out, m, n, k, (x, ki, 1), (w, 1, ki), true, true);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// Batched product of small matrices `op(a[i]) · op(b[i])` for [batch, rows, cols] operands, with
/// the batch spread over threads and each product single-threaded: candle parallelises inside each
/// small product instead, and synchronising threads 192 times per call left attention products at
/// about a third of the machine's GEMM rate (measured: 65–90 vs 233 GFLOP/s).
struct BatchedMatmul {
    trans_a: bool,
    trans_b: bool,
}

impl CustomOp2 for BatchedMatmul {
    fn name(&self) -> &'static str {
        "batched-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let a = f32_slice(s1, l1, "batched matmul")?;
        let b = f32_slice(s2, l2, "batched matmul")?;
        let (da, db) = (l1.dims(), l2.dims());
        let rank = da.len();
        if rank < 3 || db.len() != rank {
            return Err(candle_core::Error::Msg(
                "batched matmul: expected [.., rows, cols] operands".into(),
            ));
        }
        let batch: usize = da[..rank - 2].iter().product();
        let (ar, ac) = (da[rank - 2], da[rank - 1]);
        let (br, bc) = (db[rank - 2], db[rank - 1]);
        let (m, k) = if self.trans_a { (ac, ar) } else { (ar, ac) };
        let (k2, n) = if self.trans_b { (bc, br) } else { (br, bc) };
        if k != k2 || db[..rank - 2].iter().product::<usize>() != batch {
            return Err(candle_core::Error::Msg(format!(
                "batched matmul: shapes {da:?} and {db:?} do not fit"
            )));
        }
        // Row-major strides of op(x): (row stride, column stride).
        let (a_rs, a_cs) = if self.trans_a {
            (1, ac as isize)
        } else {
            (ac as isize, 1)
        };
        let (b_rs, b_cs) = if self.trans_b {
            (1, bc as isize)
        } else {
            (bc as isize, 1)
        };
        let mut out = super::zeros(batch * m * n);
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, dst)| {
            let lhs = &a[i * ar * ac..(i + 1) * ar * ac];
            let rhs = &b[i * br * bc..(i + 1) * br * bc];
            let (lhs, rhs) = ((lhs, a_rs, a_cs), (rhs, b_rs, b_cs));
            if !super::blocked::gemm(dst, m, n, k, lhs, rhs, false, false) {
                gemm_crate_into(dst, m, n, k, lhs, rhs, false, false);
            }
        });
        let mut shape = da.to_vec();
        shape[rank - 2] = m;
        shape[rank - 1] = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dc: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = match (self.trans_a, self.trans_b) {
            (false, false) => (bmm(dc, b, false, true)?, bmm(a, dc, true, false)?),
            (false, true) => (bmm(dc, b, false, false)?, bmm(dc, a, true, false)?),
            (true, false) => (bmm(b, dc, false, true)?, bmm(a, dc, false, false)?),
            (true, true) => (bmm(b, dc, true, true)?, bmm(dc, a, true, true)?),
        };
        Ok((Some(da), Some(db)))
    }
}

/// `op(a) · op(b)` over the leading (batch) dimensions, without autograd.
pub(crate) fn bmm(
    a: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
) -> candle_core::Result<Tensor> {
    a.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &BatchedMatmul { trans_a, trans_b })
}

/// `op(a) · op(b)` over the leading (batch) dimensions of [.., rows, cols] operands, batch-parallel,
/// with gradients for both operands.
pub fn batched_matmul(
    a: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
) -> candle_core::Result<Tensor> {
    a.contiguous()?
        .apply_op2(&b.contiguous()?, BatchedMatmul { trans_a, trans_b })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;

    /// In fp16 precision both products through a frozen weight read fp16 panels: the forward
    /// `x · Wᵀ + b` and the input gradient `g · W` (its panels built at first use), each close
    /// to the f32 product and not equal to it.
    #[test]
    fn fp16_panels_serve_the_forward_and_the_input_gradient() {
        if !super::super::half::available() {
            return;
        }
        let w = randn(&[200, 96], 70, 0.05);
        let b = randn(&[200], 71, 1.0);
        let x = randn(&[37, 96], 72, 1.0);
        // Gradients are small: unscaled, many would be fp16 subnormals.
        let g = randn(&[37, 200], 73, 1e-6);
        let full = PackedWeight::of(&w).unwrap().expect("panels");
        let half = full.with_half(true).unwrap().expect("fp16 panels");
        assert!(half.is_half() && !full.is_half());
        let before = half.bytes();
        for (h, f) in [
            (half.affine(&x, &b).unwrap(), full.affine(&x, &b).unwrap()),
            (
                half.input_gradient(&g).unwrap(),
                full.input_gradient(&g).unwrap(),
            ),
        ] {
            let d = rel(&h, &f);
            assert!(
                d > 1e-6 && d < 1e-2,
                "fp16 against f32: relative difference {d}"
            );
        }
        assert!(
            half.bytes() > before,
            "the input gradient's panels were not built"
        );
    }

    #[test]
    fn batched_matmul_matches_candle_in_every_transpose_mode() {
        let a = randn(&[3, 2, 5, 7], 60, 1.0);
        let b = randn(&[3, 2, 7, 4], 61, 1.0);
        let at = a.transpose(2, 3).unwrap().contiguous().unwrap();
        let bt = b.transpose(2, 3).unwrap().contiguous().unwrap();
        let want = a.matmul(&b).unwrap();
        for (x, y, ta, tb) in [
            (&a, &b, false, false),
            (&at, &b, true, false),
            (&a, &bt, false, true),
            (&at, &bt, true, true),
        ] {
            let got = bmm(x, y, ta, tb).unwrap();
            assert!(rel(&got, &want) < 1e-6, "trans ({ta}, {tb})");
        }
        assert!(bmm(&a, &a, false, false).is_err());
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let x = if ta { at.clone() } else { a.clone() };
            let y = if tb { bt.clone() } else { b.clone() };
            let reference = |t: &[Tensor]| {
                let l = if ta {
                    t[0].transpose(2, 3).unwrap()
                } else {
                    t[0].clone()
                };
                let r = if tb {
                    t[1].transpose(2, 3).unwrap()
                } else {
                    t[1].clone()
                };
                l.matmul(&r).unwrap()
            };
            compare(
                &[x, y],
                &|t| batched_matmul(&t[0], &t[1], ta, tb).unwrap(),
                &reference,
                1e-5,
            );
        }
    }
}
