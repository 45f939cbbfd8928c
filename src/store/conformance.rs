//! One conformance suite for every backend: the same checks run on the memory store in unit
//! tests and on the directory and S3 stores in integration tests. Each check expects an
//! empty store and panics on a violation.
//!
//! Test code only, not in the library: compiled under `cfg(test)` for the unit tests, and
//! included by path in `tests/s3_store.rs` (hence `s3cached::` paths, which name this crate in
//! both places).

use bytes::Bytes;

use s3cached::store::{clear, key_hash, Entry, History, PutMode, Store, StoreError};

/// Runs every check, clearing the store between them.
pub async fn run_all(store: &dyn Store) {
    round_trip(store).await;
    clear(store).await.expect("clear");
    create_only_if_absent(store).await;
    clear(store).await.expect("clear");
    update_only_if_unchanged(store).await;
    clear(store).await.expect("clear");
    delete_semantics(store).await;
    clear(store).await.expect("clear");
    listing_pages_and_bulk_delete(store).await;
    clear(store).await.expect("clear");
    control_objects(store).await;
    clear(store).await.expect("clear");
    dump_as_promised(store).await;
    clear(store).await.expect("clear");
}

fn entry(key: &[u8], value: &[u8], cas: u64) -> Entry {
    Entry {
        key: Bytes::copy_from_slice(key),
        flags: 0xfeed_f00d,
        expires_at: 4_000_000_000,
        stored_at_us: 1_700_000_000_000_000 + cas,
        cas,
        stale: false,
        win_sent: false,
        // Kept as written, like every other field.
        history: History::from_ids(vec![cas, cas / 2, 7], cas.is_multiple_of(2)),
        value: Bytes::copy_from_slice(value),
    }
}

/// What is written is read back exactly: flags, times, cas, binary keys and values.
pub async fn round_trip(store: &dyn Store) {
    assert_eq!(store.get(b"absent").await.unwrap(), None);
    let binary_key: Vec<u8> = (1u8..=250).collect();
    let big_value: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    for (key, value) in [
        (&b"plain"[..], &b"hello"[..]),
        (&binary_key[..], &[0u8, 13, 10, 255][..]),
        (&b"empty"[..], &b""[..]),
        (&b"big"[..], &big_value[..]),
        ("ключ".as_bytes(), "значение".as_bytes()),
    ] {
        let e = entry(key, value, 42);
        store.put(&e, PutMode::Overwrite).await.unwrap();
        let got = store.get(key).await.unwrap().expect("stored entry");
        assert_eq!(
            got.entry,
            e,
            "round trip of key {:?}",
            String::from_utf8_lossy(key)
        );
    }
    let mut stale = entry(b"plain", b"x", 43);
    stale.stale = true;
    stale.win_sent = true;
    store.put(&stale, PutMode::Overwrite).await.unwrap();
    assert_eq!(store.get(b"plain").await.unwrap().unwrap().entry, stale);
}

/// `Create` writes once; a second create is refused with `Exists` and changes nothing.
pub async fn create_only_if_absent(store: &dyn Store) {
    store
        .put(&entry(b"k", b"first", 1), PutMode::Create)
        .await
        .unwrap();
    assert_eq!(
        store.put(&entry(b"k", b"second", 2), PutMode::Create).await,
        Err(StoreError::Exists)
    );
    assert_eq!(store.get(b"k").await.unwrap().unwrap().entry.value, "first");
}

/// `Update` succeeds only against the version read; a stale version or a gone object fails.
pub async fn update_only_if_unchanged(store: &dyn Store) {
    let v1 = store
        .put(&entry(b"k", b"one", 1), PutMode::Overwrite)
        .await
        .unwrap();
    let read = store.get(b"k").await.unwrap().unwrap();
    assert_eq!(read.version, v1);
    let v2 = store
        .put(&entry(b"k", b"two", 2), PutMode::Update(v1.clone()))
        .await
        .unwrap();
    assert_ne!(v1, v2);
    assert_eq!(
        store
            .put(&entry(b"k", b"three", 3), PutMode::Update(v1))
            .await,
        Err(StoreError::Changed)
    );
    assert_eq!(store.get(b"k").await.unwrap().unwrap().entry.value, "two");
    assert_eq!(
        store
            .put(&entry(b"gone", b"x", 4), PutMode::Update(v2))
            .await,
        Err(StoreError::Changed)
    );
    assert_eq!(store.get(b"gone").await.unwrap(), None);
}

