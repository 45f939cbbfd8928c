//! The disk tier against a real S3-compatible server: a restarted replica starts warm,
//! revalidates what is older than the window, never serves what was deleted or flushed
//! before the restart (by it or by another replica), reads damaged files as misses, stays
//! within its bound, and is off by default. Backend requests are counted by `stats`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{unique_prefix, Backend, Client, TestServer};

/// Long enough that no revalidation happens during a test.
const LONG_WINDOW_MS: u64 = 600_000;

/// A replica on `prefix` with its disk tier in `disk` (none when `None`).
async fn replica(prefix: &str, disk: Option<&Path>, extra: &str) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk.map_or(String::new(), |d| {
        format!(
            "disk_cache_dir = {:?}\ndisk_cache_bytes = {}\n",
            d.display().to_string(),
            16 * 1024 * 1024
        )
    });
    let extra = format!("max_item_size = 65536\n{disk}{extra}");
    let config = common::config(Backend::S3, prefix, dir.path(), &extra);
    TestServer::start_config(config, dir).await
}

fn window(ms: u64) -> String {
    format!("revalidate_after_ms = {ms}\n")
}

async fn stop(server: TestServer) {
    server.app.shutdown(Duration::from_secs(5)).await;
}

async fn set(c: &mut Client, key: &str, value: &str) {
    let cmd = format!("set {key} 5 0 {}\r\n{value}\r\n", value.len());
    c.roundtrip(cmd.as_bytes(), b"STORED\r\n").await;
}

/// Item reads the replica sent to the store: plain and conditional.
async fn item_reads(c: &mut Client) -> (u64, u64) {
    (
        c.stat("backend_gets").await,
        c.stat("backend_revalidations").await,
    )
}

#[tokio::test]
async fn a_restarted_replica_serves_its_hot_keys_from_disk_with_no_backend_read() {
    if !common::have_s3() {
        return;
    }
    let disk = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("disk-warm");
    let a = replica(&prefix, Some(disk.path()), &window(LONG_WINDOW_MS)).await;
    let mut c = a.client().await;
    for i in 0..20 {
        set(&mut c, &format!("k{i}"), &format!("value-{i}")).await;
    }
    stop(a).await;
    let a = replica(&prefix, Some(disk.path()), &window(LONG_WINDOW_MS)).await;
    let mut c = a.client().await;
    for i in 0..20 {
        let got = c.get_value(&format!("k{i}")).await;
        assert_eq!(got, Some(format!("value-{i}")));
    }
    assert_eq!(
        item_reads(&mut c).await,
        (0, 0),
        "every get served from disk"
    );
    assert_eq!(c.stat("tier_disk_hits").await, 20);
    assert_eq!(c.stat("get_hits").await, 20);
    // Now in RAM: no more disk lookups.
    assert_eq!(c.get_value("k3").await.as_deref(), Some("value-3"));
    assert_eq!(c.stat("tier_disk_hits").await, 20);
    // A key the disk never held: one disk miss and one backend read.
    assert_eq!(c.get_value("absent").await, None);
    assert_eq!(c.stat("tier_disk_misses").await, 1);
    assert_eq!(item_reads(&mut c).await, (1, 0));
    stop(a).await;
}

#[tokio::test]
async fn after_the_window_a_disk_record_is_revalidated_and_another_replicas_write_is_seen() {
    if !common::have_s3() {
        return;
    }
    let disk = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("disk-reval");
    let short = window(300);
    let a = replica(&prefix, Some(disk.path()), &short).await;
    let mut c = a.client().await;
    set(&mut c, "same", "unchanged").await;
    set(&mut c, "moved", "before").await;
    stop(a).await;
    // Another replica writes while this one is down.
    let b = replica(&prefix, None, &short).await;
    let mut cb = b.client().await;
    set(&mut cb, "moved", "after").await;
    // The records are older than the window by the time the replica is back.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let a = replica(&prefix, Some(disk.path()), &short).await;
    let mut c = a.client().await;
    assert_eq!(c.get_value("same").await.as_deref(), Some("unchanged"));
    assert_eq!(c.get_value("moved").await.as_deref(), Some("after"));
    assert_eq!(
        item_reads(&mut c).await,
        (0, 2),
        "two conditional reads, no plain ones"
    );
    assert_eq!(c.stat("tier_revalidated_unchanged").await, 1);
    stop(a).await;
    stop(b).await;
}

