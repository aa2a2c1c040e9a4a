//! The adapters a server holds: loaded once from directories under one root, looked up by name,
//! replaced as a whole table so that a request keeps the adapter it started with.

use adapterkit::format::dir_size;
use adapterkit::{BaseModel, HeadKind, TaskModel};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Longest name an adapter may be served under.
pub(crate) const MAX_NAME_LEN: usize = 64;

/// One loaded adapter and what `GET /adapters` says about it.
pub(crate) struct Served {
    /// The task, its parameters detached from any graph.
    pub task: TaskModel,
    /// What clients see.
    pub info: AdapterInfo,
    /// Whether its rows may share a batch with other adapters' (it trains no copy of the
    /// encoder's embedding, attention or FFN weights).
    pub shares_encoder: bool,
}

/// The public description of a served adapter.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AdapterInfo {
    /// The name requests use.
    pub name: String,
    /// The task name stored in the directory.
    pub task: String,
    /// `classification` or `regression`.
    pub kind: &'static str,
    /// Class labels in head order (empty for regression).
    pub labels: Vec<String>,
    /// Whether inputs are sentence pairs.
    pub pair: bool,
    /// What the task trained (`adapters`, `head`, `top-2`, ...).
    pub trainable: String,
    /// Parameters the task adds to the base.
    pub parameters: usize,
    /// Bytes of its directory on disk.
    pub bytes: u64,
    /// Tokens per input (longer inputs are truncated or refused).
    pub max_len: usize,
    /// The directory it was loaded from.
    pub source: PathBuf,
}

/// Refuses a name that is not 1 to 64 ASCII letters, digits, `_` or `-`.
pub(crate) fn validate_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "`{}` is not a valid adapter name: use 1 to {MAX_NAME_LEN} ASCII letters, digits, `_` or `-`",
            name.escape_debug()
        ));
    }
    Ok(())
}

/// Loads the adapter directory `dir` (ours or AdapterHub's) to be served as `name`.
pub(crate) fn load(base: &BaseModel, name: &str, dir: &Path) -> Result<Served> {
    let mut task = TaskModel::load(dir, base)
        .with_context(|| format!("loading adapter {}", dir.display()))?
        .detached();
    // LoRA as factors, not merged weights: its rows then share batches with other adapters'
    // (their updates run per row group), and the server holds no copy of the projections.
    task.keep_lora_as_updates(base)?;
    let shares_encoder = task.shares_encoder();
    // Layers a task trained run its own f32 weights: say so, since the server was asked for fp16.
    if base.precision() != adapterkit::Precision::F32
        && matches!(
            task.trainable,
            adapterkit::task::TrainableSet::Full | adapterkit::task::TrainableSet::TopK { .. }
        )
    {
        tracing::warn!(
            "{}: the layers it trained ({}) run their own weights in f32, not {}",
            dir.display(),
            task.trainable.label(),
            base.precision()
        );
    }
    // A task trained with a length above the model's positions could only fail on a long input;
    // serve it at the length the model can take.
    let positions = base.config.max_position_embeddings;
    if task.max_len > positions {
        tracing::warn!(
            "{}: trained with max_len {} but the model has {positions} positions; serving at {positions}",
            dir.display(),
            task.max_len
        );
        task.max_len = positions;
    }
    let info = AdapterInfo {
        name: name.to_string(),
        task: task.name.clone(),
        kind: match task.head.kind {
            HeadKind::Classification => "classification",
            HeadKind::Regression => "regression",
        },
        labels: match task.head.kind {
            HeadKind::Classification => task.head.labels.clone(),
            HeadKind::Regression => Vec::new(),
        },
        pair: task.head.pair,
        trainable: task.trainable.label(),
        parameters: task.num_params(),
        bytes: dir_size(dir)?,
        max_len: task.max_len,
        source: dir.to_path_buf(),
    };
    Ok(Served {
        task,
        info,
        shares_encoder,
    })
}

