//! Tests of the directory store: the conformance suite, crash leftovers, the spare file,
//! in-place rewrites and their checks.

use super::*;
use crate::store::conformance;

#[tokio::test]
async fn conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open(dir.path(), "cache", Codec::default()).unwrap();
    conformance::run_all(&store).await;
}

#[tokio::test]
async fn items_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let entry = Entry {
        key: Bytes::from("k"),
        value: Bytes::from("v"),
        cas: 7,
        ..Entry::default()
    };
    {
        let store = DirStore::open(dir.path(), "p", Codec::default()).unwrap();
        store.put(&entry, PutMode::Overwrite).await.unwrap();
    }
    let store = DirStore::open(dir.path(), "p", Codec::default()).unwrap();
    assert_eq!(store.get(b"k").await.unwrap().unwrap().entry, entry);
    assert!(dir.path().join("p").join(key_hash(b"k")).is_file());
}

fn temp_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for d in [dir.to_path_buf(), dir.join(CONTROL_DIR)] {
        for e in fs::read_dir(d).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            if name.starts_with(TEMP_PREFIX) {
                found.push(name);
            }
        }
    }
    found
}

fn entry(key: &str) -> Entry {
    Entry {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::from("v"),
        cas: 1,
        ..Entry::default()
    }
}

#[tokio::test]
async fn failed_writes_leave_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open(dir.path(), "p", Codec::default()).unwrap();
    let root = dir.path().join("p");
    // The write itself fails halfway (a full disk, say).
    let failed = store.inner.write_with(&root.join(key_hash(b"a")), |file| {
        file.write_all(b"half an obj")?;
        Err(std::io::Error::other("injected: no space left"))
    });
    assert!(failed.is_err());
    // The rename fails: something that is not a file sits under the item's name.
    fs::create_dir_all(root.join(key_hash(b"b")).join("in-the-way")).unwrap();
    assert!(store.put(&entry("b"), PutMode::Overwrite).await.is_err());
    assert_eq!(temp_files(&root), Vec::<String>::new());
    assert!(store.get(b"a").await.unwrap().is_none());
}

fn age(path: &Path, secs: u64) {
    let file = fs::File::options().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() - Duration::from_secs(secs))
        .unwrap();
}

#[tokio::test]
async fn crash_debris_is_removed_and_counted_until_then() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("p");
    {
        let store = DirStore::open(dir.path(), "p", Codec::default()).unwrap();
        store.put(&entry("kept"), PutMode::Overwrite).await.unwrap();
    }
    // What a kill -9 during writes leaves: temporary files, old and recent.
    let old_item = root.join(format!("{TEMP_PREFIX}{}-1", key_hash(b"x")));
    let old_control = root
        .join(CONTROL_DIR)
        .join(format!("{TEMP_PREFIX}flush-epoch-2"));
    let recent = root.join(format!("{TEMP_PREFIX}{}-3", key_hash(b"y")));
    fs::write(&old_item, vec![0u8; 1000]).unwrap();
    fs::write(&old_control, b"1").unwrap();
    fs::write(&recent, vec![0u8; 500]).unwrap();
    age(&old_item, TEMP_GRACE.as_secs() + 5);
    age(&old_control, TEMP_GRACE.as_secs() + 5);
    let store = DirStore::open(dir.path(), "p", Codec::default()).unwrap();
    let left = temp_files(&root);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(recent.exists(), "a recent one may be a live write");
    let page = store.list(None, 1000).await.unwrap();
    assert_eq!((page.objects.len(), page.other_bytes), (1, 500));
    // Once it is old enough, the next full listing removes it.
    age(&recent, TEMP_GRACE.as_secs() + 5);
    let page = store.list(None, 1000).await.unwrap();
    assert_eq!(page.other_bytes, 0);
    assert_eq!(temp_files(&root), Vec::<String>::new());
    assert!(store.get(b"kept").await.unwrap().is_some());
}

