//! One login for both protocols: text `set` logins and binary SASL PLAIN, checked alike.
//!
//! Both are checked against the same users, and counted and limited in the same place: per
//! connection (closed after [`sasl::MAX_AUTH_FAILURES_PER_CONNECTION`] failures, each
//! answered after [`sasl::AUTH_FAILURE_DELAY_MS`]) and per client address, across all its
//! connections ([`FailedLogins`]: an attempt past the address's limit is answered as a
//! failure when its turn comes, without its password being checked).

use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;

use super::ConnectionConfig;
use crate::protocol::binary::{Reply, Status};
use crate::protocol::{ProtocolError, Request, Response, StoreMode};
use crate::sasl::{self, Attempt, ClientKey, FailedLogins, Turn, Users};
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
    /// The failed-login limits of every client address, shared by all connections.
    limits: Arc<FailedLogins>,
    /// This connection's client, as the limits know it.
    client: ClientKey,
    /// A failed text login is answered no sooner than this: the text driver waits for it
    /// before it writes (see [`Login::hold_replies`]).
    hold: Option<Instant>,
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

/// An attempt judged: its verdict, and when a failure may be answered.
#[derive(Debug, Clone, Copy)]
struct Judged {
    /// What the attempt came to.
    verdict: Verdict,
    /// No reply to a failure leaves before this.
    answer_at: Instant,
}

impl Login {
    /// A connection's login: required when the config has SASL users; limited by the
    /// config's failed-login limits, as its client's address.
    pub fn new(config: &ConnectionConfig, stats: Arc<Stats>) -> Self {
        Login {
            required: config.sasl.is_some(),
            users: config.sasl.clone(),
            failures: 0,
            stats,
            limits: config.failed_logins.clone(),
            client: ClientKey::of(config.client),
            hold: None,
        }
    }

    /// Whether the client must still log in before anything else is served.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Judges an attempt given its `turn`, taken at `now`: the credentials are checked only
    /// on a turn of now (a success gives the turn back); the attempt is counted, and a
    /// failure is answered no sooner than the pause after it, nor than its turn.
    fn judge(&mut self, turn: Turn, now: Instant, check: impl FnOnce(&Users) -> bool) -> Judged {
        let after_pause = now + sasl::failure_delay();
        let (attempt, answer_at) = match turn {
            Turn::Now if self.users.as_deref().is_some_and(check) => {
                self.limits.give_back(self.client);
                (Attempt::Accepted, now)
            }
            Turn::Now => (Attempt::Refused, after_pause),
            Turn::At(at) | Turn::Busy(at) => (Attempt::Throttled, at.max(after_pause)),
        };
        let go_on = sasl::record(&self.stats, attempt, &mut self.failures);
        let verdict = match attempt {
            Attempt::Accepted => {
                self.required = false;
                Verdict::Accepted
            }
            _ if go_on => Verdict::Refused,
            _ => Verdict::Closed,
        };
        Judged { verdict, answer_at }
    }

    /// Answers a text request before login: memcached takes only a `set` whose data is
    /// `user password`. A failure is answered `CLIENT_ERROR authentication failure` once
    /// [`Login::hold_replies`] allows; an address whose queue of turns is full is closed
    /// then instead (a close is no answer, so it gives no more guesses).
    pub fn text(&mut self, request: Request) -> Response {
        if self.users.is_none() {
            return Response::None;
        }
        match request {
            Request::Store {
                mode: StoreMode::Set,
                data,
                ..
            } => {
                let now = Instant::now();
                let turn = self.limits.turn(self.client, now);
                let judged = self.judge(turn, now, |users| users.check_text(&data));
                if judged.verdict == Verdict::Accepted {
                    return Response::Stored;
                }
                self.hold_until(judged.answer_at);
                match (judged.verdict, turn) {
                    (Verdict::Closed, _) | (_, Turn::Busy(_)) => Response::Close,
                    _ => Response::Error(ProtocolError::Client("authentication failure")),
                }
            }
            Request::Quit | Request::Hangup(_) => Response::Close,
            _ => Response::Error(ProtocolError::Client("unauthenticated")),
        }
    }

