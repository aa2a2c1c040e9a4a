//! The one run recipe, shared by `adapterkit train` and the paper's suite: a spec in (what to
//! train, on which data, how), the trained task, its test evaluation and a typed record out.

use crate::adapter::{AdapterConfig, AdapterMethod, LoraConfig, PrefixConfig};
use crate::data::TaskData;
use crate::encoder::BaseModel;
use crate::error::Result;
use crate::head::HeadConfig;
use crate::kernels::Precision;
use crate::task::{TaskModel, TrainableSet};
use crate::train::{
    evaluate, Checkpointing, EpochReport, EvalMetrics, Evaluation, Event, TrainConfig,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything one run needs besides the base and the data.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The task's name (it prefixes its adapter tensors).
    pub name: String,
    /// Which parameters train.
    pub trainable: TrainableSet,
    /// The adapter method (bottleneck adapters, LoRA / (IA)³, prefix tuning), for the adapter
    /// trainable set.
    pub method: Option<AdapterMethod>,
    /// The prediction head.
    pub head: HeadConfig,
    /// Maximum input length in word pieces.
    pub max_len: usize,
    /// Optimiser, schedule, epochs and seed.
    pub train: TrainConfig,
    /// Where the task directory is saved.
    pub out: PathBuf,
    /// The base model's name recorded in the directory's metadata.
    pub base_name: String,
    /// The seed of the data split, recorded only.
    pub split_seed: u64,
    /// Resumable checkpoints during training, if asked for.
    pub checkpoint: Option<CheckpointPlan>,
}

/// Where a run saves resumable checkpoints, how often, and whether it continues from one.
#[derive(Debug, Clone)]
pub struct CheckpointPlan {
    /// The checkpoint directory; removed once the run's directory is saved.
    pub dir: PathBuf,
    /// Steps between checkpoints (0: only after each epoch).
    pub every: usize,
    /// Continue the interrupted run whose checkpoint is in `dir`.
    pub resume: bool,
}

/// What identifies a run for resuming it: its options, the base and the data (hashed). The output
/// directory is not part of it, so a run may be resumed into another one.
pub fn run_identity(base: &BaseModel, data: &TaskData, spec: &RunSpec) -> serde_json::Value {
    let set = |s: &crate::data::LabelledSet| {
        let labels: Vec<String> = s.labels.iter().map(usize::to_string).collect();
        let targets: Vec<[u8; 4]> = s.targets.iter().map(|t| t.to_le_bytes()).collect();
        crate::train::checkpoint::fingerprint(
            s.inputs
                .iter()
                .flat_map(|(a, b)| {
                    [
                        a.as_bytes(),
                        b.as_deref().map_or(&[0xfe][..], str::as_bytes),
                    ]
                })
                .chain(labels.iter().map(|l| l.as_bytes()))
                .chain(targets.iter().map(|t| &t[..])),
        )
    };
    let adapter = match &spec.method {
        Some(AdapterMethod::Bottleneck(a)) => Some(a),
        _ => None,
    };
    let mut fp = serde_json::json!({
        "name": spec.name,
        "trainable": spec.trainable,
        "adapter": adapter,
        "head": spec.head,
        "max_len": spec.max_len,
        "train_config": spec.train,
        "base": crate::task::BaseFingerprint::of(base),
        "data": { "name": data.name, "train": set(&data.train), "dev": set(&data.dev) },
    });
    // Only when present, so checkpoints of runs of other methods keep their fingerprint.
    if let Some(o) = fp.as_object_mut() {
        match &spec.method {
            Some(AdapterMethod::Lora(l)) => {
                o.insert("lora".into(), serde_json::json!(l));
            }
            Some(AdapterMethod::Prefix(p)) => {
                o.insert("prefix".into(), serde_json::json!(p));
            }
            _ => {}
        }
        // A resume must not switch precision halfway (its result would match neither).
        if !base.precision().is_f32() {
            o.insert("precision".into(), serde_json::json!(base.precision()));
        }
    }
    fp
}

/// Example counts of the three sets.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SplitSizes {
    /// Dev examples.
    pub dev: usize,
    /// Test examples.
    pub test: usize,
    /// Training examples.
    pub train: usize,
}

/// What a run did, as `metrics.json` records it (fields in the file's key order).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// The adapter configuration, for the adapter methods.
    pub adapter: Option<AdapterConfig>,
    /// The LoRA / (IA)³ configuration, for runs of those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
    /// The prefix-tuning configuration (as trained, before folding), for runs of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<PrefixConfig>,
    /// The precision of the frozen projections' products during training.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// The saved task directory.
    pub adapter_dir: PathBuf,
    /// Its size on disk.
    pub adapter_dir_bytes: u64,
    /// Parameters of the base model.
    pub base_params: usize,
    /// The epoch whose parameters were kept (best dev).
    pub best_epoch: usize,
    /// Dev metrics of the kept parameters.
    pub dev: EvalMetrics,
    /// Per-epoch results.
    pub epochs: Vec<EpochReport>,
    /// The head configuration.
    pub head: HeadConfig,
    /// Maximum input length.
    pub max_len: usize,
    /// The trainable set's label (`adapters`, `full`, …).
    pub method: String,
    /// The base model's directory.
    pub model: PathBuf,
    /// The task's name.
    pub name: String,
    /// Wall time of training, evaluation included.
    pub seconds: f64,
    /// The training seed.
    pub seed: u64,
    /// Fingerprint of the split, when the data came with one.
    pub split_fingerprint: Option<String>,
    /// The seed of the split.
    pub split_seed: u64,
    /// Example counts.
    pub split_sizes: SplitSizes,
    /// Optimiser steps taken.
    pub steps: usize,
    /// The data set's name.
    pub task: String,
    /// Test metrics of the kept parameters.
    pub test: EvalMetrics,
    /// The training configuration.
    pub train_config: TrainConfig,
    /// Parameters the task trains and stores.
    pub trainable_params: usize,
    /// `trainable_params` as a percentage of `base_params`.
    pub trainable_percent: f64,
}

