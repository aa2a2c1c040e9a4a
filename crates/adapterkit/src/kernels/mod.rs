//! The CPU kernels: one file per op, each holding its fused forward and backward, its composed
//! reference and the test of the two side by side (as candle-nn keeps `rms_norm` beside
//! `rms_norm_slow`).
//!
//! Which of the two runs is an explicit [`Backend`] value passed with every call: never state of the
//! thread, so a server's worker threads cannot disturb each other. The fused kernels replace chains
//! of candle primitives (each a full pass over memory, most single-threaded) by one parallel pass
//! forward and one backward, and products with frozen weights by graph nodes that compute only the
//! input gradient. The reference is also what runs on other devices and dtypes.

pub mod activation;
pub mod adapter;
pub mod attention;
pub mod blocked;
pub mod dropout;
pub mod ffn;
pub mod gemm;
pub mod half;
pub mod layer_norm;
pub mod linear;
pub mod loss;
pub mod matmul;
mod probe;
pub mod softmax;

pub use activation::{gelu, Activation};
pub use adapter::adapter;
pub use attention::{attention, AttentionWeights};
pub use dropout::dropout;
pub use ffn::ffn;
pub use layer_norm::{layer_norm, residual_layer_norm};
pub use linear::{linear, linear_view};
pub use loss::{cross_entropy, log_softmax_last_dim, mse};
pub use matmul::{batched_matmul, matmul_2d, PackedWeight};
pub use softmax::{attention_softmax, softmax_last_dim};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Which implementation of each op a forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The fused CPU kernels where the tensors allow them (f32 on the CPU), else the reference.
    #[default]
    Fused,
    /// The ops composed from candle primitives, differentiated by candle's autograd: the truth the
    /// fused kernels are tested against.
    Reference,
}

impl Backend {
    /// Whether the fused kernel applies to all of `tensors`.
    pub fn fuses(self, tensors: &[&Tensor]) -> bool {
        self == Backend::Fused && tensors.iter().all(|t| supported(t))
    }
}

/// The number format of the frozen weights' products: the forward `x · Wᵀ + b` and the input
/// gradient `g · W` of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Precision {
    /// f32 throughout.
    #[default]
    #[serde(rename = "f32")]
    F32,
    /// The frozen weights' products in fp16 with f32 sums ([`half`]; CPUs with AVX512_FP16),
    /// everything else in f32 (activations, attention, adapters, every trained weight and its
    /// gradient). A forward product whose input is too large for fp16 sums runs in f32; input
    /// gradients are scaled by a power of two to fit.
    #[serde(rename = "fp16")]
    F16,
}

impl Precision {
    /// Whether this is f32 (for `skip_serializing_if`: records of f32 runs keep their keys).
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "f16" | "fp16" => Ok(Precision::F16),
            _ => Err(format!("unknown precision {s:?}: expected f32 or fp16")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "fp16",
        })
    }
}

pub(crate) type CResult<T> = candle_core::Result<T>;

// Rows per parallel task is chosen so each task handles at least this many elements.
pub(crate) const MIN_TASK_ELEMS: usize = 16 * 1024;

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        return Err(candle_core::Error::Msg(format!("{what}: expected f32")));
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: expected a contiguous tensor")))?;
    Ok(&v[a..b])
}

/// A buffer of `len` zeros for a kernel's output, zeroed by the rayon pool. `vec![0.0; len]`
/// zeroes a reused allocation in the calling thread while the other cores wait (5% of an
/// inference step on the Xeon).
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(MIN_TASK_ELEMS)
        .for_each(|chunk| {
            for slot in chunk {
                slot.write(0.0);
            }
        });
    // SAFETY: every one of the first `len` slots was written just above.
    unsafe { v.set_len(len) };
    v
}

