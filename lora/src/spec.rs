//! What an operator declares about an adapter: its name, the base model it applies to, where
//! its files are, and how many instances should hold it. The same shape in the TOML file and
//! in `POST /v1/adapters`.

use serde::{Deserialize, Serialize};

/// How many instances of the base model should hold the adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replicas {
    /// This many (at most the instances that serve the base model and have room).
    Count(u32),
    /// Every instance of the base model that has room.
    All,
}

impl Default for Replicas {
    fn default() -> Self {
        Self::Count(1)
    }
}

impl Serialize for Replicas {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Count(n) => s.serialize_u32(*n),
            Self::All => s.serialize_str("all"),
        }
    }
}

impl<'de> Deserialize<'de> for Replicas {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u32),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(0) => Err(serde::de::Error::custom(
                "replicas must be at least 1 (delete the adapter to unload it)",
            )),
            Raw::Count(n) => Ok(Self::Count(n)),
            Raw::Word(w) if w == "all" => Ok(Self::All),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "replicas must be a count or \"all\", not {w:?}"
            ))),
        }
    }
}

/// One adapter as declared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSpec {
    /// The name requests use as their `model`, and the engines list in /v1/models.
    pub name: String,
    /// The engines' served model name the adapter applies to.
    pub base_model: String,
    /// Where its files are (a local directory with `adapter_config.json` and the weights).
    pub path: String,
    #[serde(default)]
    pub replicas: Replicas,
}

/// Why a declared adapter cannot be taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "adapter name {0:?} is not valid: use 1 to 128 letters, digits, '.', '_', '-' or '/', starting with a letter or digit"
    )]
    Name(String),
    #[error("adapter {0:?}: base_model is empty")]
    BaseModel(String),
    #[error("adapter {0:?}: path is empty")]
    Path(String),
}

impl AdapterSpec {
    /// Checks what can be checked without the files: the name (it appears in URLs and in the
    /// engines' model lists), a base model and a path.
    pub fn check(&self) -> Result<(), SpecError> {
        let n = &self.name;
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/');
        if n.is_empty()
            || n.len() > 128
            || !n.starts_with(|c: char| c.is_ascii_alphanumeric())
            || !n.chars().all(ok_char)
        {
            return Err(SpecError::Name(n.clone()));
        }
        if self.base_model.trim().is_empty() {
            return Err(SpecError::BaseModel(n.clone()));
        }
        if self.path.trim().is_empty() {
            return Err(SpecError::Path(n.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> AdapterSpec {
        AdapterSpec {
            name: name.into(),
            base_model: "tiny".into(),
            path: "/a".into(),
            replicas: Replicas::default(),
        }
    }

    #[test]
    fn replicas_read_a_count_or_all_and_refuse_zero() {
        let r: Replicas = serde_json::from_str("2").unwrap();
        assert_eq!(r, Replicas::Count(2));
        let r: Replicas = serde_json::from_str("\"all\"").unwrap();
        assert_eq!(r, Replicas::All);
        assert!(serde_json::from_str::<Replicas>("0").is_err());
        let e = serde_json::from_str::<Replicas>("\"most\"").unwrap_err();
        assert!(e.to_string().contains("\"most\""), "{e}");
        assert_eq!(serde_json::to_string(&Replicas::All).unwrap(), "\"all\"");
    }

    #[test]
    fn names_that_would_break_urls_or_model_lists_are_refused() {
        assert!(spec("sql-lora").check().is_ok());
        assert!(spec("org/sql_lora.v2").check().is_ok());
        for bad in ["", "-x", "a b", "a?b", &"x".repeat(129)] {
            assert_eq!(spec(bad).check(), Err(SpecError::Name(bad.to_string())));
        }
        let mut s = spec("a");
        s.base_model = " ".into();
        assert!(matches!(s.check(), Err(SpecError::BaseModel(_))));
    }
}
