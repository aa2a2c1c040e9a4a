//! `adapterkit suite`: the paper's experiments on the built-in tasks, resumable. Every finished
//! (task, method, learning rate, seed) run is a JSON file in the cache; a rerun skips it.
//!
//! Protocol: for each task and method, a learning-rate sweep with seed 0 picks the best rate on dev;
//! that rate is rerun with the other seeds; test accuracy is reported as mean ± std over seeds.

mod experiments;
mod report;
mod status;

use crate::chart;
use adapterkit::adapter::lora::Projection;
use adapterkit::adapter::{AdapterConfig, AdapterMethod, LoraConfig, PrefixConfig, Scaling};
use adapterkit::data::{self, TaskData};
use adapterkit::kernels::Activation;
use adapterkit::train::{evaluate, EvalMetrics, TrainConfig};
use adapterkit::{BaseModel, HeadConfig, TaskModel, TrainableSet};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use experiments::{ablation, extend, init_sweep};
use report::report;
use serde::{Deserialize, Serialize};
use serde_json::json;
use status::status;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Arguments of `adapterkit suite`.
#[derive(Args)]
pub struct SuiteArgs {
    #[command(subcommand)]
    pub part: Part,
}

/// The parts of the suite.
#[derive(Subcommand)]
pub enum Part {
    /// Methods × tasks: learning-rate sweep on dev, best rate over seeds, test mean ± std; then the
    /// table and the accuracy-vs-parameters figure.
    Run(RunArgs),
    /// Rebuild the table and figure from the cache without training.
    Report(CommonArgs),
    /// Progress of `run` from the cache: finished and remaining runs per task, and the time the
    /// remaining ones should take (from the cached runs' own timings); trains nothing.
    Status(CommonArgs),
    /// Ablation (paper Figure 6): test accuracy of the saved m=64 adapter with the adapters of
    /// layers i..=j removed at inference, for every span; heat map.
    Ablation(AblationArgs),
    /// Init scale (paper Figure 7): adapter init std 1e-7 … 1 by decades, test accuracy over seeds.
    Init(InitArgs),
    /// Extensibility: train tasks one after another into one adapter store and check, after each
    /// addition, that every earlier task's test predictions are bit-identical.
    Extend(ExtendArgs),
}

/// Options every part shares.
#[derive(Args, Clone)]
pub struct CommonArgs {
    /// Result directory (cache, tables, figures).
    #[arg(long, default_value = "results/suite")]
    pub out: PathBuf,
    /// Base model directory [default: the cached all-MiniLM-L6-v2].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tasks, comma-separated [default: all built-in tasks].
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Methods, comma-separated [default: all]: full, head, top-1, top-2, layernorm, houlsby-m2,
    /// houlsby-m8, houlsby-m64, houlsby-m256, pfeiffer-m64, parallel-m64, lora-r8, lora-r8-all, ia3,
    /// compacter, compacter++, prefix-30.
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Seeds per best setting.
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Cap on training examples per task (a fixed, seeded, stratified subsample; dev and test stay
    /// whole); 0 = no cap. Keeps the 17,824-tweet task affordable on 2 cores.
    #[arg(long, default_value_t = 4000)]
    pub max_train: usize,
    /// A subset for CI-like checks (≤ 15 min): UCI Amazon and Yelp, four methods, one learning
    /// rate, one seed, 3 epochs. Writes to `<out>-quick` unless --out is given.
    #[arg(long)]
    pub quick: bool,
}

/// `suite run`.
#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `suite ablation`.
#[derive(Args)]
pub struct AblationArgs {
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `suite init`.
#[derive(Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Epochs per run (the sweep is long; the paper's trend shows after a few).
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
}

/// `suite extend`.
#[derive(Args)]
pub struct ExtendArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Epochs per task.
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
}