/// Sums of the columns of a row-major matrix with `cols` columns (a bias gradient: the sum over
/// rows of the output gradient), row blocks in parallel.
pub(crate) fn column_sums(x: &[f32], cols: usize) -> Vec<f32> {
    if cols == 0 {
        return Vec::new();
    }
    x.par_chunks(rows_per_task(cols).max(1) * cols)
        .map(|chunk| {
            let mut acc = vec![0f32; cols];
            for row in chunk.chunks_exact(cols) {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .reduce(
            || vec![0f32; cols],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// [`column_sums`] of a 2-D f32 tensor, `t.sum(0)` for others: candle's reduction over the
/// leading dimension of a [2048, 1536] gradient took longer than our pass.
pub(crate) fn sum_rows(t: &Tensor) -> CResult<Tensor> {
    if !supported(t) || t.rank() != 2 {
        return t.sum(0);
    }
    t.contiguous()?.apply_op1_no_bwd(&ColumnSums)
}

/// The op of [`sum_rows`].
struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (_, cols) = l.shape().dims2()?;
        let sums = column_sums(f32_slice(s, l, "column sums")?, cols);
        Ok((CpuStorage::F32(sums), Shape::from(cols)))
    }
}

/// `count` copies of `row` end to end (a bias as the starting value of a product), written once
/// by the rayon pool without zeroing first.
pub(crate) fn rows_of(row: &[f32], count: usize) -> Vec<f32> {
    let n = row.len();
    let len = n * count;
    let mut v: Vec<f32> = Vec::with_capacity(len);
    if n > 0 {
        let per = rows_per_task(n).max(1) * n;
        v.spare_capacity_mut()[..len]
            .par_chunks_mut(per)
            .for_each(|chunk| {
                // Row by row: zipped with `row.iter().cycle()` this copied one float at a time,
                // 6% of a MiniLM adapter step.
                for dst in chunk.chunks_exact_mut(n) {
                    for (slot, &x) in dst.iter_mut().zip(row) {
                        slot.write(x);
                    }
                }
            });
    }
    // SAFETY: every one of the first `len` slots was written just above (each chunk is a whole
    // number of rows: `per` and `len` are multiples of `n`).
    unsafe { v.set_len(len) };
    v
}

pub(crate) fn rows_per_task(d: usize) -> usize {
    MIN_TASK_ELEMS.div_ceil(d.max(1)).max(1)
}

/// Whether `t` can take the fused CPU kernels (f32 on the CPU).
pub fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// A loop body to compile for several vector widths. Implementations mark `run` as
/// `#[inline(always)]`: that forces the body into each width's compiled copy. A closure passed to
/// [`simd`] is inlined only when the compiler finds it small, else it is compiled once for the
/// baseline (SSE2) and every width calls that copy; the attention softmax ran that way, scalar.
pub(crate) trait Wide {
    /// What the body returns.
    type Out;
    /// The body.
    fn run(self) -> Self::Out;
}

/// A closure as a [`Wide`] body (inlined only when small; see [`Wide`]).
struct Closure<F>(F);

impl<R, F: FnOnce() -> R> Wide for Closure<F> {
    type Out = R;
    #[inline(always)]
    fn run(self) -> R {
        (self.0)()
    }
}

/// Declares a [`Wide`] body type that calls an `#[inline(always)]` row function with its one
/// tuple argument. The call is a direct call of the function, so the function is inlined into
/// each width's copy. Passing the function item itself as a body (called through `FnOnce`) went
/// through a `call_once` shim that the compiler built once, for SSE2, and did not inline: LayerNorm,
/// GELU, dropout and the attention softmax ran 4 lanes wide on every CPU.
macro_rules! wide_fn {
    ($(#[$doc:meta])* $vis:vis $name:ident<$lt:lifetime>($args:ty) -> $out:ty = $f:path) => {
        $(#[$doc])*
        $vis struct $name<$lt>($vis $args);

        impl<$lt> $crate::kernels::Wide for $name<$lt> {
            type Out = $out;
            #[inline(always)]
            fn run(self) -> $out {
                $f(self.0)
            }
        }
    };
}
pub(crate) use wide_fn;

/// Runs `f` compiled for the widest vectors the CPU has (see [`wide`]).
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    wide(Closure(f))
}

/// Runs `body` compiled for the widest vectors the CPU has: AVX-512 F + DQ (16 lanes; DQ has the
/// 64-bit integer products of the dropout hash) or AVX2 + FMA (8
/// lanes), instead of the 4-wide SSE2 of the baseline target. The bodies do not reorder
/// floating-point operations, so every width gives the same bits.
#[inline(always)]
pub(crate) fn wide<W: Wide>(body: W) -> W::Out {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
        unsafe fn avx512<W: Wide>(body: W) -> W::Out {
            body.run()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<W: Wide>(body: W) -> W::Out {
            body.run()
        }
        let avx2_fma =
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        if avx2_fma
            && blocked::isa() == Some(blocked::Isa::Avx512)
            && std::is_x86_feature_detected!("avx512dq")
        {
            // SAFETY: the CPU has AVX2, FMA, AVX-512F (`isa` checked it) and AVX-512DQ.
            return unsafe { avx512(body) };
        }
        if avx2_fma {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { avx2(body) };
        }
    }
    body.run()
}

fn take_out(out: &std::sync::Mutex<Option<Tensor>>, what: &str) -> CResult<Tensor> {
    out.lock()
        .map_err(|_| candle_core::Error::Msg(format!("{what}: poisoned lock")))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: forward ran twice")))?
        .contiguous()
}

/// The forward of a graph node whose output was computed outside the graph: hands the stored
/// output over as the node's storage (taken, so the graph does not keep a second copy).
fn hand_over(out: &std::sync::Mutex<Option<Tensor>>, what: &str) -> CResult<(CpuStorage, Shape)> {
    let out = take_out(out, what)?;
    let shape = out.shape().clone();
    let (storage, layout) = out.storage_and_layout();
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: output not contiguous")))?;
    match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => {
            Ok((CpuStorage::F32(v[a..b].to_vec()), shape))
        }
        candle_core::Storage::Cpu(CpuStorage::F64(v)) => {
            Ok((CpuStorage::F64(v[a..b].to_vec()), shape))
        }
        _ => Err(candle_core::Error::Msg(format!(
            "{what}: only f32/f64 on CPU"
        ))),
    }
}

/// A linear layer's weight W [out, in] as a forward reads it: a tensor, or rows of a frozen base
/// weight held only as its panels (see [`PackedWeight`]).
#[derive(Debug, Clone, Copy)]
pub enum WeightRef<'a> {
    /// A plain tensor (a task's trained or merged copy, or a base weight not packed).
    Tensor(&'a Tensor),
    /// Rows `start..start + rows` of the weight packed in `panels`.
    Panels {
        /// The packed weight.
        panels: &'a PackedWeight,
        /// First row.
        start: usize,
        /// Row count.
        rows: usize,
    },
}

impl<'a> WeightRef<'a> {
    /// The values as a tensor: the tensor itself (shared), or a fresh copy unpacked from the
    /// panels (for the composed paths; the fused products read the panels).
    pub fn tensor(self) -> CResult<Tensor> {
        match self {
            WeightRef::Tensor(t) => Ok(t.clone()),
            WeightRef::Panels {
                panels,
                start,
                rows,
            } => panels.unpack_rows(start, rows),
        }
    }

    /// The panels, where they hold the whole weight (and no other rows).
    pub fn whole_panels(self) -> Option<&'a PackedWeight> {
        match self {
            WeightRef::Panels {
                panels,
                start: 0,
                rows,
            } if rows == panels.dims().0 => Some(panels),
            _ => None,
        }
    }

    /// Output features (rows of W).
    pub fn rows(self) -> CResult<usize> {
        match self {
            WeightRef::Tensor(t) => t.dim(0),
            WeightRef::Panels { rows, .. } => Ok(rows),
        }
    }

    /// Whether the weight is f32 and not tracked by autograd (panels always are).
    fn frozen_f32(self) -> bool {
        match self {
            WeightRef::Tensor(t) => !t.track_op() && t.dtype() == candle_core::DType::F32,
            WeightRef::Panels { .. } => true,
        }
    }

    /// The weight as a backward keeps it: the panels where they hold all of it, else a tensor.
    pub(crate) fn owned(self) -> CResult<FrozenWeight> {
        Ok(match self.whole_panels() {
            Some(p) => FrozenWeight::Panels(p.clone()),
            None => FrozenWeight::Tensor(self.tensor()?),
        })
    }

    /// Whether both name the same weight (the same tensor, or the same rows of the same panels).
    pub(crate) fn same(self, other: WeightRef<'_>) -> bool {
        match (self, other) {
            (WeightRef::Tensor(a), WeightRef::Tensor(b)) => std::ptr::eq(a, b),
            (
                WeightRef::Panels {
                    panels: a,
                    start: sa,
                    ..
                },
                WeightRef::Panels {
                    panels: b,
                    start: sb,
                    ..
                },
            ) => std::ptr::eq(a, b) && sa == sb,
            _ => false,
        }
    }
}

/// A frozen weight kept by a backward for the input gradient `g · W`.
#[derive(Debug, Clone)]
pub(crate) enum FrozenWeight {
    /// W as a tensor.
    Tensor(Tensor),
    /// W's panels.
    Panels(PackedWeight),
}

impl FrozenWeight {
    /// `g · W` for 2-D `g`, on the fused products.
    pub(crate) fn input_gradient(&self, g: &Tensor) -> CResult<Tensor> {
        match self {
            FrozenWeight::Tensor(w) => matmul::matmul_2d(g, w),
            FrozenWeight::Panels(p) => p.input_gradient(g),
        }
    }
}

/// A linear layer's weight and bias as this forward uses them.
#[derive(Debug, Clone, Copy)]
pub struct LinearView<'a> {
    /// W [out, in].
    pub w: WeightRef<'a>,
    /// b [out].
    pub b: &'a Tensor,
}

impl<'a> LinearView<'a> {
    /// A layer whose weight is a tensor.
    pub fn new(w: &'a Tensor, b: &'a Tensor) -> Self {
        LinearView {
            w: WeightRef::Tensor(w),
            b,
        }
    }

    /// Whether W and b are f32 and not tracked by autograd: the fused whole-block kernels
    /// apply.
    pub(crate) fn frozen_f32(self) -> bool {
        self.w.frozen_f32() && !self.b.track_op()
    }

    /// `x · Wᵀ + b` for 2-D `x` outside the graph, from the panels where W is held as them.
    pub(crate) fn affine(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.w.whole_panels() {
            Some(p) => p.affine(x, self.b),
            None => matmul::affine_2d(x, &self.w.tensor()?, self.b),
        }
    }

    pub(crate) fn same(self, other: LinearView<'_>) -> bool {
        self.w.same(other.w) && std::ptr::eq(self.b, other.b)
    }
}

/// A LayerNorm's scale and shift as this forward uses them.
#[derive(Debug, Clone, Copy)]
pub struct NormView<'a> {
    /// γ.
    pub gamma: &'a Tensor,
    /// β.
    pub beta: &'a Tensor,
}

