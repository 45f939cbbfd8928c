//! The binary: bad configs stop it before any port is bound, `--check-config` prints TOML
//! that reads back the same (without secrets), `check` tells whether a server works (with
//! plain logs when its output is piped), a client over the connection cap is told at once,
//! and refused protocols cannot flood the log.
#![allow(
    clippy::disallowed_types,
    reason = "these tests run the binary, in wall-clock time"
)]

mod common;

use std::process::Command;

fn s3cached() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_s3cached"));
    for (key, _) in std::env::vars() {
        if key.starts_with("S3CACHED_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

#[test]
fn an_invalid_config_exits_with_a_clear_message() {
    let out = s3cached()
        .args(["--listen", "not-an-address"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid configuration") && err.contains("listen"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "max_entreis = 5\n").unwrap();
    let out = s3cached().arg("--config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_entreis"));
}

#[test]
fn check_config_merges_layers_and_hides_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "max_entries = 10\ncull_frequency = 4\nsecret_access_key = \"hunter2\"\naccess_key_id = \"AKIAEXAMPLE\"\n").unwrap();
    let out = s3cached()
        .arg("--config")
        .arg(&file)
        .args(["--check-config", "--max-entries", "20"])
        .env("S3CACHED_CULL_FREQUENCY", "5")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\nmax_entries = 20\n"), "{text}");
    assert!(text.contains("\ncull_frequency = 5\n"), "{text}");
    assert!(text.contains("\n# secret_access_key = <redacted: set>\n"));
    assert!(!text.contains("hunter2") && !text.contains("AKIAEXAMPLE"));
}

#[test]
fn check_config_prints_typed_toml_that_reads_back_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "max_entries = 10\nlocation = \"a \\\"quoted\\\" \\\\ prefix\"\naccess_key_id = \"AKIAEXAMPLE\"\nsecret_access_key = \"hunter2\"\n",
    )
    .unwrap();
    let first = s3cached()
        .arg("--config")
        .arg(&file)
        .args(["--check-config", "--flush-enabled", "false"])
        .args(["--data-dir", "/var/lib/s3cached data"])
        .env("S3CACHED_MAX_CONNECTIONS", "77")
        .output()
        .unwrap();
    assert!(first.status.success());
    let printed = String::from_utf8(first.stdout).unwrap();
    for line in [
        "max_connections = 77\n",
        "max_entries = 10\n",
        "flush_enabled = false\n",
        "is_gzipped = false\n",
        "listen = \"127.0.0.1:11211\"\n",
        "# access_key_id = <redacted: set>\n",
        "# secret_access_key = <redacted: set>\n",
    ] {
        assert!(printed.contains(line), "{line:?} missing from:\n{printed}");
    }
    assert!(!printed.contains("hunter2") && !printed.contains("AKIAEXAMPLE"));

    // The printed text is a config file; without the (redacted) secrets it resolves the same.
    let again = dir.path().join("printed.toml");
    std::fs::write(&again, &printed).unwrap();
    let second = s3cached()
        .arg("--config")
        .arg(&again)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let reprinted = String::from_utf8(second.stdout).unwrap();
    let unset = |s: &str| s.replace("<redacted: set>", "<redacted: unset>");
    assert_eq!(reprinted, unset(&printed));
    assert!(reprinted.contains("# secret_access_key = <redacted: unset>\n"));
}