#[tokio::test]
async fn max_bytes_counts_temporary_files() {
    use crate::culler::{Culler, CullerConfig, WriteHint};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DirStore::open(dir.path(), "p", Codec::default()).unwrap());
    for i in 0..10 {
        store
            .put(&entry(&format!("k{i}")), PutMode::Overwrite)
            .await
            .unwrap();
    }
    let item_bytes = store.list(None, 100).await.unwrap().objects[0].size;
    // Debris as large as four items, left by a crash a moment ago.
    let debris = dir.path().join("p").join(format!("{TEMP_PREFIX}z-1"));
    fs::write(&debris, vec![0u8; 4 * item_bytes as usize]).unwrap();
    let store: Arc<dyn Store> = store;
    let flush = Arc::new(
        crate::flush::Flush::load(store.clone(), Duration::ZERO)
            .await
            .unwrap(),
    );
    let culler = Culler::new(
        store.clone(),
        flush,
        Arc::default(),
        crate::clock::Clock::System,
        CullerConfig {
            max_entries: 0,
            cull_frequency: 3,
            max_bytes: 10 * item_bytes,
            interval: Duration::from_secs(3600),
        },
        Arc::new(WriteHint::new(0)),
    );
    let report = culler.pass().await.unwrap();
    assert_eq!((report.culled, report.remaining), (4, 6));
}

fn spares(dir: &Path) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_str().unwrap().starts_with(SPARE_PREFIX)
        })
        .count()
}

#[tokio::test]
async fn rewrites_swap_with_a_spare_that_is_counted_and_removed_on_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("p");
    let store = DirStore::open(dir.path(), "p", Codec::default()).unwrap();
    let mut e = entry("k");
    store.put(&e, PutMode::Overwrite).await.unwrap();
    assert_eq!(spares(&root), 0, "a new item is renamed in");
    e.value = Bytes::from(vec![b'x'; 3000]);
    store.put(&e, PutMode::Overwrite).await.unwrap();
    e.value = Bytes::from("short");
    store.put(&e, PutMode::Overwrite).await.unwrap();
    assert_eq!(store.get(b"k").await.unwrap().unwrap().entry, e);
    assert_eq!(
        spares(&root),
        1,
        "the old item's file is the stripe's spare"
    );
    assert_eq!(temp_files(&root), Vec::<String>::new());
    let page = store.list(None, 10).await.unwrap();
    assert_eq!(page.objects.len(), 1);
    assert!(page.other_bytes >= 3000, "{}", page.other_bytes);
    drop(store);
    let store = DirStore::open(dir.path(), "p", Codec::default()).unwrap();
    assert_eq!(spares(&root), 0);
    assert_eq!(store.get(b"k").await.unwrap().unwrap().entry, e);
}

/// Readers racing rewrites of one key (values of different lengths, so a torn read would
/// show) only ever see a whole value, as the spare files are recycled.
#[test]
fn concurrent_readers_never_see_a_torn_item() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open(dir.path(), "p", Codec::default()).unwrap();
    let inner = store.inner.clone();
    // b and d have the same length: those rewrites happen in place.
    let versions: Vec<Entry> = [
        (b'a', 64 << 10),
        (b'b', 100),
        (b'd', 100),
        (b'c', 200 << 10),
    ]
    .into_iter()
    .map(|(byte, len)| Entry {
        value: Bytes::from(vec![byte; len]),
        ..entry("torn")
    })
    .collect();
    let bodies: Vec<Bytes> = versions.iter().map(|e| inner.codec.encode(e)).collect();
    let name = key_hash(b"torn");
    inner
        .write_item(&mut inner.lock(&name), &name, &bodies[0])
        .unwrap();
    std::thread::scope(|s| {
        let writer = {
            let (inner, bodies) = (&inner, &bodies);
            s.spawn(move || {
                for i in 0..300 {
                    let mut stripe = inner.lock(&name);
                    inner
                        .write_item(&mut stripe, &name, &bodies[i % bodies.len()])
                        .unwrap();
                }
            })
        };
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..300 {
                    let got = inner
                        .read_item(b"torn", None)
                        .unwrap()
                        .expect("always an item");
                    assert!(
                        versions.contains(&got.entry),
                        "torn: {}",
                        got.entry.value.len()
                    );
                }
            });
        }
        writer.join().unwrap();
    });
}

