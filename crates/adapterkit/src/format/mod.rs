//! The adapter directory, ours and AdapterHub's, in one module.
//!
//! A directory holds AdapterHub's four files (`adapter_config.json` + `adapter.safetensors`, absent
//! for a head-only task, and `head_config.json` + `model_head.safetensors`), which the Python
//! library loads as they are, plus two of ours: `adapterkit_params.safetensors` (trained copies of
//! base parameters, e.g. LayerNorms) and `adapterkit.json`, written last, with what AdapterHub's
//! files cannot say (the trainable set, the base it fits, the init scheme, the input length). Each
//! configuration is stored once: the adapter's and the head's only in AdapterHub's files.
//! Reading checks that the files agree with each other and refuses a mix.

mod dir;
pub mod hub;
pub mod hub_lora;
pub mod hub_prefix;
mod meta;
pub mod preset;

pub use meta::{AdapterInit, TaskMeta, FORMAT_VERSION};

/// File names inside an adapter directory.
pub mod files {
    /// AdapterHub adapter config.
    pub const ADAPTER_CONFIG: &str = "adapter_config.json";
    /// AdapterHub adapter weights.
    pub const ADAPTER_WEIGHTS: &str = "adapter.safetensors";
    /// AdapterHub adapter weights, PyTorch pickle (read only).
    pub const ADAPTER_WEIGHTS_BIN: &str = "pytorch_adapter.bin";
    /// AdapterHub head config.
    pub const HEAD_CONFIG: &str = "head_config.json";
    /// AdapterHub head weights.
    pub const HEAD_WEIGHTS: &str = "model_head.safetensors";
    /// AdapterHub head weights, PyTorch pickle (read only).
    pub const HEAD_WEIGHTS_BIN: &str = "pytorch_model_head.bin";
    /// Our metadata.
    pub const META: &str = "adapterkit.json";
    /// Our copies of trained base parameters (LayerNorms, top-k layers, …).
    pub const BASE_PARAMS: &str = "adapterkit_params.safetensors";
    /// The run record `adapterkit train` writes with the directory.
    pub const METRICS: &str = "metrics.json";

    /// Whether a file found in an adapter directory is one a save may replace: ours, AdapterHub's,
    /// the run record, or a temporary file of an interrupted write.
    pub fn replaceable(name: &str) -> bool {
        [
            ADAPTER_CONFIG,
            ADAPTER_WEIGHTS,
            ADAPTER_WEIGHTS_BIN,
            HEAD_CONFIG,
            HEAD_WEIGHTS,
            HEAD_WEIGHTS_BIN,
            META,
            BASE_PARAMS,
            METRICS,
        ]
        .contains(&name)
            || (name.starts_with(".adapterkit-") && name.ends_with(".tmp"))
    }
}

/// Bytes the files of a directory take on disk.
pub fn dir_size(dir: &std::path::Path) -> crate::error::Result<u64> {
    use crate::error::Error;
    let mut total = 0;
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        total += e.metadata().map_err(|err| Error::io(e.path(), err))?.len();
    }
    Ok(total)
}
