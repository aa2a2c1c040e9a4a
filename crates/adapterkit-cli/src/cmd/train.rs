//! `adapterkit train`: build a run spec from the options, run it, write `metrics.json`.

use super::*;

#[derive(Args)]
pub(crate) struct TrainArgs {
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
    /// `adapter_config.json` (or a bare BnConfig object), or a preset as AdapterHub names it,
    /// optionally with keys over it as AdapterHub's strings: `double_seq_bn` / `seq_bn` (Houlsby /
    /// Pfeiffer: reduction factor 16, swish / relu, "bert" init), `par_bn` (parallel beside the
    /// FFN, factor 2, relu, scaling 4), `scaled_par_bn` (learned scaling), `compacter` /
    /// `compacter++` (Houlsby's / Pfeiffer's sites with PHM projections, factor 32, gelu), `lora`
    /// (query and value, r=8, alpha=8) or `ia3` (rescaled keys, values and FFN activations), e.g.
    /// `par_bn[reduction_factor=6]`, `compacter[phm_dim=8]` or
    /// `lora[r=8,alpha=16,intermediate_lora=True]`.
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
    /// Head depth as AdapterHub's `layers`: 1 (linear), 2 (dense + tanh + linear, AdapterHub's
    /// default), up to 8 (more dense + tanh layers of the hidden width).
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
    /// Maximum tokens per input [default: the task's, else 128; at most the model's positions].
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
    /// Also write the run record here (the directory always gets its own metrics.json).
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Save a resumable checkpoint every N steps (and after each epoch) into --checkpoint-dir, so
    /// that `--resume` can continue after a crash or a kill; removed once the run is saved.
    #[arg(long, value_name = "N")]
    checkpoint_every: Option<usize>,
    /// Checkpoint directory [default: <out>.checkpoint].
    #[arg(long, requires = "checkpoint_every")]
    checkpoint_dir: Option<PathBuf>,
    /// Continue the interrupted run whose checkpoint is in DIR: give the same options as the
    /// interrupted command (a differing one is refused by name). The result is bit-identical to an
    /// uninterrupted run. Checkpoints go on into DIR (every 50 steps unless --checkpoint-every).
    #[arg(long, value_name = "DIR", conflicts_with = "checkpoint_dir")]
    resume: Option<PathBuf>,
    /// Use the composed reference ops instead of the fused kernels (slower; for checking).
    #[arg(long)]
    reference_ops: bool,
    /// Number format of the frozen projections' products (forward and input gradient): f32, or
    /// fp16 (fp16 products with f32 sums, on CPUs with AVX512_FP16). Everything trained stays f32.
    #[arg(long, default_value = "f32")]
    precision: adapterkit::Precision,
}

fn default_lr(m: Method) -> f64 {
    match m {
        Method::Adapters | Method::Layernorm | Method::Head => 1e-3,
        Method::TopK => 1e-4,
        Method::Full => 5e-5,
    }
}

pub(crate) fn train(a: TrainArgs) -> Result<()> {
    let home = adapterkit::default_home();
    if a.method == Method::Full && a.precision != adapterkit::Precision::F32 {
        bail!(
            "--precision {}: full fine-tuning trains its own f32 copy of every projection, so \
             none is frozen to run in fp16; use --precision f32",
            a.precision
        );
    }
    if a.reference_ops && a.precision != adapterkit::Precision::F32 {
        bail!(
            "--precision {} runs on the fused kernels, and --reference-ops asks for the composed \
             ones, which are f32 only: drop one of the two",
            a.precision
        );
    }
    let base = load_base(&a.model)?
        .with_backend(backend_of(a.reference_ops))
        .with_precision(a.precision)
        .with_context(|| format!("--precision {}", a.precision))?;
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
    let method = if a.method == Method::Adapters {
        match &a.adapter_config {
            Some(spec) => Some(adapter_config_arg(spec, &base.config)?),
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
                Some(AdapterMethod::Bottleneck(cfg))
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
    let positions = base.config.max_position_embeddings;
    let max_len = match a.max_len {
        Some(n) if n > positions => bail!(
            "--max-len {n} is above the model's {positions} positions (max_position_embeddings); use at most {positions}"
        ),
        Some(n) => n,
        None => a
            .data
            .task
            .as_deref()
            .and_then(|t| data::task_spec(t).ok())
            .map(|s| s.max_len)
            .unwrap_or(128)
            .min(positions),
    };
    let name = a.name.clone().unwrap_or_else(|| {
        data.name.replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '_' && c != '-',
            "_",
        )
    });
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
    let checkpoint = match (&a.resume, a.checkpoint_every) {
        (Some(dir), every) => Some(adapterkit::run::CheckpointPlan {
            dir: dir.clone(),
            every: every.unwrap_or(50),
            resume: true,
        }),
        (None, Some(every)) => Some(adapterkit::run::CheckpointPlan {
            dir: a.checkpoint_dir.clone().unwrap_or_else(|| {
                let mut name = out.file_name().unwrap_or_default().to_os_string();
                name.push(".checkpoint");
                out.with_file_name(name)
            }),
            every,
            resume: false,
        }),
        (None, None) => None,
    };
    let spec = adapterkit::run::RunSpec {
        name,
        trainable: trainable.clone(),
        method,
        head,
        max_len,
        train: cfg,
        out: out.clone(),
        base_name: base
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        split_seed: a.data.split_seed,
        checkpoint,
    };
    let task = adapterkit::run::new_task(&base, &spec)?;
    let mut base = base;
    super::hold_model_once(&mut base, &task)?;
    let base_params = base.num_params();
    let trainable_params = task.num_params();
    let bottleneck = match &spec.method {
        Some(AdapterMethod::Bottleneck(c)) => format!(
            " ({}bottleneck {}, hidden {d})",
            if c.phm.is_some() { "Compacter, " } else { "" },
            c.bottleneck
        ),
        Some(AdapterMethod::Prefix(p)) => format!(
            " (prefix tuning, {} positions per layer{})",
            p.prefix_length,
            if p.flat {
                ""
            } else {
                ", through the MLP; folded after training"
            }
        ),
        Some(AdapterMethod::Lora(l)) => format!(
            " ({} r={} alpha={} on {:?})",
            match l.composition {
                adapterkit::adapter::lora::Composition::Add => "LoRA",
                adapterkit::adapter::lora::Composition::Scale => "(IA)³",
            },
            l.r,
            l.alpha,
            l.targets
        ),
        None => String::new(),
    };
    eprintln!(
        "training {}{bottleneck} on {} ({} train / {} dev / {} test), {} trainable parameters = {:.2}% of the base's {}",
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
    let done = adapterkit::run::run(&base, &data, &spec, task, &mut on_event)
        .with_context(|| format!("training and saving the adapter to {}", out.display()))?;
    bar.finish_and_clear();
    let r = &done.record;
    // The directory's own `metrics.json` was written with it; --metrics asks for a copy elsewhere.
    let metrics_path = match &a.metrics {
        Some(p) => {
            adapterkit::run::write_record(p, r)?;
            p.clone()
        }
        None => out.join(adapterkit::task::files::METRICS),
    };
    println!(
        "{} on {}: dev {:.4} (epoch {}), test {:.4}; {} trainable params ({:.2}% of base); adapter dir {} ({:.2} MB); {:.0} s",
        r.method,
        r.task,
        r.dev.primary(),
        r.best_epoch,
        r.test.primary(),
        r.trainable_params,
        r.trainable_percent,
        out.display(),
        r.adapter_dir_bytes as f64 / 1e6,
        r.seconds
    );
    println!("metrics: {}", metrics_path.display());
    Ok(())
}
