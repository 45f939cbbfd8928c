//! What is recorded as commands and S3 calls run, for Prometheus: commands by kind and
//! result, and latency histograms. The admin listener renders them (`admin::metrics`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use crate::protocol::{MetaRequest, MetaStatus, Request, Response, StoreMode};

/// Upper bounds of the latency buckets, in seconds: 50 µs (a RAM hit) to 10 s (past every
/// S3 deadline).
const LATENCY_BUCKETS_SECS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_SECS)
}

type Latencies<L> = Family<L, Histogram, fn() -> Histogram>;

/// A command's kind (`get`, `set`, `mg`, ...) and how it ended (`hit`, `miss`, `stored`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    pub command: &'static str,
    pub result: &'static str,
}

/// An S3 operation (`GetObject`, `PutObject`, ...) and its answer (`200`, `404`, `none`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub operation: String,
    pub status: String,
}

/// Label values as a closed set: each names itself, and has a number to index a table by.
macro_rules! label_values {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($variant),* }

        impl $name {
            const COUNT: usize = [$($text),*].len();

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),* }
            }
        }
    };
}

label_values! {
    /// The kind of a request, as a metric label.
    CommandKind {
        Get => "get", Gets => "gets", Gat => "gat", Gats => "gats", Set => "set",
        Add => "add", Replace => "replace", Append => "append", Prepend => "prepend",
        Cas => "cas", TooLarge => "too_large", Delete => "delete", Incr => "incr",
        Decr => "decr", Touch => "touch", FlushAll => "flush_all", Version => "version",
        Verbosity => "verbosity", Stats => "stats", Quit => "quit", Mg => "mg", Ms => "ms",
        Md => "md", Ma => "ma", Me => "me", Mn => "mn", CacheMemlimit => "cache_memlimit",
        Shutdown => "shutdown", LruCrawler => "lru_crawler", Invalid => "invalid",
    }
}

label_values! {
    /// How a command ended, as a metric label.
    Outcome {
        NoReply => "noreply", Stored => "stored", NotStored => "not_stored",
        Exists => "exists", NotFound => "not_found", Deleted => "deleted",
        Touched => "touched", Miss => "miss", Hit => "hit", Ok => "ok",
        ClientError => "client_error", ServerError => "server_error", Close => "close",
    }
}

/// Figures recorded as commands run (the counters in [`Stats`](crate::stats::Stats) are
/// read at scrape time instead).
#[derive(Debug, Clone)]
pub struct Timings {
    /// Commands by kind and result.
    pub(crate) commands: Family<CommandLabels, Counter>,
    /// Time from arrival to reply, by kind and result.
    pub(crate) command_seconds: Latencies<CommandLabels>,
    /// Each (command, outcome)'s counter and histogram, taken from the families at first
    /// use: they share their values with the families' own, and a family's lookup hashes
    /// the labels and takes a lock, which every request would pay.
    resolved: Arc<[OnceLock<(Counter, Histogram)>]>,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            commands: Family::default(),
            command_seconds: Family::new_with_constructor(latency_histogram),
            resolved: (0..CommandKind::COUNT * Outcome::COUNT)
                .map(|_| OnceLock::new())
                .collect(),
        }
    }
}

/// Latency of S3 request attempts by operation and answer.
#[derive(Debug, Clone)]
pub struct BackendTimings(pub(crate) Latencies<BackendLabels>);

impl Default for BackendTimings {
    fn default() -> Self {
        BackendTimings(Family::new_with_constructor(latency_histogram))
    }
}

impl BackendTimings {
    /// Records one S3 request attempt: its operation, HTTP status (`None`: no answer) and
    /// time from sending to the answer.
    pub fn record(&self, operation: &str, status: Option<u16>, took: Duration) {
        let labels = BackendLabels {
            operation: operation.to_owned(),
            status: status.map_or_else(|| "none".to_owned(), |s| s.to_string()),
        };
        self.0.get_or_create(&labels).observe(took.as_secs_f64());
    }
}

impl Timings {
    /// Records one command: what it was, how it ended and how long it took.
    pub fn command(&self, command: CommandKind, response: &Response, took: Duration) {
        let outcome = outcome_of(response);
        let cell = &self.resolved[command as usize * Outcome::COUNT + outcome as usize];
        let (count, seconds) = cell.get_or_init(|| {
            let labels = CommandLabels {
                command: command.as_str(),
                result: outcome.as_str(),
            };
            (
                self.commands.get_or_create(&labels).clone(),
                self.command_seconds.get_or_create(&labels).clone(),
            )
        });
        count.inc();
        seconds.observe(took.as_secs_f64());
    }
}