/// The hand-written backward of a block whose forward ran outside the autograd graph: it yields
/// the gradient of the block input only (the block's weights are frozen).
pub(crate) trait InputGradient: Send + Sync {
    /// The graph node's name.
    const NAME: &'static str;
    /// d loss / d input, given d loss / d output.
    fn input_gradient(&self, input: &Tensor, grad: &Tensor) -> CResult<Tensor>;
}

/// A graph node whose output was computed before it was attached: its forward hands that output
/// over (taken, so the graph does not keep a second copy), its backward is `G`.
struct Precomputed<G> {
    backward: G,
    out: std::sync::Mutex<Option<Tensor>>,
}

impl<G: InputGradient> CustomOp1 for Precomputed<G> {
    fn name(&self) -> &'static str {
        G::NAME
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> CResult<(CpuStorage, Shape)> {
        hand_over(&self.out, G::NAME)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(self.backward.input_gradient(arg, grad)?))
    }
}

/// `out`, computed from `input` outside the graph, joined to the graph as a node whose backward is
/// `backward`; `out` itself when nothing upstream needs a gradient.
pub(crate) fn attach<G: InputGradient + 'static>(
    input: &Tensor,
    out: Tensor,
    backward: G,
) -> CResult<Tensor> {
    if !input.track_op() {
        return Ok(out);
    }
    input.apply_op1(Precomputed {
        backward,
        out: std::sync::Mutex::new(Some(out)),
    })
}

