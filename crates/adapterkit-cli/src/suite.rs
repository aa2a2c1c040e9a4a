//! `adapterkit suite`: the paper's experiments on the built-in tasks, resumable. Every finished
//! (task, method, learning rate, seed) run is a JSON file in the cache; a rerun skips it.
//!
//! Protocol: for each task and method, a learning-rate sweep with seed 0 picks the best rate on dev;
//! that rate is rerun with the other seeds; test accuracy is reported as mean ± std over seeds.

use crate::chart;
use adapterkit::adapter::AdapterConfig;
use adapterkit::data::{self, TaskData};
use adapterkit::ops::Activation;
use adapterkit::train::{evaluate, EvalMetrics, TrainConfig};
use adapterkit::{BaseModel, HeadConfig, TaskModel, TrainableSet};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::json;
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
    /// houlsby-m8, houlsby-m64, houlsby-m256, pfeiffer-m64.
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

/// Trainable set and adapter configuration of a method.
fn setup(m: &Method) -> (TrainableSet, Option<AdapterConfig>) {
    let houlsby = |b: usize| AdapterConfig {
        bottleneck: b,
        ..AdapterConfig::default()
    };
    match m.name {
        "full" => (TrainableSet::Full, None),
        "head" => (TrainableSet::Head, None),
        "top-1" => (TrainableSet::TopK { k: 1 }, None),
        "top-2" => (TrainableSet::TopK { k: 2 }, None),
        "layernorm" => (TrainableSet::Layernorm, None),
        "pfeiffer-m64" => (
            TrainableSet::Adapters { layernorms: true },
            Some(AdapterConfig::pfeiffer(64, Activation::Gelu)),
        ),
        n => {
            let b = n.trim_start_matches("houlsby-m").parse().unwrap_or(64);
            (
                TrainableSet::Adapters { layernorms: true },
                Some(houlsby(b)),
            )
        }
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

/// Per-class F1 from predictions.
fn class_f1(pred: &[usize], gold: &[usize], classes: usize) -> Vec<f64> {
    (0..classes)
        .map(|c| {
            let tp = pred
                .iter()
                .zip(gold)
                .filter(|(p, g)| **p == c && **g == c)
                .count() as f64;
            let fp = pred
                .iter()
                .zip(gold)
                .filter(|(p, g)| **p == c && **g != c)
                .count() as f64;
            let fneg = pred
                .iter()
                .zip(gold)
                .filter(|(p, g)| **p != c && **g == c)
                .count() as f64;
            if tp == 0.0 {
                0.0
            } else {
                2.0 * tp / (2.0 * tp + fp + fneg)
            }
        })
        .collect()
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

/// Trains one (task, method, lr, seed) and measures it.
pub fn train_one(base: &BaseModel, spec: &RunSpec<'_>) -> Result<(RunRecord, TaskModel)> {
    let data = spec.data;
    let (trainable, mut adapter) = setup(spec.method);
    if let (Some(a), Some(s)) = (adapter.as_mut(), spec.init_std) {
        a.init_std = s;
    }
    let max_len = data::task_spec(&data.name)
        .map(|s| s.max_len)
        .unwrap_or(128);
    let head = HeadConfig {
        pair: data.pair,
        ..HeadConfig::classification(data.labels.clone())
    };
    let mut task = TaskModel::new(
        base, &data.name, trainable, adapter, head, max_len, spec.seed,
    )?;
    let cfg = TrainConfig {
        epochs: spec.epochs,
        lr: spec.lr,
        seed: spec.seed,
        ..TrainConfig::default()
    };
    let report = adapterkit::train(base, &mut task, data, &cfg, &mut |_| {})?;
    let test = evaluate(base, &task, &data.test, cfg.eval_batch_size, &[])?;
    let tmp;
    let dir = match &spec.keep_dir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("ak-suite-{}", std::process::id()));
            tmp.clone()
        }
    };
    task.save(&dir, "all-MiniLM-L6-v2")?;
    let bytes = TaskModel::dir_size(&dir)?;
    if spec.keep_dir.is_none() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let record = RunRecord {
        task: data.name.clone(),
        method: spec.method.name.to_string(),
        lr: spec.lr,
        seed: spec.seed,
        epochs: spec.epochs,
        max_len,
        dev: report.best_dev.primary(),
        best_epoch: report.best_epoch,
        test_class_f1: class_f1(&test.predicted, &data.test.labels, data.labels.len()),
        test: test.metrics,
        trainable_params: task.num_params(),
        base_params: base.num_params(),
        bytes,
        seconds: report.seconds,
        split: data
            .split
            .as_ref()
            .map(|s| s.fingerprint())
            .unwrap_or_default(),
        train_n: Some(data.train.len()),
        revision: git_revision(),
    };
    Ok((record, task))
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
    eprintln!(
        "[{}] {} {} lr {:e} seed {} ({} epochs) …",
        chrono_now(),
        spec.data.name,
        spec.method.name,
        spec.lr,
        spec.seed,
        spec.epochs
    );
    let (record, _) = train_one(base, spec)?;
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

/// Per task, the sizes that set a run's cost: mean word pieces per example as the trainer sees them
/// (truncated to the task's max length, unpadded) and the dev-set size; loaded once per task.
struct TaskSizes<'a> {
    tokenizer: &'a adapterkit::tokenizer::TextTokenizer,
    max_train: usize,
    sizes: BTreeMap<String, (f64, usize)>,
}