/// The kind of a request, as a metric label.
pub fn kind_of(request: &Request) -> CommandKind {
    match request {
        Request::Get { cas: false, .. } => CommandKind::Get,
        Request::Get { cas: true, .. } => CommandKind::Gets,
        Request::Gat { cas: false, .. } => CommandKind::Gat,
        Request::Gat { cas: true, .. } => CommandKind::Gats,
        Request::Store { mode, .. } => match mode {
            StoreMode::Set => CommandKind::Set,
            StoreMode::Add => CommandKind::Add,
            StoreMode::Replace => CommandKind::Replace,
            StoreMode::Append => CommandKind::Append,
            StoreMode::Prepend => CommandKind::Prepend,
            StoreMode::Cas => CommandKind::Cas,
        },
        Request::StoreStreamed { .. } => CommandKind::Set,
        Request::TooLarge { .. } => CommandKind::TooLarge,
        Request::Delete { .. } => CommandKind::Delete,
        Request::Arith { incr: true, .. } => CommandKind::Incr,
        Request::Arith { incr: false, .. } => CommandKind::Decr,
        Request::Touch { .. } => CommandKind::Touch,
        Request::FlushAll { .. } => CommandKind::FlushAll,
        Request::Version => CommandKind::Version,
        Request::Verbosity { .. } => CommandKind::Verbosity,
        Request::Stats { .. } => CommandKind::Stats,
        Request::Quit => CommandKind::Quit,
        Request::CacheMemlimit { .. } => CommandKind::CacheMemlimit,
        Request::Shutdown(_) => CommandKind::Shutdown,
        Request::LruCrawler(_) => CommandKind::LruCrawler,
        Request::Meta(m) => match m {
            // A binary GET is a classic get in meta form: labelled as the text one.
            MetaRequest::Get { flags, .. } if flags.classic => CommandKind::Get,
            MetaRequest::Get { .. } => CommandKind::Mg,
            MetaRequest::Set { .. } => CommandKind::Ms,
            MetaRequest::Delete { .. } => CommandKind::Md,
            MetaRequest::Arith { .. } => CommandKind::Ma,
            MetaRequest::Debug { .. } => CommandKind::Me,
            MetaRequest::Noop => CommandKind::Mn,
        },
        Request::Invalid(_) | Request::Silent | Request::Hangup(_) => CommandKind::Invalid,
    }
}

/// How a command ended, as a metric label.
fn outcome_of(response: &Response) -> Outcome {
    match response {
        Response::None => Outcome::NoReply,
        Response::Stored => Outcome::Stored,
        Response::NotStored => Outcome::NotStored,
        Response::Exists => Outcome::Exists,
        Response::NotFound => Outcome::NotFound,
        Response::Deleted => Outcome::Deleted,
        Response::Touched => Outcome::Touched,
        Response::Values { values, .. } if values.is_empty() => Outcome::Miss,
        Response::Values { .. } => Outcome::Hit,
        Response::Meta(m) => match m.status {
            MetaStatus::Va => Outcome::Hit,
            MetaStatus::En => Outcome::Miss,
            MetaStatus::Nf => Outcome::NotFound,
            MetaStatus::Ns => Outcome::NotStored,
            MetaStatus::Ex => Outcome::Exists,
            MetaStatus::Hd | MetaStatus::Mn => Outcome::Ok,
        },
        Response::Error(_) => Outcome::ClientError,
        Response::ServerError(_) => Outcome::ServerError,
        // An operator command's status line is a refusal (`MEMLIMIT_TOO_SMALL`, ...).
        Response::Line(_) => Outcome::ClientError,
        Response::Close => Outcome::Close,
        _ => Outcome::Ok,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_labelled_by_meaning() {
        let hit = Response::Values {
            values: vec![crate::protocol::Value {
                key: "k".into(),
                flags: 0,
                cas: 1,
                data: "v".into(),
                stream: None,
            }],
            with_cas: false,
            end: true,
        };
        assert_eq!(outcome_of(&hit).as_str(), "hit");
        assert_eq!(outcome_of(&Response::Stored).as_str(), "stored");
        assert_eq!(
            outcome_of(&Response::ServerError("x".into())).as_str(),
            "server_error"
        );
    }
}