/// The hand-written backward of a block with three inputs (the block input and two tensors it
/// reads besides its frozen weights, e.g. trained attention prefixes), whose forward ran outside
/// the autograd graph.
pub(crate) trait InputGradients3: Send + Sync {
    /// The graph node's name.
    const NAME: &'static str;
    /// d loss / d each input, given d loss / d output (`None` where an input needs none).
    fn input_gradients(&self, inputs: [&Tensor; 3], grad: &Tensor) -> CResult<[Option<Tensor>; 3]>;
}

/// The hand-written backward of a block with two inputs (the block input and one tensor it reads
/// besides its frozen weights, e.g. trained per-channel scales).
pub(crate) trait InputGradients2: Send + Sync {
    /// The graph node's name.
    const NAME: &'static str;
    /// d loss / d each input, given d loss / d output.
    fn input_gradients(&self, inputs: [&Tensor; 2], grad: &Tensor) -> CResult<[Option<Tensor>; 2]>;
}

/// [`Precomputed`] for two inputs.
struct Precomputed2<G> {
    backward: G,
    out: std::sync::Mutex<Option<Tensor>>,
}

impl<G: InputGradients2> candle_core::CustomOp2 for Precomputed2<G> {
    fn name(&self) -> &'static str {
        G::NAME
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        hand_over(&self.out, G::NAME)
    }

    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let [g1, g2] = self.backward.input_gradients([a1, a2], grad)?;
        Ok((g1, g2))
    }
}