#[tokio::test]
async fn nothing_deleted_or_flushed_before_a_restart_is_served_after_it() {
    if !common::have_s3() {
        return;
    }
    let disk = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("disk-flush");
    let long = window(LONG_WINDOW_MS);
    let a = replica(&prefix, Some(disk.path()), &long).await;
    let mut c = a.client().await;
    set(&mut c, "deleted", "x").await;
    c.roundtrip(b"delete deleted\r\n", b"DELETED\r\n").await;
    set(&mut c, "flushed-here", "x").await;
    c.roundtrip(b"flush_all\r\n", b"OK\r\n").await;
    set(&mut c, "flushed-elsewhere", "x").await;
    stop(a).await;
    // Another replica flushes while this one is down.
    let b = replica(&prefix, None, &long).await;
    let mut cb = b.client().await;
    cb.roundtrip(b"flush_all\r\n", b"OK\r\n").await;
    stop(b).await;
    let a = replica(&prefix, Some(disk.path()), &long).await;
    let mut c = a.client().await;
    assert_eq!(c.get_value("deleted").await, None);
    assert_eq!(c.get_value("flushed-here").await, None);
    assert_eq!(c.get_value("flushed-elsewhere").await, None);
    set(&mut c, "after", "y").await;
    assert_eq!(c.get_value("after").await.as_deref(), Some("y"));
    stop(a).await;
}

/// Something done to a file's bytes.
type Damage = dyn Fn(&mut Vec<u8>);

/// Overwrites every file in `dir` with what `damage` makes of it.
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

#[tokio::test]
async fn damaged_disk_files_read_as_misses_and_the_store_answers() {
    if !common::have_s3() {
        return;
    }
    let flips = |b: &mut Vec<u8>| {
        for at in (64..b.len()).step_by(256) {
            b[at] ^= 0xa5;
        }
    };
    // Cut inside the records (20 of 4 KiB each at the start of a block of about 1 MiB).
    let truncate = |b: &mut Vec<u8>| b.truncate(b.len() / 64);
    let damages: [&Damage; 2] = [&flips, &truncate];
    for damage in damages {
        let disk = tempfile::tempdir().unwrap();
        let prefix = unique_prefix("disk-damage");
        let long = window(LONG_WINDOW_MS);
        let a = replica(&prefix, Some(disk.path()), &long).await;
        let mut c = a.client().await;
        for i in 0..20 {
            set(&mut c, &format!("k{i}"), &format!("{i}").repeat(3000)).await;
        }
        stop(a).await;
        damage_files(disk.path(), damage);
        let a = replica(&prefix, Some(disk.path()), &long).await;
        let mut c = a.client().await;
        for i in 0..20 {
            let got = c.get_value(&format!("k{i}")).await;
            assert_eq!(got, Some(format!("{i}").repeat(3000)), "k{i}");
        }
        let (gets, _) = item_reads(&mut c).await;
        assert!(gets >= 1, "damaged records were read from the store");
        stop(a).await;
    }
}

/// Bytes the files in `dir` take on disk.
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

#[tokio::test]
async fn the_disk_tier_stays_within_its_bound_and_stats_show_it() {
    if !common::have_s3() {
        return;
    }
    let disk = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("disk-bound");
    let a = replica(&prefix, Some(disk.path()), &window(LONG_WINDOW_MS)).await;
    let mut c = a.client().await;
    // Three times the 16 MiB bound, in 48 KiB values.
    let value = "v".repeat(48 * 1024);
    for i in 0..1000 {
        set(&mut c, &format!("k{i}"), &value).await;
    }
    // The gauge is refreshed every second: wait for it to count the written blocks.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while c.stat("tier_disk_bytes").await < 8 * 1024 * 1024 {
        assert!(tokio::time::Instant::now() < deadline, "tier_disk_bytes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(a).await;
    let used = dir_bytes(disk.path());
    assert!(used <= 16 * 1024 * 1024 + 64 * 1024, "{used} bytes on disk");
}

#[tokio::test]
async fn the_disk_tier_is_off_by_default() {
    let config = s3cached::config::Config::from_toml("").unwrap();
    assert!(config.disk_tier().is_none());
    let server = TestServer::start(Backend::Dir, "disk-off", "").await;
    let mut c = server.client().await;
    set(&mut c, "k", "v").await;
    c.roundtrip(b"flush_all\r\n", b"OK\r\n").await;
    assert_eq!(c.get_value("k").await, None);
    assert_eq!(c.stat("tier_disk_misses").await, 0);
    assert_eq!(c.stat("tier_disk_bytes").await, 0);
    assert!(!server.app.ctx.store.has_disk());
}
