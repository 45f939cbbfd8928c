//! The S3-compatible server the tests (and the benchmark) talk to: where it is, started on
//! demand; the options that point s3cached at it; a plain SDK client; an HTTP reader.
//!
//! Self-contained (std, tokio, the SDK, s3cached) so `benches/` can include it by path.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Environment variable naming the S3-compatible endpoint the tests use (tests/run sets it).
pub const S3_ENDPOINT_ENV: &str = "S3CACHED_TEST_S3_ENDPOINT";
/// The test bucket; created on first use.
pub const TEST_BUCKET: &str = "s3cached-test";
/// The local S3 server started when no endpoint is given.
const MOTO: &str = "moto (tests/s3server.py)";
/// How long a started moto may take to accept connections.
const MOTO_START_TIMEOUT: Duration = Duration::from_secs(60);

/// The S3 endpoint: `S3CACHED_TEST_S3_ENDPOINT`, else moto (tests/s3server.py) started for this test
/// binary (stopped when it exits), else `None`, with one line on stderr saying why the S3
/// tests are skipped.
pub fn endpoint() -> Option<&'static str> {
    static ENDPOINT: OnceLock<Option<String>> = OnceLock::new();
    ENDPOINT
        .get_or_init(|| {
            if let Ok(url) = std::env::var(S3_ENDPOINT_ENV) {
                return Some(url);
            }
            match start_moto() {
                Ok(url) => {
                    eprintln!("{S3_ENDPOINT_ENV} is unset: started {MOTO} at {url}");
                    Some(url)
                }
                Err(why) => {
                    eprintln!(
                        "skipping the S3 tests: {S3_ENDPOINT_ENV} is unset and {MOTO} {why} \
                         (install it: pip install 'moto[server]>=5.2.5', or run tests/run)"
                    );
                    None
                }
            }
        })
        .as_deref()
}

/// The S3 endpoint, for tests that have checked [`endpoint`] (or run only under tests/run).
pub fn s3_endpoint() -> String {
    endpoint()
        .unwrap_or_else(|| panic!("no S3 server: {S3_ENDPOINT_ENV} is unset and {MOTO} failed"))
        .to_owned()
}

/// Starts moto (tests/s3server.py) on a port the kernel picks, owned by a shell that kills
/// it when this process exits (the shell's stdin, our pipe, then closes); waits until moto
/// has written the port it holds to a file, so no port is probed before it is held.
#[allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "runs once, outside any runtime's time: before the first S3 test starts"
)]
fn start_moto() -> Result<String, String> {
    let dir = std::env::temp_dir().join(format!("s3cached-moto-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("has no state directory: {e}"))?;
    let port_file = dir.join("port");
    let _ = std::fs::remove_file(&port_file);
    let child = Command::new("sh")
        .args(["-c", r#"python3 -c 'import moto.server' 2>/dev/null || exit 127; python3 "$0" -H 127.0.0.1 -p 0 --port-file "$1" >/dev/null 2>&1 & read _; kill $!"#])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/s3server.py"))
        .arg(&port_file)
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not be started: {e}"))?;
    // Kept for the life of the process: its stdin pipe closes only when the process exits.
    static MOTO_SHELL: Mutex<Option<Child>> = Mutex::new(None);
    let child = MOTO_SHELL.lock().unwrap().insert(child).id();
    let deadline = std::time::Instant::now() + MOTO_START_TIMEOUT;
    loop {
        if let Ok(port) = std::fs::read_to_string(&port_file) {
            return Ok(format!("http://127.0.0.1:{}", port.trim()));
        }
        let mut shell = MOTO_SHELL.lock().unwrap();
        if let Some(status) = shell.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            return Err(match status.code() {
                Some(127) => "is not installed".to_owned(),
                _ => format!("exited at start ({status}, shell pid {child})"),
            });
        }
        drop(shell);
        if std::time::Instant::now() >= deadline {
            return Err(format!("wrote no port within {MOTO_START_TIMEOUT:?}"));
        }
        // Polled: the file is renamed into place whole, and nothing else can be waited on.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// s3cached's options, as `(key, value)`, for `bucket` at `endpoint` under `prefix`, with
/// moto's dummy credentials: rendered as TOML by [`s3_toml`], as environment by [`s3_env`].
pub fn s3_options(bucket: &str, endpoint: &str, prefix: &str) -> Vec<(&'static str, String)> {
    vec![
        ("storage_bucket_name", bucket.into()),
        ("endpoint_url", endpoint.into()),
        ("force_path_style", "true".into()),
        ("create_bucket", "true".into()),
        ("region", "us-east-1".into()),
        ("access_key_id", "test".into()),
        ("secret_access_key", "test".into()),
        ("location", prefix.into()),
    ]
}

/// [`s3_options`] as TOML lines (strings quoted, booleans bare).
pub fn s3_toml(bucket: &str, endpoint: &str, prefix: &str) -> String {
    s3_options(bucket, endpoint, prefix)
        .into_iter()
        .map(|(key, value)| match value.as_str() {
            "true" | "false" => format!("{key} = {value}\n"),
            _ => format!("{key} = {value:?}\n"),
        })
        .collect()
}

/// [`s3_options`] as environment variables, named by s3cached's option table.
pub fn s3_env(bucket: &str, endpoint: &str, prefix: &str) -> Vec<(&'static str, String)> {
    s3_options(bucket, endpoint, prefix)
        .into_iter()
        .map(|(key, value)| {
            let env = s3cached::config::KEYS
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, env)| *env)
                .expect("an option of the table");
            (env, value)
        })
        .collect()
}

/// A plain SDK client for `endpoint`, to look at objects behind s3cached's back.
pub fn sdk_client(endpoint: &str) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// Where an HTTP message's head ends (the index of its blank line), if it has arrived.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// Reads one HTTP/1.1 message (head and `Content-Length` body) from `stream`, keeping
/// what follows in `buf`; `None` at EOF.
pub async fn read_message(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Vec<u8>>> {
    loop {
        if let Some(end) = head_end(buf) {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            let total = end + 4 + len;
            if buf.len() >= total {
                return Ok(Some(buf.drain(..total).collect()));
            }
        }
        let mut chunk = [0u8; 65536];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
