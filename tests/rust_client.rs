//! A Rust memcached client crate (`memcache`) against s3cached on the directory store and on
//! S3, over the text protocol and over its default, the binary protocol (with a SASL login).

mod common;

use common::{Backend, TestServer};

fn exercise(url: String) {
    let client = memcache::Client::connect(url).expect("connect");
    client.flush().unwrap();
    client.set("k", "v", 0).unwrap();
    assert_eq!(client.get::<String>("k").unwrap().as_deref(), Some("v"));
    // Over text the crate does not report NOT_STORED for add (binary: an error); the value
    // must stay either way.
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

/// The crate's default protocol is binary; with users set, it logs in with SASL PLAIN.
async fn run_binary(backend: Backend) {
    let users = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(users.path(), "rust:cl1ent-pass\n").unwrap();
    let extra = format!(
        "sasl_users_file = {:?}\n",
        users.path().display().to_string()
    );
    let server = TestServer::start(backend, "rustbinary", &extra).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        exercise(format!("memcache://rust:cl1ent-pass@{addr}?timeout=20"));
        let wrong = memcache::Client::connect(format!("memcache://rust:nope@{addr}?timeout=20"));
        assert!(wrong.is_err(), "a wrong password must be refused");
        let anonymous = memcache::Client::connect(format!("memcache://{addr}?timeout=20")).unwrap();
        assert!(anonymous.get::<String>("k").is_err(), "no login, no data");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn memcache_crate_binary_with_sasl_on_dir() {
    run_binary(Backend::Dir).await;
}

#[tokio::test]
async fn memcache_crate_binary_with_sasl_on_s3() {
    run_binary(Backend::S3).await;
}
