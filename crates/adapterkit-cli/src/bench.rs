//! `adapterkit bench`: fixed-shape timing of training and inference steps, with analytic FLOPs and
//! the same run's measured GEMM peak next to the achieved rate.

use adapterkit::adapter::AdapterMethod;
use adapterkit::encoder::LayerCuts;
use adapterkit::flops::{step_flops, StepKind};
use adapterkit::kernels::cross_entropy;
use adapterkit::metrics::median;
use adapterkit::rng::Rng;
use adapterkit::tokenizer::TextTokenizer;
use adapterkit::train::AdamW;
use adapterkit::{
    AdapterConfig, BaseModel, Batch, BertConfig, ForwardOptions, HeadConfig, TaskModel,
    TrainConfig, TrainableSet,
};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, ValueEnum};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Copy, Clone, ValueEnum, PartialEq, Eq)]
pub enum Shape {
    /// The real all-MiniLM-L6-v2 (6 × 384) from --model or the asset cache.
    Minilm,
    /// BERT-base shape (12 × 768, FFN 3072) with random weights.
    BertBase,
}

#[derive(Args)]
pub struct BenchArgs {
    /// What one step does.
    #[arg(long, value_enum, default_value = "adapter-train")]
    case: Case,
    /// Model shape.
    #[arg(long, value_enum, default_value = "minilm")]
    shape: Shape,
    /// Base model directory for --shape minilm [default: the cached all-MiniLM-L6-v2].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Rows per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Tokens per row (every row full length, no padding).
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Adapter bottleneck size.
    #[arg(long, default_value_t = 64)]
    bottleneck: usize,
    /// Another adapter method instead of Houlsby adapters (m = --bottleneck) for adapter-train,
    /// infer-adapter and latency, as `train --adapter-config` takes it: a preset or AdapterHub
    /// string (`par_bn[reduction_factor=6]`, `lora[r=8]`, `ia3`) or a JSON file. The step's FLOP
    /// count is then not reported (it is modelled for Houlsby adapters only).
    #[arg(long, conflicts_with = "bottleneck")]
    adapter_config: Option<String>,
    /// Inference with LoRA as the server runs it (its updates beside the shared projections, see
    /// `TaskModel::keep_lora_as_updates`) instead of merged into the weights.
    #[arg(long)]
    lora_as_updates: bool,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Worker threads (sets RAYON_NUM_THREADS before any pool exists) [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Calls of the latency case.
    #[arg(long, default_value_t = 200)]
    calls: usize,
    /// Use the composed reference ops instead of the fast ones (for A/B comparisons).
    #[arg(long)]
    reference_ops: bool,
    /// Number format of the frozen projections' products in the inference cases: f32, or fp16
    /// (on CPUs with AVX512_FP16).
    #[arg(long, default_value = "f32")]
    precision: adapterkit::Precision,
    /// Adapters the rows are spread over in the infer-mixed case.
    #[arg(long, default_value_t = 8)]
    adapters: usize,
    /// Also write the JSON result here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Copy, Clone, ValueEnum, PartialEq, Eq)]
pub enum Case {
    /// Houlsby adapters (m = --bottleneck) + LayerNorms + head: forward, backward, AdamW.
    AdapterTrain,
    /// Every parameter: forward, backward, AdamW.
    FullTrain,
    /// Forward of the base encoder.
    InferBase,
    /// Forward with one adapter and its head.
    InferAdapter,
    /// Mixed-adapter inference as the server runs it (`predict_mixed`): the batch's rows spread
    /// round-robin over --adapters adapters, against all rows through one adapter, interleaved
    /// A B A B in this process; reports both medians and their ratio.
    InferMixed,
    /// One short sentence at a time (batch 1, tokenization included) through one adapter: reports
    /// the median (p50) and p99 over --calls calls.
    Latency,
}

/// The sentence of the latency case (the PyTorch reference uses the same).
const LATENCY_SENTENCE: &str = "a gripping, beautifully acted film that stays with you.";

/// The process's high-water resident set, from `/proc/self/status`.
fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// One `/proc/self/status` memory line (`VmRSS:`, `VmHWM:`) in bytes.
fn status_bytes(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resident set and high-water mark after loading and after each phase of the last training step:
/// where a peak comes from (weights, the forward's activations, the backward's gradients, the
/// update's moments). The allocator keeps freed memory, so a phase's resident set includes what
/// earlier phases freed.
fn phase_rss(phase: &str) -> serde_json::Value {
    json!({
        "phase": phase,
        "rss_bytes": status_bytes("VmRSS:"),
        "peak_rss_bytes": status_bytes("VmHWM:"),
    })
}

/// GEMM peak of this process: median rate of a 2048×768 · 768×3072 f32 product, best of the
/// two GEMMs the process has.
fn gemm_peak() -> Result<f64> {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (2048, 768), &dev)?;
    let b = Tensor::randn(0f32, 1.0, (768, 3072), &dev)?;
    // The higher of candle's matmul (the `gemm` crate) and the crate's own kernel
    // (`kernels::matmul_2d`, AVX-512 where the CPU has it): the peak this machine offers us.
    let mut best = 0f64;
    for own in [false, true] {
        let mut times = Vec::new();
        for i in 0..6 {
            let t = Instant::now();
            let c = if own {
                adapterkit::kernels::matmul_2d(&a, &b)?
            } else {
                a.matmul(&b)?
            };
            let _ = c.sum_all()?.to_scalar::<f32>()?;
            if i > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        best = best.max(2.0 * 2048.0 * 768.0 * 3072.0 / median(&times).unwrap_or(f64::NAN) / 1e9);
    }
    Ok(best)
}

fn bert_base_config() -> Result<BertConfig> {
    Ok(serde_json::from_value(json!({
        "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "max_position_embeddings": 512
    }))?)
}

pub fn run(a: BenchArgs) -> Result<()> {
    let minilm_dir = a
        .model
        .clone()
        .unwrap_or_else(adapterkit::default_model_dir);
    let context = || format!("loading {} (run `adapterkit fetch`)", minilm_dir.display());
    let mut base = match a.shape {
        Shape::Minilm => BaseModel::load(&minilm_dir).with_context(context)?,
        // Only MiniLM's vocabulary: its weights would sit beside BERT-base's in the peak RSS
        // (the PyTorch side builds BERT-base without loading MiniLM either).
        Shape::BertBase => BaseModel::random(
            bert_base_config()?,
            TextTokenizer::from_dir(&minilm_dir).with_context(context)?,
            0,
        )?,
    }
    .with_backend(crate::cmd::backend_of(a.reference_ops));
    if a.precision != adapterkit::Precision::F32 {
        if a.reference_ops {
            anyhow::bail!(
                "--precision {} runs on the fused kernels, and --reference-ops asks for the \
                 composed ones, which are f32 only: drop one of the two",
                a.precision
            );
        }
        if matches!(a.case, Case::FullTrain) {
            anyhow::bail!(
                "--precision {}: full fine-tuning trains every projection, so none is frozen \
                 to run in fp16; use --precision f32",
                a.precision
            );
        }
        base = base
            .with_precision(a.precision)
            .with_context(|| format!("--precision {}", a.precision))?;
    }
    let cfg = base.config.clone();
    let mut rng = Rng::new(1);
    let ids: Vec<u32> = (0..a.batch * a.seq)
        .map(|i| {
            if i % a.seq == 0 {
                101
            } else {
                1000 + rng.below(cfg.vocab_size - 1000) as u32
            }
        })
        .collect();
    let types = vec![0u32; ids.len()];
    let rows: Vec<(&[u32], &[u32])> = (0..a.batch)
        .map(|r| {
            (
                &ids[r * a.seq..(r + 1) * a.seq],
                &types[r * a.seq..(r + 1) * a.seq],
            )
        })
        .collect();
    let batch = Batch::new(&rows, cfg.pad_token_id, &base.device)?;
    let labels: Vec<u32> = (0..a.batch).map(|i| (i % 2) as u32).collect();
    let head = HeadConfig::classification(vec!["a".into(), "b".into()]);
    let adapter = AdapterConfig {
        bottleneck: a.bottleneck,
        ..AdapterConfig::default()
    };
    let (set, adapter, kind, sites) = match a.case {
        Case::AdapterTrain => (
            TrainableSet::Adapters { layernorms: true },
            Some(adapter),
            StepKind::AdapterTrain,
            2,
        ),
        Case::FullTrain => (TrainableSet::Full, None, StepKind::FullTrain, 0),
        Case::InferBase => (TrainableSet::Head, None, StepKind::InferBase, 0),
        Case::InferAdapter | Case::Latency | Case::InferMixed => (
            TrainableSet::Adapters { layernorms: true },
            Some(adapter),
            StepKind::InferAdapter,
            2,
        ),
    };
    let method = match (&a.adapter_config, adapter) {
        (Some(spec), Some(_)) => Some(crate::cmd::adapter_config_arg(spec, &base.config)?),
        (_, adapter) => adapter.map(AdapterMethod::Bottleneck),
    };
    let mut task = TaskModel::with_method(&base, "bench", set, method, head, a.seq, 0)?;
    if a.case == Case::FullTrain {
        // As `adapterkit train` does: the trained copy is the only one.
        base.release_owned_by(&task)?;
    }
    if !matches!(a.case, Case::AdapterTrain | Case::FullTrain) {
        // Inference as a loaded adapter runs: LoRA merged into the weights (or as the server
        // keeps it).
        task.merge(&base)?;
        if a.lora_as_updates {
            task.keep_lora_as_updates(&base)?;
        }
    }
    let train_cfg = TrainConfig::default();
    let mut opt = match a.case {
        Case::AdapterTrain | Case::FullTrain => Some(AdamW::new(&mut task, &train_cfg)?),
        _ => None,
    };
    if a.case == Case::Latency {
        return latency(&a, &base, &task);
    }
    if a.case == Case::InferMixed {
        return mixed(&a, &base, &ids, &types);
    }
    let mut dropout_rng = Rng::new(2);
    let mut times = Vec::new();
    let mut phases = vec![phase_rss("loaded")];
    for i in 0..a.warmup + a.steps {
        let t = Instant::now();
        let last = i + 1 == a.warmup + a.steps;
        match a.case {
            Case::AdapterTrain | Case::FullTrain => {
                let mut cuts = LayerCuts::default();
                let mut opts = ForwardOptions {
                    dropout_rng: Some(&mut dropout_rng),
                    cuts: Some(&mut cuts),
                    ..ForwardOptions::default()
                };
                let logits = base.logits(&task, &batch, &mut opts)?;
                let loss = cross_entropy(&logits, &labels)?;
                drop(logits);
                if last {
                    phases.push(phase_rss("forward"));
                }
                let grads = cuts.backward(loss)?;
                if last {
                    phases.push(phase_rss("backward"));
                }
                if let Some(o) = opt.as_mut() {
                    o.step(&grads, 1e-4)?;
                }
                if last {
                    drop(grads);
                    phases.push(phase_rss("update"));
                }
            }
            Case::InferBase => {
                let h = base.encode(None, &batch, &mut ForwardOptions::default())?;
                let _ = h.narrow(1, 0, 1)?.sum_all()?.to_scalar::<f32>()?;
            }
            Case::InferAdapter | Case::Latency | Case::InferMixed => {
                let logits = base.logits(&task, &batch, &mut ForwardOptions::default())?;
                let _ = logits.sum_all()?.to_scalar::<f32>()?;
            }
        }
        if i >= a.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let med = median(&times).unwrap_or(f64::NAN);
    // Read before the GEMM peak's own operands join the process's high-water mark: the PyTorch
    // side reports its steps' peak alone.
    let rss = peak_rss_bytes();
    let peak = gemm_peak()?;
    // Modelled for Houlsby adapters (and the base) only: null for another method.
    let flops =
        (a.adapter_config.is_none() || a.case == Case::FullTrain || a.case == Case::InferBase)
            .then(|| step_flops(&cfg, kind, a.batch, a.seq, a.bottleneck, sites));
    let achieved = flops.map(|f| f / med / 1e9);
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let out = json!({
        "tool": "adapterkit",
        "case": format!("{:?}", kind),
        "shape": match a.shape { Shape::Minilm => "minilm-l6", Shape::BertBase => "bert-base" },
        "ops": if a.reference_ops { "reference" } else { "fast" },
        "precision": a.precision.to_string(),
        "batch": a.batch,
        "seq": a.seq,
        "threads": threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        "step_seconds": times,
        "median_seconds": med,
        "sequences_per_second": a.batch as f64 / med,
        "adapter_config": a.adapter_config,
        "gflop_per_step": flops.map(|f| f / 1e9),
        "achieved_gflops": achieved,
        "gemm_peak_gflops": peak,
        "percent_of_peak": achieved.map(|g| 100.0 * g / peak),
        "peak_rss_bytes": rss,
        "rss_after_phases": phases,
    });
    println!("{out}");
    if let Some(p) = &a.json {
        adapterkit::io::write_json(p, &out)?;
    }
    Ok(())
}

fn latency(a: &BenchArgs, base: &BaseModel, task: &TaskModel) -> Result<()> {
    let input = vec![(LATENCY_SENTENCE.to_string(), None)];
    let mut times = Vec::with_capacity(a.calls);
    for i in 0..a.calls + 10 {
        let t = Instant::now();
        let out = base.predict(task, &input, 128, 1, &[])?;
        if out.is_empty() {
            anyhow::bail!("no prediction");
        }
        if i >= 10 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let tokens = base.tokenizer.encode_all(&input, 128)?[0].0.len();
    times.sort_by(|x, y| x.total_cmp(y));
    let pct = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
    let out = json!({
        "tool": "adapterkit",
        "case": "latency",
        "precision": a.precision.to_string(),
        "tokens": tokens,
        "calls": a.calls,
        "median_seconds": pct(0.5),
        "p99_seconds": pct(0.99),
        "gflop_per_step": step_flops(&base.config, StepKind::InferAdapter, 1, tokens, a.bottleneck, 2) / 1e9,
        "achieved_gflops": 0.0,
        "peak_rss_bytes": peak_rss_bytes(),
        "gemm_peak_gflops": gemm_peak()?,
    });
    println!("{out}");
    if let Some(p) = &a.json {
        adapterkit::io::write_json(p, &out)?;
    }
    Ok(())
}

/// The infer-mixed case: one batch through one adapter (A) and spread over `--adapters` (B).
fn mixed(a: &BenchArgs, base: &BaseModel, ids: &[u32], types: &[u32]) -> Result<()> {
    if a.adapters == 0 {
        anyhow::bail!("--adapters must be at least 1");
    }
    let tasks: Vec<TaskModel> = (0..a.adapters)
        .map(|i| {
            let adapter = AdapterConfig {
                bottleneck: a.bottleneck,
                ..AdapterConfig::default()
            };
            let head = HeadConfig::classification(vec!["a".into(), "b".into()]);
            let set = TrainableSet::Adapters { layernorms: true };
            TaskModel::new(
                base,
                &format!("t{i}"),
                set,
                Some(adapter),
                head,
                a.seq,
                i as u64,
            )
        })
        .collect::<adapterkit::Result<_>>()?;
    let rows: Vec<(Vec<u32>, Vec<u32>)> = (0..a.batch)
        .map(|r| {
            let span = r * a.seq..(r + 1) * a.seq;
            (ids[span.clone()].to_vec(), types[span].to_vec())
        })
        .collect();
    let single: Vec<adapterkit::task::TaskRow<'_>> = rows.iter().map(|r| (&tasks[0], r)).collect();
    let spread: Vec<adapterkit::task::TaskRow<'_>> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (&tasks[i % tasks.len()], r))
        .collect();
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for i in 0..a.warmup + a.steps {
        for (rows, times) in [(&single, &mut one), (&spread, &mut many)] {
            let t = Instant::now();
            base.predict_mixed(rows, false)?;
            if i >= a.warmup {
                times.push(t.elapsed().as_secs_f64());
            }
        }
    }
    let (m1, mn) = (
        median(&one).unwrap_or(f64::NAN),
        median(&many).unwrap_or(f64::NAN),
    );
    let out = json!({
        "tool": "adapterkit",
        "case": "InferMixed",
        "precision": a.precision.to_string(),
        "cpu": crate::serve::loadgen::cpu_model(),
        "batch": a.batch,
        "seq": a.seq,
        "adapters": a.adapters,
        "one_adapter_seconds": one,
        "spread_seconds": many,
        "one_adapter_median_seconds": m1,
        "spread_median_seconds": mn,
        "throughput_spread_over_one": m1 / mn,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{out}");
    if let Some(p) = &a.json {
        adapterkit::io::write_json(p, &out)?;
    }
    Ok(())
}
