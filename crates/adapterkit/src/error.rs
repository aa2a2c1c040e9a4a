//! The library's error type.

use std::path::PathBuf;

/// Everything that can go wrong in adapterkit, each variant naming the file, field or line at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch inside the model, device error).
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file did not parse or lacked a required field.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file involved.
        path: PathBuf,
        /// The underlying error, which names the line, column and field.
        #[source]
        source: serde_json::Error,
    },

    /// A weight tensor required by the model is absent from the checkpoint.
    #[error("{path}: missing tensor `{name}` (looked for `{name}` and `bert.{name}`)")]
    MissingTensor {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor name without `bert.` prefix.
        name: String,
    },

    /// A weight tensor has another shape than the configuration implies.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        /// The file the tensor came from.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// Shape implied by the configuration.
        expected: Vec<usize>,
        /// Shape found in the file.
        found: Vec<usize>,
    },

    /// A stored tensor cannot be used as it is: not floating point, or holding NaN or infinity.
    #[error("{path}: tensor `{name}` {message}")]
    BadTensor {
        /// The file the tensor came from.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// What is wrong with it.
        message: String,
    },

    /// A configuration value is out of range or inconsistent.
    #[error("{context}: invalid value for `{field}`: {message}")]
    Config {
        /// The file or option group that holds the field.
        context: String,
        /// The field's name.
        field: String,
        /// What was expected.
        message: String,
    },

    /// The tokenizer could not be loaded or failed to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A data file has a bad record.
    #[error("{path}:{line}: {message}")]
    Data {
        /// The data file.
        path: PathBuf,
        /// 1-based line (or record) number; 0 when it concerns the whole file.
        line: usize,
        /// What is wrong and what was expected.
        message: String,
    },

    /// An adapter directory does not fit the base model it is loaded onto.
    #[error("{path}: adapter does not fit this base model: {message}")]
    Incompatible {
        /// The adapter directory.
        path: PathBuf,
        /// What differs.
        message: String,
    },

    /// A training or evaluation label names no class of the head.
    #[error("{set} example {example}: label {label} is outside the head's {classes} classes (expected 0..{classes})")]
    Label {
        /// Which set (or `batch` when only the batch row is known).
        set: String,
        /// 0-based index of the example in that set (or row in the batch).
        example: usize,
        /// The label found.
        label: usize,
        /// Classes of the head.
        classes: usize,
    },

    /// A training checkpoint cannot be resumed: unreadable, or written by a different run.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong, and what to do.
        message: String,
    },

    /// Training produced NaN or infinity; the message names the step and the likely cause.
    #[error("training stopped at step {step}: {message}")]
    Diverged {
        /// The 0-based step whose loss or gradient was not finite.
        step: usize,
        /// What was checked and what to change.
        message: String,
    },

    /// A requested item (task, adapter, split) does not exist.
    #[error("{0}")]
    NotFound(String),
}

/// Result with adapterkit's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Builds a configuration error.
    pub fn config(
        context: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Config {
            context: context.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}