    /// The time before which the replies encoded so far must not be written, once: a text
    /// driver awaits it before each write. `None` when no failed login is waiting.
    pub fn hold_replies(&mut self) -> Option<Instant> {
        self.hold.take()
    }

    /// Holds the replies until `at` at least.
    fn hold_until(&mut self, at: Instant) {
        self.hold = Some(self.hold.map_or(at, |held| held.max(at)));
    }

    /// Answers the binary `SASL_LIST_MECHS`.
    pub fn mechanisms(&self) -> Reply {
        match &self.users {
            None => unknown_command(),
            Some(_) => ok_reply(sasl::MECHANISMS),
        }
    }

    /// Answers a binary `SASL_AUTH` (`step` = false) or `SASL_STEP`: PLAIN in one step; any
    /// other mechanism, or a step, fails. It waits for its address's turn; a failure is
    /// answered after a pause.
    pub async fn sasl(&mut self, mech: &Bytes, data: &Bytes, step: bool) -> Reply {
        if self.users.is_none() {
            return unknown_command();
        }
        let (turn, now) = self.next_turn().await;
        let plain = !step && &mech[..] == sasl::MECHANISMS.as_bytes();
        let judged = self.judge(turn, now, |users| plain && users.check_plain(data));
        if judged.verdict == Verdict::Accepted {
            return ok_reply("Authenticated");
        }
        tokio::time::sleep_until(judged.answer_at).await;
        Reply {
            status: Status::AuthError,
            body: Bytes::from_static(Status::AuthError.text().as_bytes()),
            close: judged.verdict == Verdict::Closed,
        }
    }