/// A finished run: its record, the trained task and its test predictions.
pub struct RunOutcome {
    /// What the run did.
    pub record: RunRecord,
    /// The trained task (the best epoch's parameters).
    pub task: TaskModel,
    /// Predictions and metrics on the test set.
    pub test: Evaluation,
}

/// The new task `spec` describes, before training: to report its size before the work starts.
pub fn new_task(base: &BaseModel, spec: &RunSpec) -> Result<TaskModel> {
    TaskModel::with_method(
        base,
        &spec.name,
        spec.trainable.clone(),
        spec.method.clone(),
        spec.head.clone(),
        spec.max_len,
        spec.train.seed,
    )
}

/// Trains `task` (from [`new_task`]) on `data`, evaluates it on the test set, then saves it to
/// `spec.out` with its record as `metrics.json`, both in one directory swap: a failure or a crash
/// leaves the previous directory, weights and record together, as it was. Prefix tuning's MLP is
/// folded into the prefixes it produces before the save (AdapterHub's `eject_prefix_tuning`).
pub fn run(
    base: &BaseModel,
    data: &TaskData,
    spec: &RunSpec,
    mut task: TaskModel,
    on_event: &mut dyn FnMut(&Event),
) -> Result<RunOutcome> {
    // Where the results go is checked before the work: a bad output costs no training.
    TaskModel::check_save_target(&spec.out)?;
    if let Some(c) = &spec.checkpoint {
        crate::io::check_replace_target(&c.dir, &crate::train::checkpoint::is_checkpoint_file)?;
    }
    let ckpt = spec.checkpoint.as_ref().map(|c| Checkpointing {
        dir: c.dir.clone(),
        every: c.every,
        resume: c.resume,
        run: run_identity(base, data, spec),
    });
    let report =
        crate::train::train_with(base, &mut task, data, &spec.train, ckpt.as_ref(), on_event)?;
    let test = evaluate(base, &task, &data.test, spec.train.eval_batch_size, &[])?;
    let trained = task.clone();
    task.fold_prefix()?;
    let record = task.save_with(&spec.out, &spec.base_name, |staging| {
        let bytes = crate::format::dir_size(staging)?;
        let r = make_record(base, data, spec, &trained, &report, &test, bytes);
        write_record(&staging.join(crate::format::files::METRICS), &r)?;
        Ok(r)
    })?;
    // The saved directory now holds the outcome; the checkpoint would only resume a finished run.
    if let Some(c) = &ckpt {
        if let Err(e) = std::fs::remove_dir_all(&c.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %c.dir.display(), error = %e, "could not remove the checkpoint");
            }
        }
    }
    Ok(RunOutcome { record, task, test })
}

/// The record of a finished run whose directory takes `bytes`.
fn make_record(
    base: &BaseModel,
    data: &TaskData,
    spec: &RunSpec,
    task: &TaskModel,
    report: &crate::train::TrainReport,
    test: &Evaluation,
    bytes: u64,
) -> RunRecord {
    let (trainable_params, base_params) = (task.num_params(), base.num_params());
    RunRecord {
        adapter: task.adapter.clone(),
        lora: task.lora.clone(),
        prefix: task.prefix.clone(),
        precision: base.precision(),
        adapter_dir: spec.out.clone(),
        adapter_dir_bytes: bytes,
        base_params,
        best_epoch: report.best_epoch,
        dev: report.best_dev,
        epochs: report.epochs.clone(),
        head: task.head.clone(),
        max_len: spec.max_len,
        method: spec.trainable.label(),
        model: base.dir.clone(),
        name: task.name.clone(),
        seconds: report.seconds,
        seed: spec.train.seed,
        split_fingerprint: data.split.as_ref().map(|s| s.fingerprint()),
        split_seed: spec.split_seed,
        split_sizes: SplitSizes {
            dev: data.dev.len(),
            test: data.test.len(),
            train: data.train.len(),
        },
        steps: report.steps,
        task: data.name.clone(),
        test: test.metrics,
        train_config: spec.train.clone(),
        trainable_params,
        trainable_percent: 100.0 * trainable_params as f64 / base_params as f64,
    }
}

/// Writes `record` as `metrics.json` content: pretty JSON with every object's keys sorted.
pub fn write_record(path: &Path, record: &RunRecord) -> Result<()> {
    let value = serde_json::to_value(record).map_err(|e| crate::error::Error::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    crate::io::write_json(path, &value)
}
