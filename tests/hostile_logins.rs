//! Hostile clients at the door, round two: password guessing over many connections of one
//! address in both protocols, and silent sockets re-opened against a TLS port, each against
//! a server on 127.0.0.1:0 over the directory store.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, TestServer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use s3cached::sasl::{AUTH_FAILURES_PER_SEC_PER_CLIENT, AUTH_FAILURE_BURST_PER_CLIENT};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_rustls::TlsConnector;

/// Connections each guessing at once, all from 127.0.0.1.
const GUESSERS: usize = 16;
/// The text protocol's answer to a failed login.
const TEXT_FAILURE: &[u8] = b"CLIENT_ERROR authentication failure\r\n";
/// The binary protocol's "auth error" status.
const AUTH_ERROR: u16 = 0x20;

/// A server with the user alice (password "secret") and memcached's text logins on; the
/// directory that holds the users file.
async fn server_with_logins(name: &str) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(&users, "alice:secret\n").unwrap();
    let extra = format!("sasl_users_file = {:?}\ntext_auth = true\n", users);
    (TestServer::start(Backend::Dir, name, &extra).await, dir)
}

/// The protocol a guesser speaks.
#[derive(Debug, Clone, Copy)]
enum Protocol {
    Text,
    Binary,
}

/// A text login: memcached's `set` whose data is `user password`.
fn text_login(password: &str) -> Vec<u8> {
    let data = format!("alice {password}");
    format!("set auth 0 0 {}\r\n{data}\r\n", data.len()).into_bytes()
}

/// A binary SASL_AUTH frame: PLAIN, for alice.
fn sasl_auth(password: &str) -> Vec<u8> {
    let (mechanism, value) = (b"PLAIN", format!("\0alice\0{password}"));
    let mut frame = vec![0u8; 24];
    frame[0] = 0x80;
    frame[1] = 0x21;
    frame[2..4].copy_from_slice(&(mechanism.len() as u16).to_be_bytes());
    let body = (mechanism.len() + value.len()) as u32;
    frame[8..12].copy_from_slice(&body.to_be_bytes());
    frame.extend_from_slice(mechanism);
    frame.extend_from_slice(value.as_bytes());
    frame
}

/// Reads the answer to one login: its status (0 for a success, [`AUTH_ERROR`] for a binary
/// failure, 1 for a text failure), or `None` when the server closed the connection.
async fn answer(stream: &mut TcpStream, protocol: Protocol) -> Option<u16> {
    match protocol {
        Protocol::Binary => {
            let mut header = [0u8; 24];
            stream.read_exact(&mut header).await.ok()?;
            let body = u32::from_be_bytes(header[8..12].try_into().unwrap());
            let mut rest = vec![0u8; body as usize];
            stream.read_exact(&mut rest).await.ok()?;
            Some(u16::from_be_bytes([header[6], header[7]]))
        }
        Protocol::Text => {
            let mut line = Vec::new();
            while !line.ends_with(b"\r\n") {
                let mut byte = [0u8; 1];
                if stream.read(&mut byte).await.ok()? == 0 {
                    return None;
                }
                line.push(byte[0]);
            }
            match &line[..] {
                b"STORED\r\n" => Some(0),
                failure => {
                    assert_eq!(
                        failure,
                        TEXT_FAILURE,
                        "{}",
                        String::from_utf8_lossy(failure)
                    );
                    Some(1)
                }
            }
        }
    }
}

/// Guesses alice's password one login at a time, over one connection after another (the
/// server closes a connection after 8 failures), until `end`; returns how many failures
/// were answered by then.
async fn guess_until(addr: SocketAddr, protocol: Protocol, end: Instant) -> u32 {
    let mut answered = 0;
    let mut n = 0;
    while let Ok(Ok(mut stream)) = timeout_at(end, TcpStream::connect(addr)).await {
        loop {
            n += 1;
            let guess = format!("guess{n}");
            let login = match protocol {
                Protocol::Text => text_login(&guess),
                Protocol::Binary => sasl_auth(&guess),
            };
            if stream.write_all(&login).await.is_err() {
                break;
            }
            match timeout_at(end, answer(&mut stream, protocol)).await {
                Err(_) => return answered,
                Ok(None) => break,
                Ok(Some(status)) => {
                    assert!(status == AUTH_ERROR || status == 1, "status {status}");
                    answered += 1;
                }
            }
        }
    }
    answered
}

