//! A Rust memcached client crate (`memcache`, text protocol) against s3cached on the
//! directory store and on S3. (Binary-protocol refusal is in tests/transcripts.rs.)

mod common;

use common::{Backend, TestServer};

fn exercise(url: String) {
    let client = memcache::Client::connect(url).expect("connect");
    client.flush().unwrap();
    client.set("k", "v", 0).unwrap();
    assert_eq!(client.get::<String>("k").unwrap().as_deref(), Some("v"));
    // The crate does not report NOT_STORED for add; the value must stay.
    let _ = client.add("k", "other", 0);
    assert_eq!(client.get::<String>("k").unwrap().as_deref(), Some("v"));
    client.add("fresh", "a", 0).unwrap();
    client.replace("fresh", "b", 0).unwrap();
    client.append("fresh", "c").unwrap();
    client.prepend("fresh", "<").unwrap();
    assert_eq!(
        client.get::<String>("fresh").unwrap().as_deref(),
        Some("<bc")
    );
    client.set("n", 10u64, 0).unwrap();
    assert_eq!(client.increment("n", 5).unwrap(), 15);
    assert_eq!(client.decrement("n", 20).unwrap(), 0);
    let binary: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    client.set("bin", &binary[..], 0).unwrap();
    assert_eq!(client.get::<Vec<u8>>("bin").unwrap(), Some(binary));
    let many = client.gets::<String>(&["k", "fresh", "absent"]).unwrap();
    assert_eq!(many.len(), 2);
    assert!(client.touch("k", 100).unwrap());
    assert!(!client.touch("absent", 100).unwrap());
    assert!(client.delete("k").unwrap());
    assert!(!client.delete("k").unwrap());
    assert!(client.get::<String>("k").unwrap().is_none());
    // A TTL of 1 may expire at once (memcached says so too): 2 lives at least a second.
    client.set("ttl", "x", 2).unwrap();
    assert_eq!(client.get::<String>("ttl").unwrap().as_deref(), Some("x"));
    let version = client.version().unwrap();
    assert!(version[0].1.starts_with("1.6"), "{version:?}");
}

async fn run(backend: Backend) {
    let server = TestServer::start(backend, "rustclient", "").await;
    let url = format!("memcache://{}?protocol=ascii&timeout=20", server.addr);
    tokio::task::spawn_blocking(move || exercise(url))
        .await
        .unwrap();
}

#[tokio::test]
async fn memcache_crate_on_dir() {
    run(Backend::Dir).await;
}

#[tokio::test]
async fn memcache_crate_on_s3() {
    if !common::have_s3() {
        return;
    }
    run(Backend::S3).await;
}