/// One method of the suite: what it trains and its learning-rate grid.
#[derive(Debug, Clone)]
pub struct Method {
    /// Name in tables and the cache.
    pub name: &'static str,
    /// Family shown in the figure.
    pub family: &'static str,
    /// Learning rates swept on dev.
    pub lrs: &'static [f64],
}

const ADAPTER_LRS: &[f64] = &[1e-4, 3e-4, 1e-3];

/// Every method, in table order.
pub const METHODS: &[Method] = &[
    Method {
        name: "full",
        family: "full",
        lrs: &[2e-5, 5e-5, 1e-4],
    },
    Method {
        name: "head",
        family: "head",
        lrs: &[1e-3, 3e-3, 1e-2],
    },
    Method {
        name: "top-1",
        family: "top-k",
        lrs: &[5e-5, 1e-4, 3e-4],
    },
    Method {
        name: "top-2",
        family: "top-k",
        lrs: &[5e-5, 1e-4, 3e-4],
    },
    Method {
        name: "layernorm",
        family: "layernorm",
        lrs: &[1e-3, 3e-3, 1e-2],
    },
    Method {
        name: "houlsby-m2",
        family: "houlsby",
        lrs: ADAPTER_LRS,
    },
    Method {
        name: "houlsby-m8",
        family: "houlsby",
        lrs: ADAPTER_LRS,
    },
    Method {
        name: "houlsby-m64",
        family: "houlsby",
        lrs: ADAPTER_LRS,
    },
    Method {
        name: "houlsby-m256",
        family: "houlsby",
        lrs: ADAPTER_LRS,
    },
    Method {
        name: "pfeiffer-m64",
        family: "pfeiffer",
        lrs: ADAPTER_LRS,
    },
    Method {
        name: "parallel-m64",
        family: "parallel",
        lrs: ADAPTER_LRS,
    },
    Method {
        name: "lora-r8",
        family: "lora",
        lrs: ADAPTER_LRS,
    },
    Method {
        name: "lora-r8-all",
        family: "lora",
        lrs: ADAPTER_LRS,
    },
    Method {
        name: "ia3",
        family: "ia3",
        lrs: &[1e-3, 3e-3, 1e-2],
    },
    Method {
        name: "compacter",
        family: "compacter",
        lrs: &[1e-3, 3e-3, 1e-2],
    },
    Method {
        name: "compacter++",
        family: "compacter",
        lrs: &[1e-3, 3e-3, 1e-2],
    },
    Method {
        name: "prefix-30",
        family: "prefix",
        lrs: ADAPTER_LRS,
    },
];