impl TaskSizes<'_> {
    fn get(&mut self, task: &str) -> Result<(f64, usize)> {
        if let Some(&s) = self.sizes.get(task) {
            return Ok(s);
        }
        let data = load_task_data(task, self.max_train)?;
        let max_len = data::task_spec(task)?.max_len;
        let enc = self
            .tokenizer
            .encode_all(&data.train.inputs, max_len)
            .with_context(|| format!("tokenizing task `{task}`"))?;
        let mean =
            enc.iter().map(|(ids, _)| ids.len()).sum::<usize>() as f64 / enc.len().max(1) as f64;
        self.sizes.insert(task.to_string(), (mean, data.dev.len()));
        Ok((mean, data.dev.len()))
    }
}

/// A run's work in word pieces: trained (training examples × epochs) and evaluated (dev × epochs).
/// Tokens, not max length, because the trainer does not pad: a BBC document fills its 128 word
/// pieces, a tweet uses half of 64.
#[derive(Clone, Copy)]
struct Work {
    train: f64,
    eval: f64,
}

impl Work {
    fn of(task: &str, train_n: usize, epochs: usize, sizes: &mut TaskSizes) -> Result<Work> {
        let (tokens, dev_n) = sizes.get(task)?;
        Ok(Work {
            train: (train_n * epochs) as f64 * tokens,
            eval: (dev_n * epochs) as f64 * tokens,
        })
    }

    /// None when the record predates the `train_n` field.
    fn of_run(r: &RunRecord, sizes: &mut TaskSizes) -> Result<Option<Work>> {
        match r.train_n.filter(|&n| n > 0) {
            Some(n) => Work::of(&r.task, n, r.epochs, sizes).map(Some),
            None => Ok(None),
        }
    }
}

/// Time model fitted on cached runs by least squares on relative error: seconds = overhead + rate
/// of the method × trained tokens + eval rate × evaluated tokens. The overhead (setup, saving,
/// test set) dominates the 800-example tasks; the evaluation term the cheap methods on a large dev
/// set. Fitted on the other finished tasks, it predicted the total time of MR, hedge, SMS, Yelp and
/// IMDB within 16% each, and amazon's 44% under.
struct Pace {
    overhead: f64,
    eval_rate: f64,
    rates: BTreeMap<String, f64>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// Solves the square system `a x = b` by Gaussian elimination with partial pivoting; None when it
/// is singular (too few distinct runs to tell the terms apart).
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let piv = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[piv][col].abs() < 1e-12 * a[piv].iter().map(|v| v.abs()).fold(1e-300, f64::max) {
            return None;
        }
        a.swap(col, piv);
        b.swap(col, piv);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            let (above, below) = a.split_at_mut(row);
            for (v, p) in below[0][col..].iter_mut().zip(&above[col][col..]) {
                *v -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Some(x)
}

impl Pace {
    /// Fits the model to (method, seconds, work) of finished runs.
    fn fit(rows: &[(&str, f64, Work)]) -> Option<Pace> {
        let methods: Vec<&str> = rows
            .iter()
            .map(|r| r.0)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let n = methods.len() + 2;
        let (mut ata, mut atb) = (vec![vec![0.0; n]; n], vec![0.0; n]);
        // Token counts are ~1e5–1e6: scaling them to millions keeps the system well conditioned.
        let scale = 1e-6;
        for &(method, seconds, w) in rows.iter().filter(|r| r.1 > 0.0) {
            let mut x = vec![0.0; n];
            x[0] = 1.0;
            x[1] = w.eval * scale;
            if let Some(i) = methods.iter().position(|m| *m == method) {
                x[2 + i] = w.train * scale;
            }
            let wt = 1.0 / (seconds * seconds);
            for i in 0..n {
                for j in 0..n {
                    ata[i][j] += wt * x[i] * x[j];
                }
                atb[i] += wt * x[i] * seconds;
            }
        }
        let c = solve(ata, atb)?;
        Some(Pace {
            overhead: c[0].max(0.0),
            eval_rate: (c[1] * scale).max(0.0),
            rates: methods
                .into_iter()
                .zip(&c[2..])
                .map(|(m, &v)| (m.to_string(), (v * scale).max(0.0)))
                .collect(),
        })
    }