/// A small item rewritten with the same length is overwritten in place: same file, no
/// spare, no temporary file; a different length, or an fsynced store, swaps files.
#[tokio::test]
async fn same_length_rewrites_happen_in_place_unless_fsynced() {
    use std::os::unix::fs::MetadataExt;
    for fsync in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("p");
        let store =
            DirStore::open_with(dir.path(), "p", Codec::default(), fsync, DEFAULT_OPEN_FILES)
                .unwrap();
        let path = root.join(key_hash(b"k"));
        let mut e = entry("k");
        store.put(&e, PutMode::Overwrite).await.unwrap();
        let inode = fs::metadata(&path).unwrap().ino();
        e.value = Bytes::from("w");
        e.cas = 2;
        let version = store.put(&e, PutMode::Overwrite).await.unwrap();
        let got = store.get(b"k").await.unwrap().unwrap();
        assert_eq!((got.entry, got.version), (e.clone(), version));
        let in_place = fs::metadata(&path).unwrap().ino() == inode;
        assert_eq!(in_place, !fsync, "fsync {fsync}");
        assert_eq!(spares(&root), usize::from(fsync));
        assert_eq!(temp_files(&root), Vec::<String>::new());
        e.value = Bytes::from("longer");
        store.put(&e, PutMode::Overwrite).await.unwrap();
        assert_eq!(store.get(b"k").await.unwrap().unwrap().entry, e);
        assert_eq!(spares(&root), 1, "a new length swaps with the spare");
    }
}

/// Item files this process has open under `dir` (the directory's lock file aside).
fn open_files_under(dir: &Path) -> usize {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir) && !target.ends_with(LOCK_FILE))
        .count()
}

/// An item file kept open for rewrites is never written once its name means another
/// file or none: after a delete, a culler's removal, a rewrite of another length, or an
/// unlink behind the store's back, a same-length rewrite still lands under the name.
#[tokio::test]
async fn kept_files_never_take_a_write_meant_for_another_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open(dir.path(), "p", Codec::default()).unwrap();
    let path = dir.path().join("p").join(key_hash(b"k"));
    let mut e = entry("k");
    let mut write = |value: &'static str| {
        e.value = Bytes::from(value);
        e.cas += 1;
        e.clone()
    };
    for how in ["unlinked", "deleted", "culled", "longer"] {
        // Twice the same length: the second rewrite keeps the file open.
        for value in ["aaaa", "bbbb"] {
            store.put(&write(value), PutMode::Overwrite).await.unwrap();
        }
        match how {
            "unlinked" => fs::remove_file(&path).unwrap(),
            "deleted" => assert!(store.delete(b"k", None).await.unwrap()),
            "culled" => {
                let names = [key_hash(b"k")];
                assert_eq!(store.delete_objects(&names).await.unwrap(), 1);
            }
            "longer" => {
                store
                    .put(&write("longer"), PutMode::Overwrite)
                    .await
                    .unwrap();
                store
                    .put(&write("dddddd"), PutMode::Overwrite)
                    .await
                    .unwrap();
            }
            _ => {}
        }
        let last = write(if how == "longer" { "eeeeee" } else { "cccc" });
        store.put(&last, PutMode::Overwrite).await.unwrap();
        let got = store.get(b"k").await.unwrap();
        assert_eq!(got.map(|g| g.entry), Some(last), "after the item was {how}");
    }
}

/// The store keeps at most `open_files` item files open, and none with a limit of 0.
#[tokio::test]
async fn open_files_are_bounded() {
    for limit in [0, LOCK_STRIPES * 2] {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::open_with(dir.path(), "p", Codec::default(), false, limit).unwrap();
        for round in 0..2u64 {
            for i in 0..1000 {
                let e = Entry {
                    cas: round + 1,
                    ..entry(&format!("key{i}"))
                };
                store.put(&e, PutMode::Overwrite).await.unwrap();
            }
        }
        let open = open_files_under(dir.path());
        assert!(open <= limit, "{open} files open, limit {limit}");
        if limit > 0 {
            assert!(open > limit / 2, "only {open} of {limit} kept");
        }
    }
}

