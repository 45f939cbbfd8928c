//! SASL PLAIN authentication against a users file of `user:password` lines (memcached's `-Y`).
//!
//! Passwords live only in memory, are compared in constant time and never logged. Failed
//! attempts are counted (`auth_errors`) and each is answered only after a pause of
//! [`AUTH_FAILURE_DELAY_MS`]; across connections, each client address is limited by
//! [`FailedLogins`] (attempts past its limit are answered unchecked: `auth_throttled`).

mod limit;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

pub use limit::{
    ClientKey, FailedLogins, Turn, AUTH_FAILURES_PER_SEC_PER_CLIENT, AUTH_FAILURE_BURST_PER_CLIENT,
    AUTH_FAILURE_QUEUE_PER_CLIENT, MAX_TRACKED_CLIENTS,
};

use crate::stats::Stats;
use crate::throttle::LogThrottle;

/// The one mechanism offered.
pub const MECHANISMS: &str = "PLAIN";
/// Pause before answering a failed attempt, in milliseconds.
pub const AUTH_FAILURE_DELAY_MS: u64 = 250;
/// Failed attempts one connection may make before it is closed.
pub const MAX_AUTH_FAILURES_PER_CONNECTION: u32 = 8;

/// Log lines about failed logins: at most one a second.
static FAILED_LOGINS: LogThrottle = LogThrottle::new(Duration::from_secs(1));

/// The users allowed in, each with a password.
#[derive(Clone, PartialEq, Eq)]
pub struct Users {
    passwords: HashMap<Vec<u8>, Vec<u8>>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Users({} users, passwords redacted)",
            self.passwords.len()
        )
    }
}

impl Users {
    /// Reads a users file; the error names the line, never its content.
    pub fn load(path: &Path) -> Result<Users, String> {
        let text = crate::files::read_regular(path)
            .map_err(|e| format!("sasl_users_file {}: {e}", path.display()))?;
        Users::parse(&text).map_err(|e| format!("sasl_users_file {}: {e}", path.display()))
    }

    /// Parses `user:password` lines; blank lines and `#` comments are skipped.
    pub fn parse(text: &[u8]) -> Result<Users, String> {
        let mut passwords = HashMap::new();
        for (n, line) in text.split(|&b| b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() || line.starts_with(b"#") {
                continue;
            }
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return Err(format!("line {} is not user:password", n + 1));
            };
            let (user, password) = (&line[..colon], &line[colon + 1..]);
            if user.is_empty() || password.is_empty() {
                return Err(format!("line {} has an empty user or password", n + 1));
            }
            passwords.insert(user.to_vec(), password.to_vec());
        }
        if passwords.is_empty() {
            return Err("no users".into());
        }
        Ok(Users { passwords })
    }

    /// Whether `user` exists and `password` is its password.
    pub fn check(&self, user: &[u8], password: &[u8]) -> bool {
        match self.passwords.get(user) {
            Some(want) => constant_time_eq(want, password),
            None => {
                // Spend the same work on an unknown user.
                let _ = constant_time_eq(password, password);
                false
            }
        }
    }

    /// Checks a SASL PLAIN message: `[authzid] NUL authcid NUL password`.
    pub fn check_plain(&self, message: &[u8]) -> bool {
        let mut parts = message.split(|&b| b == 0);
        let (Some(_authzid), Some(user), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        self.check(user, password)
    }

    /// Checks memcached's text-protocol login: the data of a `set` is `user password`.
    pub fn check_text(&self, data: &[u8]) -> bool {
        let data = data.strip_suffix(b"\r\n").unwrap_or(data);
        let Some(space) = data.iter().position(|&b| b == b' ') else {
            return false;
        };
        self.check(&data[..space], &data[space + 1..])
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// How a login attempt ended, as `stats` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The credentials were right.
    Accepted,
    /// The credentials were checked and wrong.
    Refused,
    /// The client's address was over its limit: refused without a check.
    Throttled,
}

/// Records a login attempt in `stats` (the caller waits before answering a failure).
/// Returns whether the connection may go on (false after too many failures).
pub fn record(stats: &Stats, attempt: Attempt, failures: &mut u32) -> bool {
    Stats::incr(&stats.auth_cmds);
    if attempt == Attempt::Accepted {
        return true;
    }
    Stats::incr(&stats.auth_errors);
    if attempt == Attempt::Throttled {
        Stats::incr(&stats.auth_throttled);
    }
    *failures += 1;
    if let Some(suppressed) = FAILED_LOGINS.allow() {
        tracing::info!(
            suppressed,
            throttled = attempt == Attempt::Throttled,
            "authentication failed"
        );
    }
    *failures < MAX_AUTH_FAILURES_PER_CONNECTION
}

/// The pause before a failed attempt is answered.
pub fn failure_delay() -> Duration {
    Duration::from_millis(AUTH_FAILURE_DELAY_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let u = Users::parse(b"# comment\nalice:secret\r\n\nbob:p:w\n").unwrap();
        assert!(u.check(b"alice", b"secret"));
        assert!(u.check(b"bob", b"p:w"));
        assert!(!u.check(b"alice", b"secreT"));
        assert!(!u.check(b"alice", b"secret2"));
        assert!(!u.check(b"carol", b"secret"));
        assert!(u.check_plain(b"\0alice\0secret"));
        assert!(u.check_plain(b"alice\0alice\0secret"));
        assert!(!u.check_plain(b"alice\0secret"));
        assert!(!u.check_plain(b"\0alice\0secret\0"));
        assert!(u.check_text(b"alice secret\r\n"));
        assert!(!u.check_text(b"alice bad"));
    }

    #[test]
    fn rejects_bad_files_without_echoing_them() {
        let e = Users::parse(b"alice=hunter2\n").unwrap_err();
        assert!(e.contains("line 1") && !e.contains("hunter2"), "{e}");
        assert!(Users::parse(b"").is_err());
        assert!(Users::parse(b"alice:\n").is_err());
        let u = Users::parse(b"alice:hunter2").unwrap();
        assert!(!format!("{u:?}").contains("hunter2"));
    }
}