    fn seconds(&self, method: &str, w: Work) -> Option<f64> {
        Some(self.overhead + self.rates.get(method)? * w.train + self.eval_rate * w.eval)
    }
}

/// `suite status`: per task, the runs `run` would make that are cached and those still to do, with
/// an estimate of the time left.
fn status(p: &Plan, model: &Path, out: &mut dyn std::io::Write) -> Result<()> {
    let runs = cached(&Plan {
        tasks: data::REGISTRY.iter().map(|t| t.name.to_string()).collect(),
        ..p.clone()
    })?;
    let tokenizer = adapterkit::tokenizer::TextTokenizer::from_dir(model)
        .with_context(|| format!("loading the tokenizer of {}", model.display()))?;
    let mut sizes = TaskSizes {
        tokenizer: &tokenizer,
        max_train: p.max_train,
        sizes: BTreeMap::new(),
    };
    let mut rows = Vec::new();
    for r in &runs {
        if let Some(w) = Work::of_run(r, &mut sizes)? {
            rows.push((r.method.as_str(), r.seconds, w));
        }
    }
    let pace_model = Pace::fit(&rows);
    let predict = |m: &str, w: Work| pace_model.as_ref().and_then(|p| p.seconds(m, w));
    let (mut all_done, mut all_left, mut all_secs) = (0, 0, 0.0);
    let mut unknown = false;
    writeln!(
        out,
        "| task | finished | to do | next | estimated time left |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    for task in &p.tasks {
        let data = load_task_data(task, p.max_train)?;
        let work = Work::of(task, data.train.len(), epochs(p, task), &mut sizes)?;
        // What tokens do not capture (attention grows with length, loading) differs by task, so
        // the pace is calibrated on the task's own finished runs where there are some (median of
        // actual over predicted time).
        let mut ratios = Vec::new();
        for r in runs.iter().filter(|r| r.task == *task) {
            if let Some(w) = Work::of_run(r, &mut sizes)? {
                if let Some(t) = predict(&r.method, w).filter(|&t| t > 0.0) {
                    ratios.push(r.seconds / t);
                }
            }
        }
        let pace = median(ratios).unwrap_or(1.0);
        let (mut done, mut left, mut secs) = (0, 0, 0.0);
        let mut next: Option<String> = None;
        for m in &p.methods {
            let sweep = lrs(p, m);
            let mut best: Option<(f64, f64)> = None;
            let mut todo: Vec<(f64, u64)> = Vec::new();
            for &lr in &sweep {
                let path = run_path(&p.out, task, m.name, lr, 0);
                if path.exists() {
                    let r: RunRecord = adapterkit::io::read_json(&path)
                        .with_context(|| format!("reading cached run {}", path.display()))?;
                    done += 1;
                    if best.is_none_or(|b| r.dev > b.1) {
                        best = Some((lr, r.dev));
                    }
                } else {
                    todo.push((lr, 0));
                }
            }
            for seed in 1..p.seeds {
                // Until the sweep is finished the best rate is not known: the extra seeds count as
                // to do.
                match best.filter(|_| todo.is_empty()) {
                    Some((lr, _)) if run_path(&p.out, task, m.name, lr, seed).exists() => done += 1,
                    Some((lr, _)) => todo.push((lr, seed)),
                    None => todo.push((f64::NAN, seed)),
                }
            }
            left += todo.len();
            match predict(m.name, work) {
                Some(t) => secs += t * pace * todo.len() as f64,
                None if !todo.is_empty() => unknown = true,
                None => {}
            }
            if next.is_none() {
                next = todo.first().map(|(lr, seed)| {
                    if lr.is_nan() {
                        format!("{} seed {seed}", m.name)
                    } else {
                        format!("{} lr {lr:e} seed {seed}", m.name)
                    }
                });
            }
        }
        writeln!(
            out,
            "| {task} | {done} | {left} | {} | {:.0} min |",
            next.as_deref().unwrap_or("—"),
            secs / 60.0
        )?;
        (all_done, all_left, all_secs) = (all_done + done, all_left + left, all_secs + secs);
    }
    writeln!(
        out,
        "\n{all_done} runs finished, {all_left} to do, about {:.0} min left at the cached runs' pace{}.",
        all_secs / 60.0,
        if unknown {
            " (a method with no cached run yet is not counted)"
        } else {
            ""
        }
    )?;
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

/// One table cell: the best dev setting's test accuracy over seeds.
#[derive(Debug, Clone, Serialize)]
struct Cell {
    swept: usize,
    lr: f64,
    dev: f64,
    test_mean: f64,
    test_std: f64,
    seeds: usize,
    trainable_params: usize,
    percent: f64,
    bytes: u64,
    minority_f1: f64,
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

fn cells(p: &Plan, runs: &[RunRecord]) -> BTreeMap<(String, String), Cell> {
    let mut out = BTreeMap::new();
    for t in &p.tasks {
        for m in &p.methods {
            let mine: Vec<&RunRecord> = runs
                .iter()
                .filter(|r| &r.task == t && r.method == m.name)
                .collect();
            let Some(best) = mine
                .iter()
                .filter(|r| r.seed == 0)
                .max_by(|a, b| dev_then_lower_lr(a, b))
            else {
                continue;
            };
            let at_best: Vec<&&RunRecord> = mine.iter().filter(|r| r.lr == best.lr).collect();
            let tests: Vec<f64> = at_best.iter().map(|r| r.test.primary()).collect();
            let (mean, std) = mean_std(&tests);
            let minority = at_best
                .iter()
                .map(|r| {
                    r.test_class_f1
                        .iter()
                        .cloned()
                        .fold(f64::INFINITY, f64::min)
                })
                .sum::<f64>()
                / at_best.len() as f64;
            let swept = mine.iter().filter(|r| r.seed == 0).count();
            out.insert(
                (t.clone(), m.name.to_string()),
                Cell {
                    swept,
                    lr: best.lr,
                    dev: best.dev,
                    test_mean: mean,
                    test_std: std,
                    seeds: tests.len(),
                    trainable_params: best.trainable_params,
                    percent: 100.0 * best.trainable_params as f64 / best.base_params as f64,
                    bytes: best.bytes,
                    minority_f1: minority,
                },
            );
        }
    }
    out
}

fn report(p: &Plan) -> Result<()> {
    let runs = cached(p)?;
    if runs.is_empty() {
        bail!(
            "no cached runs under {}: run `adapterkit suite run` first",
            p.out.display()
        );
    }
    let cells = cells(p, &runs);
    let base_params = runs[0].base_params;
    let mut md = String::new();
    md.push_str(&format!(
        "Test accuracy (%), mean ± std over seeds at the learning rate picked on dev (seed 0). Base: {} parameters. Made by `{}` at revision {} from {} cached runs (each run records the revision that trained it).\n\n",
        base_params,
        command_line(),
        git_revision(),
        runs.len()
    ));
    md.push_str("| method |");
    for t in &p.tasks {
        md.push_str(&format!(" {t} |"));
    }
    md.push_str(
        " average | trained / task | % of base | serve all tasks (× base) | bytes / task |\n|---|",
    );
    for _ in 0..p.tasks.len() + 5 {
        md.push_str("---|");
    }
    md.push('\n');
    let mut csv = String::from(
        "method,task,lr,dev,test_mean,test_std,seeds,trainable_params,percent,bytes,min_class_f1\n",
    );
    let mut points = Vec::new();
    for m in &p.methods {
        md.push_str(&format!("| {} |", m.name));
        let mut accs = Vec::new();
        let mut params = Vec::new();
        let mut bytes = Vec::new();
        for t in &p.tasks {
            match cells.get(&(t.clone(), m.name.to_string())) {
                Some(c) => {
                    let want_lrs = lrs(p, m).len();
                    let seeds = if c.swept < want_lrs {
                        format!(" (lr sweep {}/{want_lrs})", c.swept)
                    } else if c.seeds < p.seeds as usize {
                        format!(" ({}/{} seeds)", c.seeds, p.seeds)
                    } else {
                        String::new()
                    };
                    md.push_str(&format!(
                        " {:.1} ± {:.1}{seeds} |",
                        100.0 * c.test_mean,
                        100.0 * c.test_std
                    ));
                    accs.push(c.test_mean);
                    params.push(c.trainable_params as f64);
                    bytes.push(c.bytes as f64);
                    csv.push_str(&format!(
                        "{},{},{:e},{:.4},{:.4},{:.4},{},{},{:.3},{},{:.4}\n",
                        m.name,
                        t,
                        c.lr,
                        c.dev,
                        c.test_mean,
                        c.test_std,
                        c.seeds,
                        c.trainable_params,
                        c.percent,
                        c.bytes,
                        c.minority_f1
                    ));
                }
                None => md.push_str(" — |"),
            }
        }
        if accs.len() == p.tasks.len() && !accs.is_empty() {
            let avg = accs.iter().sum::<f64>() / accs.len() as f64;
            let per_task = params.iter().sum::<f64>() / params.len() as f64;
            let n = p.tasks.len() as f64;
            let serve = if m.name == "full" {
                n
            } else {
                1.0 + n * per_task / base_params as f64
            };
            md.push_str(&format!(
                " **{:.1}** | {:.0} | {:.2}% | {:.2} | {:.2} MB |\n",
                100.0 * avg,
                per_task,
                100.0 * per_task / base_params as f64,
                serve,
                bytes.iter().sum::<f64>() / bytes.len() as f64 / 1e6
            ));
            points.push((m.family, m.name, per_task, 100.0 * avg));
        } else {
            md.push_str(" (incomplete) | | | | |\n");
        }
    }
    if p.tasks.iter().any(|t| t == "sms") {
        let f1: Vec<String> = p
            .methods
            .iter()
            .filter_map(|m| {
                let c = cells.get(&("sms".to_string(), m.name.to_string()))?;
                Some(format!("{} {:.1}", m.name, 100.0 * c.minority_f1))
            })
            .collect();
        md.push_str(&format!(
            "\nSMS: F1 of the spam class on test (mean over seeds; the minority class): {}.\n",
            f1.join("; ")
        ));
    }
    md.push_str(&claims(p, &cells));
    std::fs::create_dir_all(&p.out)?;
    adapterkit::io::write_atomic(&p.out.join("table.md"), md.as_bytes())?;
    adapterkit::io::write_atomic(&p.out.join("table.csv"), csv.as_bytes())?;
    let avg_points: Vec<FigPoint> = points.iter().map(|x| (x.0, x.1, x.2, x.3, 0.0)).collect();
    let plot = accuracy_figure(
        "Accuracy vs trained parameters per task (average over tasks)",
        &avg_points,
    );
    chart::write(&plot, &p.out, "params_vs_accuracy")?;
    // Per task, as the paper's Figures 3–4 draw them: an average can hide a task that disagrees.
    let per_task_dir = p.out.join("per_task");
    let mut per_task_written = Vec::new();
    for t in &p.tasks {
        let pts: Vec<FigPoint> = p
            .methods
            .iter()
            .filter_map(|m| {
                let c = cells.get(&(t.clone(), m.name.to_string()))?;
                Some((
                    m.family,
                    m.name,
                    c.trainable_params as f64,
                    100.0 * c.test_mean,
                    100.0 * c.test_std,
                ))
            })
            .collect();
        if pts.is_empty() {
            continue;
        }
        let plot = accuracy_figure(
            &format!("{t}: accuracy vs trained parameters (mean ± std over seeds)"),
            &pts,
        );
        chart::write(&plot, &per_task_dir, t)?;
        per_task_written.push(t.as_str());
    }
    print!("{md}");
    println!(
        "\nwritten: {}/table.md, table.csv, params_vs_accuracy.svg, .png; per_task/{{{}}}.svg, .png",
        p.out.display(),
        per_task_written.join(",")
    );
    Ok(())
}

/// One point of an accuracy figure: family, method, trained parameters, accuracy (%), ± std.
type FigPoint = (&'static str, &'static str, f64, f64, f64);

/// Accuracy against trained parameters on a log axis, one series per method family: relative to
/// full fine-tuning when it is among the points (the paper's Figure 3), else absolute.
fn accuracy_figure(title: &str, points: &[FigPoint]) -> chart::Chart {
    let full = points.iter().find(|x| x.1 == "full").map(|x| x.3);
    let series: Vec<chart::Series> = ["houlsby", "pfeiffer", "top-k", "layernorm", "head"]
        .iter()
        .map(|fam| {
            let mine: Vec<&FigPoint> = points.iter().filter(|x| x.0 == *fam).collect();
            chart::Series {
                name: fam.to_string(),
                points: mine
                    .iter()
                    .map(|x| (x.2, x.3 - full.unwrap_or(0.0), x.1.to_string()))
                    .collect(),
                errors: if mine.iter().any(|x| x.4 > 0.0) {
                    mine.iter().map(|x| x.4).collect()
                } else {
                    Vec::new()
                },
            }
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    chart::line_plot(
        title,
        "trained parameters per task (log scale)",
        if full.is_some() {
            "accuracy − full fine-tuning (points)"
        } else {
            "accuracy (%)"
        },
        &series,
        true,
    )
}

/// The paper's claims (issue 5's expectations) checked against the table, each with its numbers:
/// only over tasks where every method involved has a result.
fn claims(p: &Plan, cells: &BTreeMap<(String, String), Cell>) -> String {
    let get = |t: &str, m: &str| cells.get(&(t.to_string(), m.to_string()));
    let houlsby = ["houlsby-m2", "houlsby-m8", "houlsby-m64", "houlsby-m256"];
    let mut needed: Vec<&str> = houlsby.to_vec();
    needed.extend(["full", "top-1", "top-2", "layernorm"]);
    let tasks: Vec<&String> = p
        .tasks
        .iter()
        .filter(|t| needed.iter().all(|m| get(t, m).is_some()))
        .collect();
    let mut out = String::from("\nAgainst the paper's claims");
    if tasks.is_empty() {
        out.push_str(": no task has every method yet.\n");
        return out;
    }
    let names: Vec<&str> = tasks.iter().map(|t| t.as_str()).collect();
    out.push_str(&format!(
        " (tasks with every method: {}):\n\n",
        names.join(", ")
    ));
    let n = tasks.len() as f64;
    let mean = |m: &str, f: fn(&Cell) -> f64| -> f64 {
        tasks.iter().filter_map(|t| get(t, m)).map(f).sum::<f64>() / n
    };
    let avg = |m: &str| 100.0 * mean(m, |c| c.test_mean);
    let params = |m: &str| mean(m, |c| c.percent);
    let verdict = |ok: bool| if ok { "met" } else { "not met" };
    // Standard error of a method's average from its seeds' spread per task, in points: a margin
    // smaller than about twice the error of the difference is a tie, whichever side it falls.
    let std_err = |m: &str| {
        100.0
            * tasks
                .iter()
                .filter_map(|t| get(t, m))
                .map(|c| c.test_std.powi(2) / c.seeds.max(1) as f64)
                .sum::<f64>()
                .sqrt()
            / n
    };
    let margin = |a: &str, b: &str| {
        let (d, e) = (avg(a) - avg(b), std_err(a).hypot(std_err(b)));
        let reading = if d.abs() < 2.0 * e {
            "a tie within seed noise"
        } else {
            "beyond seed noise"
        };
        format!("{d:+.2} ± {e:.2} standard error, {reading}")
    };
    let full = avg("full");
    // The bottleneck size per task is picked on dev (seed 0 at its best rate), as the paper picks
    // on validation; picking on test would flatter the adapters.
    let mut picks = Vec::new();
    let mut best_sum = 0.0;
    for t in &tasks {
        // Reversed so that on a dev tie `max_by` (which keeps the last maximum) takes the smaller.
        let (m, c) = houlsby
            .iter()
            .rev()
            .filter_map(|m| get(t, m).map(|c| (m, c)))
            .max_by(|a, b| a.1.dev.total_cmp(&b.1.dev))
            .expect("every Houlsby size is present for these tasks");
        picks.push(format!("{t} {}", m.trim_start_matches("houlsby-")));
        best_sum += c.test_mean;
    }
    let best = 100.0 * best_sum / n;
    out.push_str(&format!(
        "- Houlsby, bottleneck picked per task on dev ({}): {best:.1} against full fine-tuning's \
         {full:.1} ({:+.1}); within 1.0 point: {}.\n",
        picks.join(", "),
        best - full,
        verdict(best >= full - 1.0)
    ));
    let m64 = avg("houlsby-m64");
    let m64p = params("houlsby-m64");
    out.push_str(&format!(
        "- Houlsby m=64: {m64:.1} ({:+.1}); within 1.5 points: {}; {m64p:.2}% of the base per \
         task, ≤ 4%: {}.\n",
        m64 - full,
        verdict(m64 >= full - 1.5),
        verdict(m64p <= 4.0)
    ));
    // "At a similar parameter count": the best Houlsby size that trains no more than the
    // baseline does.
    for base in ["layernorm", "top-1", "top-2"] {
        let budget = params(base);
        let rival = houlsby
            .iter()
            .filter(|m| params(m) <= budget * 1.5)
            .map(|m| (m, avg(m)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let b = avg(base);
        match rival {
            Some((m, a)) => out.push_str(&format!(
                "- {base} ({budget:.2}% of the base): {b:.1}; the best Houlsby size with at most \
                 1.5× its parameters ({m}, {:.2}%): {a:.1}; adapters above: {} ({}).\n",
                params(m),
                verdict(a > b),
                margin(m, base)
            )),
            None => out.push_str(&format!(
                "- {base} ({budget:.2}% of the base): {b:.1}; no Houlsby size is that small.\n"
            )),
        }
    }
    out
}

fn ablation(base: &BaseModel, p: &Plan) -> Result<()> {
    let mut all = serde_json::Map::new();
    for task in &p.tasks {
        let data = load_task_data(task, p.max_train)?;
        let m = method("houlsby-m64")?;
        // The adapter of the dev-best learning rate (seed 0) from `suite run`; trained here if absent.
        let runs = cached(&Plan {
            tasks: vec![task.clone()],
            methods: vec![m],
            ..p.clone()
        })?;
        let lr = runs
            .iter()
            .filter(|r| r.seed == 0)
            .max_by(|a, b| dev_then_lower_lr(a, b))
            .map(|r| r.lr)
            .unwrap_or(1e-3);
        let dir = p
            .out
            .join("adapters")
            .join(format!("{task}-{}-lr{lr:e}", m.name));
        if !dir.join("adapterkit.json").exists() {
            let spec = RunSpec {
                data: &data,
                method: m,
                lr,
                seed: 0,
                epochs: epochs(p, task),
                init_std: None,
                keep_dir: Some(dir.clone()),
            };
            let (r, _) = train_one(base, &spec)?;
            adapterkit::io::write_json(&run_path(&p.out, task, m.name, lr, 0), &r)?;
        }
        let t = TaskModel::load(&dir, base)?;
        let layers = base.config.num_hidden_layers;
        let enc = adapterkit::train::tokenize_set(base, &data.test, t.max_len)?;
        let acc = |skip: &[usize]| -> Result<f64> {
            Ok(
                adapterkit::train::evaluate_encoded(base, &t, &data.test, &enc, 64, skip)?
                    .metrics
                    .primary(),
            )
        };
        let full = acc(&[])?;
        let mut grid = vec![vec![f64::NAN; layers]; layers];
        for (i, row) in grid.iter_mut().enumerate() {
            for (j, cell) in row.iter_mut().enumerate().skip(i) {
                let skip: Vec<usize> = (i..=j).collect();
                *cell = acc(&skip)?;
            }
        }
        println!(
            "{task}: all adapters {:.4}; removing layers i..=j (rows i, columns j):",
            full
        );
        for (i, row) in grid.iter().enumerate() {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(j, v)| {
                    if j < i {
                        "   —  ".into()
                    } else {
                        format!("{v:.4}")
                    }
                })
                .collect();
            println!("  {i}: {}", cells.join(" "));
        }
        // The paper's claim: the lower layers' adapters matter less than the upper ones.
        let half = layers / 2;
        let halves = (layers >= 2).then(|| (grid[0][half - 1], grid[half][layers - 1]));
        if let Some((lower, upper)) = halves {
            println!(
                "  lower layers 0–{} removed: {:.4} (−{:.1} points); upper layers {half}–{} removed: {:.4} (−{:.1}); lower costs less: {}",
                half - 1,
                lower,
                100.0 * (full - lower),
                layers - 1,
                upper,
                100.0 * (full - upper),
                if lower > upper { "yes" } else { "no" }
            );
        }
        let heat = chart::heat_map(
            &format!(
                "{task}: test accuracy with adapters of layers i..j removed (all kept: {:.1})",
                100.0 * full
            ),
            "last removed layer j",
            "first removed layer i",
            &grid,
        );
        std::fs::create_dir_all(&p.out)?;
        chart::write(&heat, &p.out, &format!("ablation_{task}"))?;
        all.insert(
            task.clone(),
            json!({"adapter": dir, "lr": lr, "all_kept": full, "removed_i_to_j": grid,
                "lower_half_removed": halves.map(|h| h.0),
                "upper_half_removed": halves.map(|h| h.1)}),
        );
    }
    merge_json(&p.out.join("ablation.json"), all)?;
    println!(
        "written: {}/ablation.json, ablation_<task>.svg, .png",
        p.out.display()
    );
    Ok(())
}

/// Writes `entries` (one per task) into the JSON object at `path`, keeping the other tasks'
/// entries a run for different `--tasks` wrote earlier.
fn merge_json(path: &Path, entries: serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let mut all: serde_json::Map<String, serde_json::Value> = if path.exists() {
        adapterkit::io::read_json(path)
            .with_context(|| format!("{}: expected a JSON object keyed by task", path.display()))?
    } else {
        serde_json::Map::new()
    };
    all.extend(entries);
    adapterkit::io::write_json(path, &all)?;
    Ok(())
}

fn init_sweep(base: &BaseModel, p: &Plan, epochs: usize) -> Result<()> {
    let stds: Vec<f64> = (-7..=0).map(|e| 10f64.powi(e)).collect();
    let m = method("houlsby-m64")?;
    let mut series = Vec::new();
    let mut all = serde_json::Map::new();
    for task in &p.tasks {
        let data = load_task_data(task, p.max_train)?;
        let mut pts = Vec::new();
        let mut errs = Vec::new();
        let mut rows = Vec::new();
        for &std in &stds {
            let mut accs = Vec::new();
            for seed in 0..p.seeds {
                let path = p
                    .out
                    .join("init")
                    .join(task)
                    .join(format!("std{std:e}-seed{seed}.json"));
                let r: RunRecord = if path.exists() {
                    let r = adapterkit::io::read_json(&path)?;
                    check_cached(&r, &data, &path)?;
                    r
                } else {
                    eprintln!("[{}] init {task} std {std:e} seed {seed} …", chrono_now());
                    let spec = RunSpec {
                        data: &data,
                        method: m,
                        lr: 1e-3,
                        seed,
                        epochs,
                        init_std: Some(std),
                        keep_dir: None,
                    };
                    let (r, _) = train_one(base, &spec)?;
                    adapterkit::io::write_json(&path, &r)?;
                    r
                };
                accs.push(r.test.primary());
            }
            let (mean, sd) = mean_std(&accs);
            println!(
                "{task} init std {std:e}: test {:.4} ± {:.4} ({} seeds)",
                mean,
                sd,
                accs.len()
            );
            pts.push((std, 100.0 * mean, format!("±{:.1}", 100.0 * sd)));
            errs.push(100.0 * sd);
            rows.push(json!({"std": std, "test_mean": mean, "test_std": sd, "seeds": accs.len()}));
        }
        series.push(chart::Series {
            name: task.clone(),
            points: pts,
            errors: errs,
        });
        all.insert(task.clone(), json!(rows));
    }
    let plot = chart::line_plot(
        &format!(
            "Adapter init std vs test accuracy (m=64, lr 1e-3, {epochs} epochs, mean ± std of seeds)"
        ),
        "init std (log scale)",
        "test accuracy (%)",
        &series,
        true,
    );
    std::fs::create_dir_all(&p.out)?;
    chart::write(&plot, &p.out, "init")?;
    merge_json(&p.out.join("init.json"), all)?;
    println!("written: {}/init.json, init.svg, init.png", p.out.display());
    Ok(())
}

fn extend(base: &BaseModel, p: &Plan, epochs: usize) -> Result<()> {
    let store = p.out.join("store");
    let m = method("houlsby-m64")?;
    let mut reference: Vec<(String, Vec<u32>)> = Vec::new();
    let mut log = Vec::new();
    let bits = |rows: &[Vec<f32>]| -> Vec<u32> {
        rows.iter()
            .flat_map(|r| r.iter().map(|x| x.to_bits()))
            .collect()
    };
    for task in &p.tasks {
        let data = load_task_data(task, p.max_train)?;
        let spec = RunSpec {
            data: &data,
            method: m,
            lr: 1e-3,
            seed: 0,
            epochs,
            init_std: None,
            keep_dir: Some(store.join(task)),
        };
        let (r, _) = train_one(base, &spec)?;
        let mine = TaskModel::load(&store.join(task), base)?;
        let out = evaluate(base, &mine, &data.test, 64, &[])?;
        reference.push((task.clone(), bits(&out.outputs)));
        // Every earlier task, reloaded from the store, must predict exactly as before.
        let mut identical = Vec::new();
        for (earlier, want) in &reference {
            let d = load_task_data(earlier, p.max_train)?;
            let t = TaskModel::load(&store.join(earlier), base)?;
            let got = bits(&evaluate(base, &t, &d.test, 64, &[])?.outputs);
            identical.push(json!({"task": earlier, "bit_identical": &got == want}));
            if &got != want {
                bail!("after adding {task}, {earlier}'s test predictions changed");
            }
        }
        println!(
            "added {task} (test {:.4}); {} earlier task(s) bit-identical",
            r.test.primary(),
            reference.len() - 1
        );
        log.push(json!({"added": task, "test": r.test.primary(), "checked": identical}));
    }
    adapterkit::io::write_json(&p.out.join("extend.json"), &log)?;
    println!("written: {}/extend.json", p.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_recovers_a_known_solution_and_refuses_a_singular_system() {
        let a = vec![
            vec![2.0, 1.0, -1.0],
            vec![-3.0, -1.0, 2.0],
            vec![-2.0, 1.0, 2.0],
        ];
        let x = solve(a, vec![8.0, -11.0, -3.0]).unwrap();
        for (got, want) in x.iter().zip([2.0, 3.0, -1.0]) {
            assert!((got - want).abs() < 1e-9, "{x:?}");
        }
        assert!(solve(vec![vec![1.0, 2.0], vec![2.0, 4.0]], vec![1.0, 2.0]).is_none());
    }

    #[test]
    fn pace_fit_recovers_overhead_and_rates_and_predicts_an_unseen_size() {
        // seconds = 12 + 2e-4 × train (full) or 5e-5 × train (head) + 3e-5 × eval.
        let truth = |m: &str, w: Work| {
            12.0 + if m == "full" { 2e-4 } else { 5e-5 } * w.train + 3e-5 * w.eval
        };
        let mut rows = Vec::new();
        for (train, eval) in [(6e4, 1e4), (4e5, 5e4), (3.6e5, 1.6e5), (2e5, 2e4)] {
            let w = Work { train, eval };
            for m in ["full", "head"] {
                rows.push((m, truth(m, w), w));
            }
        }
        let pace = Pace::fit(&rows).unwrap();
        assert!((pace.overhead - 12.0).abs() < 1e-6, "{}", pace.overhead);
        let big = Work {
            train: 1.1e6,
            eval: 1.4e5,
        };
        for m in ["full", "head"] {
            let (got, want) = (pace.seconds(m, big).unwrap(), truth(m, big));
            assert!((got / want - 1.0).abs() < 1e-6, "{m}: {got} vs {want}");
        }
        assert!(pace.seconds("layernorm", big).is_none());
        // One run cannot separate overhead from rate.
        assert!(Pace::fit(&rows[..1]).is_none());
    }

    #[test]
    fn claims_call_a_margin_inside_the_seed_noise_a_tie() {
        let methods = [
            ("full", 0.90, 100.0),
            ("layernorm", 0.880, 0.7),
            ("houlsby-m2", 0.881, 0.8),
            ("houlsby-m8", 0.870, 1.0),
            ("houlsby-m64", 0.885, 3.3),
            ("houlsby-m256", 0.889, 11.1),
            ("top-1", 0.850, 8.5),
            ("top-2", 0.870, 16.3),
        ];
        let cells: BTreeMap<(String, String), Cell> = methods
            .iter()
            .map(|&(m, acc, percent)| {
                let cell = Cell {
                    swept: 3,
                    lr: 1e-3,
                    dev: acc,
                    test_mean: acc,
                    test_std: 0.01,
                    seeds: 3,
                    trainable_params: 1,
                    percent,
                    bytes: 1,
                    minority_f1: acc,
                };
                (("mr".to_string(), m.to_string()), cell)
            })
            .collect();
        let plan = Plan {
            max_train: 0,
            out: PathBuf::new(),
            tasks: vec!["mr".into()],
            methods: METHODS.iter().collect(),
            seeds: 3,
            quick: false,
        };
        let text = claims(&plan, &cells);
        // One task, std 1 point over 3 seeds: the error of a difference is 0.82 points.
        assert!(
            text.contains(
                "adapters above: met (+0.10 ± 0.82 standard error, a tie within seed noise)"
            ),
            "{text}"
        );
        assert!(
            text.contains("(+3.90 ± 0.82 standard error, beyond seed noise)"),
            "{text}"
        );
        assert!(
            text.contains("bottleneck picked per task on dev (mr m256)"),
            "{text}"
        );
    }
}
