//! `/metrics`: the registry the admin listener encodes (OpenMetrics text, by
//! `prometheus-client`): the timings recorded as commands and S3 calls run, and every
//! `stats` counter and store figure, read at scrape time.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::command::Ctx;
use crate::stats::GAUGES;
use crate::store::s3::S3Requests;
use crate::store::Store;

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
    let help = "Conditional writes whose answer was lost, by what reading the object back \
                found: applied, not_applied, or unknown (answered SERVER_ERROR ... outcome \
                unknown, never applied again)";
    let settled = [
        ("applied", n(&s3.settled_applied)),
        ("not_applied", n(&s3.settled_not_applied)),
        ("unknown", n(&s3.outcomes_unknown)),
    ];
    labelled(encoder, "s3_write_settlements", help, "outcome", &settled)?;
    let help = "S3 answers asking to slow down (503 SlowDown, 429); the request is sent again";
    one(
        encoder,
        "s3_throttled",
        help,
        ConstCounter::new(n(&s3.throttled)),
    )?;
    let help = "How many S3 requests may be in flight now: halved when S3 throttles, grown \
                back as it answers, at most s3_max_in_flight";
    one(
        encoder,
        "s3_in_flight_limit",
        help,
        ConstGauge::new(s3.in_flight.limit() as i64),
    )?;
    encode_hedging(encoder, s3)?;
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

/// Hedged GETs: how many, how many won, and the delay now.
fn encode_hedging(encoder: &mut DescriptorEncoder, s3: &S3Requests) -> Result<(), std::fmt::Error> {
    use std::sync::atomic::Ordering::Relaxed;
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed);
    let help = "GETs sent a second time because the first had not answered after the hedge delay";
    one(
        encoder,
        "s3_hedged_gets",
        help,
        ConstCounter::new(n(&s3.hedging.sent)),
    )?;
    let help = "Hedged GETs whose second request answered first";
    one(
        encoder,
        "s3_hedge_wins",
        help,
        ConstCounter::new(n(&s3.hedging.won)),
    )?;
    let help = "How long a GET waits before it is hedged now: the recent 90th percentile, \
                within s3_hedge_min_ms and s3_hedge_max_ms";
    one(
        encoder,
        "s3_hedge_delay_seconds",
        help,
        ConstGauge::new(s3.hedging.delay().as_secs_f64()),
    )?;
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
    use std::time::Duration;

    use super::*;
    use crate::metrics::{BackendTimings, CommandKind, Timings};
    use crate::protocol::{Response, Value};

    #[test]
    fn timings_render_as_openmetrics() {
        let hit = Response::Values {
            values: vec![Value {
                key: "k".into(),
                flags: 0,
                cas: 1,
                data: "v".into(),
                stream: None,
            }],
            with_cas: false,
            end: true,
        };
        let t = Timings::default();
        t.command(CommandKind::Get, &hit, Duration::from_micros(70));
        t.command(CommandKind::Get, &hit, Duration::from_millis(70));
        t.command(
            CommandKind::Set,
            &Response::Stored,
            Duration::from_micros(70),
        );
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