/// Delete reports whether something was there; a conditional delete respects the version.
pub async fn delete_semantics(store: &dyn Store) {
    assert!(!store.delete(b"k", None).await.unwrap());
    let v1 = store
        .put(&entry(b"k", b"one", 1), PutMode::Overwrite)
        .await
        .unwrap();
    store
        .put(&entry(b"k", b"two", 2), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(
        store.delete(b"k", Some(&v1)).await,
        Err(StoreError::Changed)
    );
    assert!(store.get(b"k").await.unwrap().is_some());
    let current = store.get(b"k").await.unwrap().unwrap().version;
    assert!(store.delete(b"k", Some(&current)).await.unwrap());
    assert_eq!(store.get(b"k").await.unwrap(), None);
}

/// Listing pages through every item once, in name order, without control objects.
pub async fn listing_pages_and_bulk_delete(store: &dyn Store) {
    store
        .put_control("marker", Bytes::from("x"), PutMode::Overwrite)
        .await
        .unwrap();
    let count = 25;
    for i in 0..count {
        let key = format!("key-{i}");
        store
            .put(&entry(key.as_bytes(), b"v", i), PutMode::Overwrite)
            .await
            .unwrap();
    }
    let mut names = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.list(cursor, 10).await.unwrap();
        assert!(page.objects.len() <= 10);
        names.extend(page.objects.iter().map(|o| o.name.clone()));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let mut expected: Vec<String> = (0..count)
        .map(|i| format!("key-{i}"))
        .map(|k| key_hash(k.as_bytes()))
        .collect();
    expected.sort();
    let short: Vec<String> = names
        .iter()
        .map(|n| n.rsplit('/').next().unwrap().to_owned())
        .collect();
    assert_eq!(short, expected);
    let removed = store.delete_objects(&names[..10]).await.unwrap();
    assert_eq!(removed, 10);
    let left = store.list(None, 1000).await.unwrap();
    assert_eq!(left.objects.len(), count as usize - 10);
    assert!(store.get_control("marker").await.unwrap().is_some());
}

/// Control objects honour create and update preconditions like items.
pub async fn control_objects(store: &dyn Store) {
    assert_eq!(store.get_control("lease").await.unwrap(), None);
    let v1 = store
        .put_control("lease", Bytes::from("a"), PutMode::Create)
        .await
        .unwrap();
    assert_eq!(
        store
            .put_control("lease", Bytes::from("b"), PutMode::Create)
            .await,
        Err(StoreError::Exists)
    );
    let v2 = store
        .put_control("lease", Bytes::from("c"), PutMode::Update(v1.clone()))
        .await
        .unwrap();
    assert_eq!(
        store
            .put_control("lease", Bytes::from("d"), PutMode::Update(v1))
            .await,
        Err(StoreError::Changed)
    );
    let (body, version) = store.get_control("lease").await.unwrap().unwrap();
    assert_eq!(body, "c");
    assert_eq!(version, v2);
}

/// A store that says it dumps lists every item once, in pages, each without its value and
/// with its size; one that does not answers `None`.
pub async fn dump_as_promised(store: &dyn Store) {
    if !store.info().dumps {
        assert!(store.dump(None, 10).await.unwrap().is_none());
        return;
    }
    store
        .put_control("marker", Bytes::from("x"), PutMode::Overwrite)
        .await
        .unwrap();
    let mut written = Vec::new();
    for i in 0..25u64 {
        let e = entry(format!("dump-{i}").as_bytes(), &vec![b'v'; i as usize], i);
        store.put(&e, PutMode::Overwrite).await.unwrap();
        written.push(e);
    }
    let mut found = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.dump(cursor, 10).await.unwrap().expect("a page");
        assert!(page.items.len() <= 10);
        found.extend(page.items);
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    found.sort_by_key(|d| d.entry.cas);
    assert_eq!(found.len(), written.len());
    for (dumped, e) in found.iter().zip(&written) {
        let without_value = Entry {
            value: Bytes::new(),
            ..e.clone()
        };
        assert_eq!(dumped.entry, without_value);
        assert!(dumped.size >= (e.key.len() + e.value.len()) as u64);
    }
}
