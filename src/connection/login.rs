//! One login for both protocols: text `set` logins and binary SASL PLAIN, checked alike.
//!
//! Both are checked against the same users, and counted and limited in the same place.

use std::sync::Arc;

use bytes::Bytes;

use crate::protocol::binary::{Reply, Status};
use crate::protocol::{ProtocolError, Request, Response, StoreMode};
use crate::sasl::{self, Users};
use crate::stats::Stats;

/// memcached's answer to a text command before a text-protocol login, and to a text client
/// when only binary SASL logins are allowed.
pub const UNAUTHENTICATED: &[u8] = b"CLIENT_ERROR unauthenticated\r\n";

/// A connection's login state.
pub struct Login {
    /// The users allowed in; `None` when SASL is off and everyone is let in.
    users: Option<Arc<Users>>,
    /// SASL is on and this connection has not logged in yet.
    required: bool,
    /// Failed attempts so far: past [`sasl::MAX_AUTH_FAILURES_PER_CONNECTION`] the
    /// connection is closed.
    failures: u32,
    /// Where attempts and failures are counted.
    stats: Arc<Stats>,
}

/// What one login attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// In: requests are served from now on.
    Accepted,
    /// Refused; the client may try again.
    Refused,
    /// Refused once too often: close the connection.
    Closed,
}

impl Login {
    /// A connection's login: required when `users` is set.
    pub fn new(users: Option<Arc<Users>>, stats: Arc<Stats>) -> Self {
        Login {
            required: users.is_some(),
            users,
            failures: 0,
            stats,
        }
    }

    /// Whether the client must still log in before anything else is served.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Counts an attempt whose credentials were `ok` (`go_on`: the failure limit is not
    /// reached) and lets the connection in when they were.
    fn judge(&mut self, ok: bool, go_on: bool) -> Verdict {
        if ok {
            self.required = false;
            Verdict::Accepted
        } else if go_on {
            Verdict::Refused
        } else {
            Verdict::Closed
        }
    }

    /// Answers a text request before login: memcached takes only a `set` whose data is
    /// `user password`, answered at once (no pause after a failure, as memcached).
    pub fn text(&mut self, request: Request) -> Response {
        let Some(users) = &self.users else {
            return Response::None;
        };
        match request {
            Request::Store {
                mode: StoreMode::Set,
                data,
                ..
            } => {
                let ok = users.check_text(&data);
                let go_on = sasl::record_now(&self.stats, ok, &mut self.failures);
                match self.judge(ok, go_on) {
                    Verdict::Accepted => Response::Stored,
                    Verdict::Refused => {
                        Response::Error(ProtocolError::Client("authentication failure"))
                    }
                    Verdict::Closed => Response::Close,
                }
            }
            Request::Quit | Request::Hangup(_) => Response::Close,
            _ => Response::Error(ProtocolError::Client("unauthenticated")),
        }
    }

    /// Answers the binary `SASL_LIST_MECHS`.
    pub fn mechanisms(&self) -> Reply {
        match &self.users {
            None => unknown_command(),
            Some(_) => ok_reply(sasl::MECHANISMS),
        }
    }

    /// Answers a binary `SASL_AUTH` (`step` = false) or `SASL_STEP`: PLAIN in one step; any
    /// other mechanism, or a step, fails. A failure is answered after a pause.
    pub async fn sasl(&mut self, mech: &Bytes, data: &Bytes, step: bool) -> Reply {
        let Some(users) = &self.users else {
            return unknown_command();
        };
        let ok = !step && &mech[..] == sasl::MECHANISMS.as_bytes() && users.check_plain(data);
        let go_on = sasl::record(&self.stats, ok, &mut self.failures).await;
        match self.judge(ok, go_on) {
            Verdict::Accepted => ok_reply("Authenticated"),
            refused => Reply {
                status: Status::AuthError,
                body: Bytes::from_static(Status::AuthError.text().as_bytes()),
                close: refused == Verdict::Closed,
            },
        }
    }
}

fn ok_reply(body: &'static str) -> Reply {
    Reply {
        status: Status::Success,
        body: Bytes::from_static(body.as_bytes()),
        close: false,
    }
}

fn unknown_command() -> Reply {
    Reply {
        status: Status::UnknownCommand,
        body: Bytes::from_static(Status::UnknownCommand.text().as_bytes()),
        close: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login() -> Login {
        let users = Users::parse(b"alice:secret\n").unwrap();
        Login::new(Some(Arc::new(users)), Arc::new(Stats::default()))
    }

    fn text_set(data: &'static [u8]) -> Request {
        Request::Store {
            mode: StoreMode::Set,
            key: Bytes::from_static(b"any"),
            flags: 0,
            exptime: 0,
            data: Bytes::from_static(data),
            cas_unique: 0,
            noreply: false,
        }
    }

    #[test]
    fn without_users_nothing_is_required() {
        let login = Login::new(None, Arc::new(Stats::default()));
        assert!(!login.required());
        assert_eq!(login.mechanisms().status, Status::UnknownCommand);
    }

    #[test]
    fn a_text_login_lets_the_connection_in() {
        let mut login = login();
        assert!(login.required());
        assert_eq!(
            login.text(Request::Version),
            Response::Error(ProtocolError::Client("unauthenticated"))
        );
        assert_eq!(
            login.text(text_set(b"alice wrong\r\n")),
            Response::Error(ProtocolError::Client("authentication failure"))
        );
        assert!(login.required());
        assert_eq!(login.text(text_set(b"alice secret\r\n")), Response::Stored);
        assert!(!login.required());
        assert_eq!(
            login
                .stats
                .auth_cmds
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }

    #[test]
    fn too_many_failures_close_the_connection() {
        let mut login = login();
        for _ in 1..sasl::MAX_AUTH_FAILURES_PER_CONNECTION {
            assert_ne!(login.text(text_set(b"alice wrong")), Response::Close);
        }
        assert_eq!(login.text(text_set(b"alice wrong")), Response::Close);
    }

    #[tokio::test(start_paused = true)]
    async fn sasl_plain_in_one_step() {
        let mut login = login();
        let plain = Bytes::from_static(b"PLAIN");
        assert_eq!(login.mechanisms().body, Bytes::from_static(b"PLAIN"));
        let began = tokio::time::Instant::now();
        let refused = login
            .sasl(&plain, &Bytes::from_static(b"\0alice\0bad"), false)
            .await;
        assert_eq!((refused.status, refused.close), (Status::AuthError, false));
        assert!(began.elapsed().as_millis() >= u128::from(sasl::AUTH_FAILURE_DELAY_MS));
        let step = login
            .sasl(&plain, &Bytes::from_static(b"\0alice\0secret"), true)
            .await;
        assert_eq!(step.status, Status::AuthError, "no steps in PLAIN");
        let ok = login
            .sasl(&plain, &Bytes::from_static(b"\0alice\0secret"), false)
            .await;
        assert_eq!(ok.status, Status::Success);
        assert!(!login.required());
    }
}
