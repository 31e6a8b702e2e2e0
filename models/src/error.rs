//! Typed errors of the `models` crate: each variant names the file, field or value at fault.

use std::path::PathBuf;

/// Errors from configs, parameter tables and checkpoint formats.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model configuration is inconsistent.
    #[error("invalid model config: {0}")]
    Config(String),

    /// An unknown preset name.
    #[error("unknown model '{name}'; known models: {known}")]
    UnknownModel { name: String, known: String },

    /// Reading or writing a file failed. The I/O error is part of the message, not a source
    /// of its own, so that a chain printed in full (`{:#}`) names it once.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    /// A file is not in the format expected, or is damaged.
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },

    /// A required tensor or field is absent.
    #[error("{}: missing {what}", path.display())]
    Missing { path: PathBuf, what: String },

    /// An explanation's settings or inputs do not fit (the message says which and why).
    #[error("{0}")]
    Explain(String),
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for a [`Error::Format`] error.
    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for an [`Error::Io`] error.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }
}