/// Runs [`GUESSERS`] guessers against `addr` for `secs` seconds; returns the failures
/// answered to all of them.
async fn guess_for(addr: SocketAddr, protocol: Protocol, secs: u32) -> u32 {
    let end = Instant::now() + Duration::from_secs(u64::from(secs));
    let guessers: Vec<_> = (0..GUESSERS)
        .map(|_| tokio::spawn(guess_until(addr, protocol, end)))
        .collect();
    let mut answered = 0;
    for guesser in guessers {
        answered += guesser.await.unwrap();
    }
    answered
}

/// The most failures one address may have answered in `secs` seconds, as documented.
fn documented_most(secs: u32) -> u32 {
    AUTH_FAILURE_BURST_PER_CLIENT + AUTH_FAILURES_PER_SEC_PER_CLIENT * secs + 1
}

/// Logs in as alice from `source` (another loopback address) over the binary protocol.
async fn binary_login_from(source: &str, server: SocketAddr) -> u16 {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(server).await.unwrap();
    stream.write_all(&sasl_auth("secret")).await.unwrap();
    let reply = tokio::time::timeout(
        Duration::from_secs(1),
        answer(&mut stream, Protocol::Binary),
    );
    reply
        .await
        .expect("answered within 1 s")
        .expect("an answer")
}

#[tokio::test]
async fn binary_guesses_over_many_connections_get_the_address_rate_of_answers() {
    let (server, _users) = server_with_logins("binary-guessing").await;
    let stats = server.app.ctx.stats.clone();
    let secs = 3;
    let answered = guess_for(server.addr, Protocol::Binary, secs).await;
    println!("{GUESSERS} binary connections: {answered} failures answered in {secs} s");
    assert!(answered <= documented_most(secs), "{answered} answered");
    assert!(
        answered >= AUTH_FAILURE_BURST_PER_CLIENT,
        "{answered} answered"
    );
    let throttled = stats.auth_throttled.load(Relaxed);
    let checked = stats.auth_cmds.load(Relaxed) - throttled;
    assert!(throttled > 0);
    assert!(
        checked <= u64::from(documented_most(secs)),
        "{checked} checked"
    );
    // Another address is not held back by this one's guessing.
    assert_eq!(binary_login_from("127.0.0.2", server.addr).await, 0);
}

#[tokio::test]
async fn text_guesses_pipelined_over_many_connections_are_checked_at_the_address_rate() {
    let (server, _users) = server_with_logins("text-pipelined").await;
    let stats = server.app.ctx.stats.clone();
    let started = Instant::now();
    // Each connection sends 8 guesses in one write, then reads until it is closed.
    let guessers: Vec<_> = (0..GUESSERS)
        .map(|_| {
            let addr = server.addr;
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let guesses: Vec<u8> = (0..8).flat_map(|n| text_login(&format!("g{n}"))).collect();
                stream.write_all(&guesses).await.unwrap();
                while answer(&mut stream, Protocol::Text).await.is_some() {}
            })
        })
        .collect();
    for guesser in guessers {
        tokio::time::timeout(Duration::from_secs(30), guesser)
            .await
            .expect("every guesser is closed")
            .unwrap();
    }
    let secs = started.elapsed().as_secs() as u32 + 1;
    let throttled = stats.auth_throttled.load(Relaxed);
    let checked = stats.auth_cmds.load(Relaxed) - throttled;
    println!("{GUESSERS} x 8 pipelined text guesses: {checked} checked, {throttled} throttled");
    assert!(
        checked <= u64::from(documented_most(secs)),
        "{checked} checked"
    );
    assert!(throttled > 0, "no guess was held back");
}