/// A server binary on a free loopback port, killed when dropped.
struct Server {
    child: std::process::Child,
    addr: String,
    /// Every line of its log, read on a thread so the pipe never fills.
    log: std::sync::mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut child = s3cached()
            .args([
                "--listen",
                "127.0.0.1:0",
                "--max-entries",
                "0",
                "--data-dir",
            ])
            .arg(dir.path())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let mut server = Server {
            child,
            addr: String::new(),
            log,
            _dir: dir,
        };
        let line = server.wait_for_log("s3cached listening");
        assert!(
            !line.contains('\x1b'),
            "colour codes in a piped log: {line:?}"
        );
        let addr = line
            .split("addr=")
            .nth(1)
            .expect("addr in the listening line");
        server.addr = addr.split_whitespace().next().unwrap().to_owned();
        server
    }

    /// The first log line containing `text`, within 20 seconds.
    fn wait_for_log(&self, text: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self.log.recv_timeout(left).unwrap_or_else(|e| {
                panic!("no log line with {text:?}: {e}");
            });
            if line.contains(text) {
                return line;
            }
        }
    }

    /// Stops the server and returns the log lines not yet read.
    fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log.iter().collect()
    }

    fn check(&self, extra: &[&str]) -> std::process::Output {
        s3cached()
            .args(["check", "--addr", &self.addr])
            .args(extra)
            .output()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn check_passes_against_a_running_server_and_fails_without_one() {
    let server = Server::start(&[]);
    let out = server.check(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ok: connected to"), "{text}");
    assert!(
        text.contains("ok: set, get and delete of s3cached-check-"),
        "{text}"
    );
    assert!(text.contains("stat backend dir\n"), "{text}");
    assert!(text.contains("stat curr_connections 1\n"), "{text}");

    // Without --addr, check reaches the configured listen address; 0.0.0.0 means loopback.
    let port = server.addr.rsplit(':').next().unwrap();
    let out = s3cached()
        .args(["check", "--version-only"])
        .env("S3CACHED_LISTEN", format!("0.0.0.0:{port}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("VERSION") || text.contains("version 1.6"),
        "{text}"
    );

    let addr = server.addr.clone();
    drop(server);
    // Held but not listening, so the check is refused, not answered by whoever takes the
    // port next (nor by a connection to itself).
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.set_reuseaddr(true).unwrap(); // past the closed connections' TIME_WAIT
    held.bind(addr.parse().unwrap())
        .expect("the stopped server's port is free");
    let out = s3cached()
        .args(["check", "--addr", &addr, "--timeout-ms", "2000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FAILED at connect") && err.contains(&addr),
        "{err}"
    );
}

#[test]
fn over_the_connection_cap_a_client_is_told_and_closed() {
    use std::io::{Read, Write};
    let server = Server::start(&["--max-connections", "1"]);
    let mut held = std::net::TcpStream::connect(&server.addr).unwrap();
    held.write_all(b"version\r\n").unwrap();
    let mut reply = [0u8; 64];
    let n = held.read(&mut reply).unwrap();
    assert!(reply[..n].starts_with(b"VERSION "));

    let mut refused = std::net::TcpStream::connect(&server.addr).unwrap();
    refused
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    refused.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"ERROR Too many open connections\r\n");

    let out = server.check(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Too many open connections"), "{err}");

    held.write_all(b"stats\r\n").unwrap();
    let mut stats = Vec::new();
    while !stats.ends_with(b"END\r\n") {
        let n = held.read(&mut reply).unwrap();
        assert!(n > 0, "closed before END");
        stats.extend_from_slice(&reply[..n]);
    }
    let stats = String::from_utf8_lossy(&stats);
    assert!(stats.contains("STAT rejected_connections 2\r\n"), "{stats}");
    assert!(stats.contains("STAT curr_connections 1\r\n"), "{stats}");
}

#[test]
fn refused_protocols_log_at_most_one_line_a_second() {
    use std::io::{Read, Write};
    let server = Server::start(&[]);
    let begun = std::time::Instant::now();
    for _ in 0..20 {
        let mut http = std::net::TcpStream::connect(&server.addr).unwrap();
        http.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let _ = http.read_to_end(&mut Vec::new()); // until the server hangs up
    }
    let secs = begun.elapsed().as_secs() as usize;
    let lines: Vec<String> = server
        .stop()
        .into_iter()
        .filter(|l| l.contains("closing connection"))
        .collect();
    assert!(!lines.is_empty(), "the first refusal is logged");
    assert!(lines[0].contains("suppressed=0"), "{}", lines[0]);
    assert!(
        lines.len() <= secs + 1,
        "{} lines in {secs} s: {lines:#?}",
        lines.len()
    );
}

#[test]
fn the_access_key_id_never_reaches_the_log_even_at_trace_level() {
    let Some(endpoint) = common::s3::endpoint() else {
        return; // said why on stderr
    };
    const KEY_ID: &str = "AKIALOGLEAKCHECK0001";
    let prefix = common::unique_prefix("log-leak");
    let server = Server::start(&[
        "--storage-bucket-name",
        common::TEST_BUCKET,
        "--create-bucket",
        "true",
        "--endpoint-url",
        endpoint,
        "--force-path-style",
        "true",
        "--region",
        "us-east-1",
        "--access-key-id",
        KEY_ID,
        "--secret-access-key",
        "test",
        "--location",
        &prefix,
        "--log-level",
        "trace",
    ]);
    // A round trip through S3: signed requests, resolved credentials, all logged at trace.
    let out = server.check(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = server.stop();
    assert!(
        log.iter().any(|l| l.contains("PutObject")),
        "the S3 requests were logged at all"
    );
    let leaked: Vec<&String> = log.iter().filter(|l| l.contains(KEY_ID)).collect();
    let first: Option<String> = leaked.first().map(|l| l.chars().take(160).collect());
    assert!(
        leaked.is_empty(),
        "{} lines hold the key id, as: {first:?}",
        leaked.len()
    );
}