/// [`attach`] for a block of two inputs.
pub(crate) fn attach2<G: InputGradients2 + 'static>(
    inputs: [&Tensor; 2],
    out: Tensor,
    backward: G,
) -> CResult<Tensor> {
    if !inputs.iter().any(|t| t.track_op()) {
        return Ok(out);
    }
    inputs[0].apply_op2(
        inputs[1],
        Precomputed2 {
            backward,
            out: std::sync::Mutex::new(Some(out)),
        },
    )
}

/// [`Precomputed`] for three inputs.
struct Precomputed3<G> {
    backward: G,
    out: std::sync::Mutex<Option<Tensor>>,
}

impl<G: InputGradients3> candle_core::CustomOp3 for Precomputed3<G> {
    fn name(&self) -> &'static str {
        G::NAME
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        hand_over(&self.out, G::NAME)
    }

    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [g1, g2, g3] = self.backward.input_gradients([a1, a2, a3], grad)?;
        Ok((g1, g2, g3))
    }
}

/// [`attach`] for a block of three inputs.
pub(crate) fn attach3<G: InputGradients3 + 'static>(
    inputs: [&Tensor; 3],
    out: Tensor,
    backward: G,
) -> CResult<Tensor> {
    if !inputs.iter().any(|t| t.track_op()) {
        return Ok(out);
    }
    inputs[0].apply_op3(
        inputs[1],
        inputs[2],
        Precomputed3 {
            backward,
            out: std::sync::Mutex::new(Some(out)),
        },
    )
}

#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor, Var};

    pub(crate) fn randn(shape: &[usize], seed: u64, scale: f64) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (rng.normal() * scale) as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Max |a-b| relative to max |b|.
    pub(crate) fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let diff = a
            .sub(b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-12)
    }

    /// Values and gradients of `fast` and `reference` on the same inputs, via loss = Σ out ⊙ w.
    pub(crate) fn compare(
        inputs: &[Tensor],
        fast: &dyn Fn(&[Tensor]) -> Tensor,
        reference: &dyn Fn(&[Tensor]) -> Tensor,
        tol: f32,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let yf = fast(&ts);
        let yr = reference(&ts);
        assert!(rel(&yf, &yr) < tol, "values differ: {}", rel(&yf, &yr));
        let w = randn(yf.dims(), 99, 1.0);
        let gf = yf.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = yr.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, t) in ts.iter().enumerate() {
            match (gf.get(t), gr.get(t)) {
                (Some(a), Some(b)) => {
                    assert!(rel(a, b) < tol, "gradient {i} differs: {}", rel(a, b))
                }
                (None, None) => {}
                (a, b) => panic!(
                    "gradient {i}: fast {} vs reference {}",
                    a.is_some(),
                    b.is_some()
                ),
            }
        }
    }
}
