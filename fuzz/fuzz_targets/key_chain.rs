//! Block keys (`chain_keys`, `ChainHasher`) and the namespace encoding on arbitrary namespaces,
//! tokens and block sizes (docs/ARCHITECTURE.md, "Keys"):
//! - everything is deterministic;
//! - the namespace encoding parses back to the namespace (so two namespaces never encode alike)
//!   and different namespaces get different ids and different keys;
//! - one key per full block; a prefix of the tokens gives a prefix of the keys; the incremental
//!   hasher and a resumed chain give the same keys;
//! - changing any token of block i changes keys i.. and none before i; a token in the trailing
//!   partial block changes nothing.

#![no_main]

use kvcache_core::key::{ChainHasher, chain_root};
use kvcache_core::{BlockKey, Namespace, TpPlacement, chain_keys};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

fn namespace(u: &mut Unstructured) -> Result<Namespace> {
    Ok(Namespace {
        model: u.arbitrary()?,
        kv_dtype: u.arbitrary()?,
        block_size: u.arbitrary()?,
        layout: u.arbitrary()?,
        tp: if u.arbitrary()? {
            TpPlacement::RankAgnostic
        } else {
            TpPlacement::Rank {
                world_size: u.arbitrary()?,
                rank: u.arbitrary()?,
            }
        },
        lora: u.arbitrary()?,
        salt: u.arbitrary()?,
    })
}

/// An independent reader of the canonical encoding: `tag`, then `id:u8 len:LE-u32 bytes` for
/// fields 1..4, 5 or 6, 7 or 8, 9 or 10, and nothing after.
fn parse_namespace(b: &[u8]) -> Option<Namespace> {
    let mut rest = b.strip_prefix(b"kvcache/namespace/v1".as_slice())?;
    let mut field = |want: &[u8]| -> Option<(u8, Vec<u8>)> {
        let (&id, tail) = rest.split_first()?;
        if !want.contains(&id) {
            return None;
        }
        let (len, tail) = tail.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return None;
        }
        let (bytes, tail) = tail.split_at(len);
        rest = tail;
        Some((id, bytes.to_vec()))
    };
    let text = |b: Vec<u8>| String::from_utf8(b).ok();
    let model = text(field(&[1])?.1)?;
    let kv_dtype = text(field(&[2])?.1)?;
    let block_size = u32::from_le_bytes(field(&[3])?.1.try_into().ok()?);
    let layout = text(field(&[4])?.1)?;
    let tp = match field(&[5, 6])? {
        (5, b) if b.len() == 8 => TpPlacement::Rank {
            world_size: u32::from_le_bytes(b[..4].try_into().ok()?),
            rank: u32::from_le_bytes(b[4..].try_into().ok()?),
        },
        (6, b) if b.is_empty() => TpPlacement::RankAgnostic,
        _ => return None,
    };
    let lora = match field(&[7, 8])? {
        (7, b) => Some(text(b)?),
        (_, b) if b.is_empty() => None,
        _ => return None,
    };
    let salt = match field(&[9, 10])? {
        (9, b) => Some(text(b)?),
        (_, b) if b.is_empty() => None,
        _ => return None,
    };
    rest.is_empty().then_some(Namespace {
        model,
        kv_dtype,
        block_size,
        layout,
        tp,
        lora,
        salt,
    })
}

fn run(u: &mut Unstructured) -> Result<()> {
    let ns = namespace(u)?;
    let other = namespace(u)?;
    let block_size: usize = u.int_in_range(1..=64)?;
    let tokens: Vec<u32> = u.arbitrary()?;
    let cut = u.choose_index(tokens.len() + 1)?;
    let (changed, delta): (usize, u32) = (u.arbitrary()?, u.int_in_range(1..=u32::MAX)?);
    let resume: usize = u.arbitrary()?;

    // The namespace encoding: deterministic, readable back, never shared by two namespaces.
    let encoded = ns.encode();
    assert_eq!(encoded, ns.encode());
    assert_eq!(
        parse_namespace(&encoded).as_ref(),
        Some(&ns),
        "encoding is unambiguous"
    );
    let id = ns.id();
    assert_eq!(id, ns.id());
    if other == ns {
        assert_eq!(other.id(), id);
    } else {
        assert_ne!(other.encode(), encoded);
        assert_ne!(other.id(), id, "distinct namespaces share an id");
    }

    // One key per full block, deterministic, and equal to the incremental hasher's.
    let keys = chain_keys(&id, &tokens, block_size);
    assert_eq!(keys.len(), tokens.len() / block_size);
    assert_eq!(keys, chain_keys(&id, &tokens, block_size));
    let mut hasher = ChainHasher::new(id);
    let incremental: Vec<BlockKey> = tokens
        .chunks_exact(block_size)
        .map(|b| hasher.next_block(b, &[]))
        .collect();
    assert_eq!(incremental, keys);
    // Resuming from key n-1 (the root for n = 0) continues the same chain.
    let resume_at = resume % (keys.len() + 1);
    let parent = match resume_at {
        0 => chain_root(&id),
        n => keys[n - 1],
    };
    let mut resumed = ChainHasher::resume(id, parent);
    for (n, block) in tokens.chunks_exact(block_size).enumerate().skip(resume_at) {
        assert_eq!(resumed.next_block(block, &[]), keys[n]);
    }

    // A prefix of the tokens keys a prefix of the blocks.
    let prefix = chain_keys(&id, &tokens[..cut], block_size);
    assert_eq!(prefix[..], keys[..cut / block_size]);

    // Another namespace never shares a key with this one.
    if other.id() != id {
        let theirs = chain_keys(&other.id(), &tokens, block_size);
        for (a, b) in keys.iter().zip(&theirs) {
            assert_ne!(a, b, "two namespaces share a key");
        }
    }

    // Changing one token changes the keys of its block and every later one, and no earlier one.
    if !tokens.is_empty() {
        let j = changed % tokens.len();
        let mut mutated = tokens.clone();
        mutated[j] = mutated[j].wrapping_add(delta);
        let after = chain_keys(&id, &mutated, block_size);
        assert_eq!(after.len(), keys.len());
        let i = j / block_size;
        if i < keys.len() {
            assert_eq!(after[..i], keys[..i], "keys before the changed block stay");
            for n in i..keys.len() {
                assert_ne!(after[n], keys[n], "key {n} ignores a change in block {i}");
            }
        } else {
            assert_eq!(after, keys, "the trailing partial block is not keyed");
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