/// Whether `dir` looks like an adapter directory (ours or AdapterHub's).
fn is_adapter_dir(dir: &Path) -> bool {
    use adapterkit::format::files;
    [files::META, files::ADAPTER_CONFIG, files::HEAD_CONFIG]
        .iter()
        .any(|f| dir.join(f).is_file())
}

/// The adapter directories directly under `root`, each named after its directory, in name order.
/// Hidden entries are skipped; a directory that holds no adapter files is skipped with a warning.
pub(crate) fn discover(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let e = e.with_context(|| format!("reading {}", root.display()))?;
        let path = e.path();
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            bail!("{}: the directory name is not UTF-8", path.display());
        };
        if name.starts_with('.') || !path.is_dir() {
            continue;
        }
        if !is_adapter_dir(&path) {
            tracing::warn!("{}: no adapter files, skipped", path.display());
            continue;
        }
        validate_name(&name).map_err(|m| anyhow::anyhow!("{}: {m}", path.display()))?;
        found.push((name, path));
    }
    found.sort();
    Ok(found)
}

/// The adapters being served, swapped as a whole on every change.
pub(crate) struct Registry {
    /// The directory every adapter must come from, canonical.
    pub root: PathBuf,
    table: RwLock<Arc<BTreeMap<String, Arc<Served>>>>,
}

impl Registry {
    /// An empty registry over `root` (which must exist).
    pub fn new(root: &Path) -> Result<Self> {
        let root = root
            .canonicalize()
            .with_context(|| format!("--adapters {}", root.display()))?;
        if !root.is_dir() {
            bail!("--adapters {}: not a directory", root.display());
        }
        Ok(Registry {
            root,
            table: RwLock::new(Arc::new(BTreeMap::new())),
        })
    }

    /// The table as it is now; later changes do not alter it.
    pub fn snapshot(&self) -> Arc<BTreeMap<String, Arc<Served>>> {
        match self.table.read() {
            Ok(t) => Arc::clone(&t),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The adapter served as `name`, if any.
    pub fn get(&self, name: &str) -> Option<Arc<Served>> {
        self.snapshot().get(name).cloned()
    }

    /// Serves `served` under its name; returns whether it replaced one.
    pub fn insert(&self, served: Served) -> bool {
        self.update(|t| {
            t.insert(served.info.name.clone(), Arc::new(served))
                .is_some()
        })
    }

    /// Stops serving `name`; returns whether it was served.
    pub fn remove(&self, name: &str) -> bool {
        self.update(|t| t.remove(name).is_some())
    }

    fn update<R>(&self, f: impl FnOnce(&mut BTreeMap<String, Arc<Served>>) -> R) -> R {
        let mut guard = match self.table.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut next = (**guard).clone();
        let r = f(&mut next);
        *guard = Arc::new(next);
        r
    }

    /// The directory `path` names (relative to the root, or absolute), refused unless it lies
    /// inside the root once symlinks are resolved.
    pub fn resolve(&self, path: &str) -> std::result::Result<PathBuf, String> {
        let p = Path::new(path);
        if path.is_empty() {
            return Err("`path` is empty: give a directory under the adapter root".into());
        }
        if p.components().any(|c| c == Component::ParentDir) {
            return Err(format!(
                "`path` {path:?} contains `..`; give a directory under the adapter root"
            ));
        }
        let joined = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.root.join(p)
        };
        let real = joined
            .canonicalize()
            .map_err(|e| format!("`path` {path:?}: {e}"))?;
        if !real.starts_with(&self.root) || real == self.root {
            return Err(format!(
                "`path` {path:?} resolves to {}, outside the adapter root {}",
                real.display(),
                self.root.display()
            ));
        }
        if !real.is_dir() {
            return Err(format!("`path` {path:?} is not a directory"));
        }
        Ok(real)
    }
}