    /// Waits until the client's address has a turn within its queue; returns the turn and
    /// when it was taken.
    async fn next_turn(&self) -> (Turn, Instant) {
        loop {
            let now = Instant::now();
            match self.limits.turn(self.client, now) {
                Turn::Busy(again) => tokio::time::sleep_until(again).await,
                turn => return (turn, now),
            }
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
    use crate::protocol::Limits;
    use crate::sasl::{AUTH_FAILURES_PER_SEC_PER_CLIENT, AUTH_FAILURE_BURST_PER_CLIENT};
    use std::net::IpAddr;
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    /// Settings with the user alice and the address 192.0.2.1.
    fn config() -> ConnectionConfig {
        let mut config = ConnectionConfig::new(Limits::default(), 1 << 26);
        config.sasl = Some(Arc::new(Users::parse(b"alice:secret\n").unwrap()));
        config.client = Some("192.0.2.1".parse().unwrap());
        config
    }

    fn login() -> Login {
        Login::new(&config(), Arc::new(Stats::default()))
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

    const FAILURE: Response = Response::Error(ProtocolError::Client("authentication failure"));

    #[test]
    fn without_users_nothing_is_required() {
        let mut config = config();
        config.sasl = None;
        let login = Login::new(&config, Arc::new(Stats::default()));
        assert!(!login.required());
        assert_eq!(login.mechanisms().status, Status::UnknownCommand);
    }

    #[tokio::test(start_paused = true)]
    async fn a_text_login_lets_the_connection_in() {
        let mut login = login();
        assert!(login.required());
        assert_eq!(
            login.text(Request::Version),
            Response::Error(ProtocolError::Client("unauthenticated"))
        );
        assert_eq!(login.hold_replies(), None);
        assert_eq!(login.text(text_set(b"alice wrong\r\n")), FAILURE);
        let pause = Duration::from_millis(sasl::AUTH_FAILURE_DELAY_MS);
        assert_eq!(login.hold_replies(), Some(Instant::now() + pause));
        assert_eq!(login.hold_replies(), None, "waited for once");
        assert!(login.required());
        assert_eq!(login.text(text_set(b"alice secret\r\n")), Response::Stored);
        assert_eq!(login.hold_replies(), None, "a success is answered at once");
        assert!(!login.required());
        assert_eq!(login.stats.auth_cmds.load(Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn too_many_failures_close_the_connection() {
        let mut login = login();
        for _ in 1..sasl::MAX_AUTH_FAILURES_PER_CONNECTION {
            assert_eq!(login.text(text_set(b"alice wrong")), FAILURE);
        }
        assert_eq!(login.text(text_set(b"alice wrong")), Response::Close);
    }

    #[tokio::test(start_paused = true)]
    async fn past_its_address_limit_a_text_login_is_refused_unchecked_and_held() {
        let config = config();
        let stats = Arc::new(Stats::default());
        let connection = || Login::new(&config, stats.clone());
        let start = Instant::now();
        for _ in 0..AUTH_FAILURE_BURST_PER_CLIENT {
            assert_eq!(connection().text(text_set(b"alice wrong")), FAILURE);
        }
        // The right password, but the address is over its limit: refused without a check,
        // and answered when the next turn comes.
        let mut late = connection();
        assert_eq!(late.text(text_set(b"alice secret")), FAILURE);
        assert!(late.required());
        let turn = Duration::from_millis(1000 / u64::from(AUTH_FAILURES_PER_SEC_PER_CLIENT));
        let pause = Duration::from_millis(sasl::AUTH_FAILURE_DELAY_MS);
        assert_eq!(late.hold_replies(), Some(start + turn.max(pause)));
        assert_eq!(stats.auth_throttled.load(Relaxed), 1);
        // Once the queue is full too, a login is closed (after a pause), never answered.
        while stats.auth_throttled.load(Relaxed) < 64 {
            let mut one = connection();
            if one.text(text_set(b"alice wrong")) == Response::Close {
                assert!(one.hold_replies().is_some_and(|at| at > Instant::now()));
                break;
            }
        }
        assert!(stats.auth_throttled.load(Relaxed) < 64, "never closed");
        // Another address is not held back.
        let mut other_config = config.clone();
        other_config.client = Some(IpAddr::from([192, 0, 2, 2]));
        let mut other = Login::new(&other_config, stats.clone());
        assert_eq!(other.text(text_set(b"alice secret")), Response::Stored);
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

    #[tokio::test(start_paused = true)]
    async fn many_sasl_connections_of_one_address_get_the_address_rate() {
        let config = config();
        let stats = Arc::new(Stats::default());
        let end = Instant::now() + Duration::from_secs(5);
        // 32 connections, each guessing (and reconnecting when closed) until the end.
        let guessers = (0..32).map(|_| {
            let (config, stats) = (config.clone(), stats.clone());
            tokio::spawn(async move {
                let (plain, guess) = (
                    Bytes::from_static(b"PLAIN"),
                    Bytes::from_static(b"\0alice\0x"),
                );
                let mut answered = 0u32;
                let mut login = Login::new(&config, stats.clone());
                while Instant::now() < end {
                    let reply = login.sasl(&plain, &guess, false).await;
                    answered += u32::from(Instant::now() <= end);
                    if reply.close {
                        login = Login::new(&config, stats.clone());
                    }
                }
                answered
            })
        });
        let mut answered = 0;
        for guesser in guessers.collect::<Vec<_>>() {
            answered += guesser.await.unwrap();
        }
        let most = AUTH_FAILURE_BURST_PER_CLIENT + 5 * AUTH_FAILURES_PER_SEC_PER_CLIENT;
        assert!(answered <= most && answered + 2 >= most, "{answered}");
        let checked = stats.auth_cmds.load(Relaxed) - stats.auth_throttled.load(Relaxed);
        assert!(checked <= u64::from(most), "{checked} passwords checked");
    }
}
