//! The disk tier against real files and a real RocksDB: round trips, corruption, torn
//! segments, a broken index, permissions, restarts.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kvcache_core::BlockKey;

use crate::tier::LowerTier;
use crate::tier::disk::{DiskConfig, DiskTier};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvcache-disk-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    d
}

fn bytes(key: BlockKey, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (key.low64() as usize + i * 7) as u8)
        .collect()
}

fn read(t: &DiskTier, key: BlockKey) -> Option<Vec<u8>> {
    let mut buf = vec![0; t.len_of(key)?];
    t.read_into(key, &mut buf).then_some(buf)
}

#[test]
fn blocks_survive_a_reopen_and_a_corrupt_one_is_a_miss() {
    let d = dir("reopen");
    let cfg = DiskConfig::new(d.clone(), 16 << 20);
    let keys: Vec<BlockKey> = (1..=50).map(|i| BlockKey(i * 1_000_003)).collect();
    {
        let t = DiskTier::open(cfg.clone()).unwrap();
        for &k in &keys {
            t.demote(k, &bytes(k, 10_000));
        }
        t.flush();
        assert_eq!(t.stats()[0].blocks, 50);
    }
    let t = DiskTier::open(cfg).unwrap();
    for &k in &keys {
        assert_eq!(read(&t, k), Some(bytes(k, 10_000)), "{k} after reopening");
    }
    assert_eq!(read(&t, BlockKey(7)), None);
    // Flip a byte of one block on disk: its read fails verification and it is forgotten.
    let loc = t.shared.lookup(keys[3]).unwrap();
    let f = OpenOptions::new()
        .write(true)
        .open(t.shared.segment_path(loc.segment))
        .unwrap();
    f.write_all_at(&[0xff ^ bytes(keys[3], 1)[0]], loc.offset)
        .unwrap();
    assert_eq!(read(&t, keys[3]), None);
    assert_eq!(t.len_of(keys[3]), None);
    assert_eq!(t.stats()[0].corrupt_blocks, 1);
    drop(t);
    fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_broken_index_and_a_torn_segment_leave_the_intact_blocks_readable() {
    let d = dir("broken");
    // Segments of 1 MiB: 60 blocks of 100 KB fill six of them.
    let cfg = DiskConfig {
        segment_bytes: 1 << 20,
        ..DiskConfig::new(d.clone(), 16 << 20)
    };
    let keys: Vec<BlockKey> = (1..=60).map(|i| BlockKey(i * 104_729)).collect();
    let last_segment;
    {
        let t = DiskTier::open(cfg.clone()).unwrap();
        for &k in &keys {
            t.demote(k, &bytes(k, 100_000));
        }
        t.demote(keys[0], &bytes(keys[0], 100_000)); // already on disk: not written twice
        t.flush();
        last_segment = *t.shared.files.lock().keys().next_back().unwrap();
        assert!(last_segment >= 5);
    }
    // What a crash mid-demotion and a damaged index leave: the newest segment ends halfway
    // through a record, and RocksDB's CURRENT names no manifest.
    let seg = d.join("segments").join(format!("{last_segment:016x}.seg"));
    let len = fs::metadata(&seg).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 50_000)
        .unwrap();
    fs::write(d.join("index").join("CURRENT"), b"MANIFEST-999999\n").unwrap();

    let cfg_again = cfg.clone();
    let t = DiskTier::open(cfg).unwrap();
    let held: Vec<bool> = keys.iter().map(|&k| read(&t, k).is_some()).collect();
    let last = keys.len() - 1;
    assert!(!held[last], "the torn record is not served");
    assert!(
        held[..last].iter().all(|h| *h),
        "every intact block: {held:?}"
    );
    for &k in &keys[..last] {
        assert_eq!(read(&t, k), Some(bytes(k, 100_000)));
    }
    assert_eq!(t.stats()[0].blocks as usize, last);
    assert_eq!(t.stats()[0].corrupt_blocks, 0);
    let aside: Vec<String> = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("index.broken-"))
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "the broken index is kept aside for inspection"
    );
    // New demotions go on into a fresh segment, and survive a normal reopen.
    t.demote(BlockKey(5), &bytes(BlockKey(5), 1000));
    t.flush();
    drop(t);
    let t = DiskTier::open(cfg_again).unwrap();
    assert_eq!(read(&t, BlockKey(5)), Some(bytes(BlockKey(5), 1000)));
    assert_eq!(read(&t, keys[1]), Some(bytes(keys[1], 100_000)));
    drop(t);
    fs::remove_dir_all(d).unwrap();
}

#[test]
fn the_tiers_files_are_private_to_the_node() {
    let d = dir("modes");
    fs::create_dir_all(d.join("segments")).unwrap();
    fs::set_permissions(d.join("segments"), fs::Permissions::from_mode(0o755)).unwrap();
    let t = DiskTier::open(DiskConfig::new(d.clone(), 4 << 20)).unwrap();
    t.demote(BlockKey(9), &bytes(BlockKey(9), 1000));
    t.flush();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&d.join("segments")),
        0o700,
        "an existing directory is made private"
    );
    assert_eq!(mode(&d.join("index")), 0o700);
    for e in fs::read_dir(d.join("segments")).unwrap() {
        assert_eq!(mode(&e.unwrap().path()), 0o600);
    }
    drop(t);
    fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_full_disk_drops_whole_segments_oldest_first() {
    let d = dir("full");
    // 4 segments of 1 MiB; 300 blocks of 40 KiB is about 12 MiB.
    let t = DiskTier::open(DiskConfig::new(d.clone(), 4 << 20)).unwrap();
    let keys: Vec<BlockKey> = (1..=300).map(|i| BlockKey(i * 7919)).collect();
    for &k in &keys {
        t.demote(k, &bytes(k, 40 << 10));
    }
    t.flush();
    let s = t.stats().remove(0);
    assert!(s.used_bytes <= 4 << 20, "{s:?}");
    assert!(s.dropped_segments >= 8, "{s:?}");
    let held: Vec<bool> = keys.iter().map(|&k| read(&t, k).is_some()).collect();
    let first_held = held.iter().position(|h| *h).unwrap();
    assert!(
        held[first_held..].iter().all(|h| *h),
        "the newest blocks stay, in one run"
    );
    assert_eq!(s.blocks as usize, keys.len() - first_held);
    for &k in &keys[first_held..] {
        assert_eq!(read(&t, k), Some(bytes(k, 40 << 10)));
    }
    // A block bigger than a segment is not written at all.
    t.demote(BlockKey(1), &[0; 2 << 20]);
    assert_eq!(t.stats()[0].skipped_blocks, 1);
    drop(t);
    fs::remove_dir_all(d).unwrap();
}
