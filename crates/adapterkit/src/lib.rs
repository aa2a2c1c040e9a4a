#![warn(missing_docs)]
//! adapterkit: parameter-efficient transfer learning with bottleneck adapters (Houlsby et al. 2019)
//! for BERT-family encoders, on candle.
//!
//! A frozen [`BaseModel`] is shared by any number of [`TaskModel`]s; each task owns only what it
//! trains (adapters, head, and copies of the base parameters it tunes) and is saved as a small
//! AdapterHub-compatible directory.
//!
//! Performance note for programs using the library: candle's element-wise worker pool spins for a
//! long time after each job, which on few cores takes time from the rayon pool our kernels use.
//! The `adapterkit` binary sets `CANDLE_BARRIER_POOL_SPIN_LIMIT=1000` before any thread starts;
//! do the same in your `main` (the adapter step at 32×32 tokens ran 18% faster, measured).

pub mod adapter;
pub mod config;
pub mod data;
pub mod encoder;
pub mod error;
pub mod flops;
pub mod format;
pub mod head;
pub mod io;
pub mod kernels;
pub mod keys;
pub mod metrics;
pub mod rng;
pub mod run;
pub mod task;
pub mod tokenizer;
pub mod train;

pub use adapter::{AdapterConfig, Placement};
pub use config::BertConfig;
pub use encoder::{BaseModel, Batch, ForwardOptions};
pub use error::{Error, Result};
pub use head::{HeadConfig, HeadKind, Pooling};
pub use kernels::{Backend, Precision};
pub use task::{TaskModel, TrainableSet};
pub use train::{train, TrainConfig};

/// The asset cache: `$ADAPTERKIT_HOME`, else `~/.cache/adapterkit`.
pub fn default_home() -> std::path::PathBuf {
    if let Some(h) = std::env::var_os("ADAPTERKIT_HOME") {
        return h.into();
    }
    let home = std::env::var_os("HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| ".".into());
    home.join(".cache").join("adapterkit")
}

/// The default base model directory inside the asset cache (all-MiniLM-L6-v2).
pub fn default_model_dir() -> std::path::PathBuf {
    default_home().join("models").join("all-MiniLM-L6-v2")
}

/// The asset fetch script, embedded so the binary can run it anywhere (`adapterkit fetch`).
pub const FETCH_SCRIPT: &str = include_str!("../../../tools/fetch_assets.py");
