//! `adapterkit.json`: what AdapterHub's files cannot say about a task.

use crate::adapter::{AdapterConfig, Init};
use crate::head::HeadConfig;
use crate::task::{BaseFingerprint, TrainableSet};
use serde::{Deserialize, Serialize};

/// The format we write. Format 1 also stored the adapter and head configurations (a second copy
/// of AdapterHub's files); it is still read, and its two copies must agree.
pub const FORMAT_VERSION: u32 = 2;

/// How new adapter projections were drawn: AdapterHub's `init_weights` names our truncated
/// normal `houlsby` and has no std.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterInit {
    /// The scheme.
    pub scheme: Init,
    /// Std of the truncated normal.
    pub std: f64,
}

/// Our metadata file in an adapter directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskMeta {
    /// File format version.
    pub format: u32,
    /// Task (and adapter) name.
    pub name: String,
    /// What was trained.
    pub trainable: TrainableSet,
    /// The base this task fits.
    pub base: BaseFingerprint,
    /// Maximum input length used in training (the default for prediction).
    pub max_len: usize,
    /// The adapter's init (format 2, tasks with adapters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_init: Option<AdapterInit>,
    /// Whether inputs are text pairs (format 2; AdapterHub's head config has no such key).
    #[serde(default)]
    pub pair: bool,
    /// Format 1 only: the adapter configuration.
    #[serde(default, skip_serializing)]
    pub adapter: Option<AdapterConfig>,
    /// Format 1 only: the head configuration.
    #[serde(default, skip_serializing)]
    pub head: Option<HeadConfig>,
}
