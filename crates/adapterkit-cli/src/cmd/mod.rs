//! The commands' bodies, one file each, and the arguments several of them share.

pub(crate) mod eval;
pub(crate) mod fetch;
pub(crate) mod info;
pub(crate) mod predict;
pub(crate) mod split;
pub(crate) mod train;

use adapterkit::adapter::AdapterMethod;
use adapterkit::data::{self, Columns, Format, TaskData};
use adapterkit::kernels::Activation;
use adapterkit::train::{evaluate, Event};
use adapterkit::{
    AdapterConfig, BaseModel, HeadConfig, HeadKind, Placement, Pooling, TaskModel, TrainConfig,
    TrainableSet,
};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

#[derive(Copy, Clone, ValueEnum, PartialEq, Eq)]
pub(crate) enum Method {
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
pub(crate) enum PlacementArg {
    /// Two adapters per layer: after attention output and after FFN output.
    Houlsby,
    /// One adapter per layer after the FFN, AdapterHub's `seq_bn` arrangement (original residual +
    /// LayerNorm before and after the adapter).
    Pfeiffer,
    /// One adapter per layer, after the attention output only.
    Attention,
}

#[derive(Copy, Clone, ValueEnum)]
pub(crate) enum PoolingArg {
    /// The [CLS] state (AdapterHub's default head input).
    Cls,
    /// [CLS] through the checkpoint's frozen pooler (the paper's setup).
    Pooler,
    /// Mean of the token states.
    Mean,
}

#[derive(Copy, Clone, ValueEnum)]
pub(crate) enum FormatArg {
    Csv,
    Tsv,
    Json,
    Jsonl,
}

#[derive(Args, Clone)]
pub(crate) struct DataArgs {
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

/// The kernels `--reference-ops` selects.
pub(crate) fn backend_of(reference_ops: bool) -> adapterkit::Backend {
    if reference_ops {
        adapterkit::Backend::Reference
    } else {
        adapterkit::Backend::Fused
    }
}

pub(crate) fn load_base(model: &Option<PathBuf>) -> Result<BaseModel> {
    let dir = model.clone().unwrap_or_else(adapterkit::default_model_dir);
    if !dir.join("config.json").exists() && model.is_none() {
        bail!(
            "the default model is not in {}: run `adapterkit fetch` first, or pass --model DIR",
            dir.display()
        );
    }
    BaseModel::load(&dir).with_context(|| format!("loading base model from {}", dir.display()))
}

/// [`load_base`] in `precision` ([`BaseModel::with_precision`]).
pub(crate) fn load_base_in(
    model: &Option<PathBuf>,
    precision: adapterkit::Precision,
) -> Result<BaseModel> {
    load_base(model)?
        .with_precision(precision)
        .with_context(|| format!("--precision {precision}"))
}

pub(crate) fn load_task(base: &BaseModel, dir: &Path) -> Result<TaskModel> {
    TaskModel::load(dir, base).with_context(|| format!("loading adapter {}", dir.display()))
}

/// For a command that runs one task on `base`: releases the base's copy of the weights the task
/// has its own copy of (full fine-tuning, top-k), so the process holds the model once.
pub(crate) fn hold_model_once(base: &mut BaseModel, task: &TaskModel) -> Result<()> {
    if matches!(
        task.trainable,
        adapterkit::TrainableSet::Full | adapterkit::TrainableSet::TopK { .. }
    ) {
        base.release_owned_by(task)
            .context("releasing the base's copy of the task's weights")?;
    }
    Ok(())
}

/// `--adapter-config`: an AdapterHub preset or configuration string, or a JSON file in
/// AdapterHub's format.
pub(crate) fn adapter_config_arg(
    spec: &str,
    base: &adapterkit::BertConfig,
) -> Result<AdapterMethod> {
    let (ctx, value) = match adapterkit::format::preset::from_string(spec)? {
        Some(v) => (format!("--adapter-config {spec}"), v),
        None => {
            let path = Path::new(spec);
            let v = adapterkit::io::read_json::<serde_json::Value>(path).with_context(|| {
                format!(
                    "--adapter-config `{spec}`: not a preset ({}) and not a readable JSON file",
                    adapterkit::format::preset::PRESETS.join(", ")
                )
            })?;
            (path.display().to_string(), v)
        }
    };
    Ok(adapterkit::format::hub::method_from_hub(
        &ctx, &value, base,
    )?)
}
