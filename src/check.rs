//! `s3cached check`: a small memcached client that tells whether a running server works.
//!
//! It asks for `version`, sets, reads back and deletes a key of its own, and prints a few
//! `stats` lines; any wrong answer, refusal or timeout is an error with the step that failed.
//! With `--read-addr`, the key is read back and deleted through a second server (another
//! replica on the same bucket), which checks that replicas share their items.
//! Only the Rust standard library and tokio are needed, so it serves as a first check on a
//! fresh machine and as a container health check.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Default deadline for the whole check, in milliseconds.
pub const DEFAULT_CHECK_TIMEOUT_MS: u64 = 5000;
/// Most bytes the check reads from the server in all.
pub const MAX_REPLY_BYTES: u64 = 1024 * 1024;
/// How long the round-trip item lives if the check cannot delete it, in seconds.
pub const CHECK_ITEM_TTL_SECS: u32 = 60;
/// The `stats` lines the check prints, when the server has them.
pub const SUMMARY_STATS: &[&str] = &[
    "version",
    "uptime",
    "backend",
    "curr_connections",
    "total_connections",
    "rejected_connections",
    "curr_items",
    "get_hits",
    "get_misses",
    "backend_errors",
];

/// Options of `s3cached check`.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// Server to check, host:port (default: the configured listen address, with 0.0.0.0
    /// and [::] read as loopback).
    #[arg(long)]
    pub addr: Option<String>,
    /// Deadline for the whole check, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_CHECK_TIMEOUT_MS)]
    pub timeout_ms: u64,
    /// Ask only for `version`: a liveness probe that does not touch the store.
    #[arg(long)]
    pub version_only: bool,
    /// Read the key back and delete it through this server instead, host:port: another
    /// replica on the same bucket and prefix.
    #[arg(long)]
    pub read_addr: Option<String>,
}

/// Why a check failed: the step and what went wrong.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {reason}")]
pub struct CheckError {
    pub step: &'static str,
    pub reason: String,
}

fn fail<T>(step: &'static str, reason: impl std::fmt::Display) -> Result<T, CheckError> {
    Err(CheckError {
        step,
        reason: reason.to_string(),
    })
}

