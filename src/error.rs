//! The one error type of swk. Every variant names the file, tensor or flag at fault.

use std::path::PathBuf;

/// Everything that can go wrong in swk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O failure on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A model file whose bytes do not follow its format (truncated, corrupt, lying header).
    #[error("{path}: {msg}")]
    Format {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A configuration (config.json, GGUF metadata) that is missing a field or holds a bad value.
    #[error("{path}: config: {msg}")]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// An architecture swk has no forward pass for.
    #[error("{path}: unknown architecture `{arch}`; supported: {supported}")]
    UnknownArchitecture {
        /// The model file naming the architecture.
        path: PathBuf,
        /// The architecture it names.
        arch: String,
        /// Comma-separated list of supported architectures.
        supported: String,
    },
    /// A tensor that is missing or has the wrong shape or dtype.
    #[error("tensor `{name}`: {msg}")]
    Tensor {
        /// The tensor's Hugging Face name.
        name: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A tokenizer that could not be built or that failed to encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A weight edit that cannot be applied (bad spec, index out of range).
    #[error("edit `{spec}`: {msg}")]
    Edit {
        /// The edit as the user wrote it (or its description).
        spec: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A bad argument or input given by the user.
    #[error("{0}")]
    Invalid(String),
    /// A failure of the compute backend (device, kernel, out of memory).
    #[error("backend: {0}")]
    Backend(String),
    /// A model that cannot be found locally or downloaded.
    #[error("model `{id}`: {msg}")]
    NotFound {
        /// The model id or path asked for.
        id: String,
        /// Why it cannot be had.
        msg: String,
    },
    /// A data set file that cannot be found locally or downloaded.
    #[error("data set `{repo}`, file `{file}`: {msg}")]
    Dataset {
        /// The hub repository (`org/name`).
        repo: String,
        /// The file's path in the repository.
        file: String,
        /// Why it cannot be had, and how to get it.
        msg: String,
    },
    /// JSON that could not be read or written.
    #[error("{path}: json: {source}")]
    Json {
        /// The file holding the JSON.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
}

/// Result with swk's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A [`Error::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }
    /// A [`Error::Config`] for `path`.
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config { path: path.into(), msg: msg.into() }
    }
    /// A [`Error::Tensor`] for tensor `name`.
    pub fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor { name: name.into(), msg: msg.into() }
    }
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

/// Return early with an [`Error::Invalid`] built from a format string.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::Error::Invalid(format!($($arg)*))) };
}
