//! Golden key-chain vectors: the keys of fixed inputs are checked in (tests/golden/) so that any
//! change to the key derivation, in Rust or in another language, is caught. Regenerate only when
//! deliberately bumping `KEY_SCHEME_VERSION`: `KVCACHE_REGENERATE_GOLDEN=1 cargo test -p kvcache-core`.

use kvcache_core::{BlockKey, KEY_SCHEME_VERSION, Namespace, TpPlacement, chain_keys};
use serde::{Deserialize, Serialize};

/// The checked-in vectors, compiled in: the test reads the tree it was built from, even when a
/// shared target directory holds a binary built in another checkout.
const GOLDEN: &str = include_str!("golden/key_chain_v1.json");
const GOLDEN_PATH: &str = "tests/golden/key_chain_v1.json";

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Golden {
    key_scheme_version: u32,
    cases: Vec<Case>,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Case {
    name: String,
    namespace: Namespace,
    /// Hex of `Namespace::encode()`.
    namespace_encoding: String,
    /// Hex of `Namespace::id()`: what `chain_keys` takes.
    namespace_id: String,
    block_size: usize,
    tokens: Vec<u32>,
    keys: Vec<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn cases() -> Vec<(String, Namespace, usize, Vec<u32>)> {
    let tiny = Namespace {
        layout: "cpu:layers=2,kv_heads=4,head_dim=64".into(),
        ..Namespace::new("tiny-llama@0", "bfloat16", 16)
    };
    let mla = Namespace {
        tp: TpPlacement::RankAgnostic,
        ..tiny.clone()
    };
    let tenant = Namespace {
        tp: TpPlacement::Rank {
            world_size: 4,
            rank: 3,
        },
        lora: Some("sql-adapter".into()),
        salt: Some("tenant-a".into()),
        ..Namespace::new("llama-3-70b@main", "fp8_e4m3", 128)
    };
    vec![
        (
            "three_full_blocks_and_a_tail".into(),
            tiny.clone(),
            16,
            (0..50).collect(),
        ),
        (
            "shorter_than_a_block".into(),
            tiny.clone(),
            16,
            (0..15).collect(),
        ),
        (
            "rank_agnostic_same_tokens".into(),
            mla,
            16,
            (0..50).collect(),
        ),
        (
            "large_token_ids".into(),
            tiny,
            4,
            vec![u32::MAX, 0, 151_643, 1, 2, 3, 4, 5],
        ),
        (
            "tp_rank_lora_salt_block_128".into(),
            tenant,
            128,
            (0..300).map(|i| i * 7 % 32_000).collect(),
        ),
    ]
}

fn compute() -> Golden {
    let cases = cases()
        .into_iter()
        .map(|(name, namespace, block_size, tokens)| {
            let keys = chain_keys(&namespace.id(), &tokens, block_size)
                .iter()
                .map(|k| k.to_hex())
                .collect();
            Case {
                name,
                namespace_encoding: hex(&namespace.encode()),
                namespace_id: hex(namespace.id().as_bytes()),
                namespace,
                block_size,
                tokens,
                keys,
            }
        })
        .collect();
    Golden {
        key_scheme_version: KEY_SCHEME_VERSION,
        cases,
    }
}

#[test]
fn key_chain_matches_checked_in_golden_vectors() {
    let computed = compute();
    if std::env::var_os("KVCACHE_REGENERATE_GOLDEN").is_some() {
        let text = serde_json::to_string_pretty(&computed).unwrap() + "\n";
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo test");
        std::fs::write(std::path::Path::new(&dir).join(GOLDEN_PATH), text).unwrap();
        panic!("regenerated {GOLDEN_PATH}; unset KVCACHE_REGENERATE_GOLDEN and rerun");
    }
    let golden: Golden = serde_json::from_str(GOLDEN).expect("golden file does not parse");
    assert_eq!(golden.key_scheme_version, KEY_SCHEME_VERSION);
    assert_eq!(golden.cases.len(), computed.cases.len());
    for (want, got) in golden.cases.iter().zip(&computed.cases) {
        assert_eq!(
            want, got,
            "case {} changed: key derivation is no longer stable",
            want.name
        );
    }
}

#[test]
fn golden_keys_parse_as_block_keys() {
    for case in compute().cases {
        for k in &case.keys {
            assert!(BlockKey::from_hex(k).is_some());
        }
        assert_eq!(case.keys.len(), case.tokens.len() / case.block_size);
    }
}