/// A rewrite torn by a power cut (the new item's first half over the old one's second
/// half, lengths intact) reads as a miss, never as a wrong value, and does not block a
/// conditional write.
#[tokio::test]
async fn a_torn_item_file_is_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open(dir.path(), "p", Codec::default()).unwrap();
    let old = Entry {
        value: Bytes::from(vec![b'o'; 8192]),
        ..entry("k")
    };
    let new = Entry {
        value: Bytes::from(vec![b'n'; 8192]),
        cas: old.cas + 1,
        ..entry("k")
    };
    store.put(&old, PutMode::Overwrite).await.unwrap();
    let path = dir.path().join("p").join(key_hash(b"k"));
    let old_bytes = fs::read(&path).unwrap();
    store.put(&new, PutMode::Overwrite).await.unwrap();
    let mut torn = fs::read(&path).unwrap();
    assert_eq!(torn.len(), old_bytes.len());
    torn[4096..].copy_from_slice(&old_bytes[4096..]);
    fs::write(&path, &torn).unwrap();
    assert_eq!(store.get(b"k").await.unwrap(), None);
    assert_eq!(store.stored_at_us(&key_hash(b"k")).await.unwrap(), None);
    store.put(&old, PutMode::Create).await.unwrap();
    assert_eq!(store.get(b"k").await.unwrap().unwrap().entry, old);
}

#[tokio::test]
async fn fsynced_store_passes_the_suite_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open_with(dir.path(), "f", Codec::default(), true, 0).unwrap();
    conformance::run_all(&store).await;
    store.put(&entry("k"), PutMode::Overwrite).await.unwrap();
    drop(store);
    let store = DirStore::open_with(dir.path(), "f", Codec::default(), true, 0).unwrap();
    assert!(store.get(b"k").await.unwrap().is_some());
    assert_eq!(temp_files(&dir.path().join("f")), Vec::<String>::new());
}

#[test]
fn a_directory_is_served_by_one_process_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open(dir.path(), "p", Codec::default()).unwrap();
    assert!(store.info().exclusive);
    let second = DirStore::open(dir.path(), "p", Codec::default());
    let err = second.err().expect("a second store on a locked directory");
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    assert!(err.to_string().contains("another s3cached"), "{err}");
    // Another location under the same data directory is another store.
    assert!(DirStore::open(dir.path(), "q", Codec::default()).is_ok());
    drop(store);
    assert!(DirStore::open(dir.path(), "p", Codec::default()).is_ok());
}

#[tokio::test]
async fn a_retrievals_budget_is_charged_each_file_before_it_is_read() {
    use crate::budget::meter::{self, Meter};
    use crate::budget::{Budget, MIN_MEMORY_LIMIT_BYTES};
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open(dir.path(), "p", Codec::default()).unwrap();
    let value = Bytes::from(vec![b'v'; 5 * 1024 * 1024]);
    let big = Entry {
        value: value.clone(),
        ..entry("big")
    };
    store.put(&big, PutMode::Overwrite).await.unwrap();
    let file_len = fs::metadata(dir.path().join("p").join(key_hash(b"big")))
        .unwrap()
        .len();
    // Half the budget is the main part a meter takes from; 5 MiB fits once, not twice.
    let budget = Budget::new(MIN_MEMORY_LIMIT_BYTES);
    let meter = Arc::new(Meter::new(budget.clone(), false, None));
    let read = meter::scope(meter.clone(), store.get(b"big")).await;
    assert_eq!(read.unwrap().unwrap().entry.value, value);
    assert_eq!(meter.used_bytes(), file_len, "charged the file's size");
    let refused = meter::scope(meter.clone(), store.get(b"big")).await;
    assert!(
        matches!(refused, Err(StoreError::OverBudget(n)) if n == file_len),
        "{refused:?}"
    );
    assert_eq!(meter.used_bytes(), file_len, "a refused read takes nothing");
    drop(meter);
    assert_eq!(budget.used_bytes(), 0);
    // Outside a retrieval nothing is charged.
    assert!(store.get(b"big").await.unwrap().is_some());
}
