//! Namespaces: everything that makes KV bytes differ for the same tokens.
//!
//! A [`Namespace`] is encoded canonically (a version tag, then tagged, length-prefixed fields in
//! a fixed order) and hashed to a 16-byte [`NamespaceId`] that every block key folds in. Two
//! tenants, models, dtypes, layouts, TP ranks or LoRA adapters therefore never share a key.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_128;

/// How tensor parallelism splits the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TpPlacement {
    /// Each rank holds different KV heads: keys differ per rank.
    Rank { world_size: u32, rank: u32 },
    /// KV identical on every rank (MLA models): stored once, shared by all ranks.
    RankAgnostic,
}

/// Identity of a KV cache space. Every field that changes KV bytes belongs here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    /// Model identity: a name plus revision or weights hash.
    pub model: String,
    /// KV cache dtype as the engine names it (`bfloat16`, `fp8_e4m3`, ...).
    pub kv_dtype: String,
    /// Tokens per block.
    pub block_size: u32,
    /// Layout of the KV bytes (`layers`, `kv_heads`, `head_dim`, a layout name); free-form but
    /// canonical: the engine integration decides the string and must keep it stable.
    pub layout: String,
    /// Tensor-parallel placement.
    pub tp: TpPlacement,
    /// LoRA adapter whose KV this is, if any.
    pub lora: Option<String>,
    /// Cache salt: isolates tenants that must never share blocks.
    pub salt: Option<String>,
}

/// The 16-byte digest of a namespace's canonical encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NamespaceId([u8; 16]);

impl NamespaceId {
    /// Wraps an id received from elsewhere (e.g. Python).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The 16 bytes folded into block keys.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

const ENCODING_TAG: &[u8] = b"kvcache/namespace/v1";

impl Namespace {
    /// A namespace with single-rank TP, no LoRA, no salt and an empty layout string.
    pub fn new(model: impl Into<String>, kv_dtype: impl Into<String>, block_size: u32) -> Self {
        Self {
            model: model.into(),
            kv_dtype: kv_dtype.into(),
            block_size,
            layout: String::new(),
            tp: TpPlacement::Rank {
                world_size: 1,
                rank: 0,
            },
            lora: None,
            salt: None,
        }
    }

    /// Canonical byte encoding: `tag`, then `field-id:u8 len:LE-u32 bytes` per field, in order.
    /// Absent optional fields are written with a distinct field id, so `None` never equals `""`.
    pub fn encode(&self) -> Vec<u8> {
        fn field(out: &mut Vec<u8>, id: u8, bytes: &[u8]) {
            out.push(id);
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(ENCODING_TAG);
        field(&mut out, 1, self.model.as_bytes());
        field(&mut out, 2, self.kv_dtype.as_bytes());
        field(&mut out, 3, &self.block_size.to_le_bytes());
        field(&mut out, 4, self.layout.as_bytes());
        match self.tp {
            TpPlacement::Rank { world_size, rank } => {
                let mut tp = world_size.to_le_bytes().to_vec();
                tp.extend_from_slice(&rank.to_le_bytes());
                field(&mut out, 5, &tp);
            }
            TpPlacement::RankAgnostic => field(&mut out, 6, &[]),
        }
        match &self.lora {
            Some(lora) => field(&mut out, 7, lora.as_bytes()),
            None => field(&mut out, 8, &[]),
        }
        match &self.salt {
            Some(salt) => field(&mut out, 9, salt.as_bytes()),
            None => field(&mut out, 10, &[]),
        }
        out
    }

    /// The digest folded into every block key of this namespace.
    pub fn id(&self) -> NamespaceId {
        NamespaceId(xxh3_128(&self.encode()).to_be_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_changes_the_id() {
        let base = Namespace::new("m", "bfloat16", 16);
        let variants = [
            Namespace {
                model: "m2".into(),
                ..base.clone()
            },
            Namespace {
                kv_dtype: "float16".into(),
                ..base.clone()
            },
            Namespace {
                block_size: 32,
                ..base.clone()
            },
            Namespace {
                layout: "L2xH4xD64".into(),
                ..base.clone()
            },
            Namespace {
                tp: TpPlacement::Rank {
                    world_size: 2,
                    rank: 0,
                },
                ..base.clone()
            },
            Namespace {
                tp: TpPlacement::RankAgnostic,
                ..base.clone()
            },
            Namespace {
                lora: Some("adapter".into()),
                ..base.clone()
            },
            Namespace {
                lora: Some(String::new()),
                ..base.clone()
            },
            Namespace {
                salt: Some("tenant-a".into()),
                ..base.clone()
            },
        ];
        let mut ids = vec![base.id()];
        for v in &variants {
            let id = v.id();
            assert!(!ids.contains(&id), "{v:?} collides");
            ids.push(id);
        }
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        let a = Namespace {
            model: "ab".into(),
            kv_dtype: "c".into(),
            ..Namespace::new("", "", 16)
        };
        let b = Namespace {
            model: "a".into(),
            kv_dtype: "bc".into(),
            ..Namespace::new("", "", 16)
        };
        assert_ne!(a.id(), b.id());
    }
}
