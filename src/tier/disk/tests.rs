//! The disk tier alone: records round-trip, damage reads as a miss, deletes survive a
//! restart, and the files stay within the bound.

use super::*;

fn record(value: &[u8], cas: u64) -> Record {
    Record {
        item: Versioned {
            entry: Entry {
                key: Bytes::new(),
                flags: 0xdead_beef,
                expires_at: 1_900_000_000,
                stored_at_us: 1_800_000_000_000_000,
                cas,
                stale: true,
                win_sent: false,
                history: History::default(),
                value: Bytes::copy_from_slice(value),
            },
            version: Version("\"0123456789abcdef\"".into()),
            large: None,
        },
        checked_unix_ms: 1_799_999_999_999,
    }
}

fn encoded(r: &Record) -> Vec<u8> {
    let mut buf = Vec::new();
    r.encode(&mut buf).unwrap();
    buf
}

fn same(a: &Record, b: &Record) -> bool {
    a.item == b.item && a.checked_unix_ms == b.checked_unix_ms
}

#[test]
fn a_record_round_trips_every_field() {
    let r = record(b"hello", 42);
    let buf = encoded(&r);
    assert_eq!(buf.len(), r.estimated_size());
    let back = Record::decode(&mut &buf[..]).unwrap();
    assert!(same(&back, &r));
    let mut flags = r.clone();
    flags.item.entry.stale = false;
    flags.item.entry.win_sent = true;
    let back = Record::decode(&mut &encoded(&flags)[..]).unwrap();
    assert!(same(&back, &flags));
}

#[test]
fn every_truncation_and_every_flipped_byte_is_an_error() {
    let r = record(b"some value bytes", 7);
    let buf = encoded(&r);
    for len in 0..buf.len() {
        assert!(Record::decode(&mut &buf[..len]).is_err(), "cut at {len}");
    }
    for at in 0..buf.len() {
        let mut bad = buf.clone();
        bad[at] ^= 0x41;
        match Record::decode(&mut &bad[..]) {
            Err(_) => {}
            // A changed length may still frame a record, but never one that passes the CRC.
            Ok(back) => panic!("flip at {at} decoded as {:?}", back.item),
        }
    }
    let key = DiskKey(Bytes::from_static(b"k"));
    let mut kbuf = Vec::new();
    key.encode(&mut kbuf).unwrap();
    assert_eq!(DiskKey::decode(&mut &kbuf[..]).unwrap(), key);
    let huge = u32::MAX.to_le_bytes();
    assert!(DiskKey::decode(&mut &huge[..]).is_err());
}

fn config(dir: &Path, bytes: u64) -> DiskConfig {
    DiskConfig {
        dir: dir.to_owned(),
        bytes,
        max_item_bytes: 64 * 1024,
    }
}

const MIB: u64 = 1024 * 1024;
/// What the files may take beyond the bound: none is expected (foyer allocates blocks and
/// its tombstone log inside the capacity); a little room for anything else in the directory.
const SLACK_BYTES: u64 = 64 * 1024;

async fn found(disk: &DiskTier, key: &str) -> Option<Record> {
    match disk.lookup(&Bytes::from(key.to_owned())).await {
        Lookup::Found(r) => Some(r),
        Lookup::Missing | Lookup::Damaged => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_and_deletes_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 8 * MIB);
    let disk = DiskTier::open(&cfg).await.unwrap();
    disk.insert(Bytes::from("kept"), record(b"v1", 1));
    disk.insert(Bytes::from("deleted"), record(b"v2", 2));
    disk.insert(Bytes::from("replaced"), record(b"old", 3));
    disk.insert(Bytes::from("replaced"), record(b"new", 4));
    // Written out before the delete, so only the tombstone keeps it away after a restart.
    disk.close().await;
    drop(disk);
    let disk = DiskTier::open(&cfg).await.unwrap();
    disk.remove(b"deleted");
    disk.close().await;
    drop(disk);
    let disk = DiskTier::open(&cfg).await.unwrap();
    assert!(same(
        &found(&disk, "kept").await.unwrap(),
        &record(b"v1", 1)
    ));
    assert!(found(&disk, "deleted").await.is_none());
    let replaced = found(&disk, "replaced").await.unwrap();
    assert_eq!(&replaced.item.entry.value[..], b"new");
    assert!(found(&disk, "never").await.is_none());
}

/// Every file in `dir` overwritten by `damage`.
fn damage_files(dir: &Path, damage: impl Fn(&mut Vec<u8>)) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let mut bytes = std::fs::read(&path).unwrap();
            damage(&mut bytes);
            std::fs::write(&path, bytes).unwrap();
        }
    }
}

async fn damaged_files_read_as_misses(damage: impl Fn(&mut Vec<u8>)) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 8 * MIB);
    let disk = DiskTier::open(&cfg).await.unwrap();
    for i in 0..50 {
        disk.insert(
            Bytes::from(format!("k{i}")),
            record(&[b'a' + (i % 26) as u8; 3000], i),
        );
    }
    disk.close().await;
    drop(disk);
    damage_files(dir.path(), damage);
    let disk = DiskTier::open(&cfg)
        .await
        .expect("a damaged tier still opens");
    for i in 0..50 {
        if let Some(r) = found(&disk, &format!("k{i}")).await {
            assert!(same(&r, &record(&[b'a' + (i % 26) as u8; 3000], i)), "k{i}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_read_as_misses_never_as_wrong_values() {
    // Every 512th byte flipped: each record is hit somewhere.
    damaged_files_read_as_misses(|b| {
        for at in (100..b.len()).step_by(512) {
            b[at] ^= 0xff;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_emptied_files_read_as_misses() {
    damaged_files_read_as_misses(|b| b.truncate(b.len() / 3)).await;
    damaged_files_read_as_misses(|b| b.clear()).await;
    damaged_files_read_as_misses(|b| b.iter_mut().for_each(|x| *x = 0x5a)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_files_stay_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 8 * MIB);
    let disk = DiskTier::open(&cfg).await.unwrap();
    // Five times the bound, in 20 KiB values, in batches the write queue holds; each
    // batch is written out before the next is queued.
    for batch in 0..100u64 {
        let before = disk.written_bytes();
        for i in batch * 20..batch * 20 + 20 {
            disk.insert(Bytes::from(format!("k{i}")), record(&[7; 20 * 1024], i));
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while disk.written_bytes() < before + 20 * 20 * 1024 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "batch {batch} written"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
    assert!(found(&disk, "k1999").await.is_some(), "the newest are kept");
    assert!(
        found(&disk, "k0").await.is_none(),
        "the oldest were evicted"
    );
    disk.close().await;
    let used = disk.disk_bytes();
    assert!(used > 4 * MIB, "records were written: {used}");
    assert!(used <= 8 * MIB + SLACK_BYTES, "{used} bytes on disk");
}
