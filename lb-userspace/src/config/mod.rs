//! The TOML config: the validated types (`types`), the file as written (`raw`), its units
//! (durations, MACs), the cluster's key file, and the validation whose errors name the file,
//! line and field (`validate`, one file per section).

use std::path::{Path, PathBuf};

mod key;
mod raw;
#[cfg(test)]
mod tests;
mod types;
mod units;
mod validate;

pub use key::*;
pub use types::*;
pub use units::*;

/// A config error: where it is and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}:{column}: {field}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub field: String,
    pub message: String,
}

/// Reading the file failed, or its content is not a valid config.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Syntax, type, missing or unknown field: toml's own message carries line and column.
    #[error("{file}: {message}")]
    Toml { file: String, message: String },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Reads and validates `path`.
///
/// # Errors
/// When the file cannot be read or is not a valid config; the error names line and field.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read { path: path.to_path_buf(), source })?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates config text; `file` is only used in messages.
///
/// # Errors
/// When the text is not a valid config; the error names line and field.
pub fn parse(text: &str, file: &str) -> Result<Config, LoadError> {
    let raw: raw::RawConfig = toml::from_str(text).map_err(|e| LoadError::Toml { file: file.to_owned(), message: e.to_string() })?;
    Ok(validate::Validator { text, file }.config(raw)?)
}
