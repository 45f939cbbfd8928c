//! Prometheus metrics: latency histograms recorded as commands and S3 calls run, and every
//! `stats` counter read at scrape time, encoded by `prometheus-client` (OpenMetrics text).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::command::Ctx;
use crate::protocol::{MetaRequest, MetaStatus, Request, Response, StoreMode};
use crate::stats::{S3Requests, GAUGES};
use crate::store::Store;

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
    Command {
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
    commands: Family<CommandLabels, Counter>,
    command_seconds: Latencies<CommandLabels>,
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
            resolved: (0..Command::COUNT * Outcome::COUNT)
                .map(|_| OnceLock::new())
                .collect(),
        }
    }
}

/// Latency of S3 request attempts by operation and answer.
#[derive(Debug, Clone)]
pub struct BackendTimings(Latencies<BackendLabels>);

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
    pub fn command(&self, command: Command, response: &Response, took: Duration) {
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
pub fn kind_of(request: &Request) -> Command {
    match request {
        Request::Get { cas: false, .. } => Command::Get,
        Request::Get { cas: true, .. } => Command::Gets,
        Request::Gat { cas: false, .. } => Command::Gat,
        Request::Gat { cas: true, .. } => Command::Gats,
        Request::Store { mode, .. } => match mode {
            StoreMode::Set => Command::Set,
            StoreMode::Add => Command::Add,
            StoreMode::Replace => Command::Replace,
            StoreMode::Append => Command::Append,
            StoreMode::Prepend => Command::Prepend,
            StoreMode::Cas => Command::Cas,
        },
        Request::TooLarge { .. } => Command::TooLarge,
        Request::Delete { .. } => Command::Delete,
        Request::Arith { incr: true, .. } => Command::Incr,
        Request::Arith { incr: false, .. } => Command::Decr,
        Request::Touch { .. } => Command::Touch,
        Request::FlushAll { .. } => Command::FlushAll,
        Request::Version => Command::Version,
        Request::Verbosity { .. } => Command::Verbosity,
        Request::Stats { .. } => Command::Stats,
        Request::Quit => Command::Quit,
        Request::CacheMemlimit { .. } => Command::CacheMemlimit,
        Request::Shutdown(_) => Command::Shutdown,
        Request::LruCrawler(_) => Command::LruCrawler,
        Request::Meta(m) => match m {
            MetaRequest::Get { .. } => Command::Mg,
            MetaRequest::Set { .. } => Command::Ms,
            MetaRequest::Delete { .. } => Command::Md,
            MetaRequest::Arith { .. } => Command::Ma,
            MetaRequest::Debug { .. } => Command::Me,
            MetaRequest::Noop => Command::Mn,
        },
        Request::Invalid(_) | Request::Silent | Request::Hangup(_) => Command::Invalid,
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

/// The registry `/metrics` encodes: the timings, and the counters of `ctx` at each scrape.
pub fn registry(ctx: Arc<Ctx>) -> Registry {
    let mut registry = Registry::with_prefix("s3cached");
    let timings = ctx.stats.timings.clone();
    registry.register("commands", "Commands by kind and result", timings.commands);
    registry.register(
        "command_duration_seconds",
        "Time from a command's arrival to its reply, by kind and result",
        timings.command_seconds,
    );
    if let Some(s3) = &ctx.stats.s3 {
        registry.register(
            "backend_request_duration_seconds",
            "Time of one S3 request attempt, by operation and HTTP status (none: no answer)",
            s3.latency.0.clone(),
        );
    }
    registry.register_collector(Box::new(StatsCollector { ctx }));
    registry
}

/// Reads `stats` counters and store figures at scrape time.
struct StatsCollector {
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for StatsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatsCollector")
    }
}

/// Writes one unlabelled counter or gauge.
fn one<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: M,
) -> Result<(), std::fmt::Error> {
    let e = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(e)
}

/// Writes one counter family with a single label.
fn labelled(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in values {
        let labels = [(label, *value)];
        ConstCounter::new(*n).encode(e.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = &self.ctx.stats;
        for (name, value) in stats.snapshot() {
            if name.starts_with("s3_") {
                continue; // below, with labels
            }
            let help = format!("memcached-style stats counter {name}");
            if GAUGES.contains(&name) {
                one(&mut encoder, name, &help, ConstGauge::new(value as i64))?;
            } else {
                one(&mut encoder, name, &help, ConstCounter::new(value))?;
            }
        }
        let epoch_secs = self.ctx.flush.epoch_us() as f64 / 1e6;
        let help = "Unix time of the last flush_all in force (0: none)";
        one(
            &mut encoder,
            "flush_epoch_seconds",
            help,
            ConstGauge::new(epoch_secs),
        )?;
        let (items, bytes) = self.ctx.store.usage();
        let help = "Items held in the RAM tier";
        one(
            &mut encoder,
            "tier_items",
            help,
            ConstGauge::new(items as i64),
        )?;
        let help = "Bytes held in the RAM tier";
        one(
            &mut encoder,
            "tier_bytes",
            help,
            ConstGauge::new(bytes as i64),
        )?;
        let atomic = i64::from(self.ctx.store.info().atomic);
        let help = "1 when the store enforces conditional writes";
        one(
            &mut encoder,
            "backend_atomic",
            help,
            ConstGauge::new(atomic),
        )?;
        if let Some(s3) = &stats.s3 {
            encode_s3(&mut encoder, s3)?;
        }
        Ok(())
    }
}

/// S3 requests by class and by answer, and what they cost.
fn encode_s3(encoder: &mut DescriptorEncoder, s3: &S3Requests) -> Result<(), std::fmt::Error> {
    use std::sync::atomic::Ordering::Relaxed;
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed);
    let help = "S3 requests sent (retries included) by price class: get = GET/HEAD, \
                put = PUT/COPY/POST/LIST, delete = DELETE";
    let classes = [
        ("get", n(&s3.get)),
        ("put", n(&s3.put)),
        ("delete", n(&s3.delete)),
    ];
    labelled(encoder, "s3_requests", help, "class", &classes)?;
    let help = "S3 answers by kind: ok (2xx/3xx), not_found (404), conflict (409/412), \
                client_error (other 4xx), server_error (5xx), none (no answer)";
    let answers = [
        ("ok", n(&s3.answered_ok)),
        ("not_found", n(&s3.not_found)),
        ("conflict", n(&s3.conflicts)),
        ("client_error", n(&s3.client_errors)),
        ("server_error", n(&s3.server_errors)),
        ("none", n(&s3.no_answer)),
    ];
    labelled(encoder, "s3_answers", help, "answer", &answers)?;
    let help = "Estimated cost of the S3 requests sent, in US dollars, at the configured prices";
    one(
        encoder,
        "s3_estimated_cost_usd",
        help,
        ConstCounter::new(s3.cost_usd()),
    )?;
    let mut e = encoder.encode_descriptor(
        "s3_price_per_1000_requests_usd",
        "The configured S3 price per 1,000 requests, by class",
        None,
        MetricType::Gauge,
    )?;
    for (class, price) in [
        ("get", s3.prices.get_per_1000),
        ("put", s3.prices.put_per_1000),
        ("delete", s3.prices.delete_per_1000),
    ] {
        ConstGauge::new(price).encode(e.encode_family(&[("class", class)])?)?;
    }
    Ok(())
}

/// The registry as OpenMetrics text.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; a collector error would leave a partial page.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(cause = %e, "cannot encode metrics");
    }
    out
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
        let t = Timings::default();
        t.command(Command::Get, &hit, Duration::from_micros(70));
        t.command(Command::Get, &hit, Duration::from_millis(70));
        t.command(Command::Set, &Response::Stored, Duration::from_micros(70));
        let b = BackendTimings::default();
        b.record("GetObject", Some(404), Duration::from_millis(3));
        let mut registry = Registry::default();
        registry.register("c", "c", t.commands.clone());
        registry.register("l", "l", t.command_seconds.clone());
        registry.register("b", "b", b.0.clone());
        let text = render(&registry);
        assert!(
            text.contains("c_total{command=\"get\",result=\"hit\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("c_total{command=\"set\",result=\"stored\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("l_bucket{le=\"0.0001\",command=\"get\",result=\"hit\"} 1")
                || text.contains("l_bucket{command=\"get\",result=\"hit\",le=\"0.0001\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("b_count{operation=\"GetObject\",status=\"404\"} 1"),
            "{text}"
        );
    }
}
