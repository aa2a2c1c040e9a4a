//! Throughput probes of the reduced-precision multiply-adds a GEMM tile could use (AVX512_BF16's
//! `vdpbf16ps`, AVX512_FP16's `vfmadd231ph`) against the f32 FMA our tiles run, on this CPU.
//!
//! Tests only, ignored: they time instruction streams, so they measure, not check. A reduced-
//! precision mode only pays if its FLOP rate beats f32's. On the Xeon the speed issue was filed on
//! (family 6 model 207), `vdpbf16ps` reached 0.49× the f32 FMA rate, so no bf16 mode was built,
//! and `vfmadd231ph` 2.15× (`bench/results/2026-12-08-reduced-precision-rate-xeon.txt`).

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use std::arch::asm;
    use std::time::Instant;

    /// Independent accumulators per loop turn: more than latency × issue width of any of the
    /// three instructions, so the loop measures throughput, not a dependency chain.
    const CHAINS: usize = 24;

    /// Runs `turns` loop turns of 24 independent `$insn zmmN, zmm30, zmm31` (N = 0..23) and
    /// returns the seconds taken.
    macro_rules! stream {
        ($insn:literal, $turns:expr) => {{
            let turns: usize = $turns;
            let t = Instant::now();
            // SAFETY: the caller checked the CPU has the instruction's extension; the asm only
            // touches the vector registers it names (declared clobbered) and the loop counter.
            unsafe {
                asm!(
                    "vxorps xmm30, xmm30, xmm30",
                    "vxorps xmm31, xmm31, xmm31",
                    "2:",
                    concat!($insn, " zmm0, zmm30, zmm31"),
                    concat!($insn, " zmm1, zmm30, zmm31"),
                    concat!($insn, " zmm2, zmm30, zmm31"),
                    concat!($insn, " zmm3, zmm30, zmm31"),
                    concat!($insn, " zmm4, zmm30, zmm31"),
                    concat!($insn, " zmm5, zmm30, zmm31"),
                    concat!($insn, " zmm6, zmm30, zmm31"),
                    concat!($insn, " zmm7, zmm30, zmm31"),
                    concat!($insn, " zmm8, zmm30, zmm31"),
                    concat!($insn, " zmm9, zmm30, zmm31"),
                    concat!($insn, " zmm10, zmm30, zmm31"),
                    concat!($insn, " zmm11, zmm30, zmm31"),
                    concat!($insn, " zmm12, zmm30, zmm31"),
                    concat!($insn, " zmm13, zmm30, zmm31"),
                    concat!($insn, " zmm14, zmm30, zmm31"),
                    concat!($insn, " zmm15, zmm30, zmm31"),
                    concat!($insn, " zmm16, zmm30, zmm31"),
                    concat!($insn, " zmm17, zmm30, zmm31"),
                    concat!($insn, " zmm18, zmm30, zmm31"),
                    concat!($insn, " zmm19, zmm30, zmm31"),
                    concat!($insn, " zmm20, zmm30, zmm31"),
                    concat!($insn, " zmm21, zmm30, zmm31"),
                    concat!($insn, " zmm22, zmm30, zmm31"),
                    concat!($insn, " zmm23, zmm30, zmm31"),
                    "dec {n}",
                    "jnz 2b",
                    n = inout(reg) turns => _,
                    out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                    out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                    out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                    out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
                    out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
                    out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
                    out("zmm30") _, out("zmm31") _,
                    options(nostack, nomem),
                );
            }
            t.elapsed().as_secs_f64()
        }};
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    /// FLOP/s of each instruction on one core, interleaved f32 / bf16 / fp16 rounds, medians:
    /// `cargo test --release -p adapterkit --lib kernels::probe -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn time_reduced_precision_rates() {
        if !is_x86_feature_detected!("avx512f") {
            println!("no AVX-512: nothing to probe");
            return;
        }
        let bf16 = is_x86_feature_detected!("avx512bf16");
        let fp16 = is_x86_feature_detected!("avx512fp16");
        let turns = 20_000_000;
        // FLOPs per instruction: 16 f32 lanes × 2; 16 lanes × 2 bf16 pairs × 2; 32 fp16 lanes × 2.
        let per_turn = CHAINS as f64 * turns as f64;
        let (mut f32s, mut bf16s, mut fp16s) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..7 {
            f32s.push(per_turn * 32.0 / stream!("vfmadd231ps", turns));
            if bf16 {
                bf16s.push(per_turn * 64.0 / stream!("vdpbf16ps", turns));
            }
            if fp16 {
                fp16s.push(per_turn * 64.0 / stream!("vfmadd231ph", turns));
            }
        }
        let f32_rate = median(f32s);
        println!("f32 FMA (vfmadd231ps zmm): {:.1} GFLOP/s", f32_rate / 1e9);
        for (name, have, rates) in [
            ("bf16 dot (vdpbf16ps zmm, f32 sums)", bf16, bf16s),
            ("fp16 FMA (vfmadd231ph zmm, fp16 sums)", fp16, fp16s),
        ] {
            if have {
                let r = median(rates);
                println!(
                    "{name}: {:.1} GFLOP/s, {:.2}× the f32 FMA rate",
                    r / 1e9,
                    r / f32_rate
                );
            } else {
                println!("{name}: not on this CPU");
            }
        }
    }
}