fn method(name: &str) -> Result<&'static Method> {
    METHODS.iter().find(|m| m.name == name).with_context(|| {
        format!(
            "unknown method `{name}` (known: {})",
            METHODS
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// Trainable set and adapter method of a method.
fn setup(m: &Method) -> (TrainableSet, Option<AdapterMethod>) {
    let houlsby = |b: usize| AdapterConfig {
        bottleneck: b,
        ..AdapterConfig::default()
    };
    // The adapter rows train the LayerNorms too (the Houlsby paper's recipe); LoRA and (IA)³
    // train only their own tensors and the head, as their papers do.
    let adapters = |a: AdapterConfig| {
        (
            TrainableSet::Adapters { layernorms: true },
            Some(AdapterMethod::Bottleneck(a)),
        )
    };
    let lora = |l: LoraConfig| {
        (
            TrainableSet::Adapters { layernorms: false },
            Some(AdapterMethod::Lora(l)),
        )
    };
    match m.name {
        "full" => (TrainableSet::Full, None),
        "head" => (TrainableSet::Head, None),
        "top-1" => (TrainableSet::TopK { k: 1 }, None),
        "top-2" => (TrainableSet::TopK { k: 2 }, None),
        "layernorm" => (TrainableSet::Layernorm, None),
        "pfeiffer-m64" => adapters(AdapterConfig::pfeiffer(64, Activation::Gelu)),
        // AdapterHub's par_bn (He et al. 2022) at m = 64: beside the FFN, scaling 4, ReLU.
        "parallel-m64" => adapters(AdapterConfig::parallel(64, Scaling::Fixed(4.0))),
        // AdapterHub's lora preset (query and value, alpha = r = 8), and on every projection.
        "lora-r8" => lora(LoraConfig::lora(8, 8.0)),
        "lora-r8-all" => lora(LoraConfig {
            targets: Projection::ALL.to_vec(),
            ..LoraConfig::lora(8, 8.0)
        }),
        "ia3" => lora(LoraConfig::ia3()),
        // AdapterHub's compacter / compacter++ presets at m = 12 (their reduction factor 32 on
        // MiniLM's 384): PHM projections with n = 4, rules shared by all layers, rank-1 weights.
        "compacter" => adapters(AdapterConfig::compacter(12, false)),
        "compacter++" => adapters(AdapterConfig::compacter(12, true)),
        // AdapterHub's prefix_tuning preset: 30 positions per layer through the MLP (512, tanh),
        // folded after training; LayerNorms frozen, as Li & Liang.
        "prefix-30" => (
            TrainableSet::Adapters { layernorms: false },
            Some(AdapterMethod::Prefix(PrefixConfig::default())),
        ),
        n => adapters(houlsby(
            n.trim_start_matches("houlsby-m").parse().unwrap_or(64),
        )),
    }
}

/// Epochs per task: 5, and 3 for the two largest training sets (tweets capped at --max-train, SMS).
fn epochs_for(task: &str) -> usize {
    match task {
        "tweets" | "sms" => 3,
        _ => 5,
    }
}

/// One finished run, as cached.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// Task name.
    pub task: String,
    /// Method name.
    pub method: String,
    /// Peak learning rate.
    pub lr: f64,
    /// Training seed.
    pub seed: u64,
    /// Epochs trained.
    pub epochs: usize,
    /// Maximum input length.
    pub max_len: usize,
    /// Best dev accuracy and the epoch it came from.
    pub dev: f64,
    /// Epoch kept.
    pub best_epoch: usize,
    /// Test metrics of the kept parameters.
    pub test: EvalMetrics,
    /// Test F1 of each class (for SMS spam: the spam class).
    pub test_class_f1: Vec<f64>,
    /// Parameters the task trains and stores.
    pub trainable_params: usize,
    /// Base model parameters.
    pub base_params: usize,
    /// Size of the saved task directory.
    pub bytes: u64,
    /// Wall time.
    pub seconds: f64,
    /// Split fingerprint.
    pub split: String,
    /// Training examples used (after --max-train); absent in records older than the field.
    #[serde(default)]
    pub train_n: Option<usize>,
    /// Git revision the binary that ran was built from.
    pub revision: String,
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("adapterkit {}", args.join(" "))
}

/// The git revision this binary was built from (`+dirty` when crates/ had uncommitted changes).
fn git_revision() -> String {
    env!("ADAPTERKIT_BUILD_REVISION").to_string()
}

fn run_path(out: &Path, task: &str, method: &str, lr: f64, seed: u64) -> PathBuf {
    out.join("runs")
        .join(task)
        .join(method)
        .join(format!("lr{lr:e}-seed{seed}.json"))
}

/// Everything one run needs.
pub struct RunSpec<'a> {
    /// Task data.
    pub data: &'a TaskData,
    /// Method.
    pub method: &'a Method,
    /// Learning rate.
    pub lr: f64,
    /// Seed.
    pub seed: u64,
    /// Epochs.
    pub epochs: usize,
    /// Adapter init std override (init sweep).
    pub init_std: Option<f64>,
    /// Where to keep the task directory (else a temporary one, removed after measuring its size).
    pub keep_dir: Option<PathBuf>,
}

/// Steps between the resumable checkpoints of a cached suite run: an interrupted `suite run` loses
/// at most this many steps of the run it was in.
const CHECKPOINT_EVERY: usize = 50;

/// Trains one (task, method, lr, seed) and measures it.
pub fn train_one(base: &BaseModel, spec: &RunSpec<'_>) -> Result<(RunRecord, TaskModel)> {
    train_one_with(base, spec, None)
}

/// [`train_one`], checkpointing into `checkpoint` (and continuing from a checkpoint there).
fn train_one_with(
    base: &BaseModel,
    spec: &RunSpec<'_>,
    checkpoint: Option<&Path>,
) -> Result<(RunRecord, TaskModel)> {
    let data = spec.data;
    let (trainable, method) = setup(spec.method);
    let mut method = method;
    if let (Some(AdapterMethod::Bottleneck(a)), Some(s)) = (method.as_mut(), spec.init_std) {
        a.init_std = s;
    }
    let max_len = data::task_spec(&data.name)
        .map(|s| s.max_len)
        .unwrap_or(128)
        .min(base.config.max_position_embeddings);
    let head = HeadConfig {
        pair: data.pair,
        ..HeadConfig::classification(data.labels.clone())
    };
    let tmp = std::env::temp_dir().join(format!("ak-suite-{}", std::process::id()));
    let run = adapterkit::run::RunSpec {
        name: data.name.clone(),
        trainable,
        method,
        head,
        max_len,
        train: TrainConfig {
            epochs: spec.epochs,
            lr: spec.lr,
            seed: spec.seed,
            ..TrainConfig::default()
        },
        out: spec.keep_dir.clone().unwrap_or_else(|| tmp.clone()),
        base_name: "all-MiniLM-L6-v2".into(),
        split_seed: 0,
        checkpoint: checkpoint.map(|dir| adapterkit::run::CheckpointPlan {
            dir: dir.to_path_buf(),
            every: CHECKPOINT_EVERY,
            resume: dir.join(adapterkit::train::checkpoint::STATE).is_file(),
        }),
    };
    let task = adapterkit::run::new_task(base, &run)?;
    let done = adapterkit::run::run(base, data, &run, task, &mut |_| {})?;
    if spec.keep_dir.is_none() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let (r, test) = (&done.record, &done.test);
    let record = RunRecord {
        task: data.name.clone(),
        method: spec.method.name.to_string(),
        lr: spec.lr,
        seed: spec.seed,
        epochs: spec.epochs,
        max_len,
        dev: r.dev.primary(),
        best_epoch: r.best_epoch,
        test_class_f1: adapterkit::metrics::class_f1(
            &test.predicted,
            &data.test.labels,
            data.labels.len(),
        ),
        test: r.test,
        trainable_params: r.trainable_params,
        base_params: r.base_params,
        bytes: r.adapter_dir_bytes,
        seconds: r.seconds,
        split: data
            .split
            .as_ref()
            .map(|s| s.fingerprint())
            .unwrap_or_default(),
        train_n: Some(data.train.len()),
        revision: git_revision(),
    };
    Ok((record, done.task))
}

/// The cached run, or a fresh one that is then cached.
fn cached_run(base: &BaseModel, out: &Path, spec: &RunSpec<'_>) -> Result<RunRecord> {
    let path = run_path(out, &spec.data.name, spec.method.name, spec.lr, spec.seed);
    if path.exists() {
        let r: RunRecord = adapterkit::io::read_json(&path)
            .with_context(|| format!("reading cached run {}", path.display()))?;
        check_cached(&r, spec.data, &path)?;
        return Ok(r);
    }
    let checkpoint = path.with_extension("checkpoint");
    let resuming = checkpoint
        .join(adapterkit::train::checkpoint::STATE)
        .is_file();
    eprintln!(
        "[{}] {} {} lr {:e} seed {} ({} epochs){} …",
        chrono_now(),
        spec.data.name,
        spec.method.name,
        spec.lr,
        spec.seed,
        spec.epochs,
        if resuming {
            ", resuming its checkpoint"
        } else {
            ""
        }
    );
    let (record, _) = train_one_with(base, spec, Some(&checkpoint))?;
    eprintln!(
        "    dev {:.4} test {:.4} ({:.0} s)",
        record.dev,
        record.test.primary(),
        record.seconds
    );
    adapterkit::io::write_json(&path, &record)?;
    Ok(record)
}

/// Refuses a cached run made on another split or training subsample: mixing them would make the
/// table compare runs that did not see the same data.
fn check_cached(r: &RunRecord, data: &TaskData, path: &Path) -> Result<()> {
    let split = data
        .split
        .as_ref()
        .map(|s| s.fingerprint())
        .unwrap_or_default();
    if r.split != split {
        bail!(
            "{}: cached run used split {} but this run's split is {}; use another --out",
            path.display(),
            r.split,
            split
        );
    }
    if let Some(n) = r.train_n {
        if n != data.train.len() {
            bail!(
                "{}: cached run trained on {n} examples but this plan keeps {} (--max-train); \
                 use another --out or the same --max-train",
                path.display(),
                data.train.len()
            );
        }
    }
    Ok(())
}

fn chrono_now() -> String {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

#[derive(Clone)]
struct Plan {
    max_train: usize,
    out: PathBuf,
    tasks: Vec<String>,
    methods: Vec<&'static Method>,
    seeds: u64,
    quick: bool,
}

fn plan(c: &CommonArgs) -> Result<Plan> {
    let quick_tasks = ["amazon", "yelp"];
    let tasks: Vec<String> = if !c.tasks.is_empty() {
        c.tasks.clone()
    } else if c.quick {
        quick_tasks.iter().map(|s| s.to_string()).collect()
    } else {
        data::REGISTRY.iter().map(|t| t.name.to_string()).collect()
    };
    for t in &tasks {
        data::task_spec(t)?;
    }
    let methods: Vec<&Method> = if !c.methods.is_empty() {
        c.methods.iter().map(|m| method(m)).collect::<Result<_>>()?
    } else if c.quick {
        ["full", "head", "layernorm", "houlsby-m64"]
            .iter()
            .map(|m| method(m))
            .collect::<Result<_>>()?
    } else {
        METHODS.iter().collect()
    };
    let out = if c.quick && c.out == Path::new("results/suite") {
        PathBuf::from("results/suite-quick")
    } else {
        c.out.clone()
    };
    Ok(Plan {
        max_train: c.max_train,
        out,
        tasks,
        methods,
        seeds: if c.quick { 1 } else { c.seeds.max(1) },
        quick: c.quick,
    })
}

/// Entry point of `adapterkit suite`.
pub fn main(a: SuiteArgs, load_base: impl Fn(&Option<PathBuf>) -> Result<BaseModel>) -> Result<()> {
    match a.part {
        Part::Run(r) => {
            let p = plan(&r.common)?;
            let base = load_base(&r.common.model)?;
            // Where the plan stands and how long the rest should take, before hours of training.
            let model = model_dir(&r.common);
            status(&p, &model, &mut std::io::stderr())?;
            run(&base, &p)?;
            report(&p)
        }
        Part::Report(c) => report(&plan(&c)?),
        Part::Status(c) => status(&plan(&c)?, &model_dir(&c), &mut std::io::stdout()),
        Part::Ablation(x) => {
            let base = load_base(&x.common.model)?;
            ablation(&base, &plan(&x.common)?)
        }
        Part::Init(x) => {
            let base = load_base(&x.common.model)?;
            init_sweep(&base, &plan(&x.common)?, x.epochs)
        }
        Part::Extend(x) => {
            let base = load_base(&x.common.model)?;
            extend(&base, &plan(&x.common)?, x.epochs)
        }
    }
}

fn load_task_data(task: &str, max_train: usize) -> Result<TaskData> {
    let mut d = data::load_registry_task(&adapterkit::default_home(), task, 0)
        .with_context(|| format!("loading task `{task}` (run `adapterkit fetch` first)"))?;
    if max_train > 0 && d.train.len() > max_train {
        // Stratified: each class keeps its share; the order within a class is a seeded shuffle.
        let keep_frac = max_train as f64 / d.train.len() as f64;
        let mut rng = adapterkit::rng::Rng::derive(0, "suite-train-cap");
        let mut keep = Vec::new();
        for c in 0..d.labels.len() {
            let mut idx: Vec<usize> = (0..d.train.len())
                .filter(|&i| d.train.labels[i] == c)
                .collect();
            rng.shuffle(&mut idx);
            let n = (idx.len() as f64 * keep_frac).round() as usize;
            keep.extend_from_slice(&idx[..n.min(idx.len())]);
        }
        keep.sort_unstable();
        let t = &d.train;
        d.train = data::LabelledSet {
            inputs: keep.iter().map(|&i| t.inputs[i].clone()).collect(),
            labels: keep.iter().map(|&i| t.labels[i]).collect(),
            targets: keep
                .iter()
                .filter_map(|&i| t.targets.get(i).copied())
                .collect(),
        };
    }
    Ok(d)
}

/// The learning rates a plan sweeps for a method.
fn lrs(p: &Plan, m: &Method) -> Vec<f64> {
    if p.quick {
        vec![m.lrs[m.lrs.len() / 2]]
    } else {
        m.lrs.to_vec()
    }
}

fn epochs(p: &Plan, task: &str) -> usize {
    if p.quick {
        3
    } else {
        epochs_for(task)
    }
}

fn run(base: &BaseModel, p: &Plan) -> Result<()> {
    for task in &p.tasks {
        let data = load_task_data(task, p.max_train)?;
        for m in &p.methods {
            let mut best: Option<RunRecord> = None;
            for lr in lrs(p, m) {
                let keep = (m.name == "houlsby-m64").then(|| {
                    p.out
                        .join("adapters")
                        .join(format!("{task}-{}-lr{lr:e}", m.name))
                });
                let spec = RunSpec {
                    data: &data,
                    method: m,
                    lr,
                    seed: 0,
                    epochs: epochs(p, task),
                    init_std: None,
                    keep_dir: keep,
                };
                let r = cached_run(base, &p.out, &spec)?;
                if best.as_ref().is_none_or(|b| r.dev > b.dev) {
                    best = Some(r);
                }
            }
            let Some(best) = best else { continue };
            for seed in 1..p.seeds {
                let spec = RunSpec {
                    data: &data,
                    method: m,
                    lr: best.lr,
                    seed,
                    epochs: epochs(p, task),
                    init_std: None,
                    keep_dir: None,
                };
                cached_run(base, &p.out, &spec)?;
            }
        }
    }
    Ok(())
}

fn model_dir(c: &CommonArgs) -> PathBuf {
    c.model
        .clone()
        .unwrap_or_else(adapterkit::default_model_dir)
}

/// All cached runs of a plan's tasks and methods.
fn cached(p: &Plan) -> Result<Vec<RunRecord>> {
    let mut v = Vec::new();
    for t in &p.tasks {
        for m in &p.methods {
            let dir = p.out.join("runs").join(t).join(m.name);
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd {
                let path = e?.path();
                if path.extension().is_some_and(|x| x == "json") {
                    v.push(
                        adapterkit::io::read_json(&path)
                            .with_context(|| format!("reading {}", path.display()))?,
                    );
                }
            }
        }
    }
    Ok(v)
}

/// Orders seed-0 runs by dev accuracy; on a tie the lower learning rate ranks higher, as `run`
/// picks the first best rate of an ascending grid.
fn dev_then_lower_lr(a: &RunRecord, b: &RunRecord) -> std::cmp::Ordering {
    a.dev.total_cmp(&b.dev).then(b.lr.total_cmp(&a.lr))
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let s = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, s)
}