#[tokio::test]
async fn text_guesses_over_many_connections_get_the_address_rate_of_answers() {
    let (server, _users) = server_with_logins("text-guessing").await;
    let secs = 3;
    let answered = guess_for(server.addr, Protocol::Text, secs).await;
    println!("{GUESSERS} text connections: {answered} failures answered in {secs} s");
    assert!(answered <= documented_most(secs), "{answered} answered");
    assert!(
        answered >= AUTH_FAILURE_BURST_PER_CLIENT,
        "{answered} answered"
    );
}

/// A CA and a server certificate it signed (for localhost and 127.0.0.1), made by the
/// openssl command-line tool in a temporary directory; `None` (and a line on stderr)
/// when openssl is not installed.
fn server_certificates() -> Option<tempfile::TempDir> {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipped: the openssl command is not installed");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let openssl = |args: &str| {
        let out = Command::new("openssl")
            .args(args.split(' '))
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args}: {out:?}");
    };
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    openssl(&format!(
        "req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=test-CA"
    ));
    openssl(&format!(
        "req {ec} -keyout server.key -out server.csr -subj /CN=server"
    ));
    let ext = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
    std::fs::write(dir.path().join("server.ext"), ext).unwrap();
    openssl(
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
         -extfile server.ext -out server.pem",
    );
    Some(dir)
}

/// A TLS client that trusts the CA in `dir`.
fn tls_connector(dir: &Path) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// Reads one line (through `\r\n`).
async fn read_line(stream: &mut (impl AsyncRead + Unpin)) -> String {
    let mut line = Vec::new();
    while !line.ends_with(b"\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "closed early");
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Connects over TLS, asks `version` and returns the answer.
async fn tls_version(addr: SocketAddr, connector: &TlsConnector) -> String {
    let socket = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, socket).await.unwrap();
    stream.write_all(b"version\r\n").await.unwrap();
    read_line(&mut stream).await
}

/// Keeps a socket to `addr` open that never sends a byte, opening another soon after the
/// server closes it, until aborted.
async fn silent_socket(addr: SocketAddr) {
    loop {
        if let Ok(mut socket) = TcpStream::connect(addr).await {
            let mut buf = [0u8; 64];
            while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
        }
        // An attacker re-opens at once; a short pause spares the test machine.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `done` until it holds; fails after `limit`.
async fn eventually(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn silent_tls_sockets_reopened_past_the_pool_do_not_keep_a_client_out() {
    let Some(pki) = server_certificates() else {
        return;
    };
    let (cert, key) = (pki.path().join("server.pem"), pki.path().join("server.key"));
    let extra = format!(
        "tls_cert = {cert:?}\ntls_key = {key:?}\nmax_connections = 4\nmax_tls_handshakes = 16\n"
    );
    let server = TestServer::start(Backend::Dir, "silent-tls", &extra).await;
    let stats = server.app.ctx.stats.clone();
    // 64 silent sockets, against a pool of 16 handshakes and a cap of 4 connections.
    let silent: Vec<_> = (0..64)
        .map(|_| tokio::spawn(silent_socket(server.addr)))
        .collect();
    eventually(
        Duration::from_secs(30),
        "silent sockets to overflow the pool",
        || stats.tls_handshakes_dropped.load(Relaxed) >= 64,
    )
    .await;
    let connector = tls_connector(pki.path());
    for _ in 0..5 {
        let served =
            tokio::time::timeout(Duration::from_secs(1), tls_version(server.addr, &connector));
        let version = served.await.expect("a TLS client served within 1 s");
        assert_eq!(version, common::version_line());
    }
    assert!(stats.curr_connections.load(Relaxed) <= 4);
    assert_eq!(stats.rejected_connections.load(Relaxed), 0);
    for socket in silent {
        socket.abort();
    }
}