/// The address a server listening on `listen` is reached at from this host.
pub fn reachable(listen: SocketAddr) -> SocketAddr {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

/// Runs the check against `addr`, writing one line per step to `out`.
pub async fn run(
    addr: &str,
    args: &CheckArgs,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), CheckError> {
    let deadline = Instant::now() + Duration::from_millis(args.timeout_ms);
    let started = Instant::now();
    let mut client = Client::connect(addr, deadline).await?;
    let version = client.version().await?;
    let _ = writeln!(out, "ok: connected to {addr}, {version}");
    if args.version_only {
        return Ok(());
    }
    match &args.read_addr {
        Some(other) => {
            let mut replica = Client::connect(other, deadline).await?;
            let version = replica.version().await?;
            let _ = writeln!(out, "ok: connected to {other}, {version}");
            let key = client.set_unique(out).await?;
            replica.read_back(&key, out, other).await?;
        }
        None => {
            let key = client.set_unique(out).await?;
            client.read_back(&key, out, addr).await?;
        }
    }
    let stats = client.stats().await?;
    for (name, value) in stats
        .iter()
        .filter(|(name, _)| SUMMARY_STATS.contains(&name.as_str()))
    {
        let _ = writeln!(out, "stat {name} {value}");
    }
    let _ = writeln!(
        out,
        "ok: s3cached at {addr} works ({} ms)",
        started.elapsed().as_millis()
    );
    Ok(())
}

type Reader = BufReader<tokio::io::Take<tokio::net::tcp::OwnedReadHalf>>;

/// One connection to the server, every read and write under the check's deadline.
struct Client {
    reader: Reader,
    writer: tokio::net::tcp::OwnedWriteHalf,
    deadline: Instant,
}

impl Client {
    async fn connect(addr: &str, deadline: Instant) -> Result<Client, CheckError> {
        let connect = TcpStream::connect(addr);
        let stream = match tokio::time::timeout_at(deadline, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return fail("connect", format!("cannot connect to {addr}: {e}")),
            Err(_) => return fail("connect", format!("no connection to {addr} in time")),
        };
        let _ = stream.set_nodelay(true);
        Ok(Client::new(stream, deadline))
    }

    fn new(stream: TcpStream, deadline: Instant) -> Self {
        let (read, writer) = stream.into_split();
        Client {
            reader: BufReader::new(read.take(MAX_REPLY_BYTES)),
            writer,
            deadline,
        }
    }

    async fn send(&mut self, step: &'static str, bytes: &[u8]) -> Result<(), CheckError> {
        match tokio::time::timeout_at(self.deadline, self.writer.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => fail(step, format!("cannot send: {e}")),
            Err(_) => fail(step, "timed out sending"),
        }
    }

    /// One reply line without its CRLF.
    async fn line(&mut self, step: &'static str) -> Result<String, CheckError> {
        let mut line = Vec::new();
        match tokio::time::timeout_at(self.deadline, self.reader.read_until(b'\n', &mut line)).await
        {
            Ok(Ok(0)) => fail(step, "the server closed the connection"),
            Ok(Ok(_)) if !line.ends_with(b"\r\n") => fail(step, "reply cut short"),
            Ok(Ok(_)) => {
                line.truncate(line.len() - 2);
                Ok(String::from_utf8_lossy(&line).into_owned())
            }
            Ok(Err(e)) => fail(step, format!("cannot read the reply: {e}")),
            Err(_) => fail(step, "no reply in time"),
        }
    }

    /// Sends `request` and expects the one-line reply `want`.
    async fn expect(
        &mut self,
        step: &'static str,
        request: &[u8],
        want: &str,
    ) -> Result<(), CheckError> {
        self.send(step, request).await?;
        let got = self.line(step).await?;
        if got != want {
            return fail(step, format!("expected {want}, got {got:?}"));
        }
        Ok(())
    }

    async fn version(&mut self) -> Result<String, CheckError> {
        self.send("version", b"version\r\n").await?;
        let line = self.line("version").await?;
        match line.strip_prefix("VERSION ") {
            Some(v) => Ok(format!("version {v}")),
            None => fail("version", format!("expected VERSION, got {line:?}")),
        }
    }

    /// Sets a unique key whose value is `check <key>`; returns the key.
    async fn set_unique(
        &mut self,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<String, CheckError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let key = format!("s3cached-check-{}-{nanos}", std::process::id());
        let value = format!("check {key}");
        let set = format!(
            "set {key} 0 {CHECK_ITEM_TTL_SECS} {}\r\n{value}\r\n",
            value.len()
        );
        self.expect("set", set.as_bytes(), "STORED").await?;
        let _ = writeln!(out, "ok: set {key}");
        Ok(key)
    }

    /// Reads back the key [`set_unique`](Self::set_unique) set, then deletes it.
    async fn read_back(
        &mut self,
        key: &str,
        out: &mut (dyn std::io::Write + Send),
        addr: &str,
    ) -> Result<(), CheckError> {
        let value = format!("check {key}");
        self.send("get", format!("get {key}\r\n").as_bytes())
            .await?;
        let header = self.line("get").await?;
        if header != format!("VALUE {key} 0 {}", value.len()) {
            return fail(
                "get",
                format!("expected the value just set, got {header:?}"),
            );
        }
        let body = self.line("get").await?;
        if body != value {
            return fail("get", format!("read back {body:?}, set {value:?}"));
        }
        let end = self.line("get").await?;
        if end != "END" {
            return fail("get", format!("expected END, got {end:?}"));
        }
        self.expect("delete", format!("delete {key}\r\n").as_bytes(), "DELETED")
            .await?;
        let _ = writeln!(
            out,
            "ok: set, get and delete of {key} (read through {addr})"
        );
        Ok(())
    }

    /// The general `stats`, as name and value.
    async fn stats(&mut self) -> Result<Vec<(String, String)>, CheckError> {
        self.send("stats", b"stats\r\n").await?;
        let mut rows = Vec::new();
        loop {
            let line = self.line("stats").await?;
            if line == "END" {
                return Ok(rows);
            }
            let mut parts = line.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("STAT"), Some(name), Some(value)) => {
                    rows.push((name.to_owned(), value.to_owned()))
                }
                _ => return fail("stats", format!("expected STAT or END, got {line:?}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn args(timeout_ms: u64) -> CheckArgs {
        CheckArgs {
            addr: None,
            timeout_ms,
            version_only: false,
            read_addr: None,
        }
    }

    /// A fake server that answers every request with `reply` and never closes.
    async fn fake(reply: &'static [u8]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            while let Ok(n) = socket.read(&mut buf).await {
                if n == 0 || socket.write_all(reply).await.is_err() {
                    return;
                }
            }
        });
        addr
    }

    #[test]
    fn unspecified_addresses_are_reached_on_loopback() {
        let v4: SocketAddr = "0.0.0.0:11211".parse().unwrap();
        assert_eq!(reachable(v4), "127.0.0.1:11211".parse().unwrap());
        let v6: SocketAddr = "[::]:11211".parse().unwrap();
        assert_eq!(reachable(v6), "[::1]:11211".parse().unwrap());
        let given: SocketAddr = "10.0.0.5:11211".parse().unwrap();
        assert_eq!(reachable(given), given);
    }

    #[tokio::test]
    async fn a_wrong_answer_names_the_step() {
        let addr = fake(b"ERROR\r\n").await;
        let err = run(&addr, &args(5000), &mut Vec::new()).await.unwrap_err();
        assert_eq!(err.step, "version");
        assert!(err.reason.contains("ERROR"), "{err}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let err = run(&addr, &args(200), &mut Vec::new()).await.unwrap_err();
        assert_eq!(err.step, "version");
        assert!(err.reason.contains("in time"), "{err}");
        drop(listener);
    }

    #[tokio::test]
    async fn a_refused_connection_fails_at_connect() {
        // A port bound but not listening: held, so nobody else takes it, and refused.
        let held = tokio::net::TcpSocket::new_v4().unwrap();
        held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = held.local_addr().unwrap().to_string();
        let err = run(&addr, &args(2000), &mut Vec::new()).await.unwrap_err();
        assert_eq!(err.step, "connect");
    }

    #[tokio::test]
    async fn a_wrong_reply_to_set_fails_at_set() {
        // The fake answers every line with VERSION: right for `version`, wrong for `set`.
        let addr = fake(b"VERSION 1.6.18\r\n").await;
        let err = run(&addr, &args(2000), &mut Vec::new()).await.unwrap_err();
        assert_eq!(err.step, "set");
    }
}
