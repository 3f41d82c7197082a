//! Where an adapter's files come from. A source turns a declared `path` into the path the
//! engines load from, or says why it cannot; one is implemented, a local directory (the
//! engines see the same filesystem: one host, or a volume mounted in every pod). Others
//! (hub, object stores) are sources of their own behind the same trait.

use std::path::{Path, PathBuf};

/// Why a declared path cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SourceError {
    #[error(
        "unsupported adapter source {0:?}: use a local directory (an absolute path or file:///...)"
    )]
    Unsupported(String),
    #[error(
        "adapter path {0:?} must be absolute (the engines resolve it, not this process's directory)"
    )]
    Relative(String),
    #[error("adapter directory {0} does not exist or is not a directory")]
    Missing(PathBuf),
    #[error("adapter directory {0} has no adapter_config.json (a PEFT LoRA adapter has one)")]
    NoConfig(PathBuf),
}

/// A kind of adapter source.
pub trait AdapterSource: Send + Sync {
    /// The path to send the engines for `declared`.
    fn resolve(&self, declared: &str) -> Result<String, SourceError>;
}

/// Adapters in local directories (`/dir` or `file:///dir`).
#[derive(Clone, Copy, Debug)]
pub struct LocalDir {
    /// Check the directory here too (off when the engines' filesystem is not this one's).
    pub check: bool,
}

impl AdapterSource for LocalDir {
    fn resolve(&self, declared: &str) -> Result<String, SourceError> {
        let raw = declared.strip_prefix("file://").unwrap_or(declared);
        if raw.contains("://") {
            return Err(SourceError::Unsupported(declared.to_string()));
        }
        let path = Path::new(raw);
        if !path.is_absolute() {
            return Err(SourceError::Relative(declared.to_string()));
        }
        if !self.check {
            return Ok(raw.to_string());
        }
        if !path.is_dir() {
            return Err(SourceError::Missing(path.to_path_buf()));
        }
        if !path.join("adapter_config.json").is_file() {
            return Err(SourceError::NoConfig(path.to_path_buf()));
        }
        Ok(raw.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_directory_needs_an_adapter_config_and_other_sources_are_named_unsupported() {
        let dir = std::env::temp_dir().join(format!("kvcache-lora-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let local = LocalDir { check: true };
        let path = dir.to_str().unwrap();
        assert_eq!(local.resolve(path), Err(SourceError::NoConfig(dir.clone())));
        std::fs::write(dir.join("adapter_config.json"), "{}").unwrap();
        assert_eq!(local.resolve(path).unwrap(), path);
        assert_eq!(local.resolve(&format!("file://{path}")).unwrap(), path);
        assert!(matches!(
            local.resolve("hf://org/adapter"),
            Err(SourceError::Unsupported(_))
        ));
        assert!(matches!(
            local.resolve("adapters/a"),
            Err(SourceError::Relative(_))
        ));
        assert!(matches!(
            local.resolve("/no/such/dir"),
            Err(SourceError::Missing(_))
        ));
        assert_eq!(
            LocalDir { check: false }.resolve("/no/such/dir").unwrap(),
            "/no/such/dir"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
