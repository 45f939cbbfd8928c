//! S3 requests counted by price class and by answer, and what they cost: the figures
//! behind `stats`' s3_* rows and the cost estimate.

use super::hedge::{HedgeSettings, Hedging};
use super::limit::InFlight;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::metrics::BackendTimings;

/// What S3 charges per 1,000 requests of each class, in US dollars.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct S3Prices {
    /// GET, HEAD and every other request not listed below.
    pub get_per_1000: f64,
    /// PUT, COPY, POST and LIST.
    pub put_per_1000: f64,
    /// DELETE (free on AWS).
    pub delete_per_1000: f64,
}

/// AWS S3 Standard, US East (N. Virginia) list prices: $0.0004 per 1,000 GET/HEAD,
/// $0.005 per 1,000 PUT/COPY/POST/LIST, DELETE free.
pub const AWS_S3_STANDARD_PRICES: S3Prices = S3Prices {
    get_per_1000: 0.0004,
    put_per_1000: 0.005,
    delete_per_1000: 0.0,
};

/// The price class of one S3 request, as AWS bills it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestClass {
    /// GET and HEAD of an object (and anything else not below).
    Get,
    /// PUT, COPY, POST and LIST (a GET on the bucket itself).
    Put,
    /// DELETE of an object, and the multi-object delete (a POST `?delete`).
    Delete,
}

impl RequestClass {
    /// The class of a request by its HTTP method and query string.
    pub fn of(method: &str, query: &str) -> Self {
        let has = |name: &str| {
            query
                .split('&')
                .any(|p| p == name || p.starts_with(&format!("{name}=")))
        };
        match method {
            "DELETE" => RequestClass::Delete,
            "POST" if has("delete") => RequestClass::Delete,
            "PUT" | "POST" => RequestClass::Put,
            "GET" if has("list-type") || has("versions") || has("uploads") => RequestClass::Put,
            _ => RequestClass::Get,
        }
    }
}

/// S3 requests sent (every attempt, retries included) by price class and by what came
/// back, with their estimated cost.
#[derive(Debug)]
pub struct S3Requests {
    pub get: AtomicU64,
    pub put: AtomicU64,
    pub delete: AtomicU64,
    /// Answers 2xx and 3xx (304 is a revalidation's normal answer).
    pub answered_ok: AtomicU64,
    /// 404: a miss, normal.
    pub not_found: AtomicU64,
    /// 409 and 412: a conditional write lost to another writer.
    pub conflicts: AtomicU64,
    /// Other 4xx: refused (credentials, permissions, bad requests).
    pub client_errors: AtomicU64,
    /// 5xx: the store failed (503 SlowDown included).
    pub server_errors: AtomicU64,
    /// 503 and 429: S3 asked us to slow down (also counted above).
    pub throttled: AtomicU64,
    /// How many requests may be in flight: cut when S3 throttles, grown as it answers.
    pub in_flight: InFlight,
    /// Slow GETs sent a second time: the delay, the budget, what they did.
    pub hedging: Hedging,
    /// No answer: timeouts, refused or dropped connections.
    pub no_answer: AtomicU64,
    /// Conditional writes whose answer was lost, settled by reading the object back: found
    /// applied, found not applied, or not to be told (answered `SERVER_ERROR`).
    pub settled_applied: AtomicU64,
    pub settled_not_applied: AtomicU64,
    pub outcomes_unknown: AtomicU64,
    /// The most writes found after ours in a history when a write was settled applied:
    /// how close settlements come to the history's bound.
    pub settled_depth_max: AtomicU64,
    pub prices: S3Prices,
    /// Time of each attempt, by S3 operation and answer.
    pub latency: BackendTimings,
    /// Since when the counts run (start, or the last `stats reset`), for the hourly cost.
    since: std::sync::Mutex<tokio::time::Instant>,
}

impl S3Requests {
    pub fn new(prices: S3Prices, max_in_flight: usize, hedge: HedgeSettings) -> Self {
        S3Requests {
            get: AtomicU64::new(0),
            put: AtomicU64::new(0),
            delete: AtomicU64::new(0),
            answered_ok: AtomicU64::new(0),
            not_found: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            client_errors: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            in_flight: InFlight::new(max_in_flight),
            hedging: Hedging::new(hedge),
            no_answer: AtomicU64::new(0),
            settled_applied: AtomicU64::new(0),
            settled_not_applied: AtomicU64::new(0),
            outcomes_unknown: AtomicU64::new(0),
            settled_depth_max: AtomicU64::new(0),
            prices,
            latency: BackendTimings::default(),
            since: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Counts one request sent.
    pub fn sent(&self, class: RequestClass) {
        bump(match class {
            RequestClass::Get => &self.get,
            RequestClass::Put => &self.put,
            RequestClass::Delete => &self.delete,
        });
    }

    /// Counts one answer by its HTTP status, or one attempt that got none, and moves the
    /// in-flight limit: down when S3 throttles, up as it answers.
    pub fn answered(&self, status: Option<u16>) {
        match status {
            Some(429 | 503) => {
                bump(&self.throttled);
                self.in_flight.throttled();
            }
            Some(_) => self.in_flight.answered(),
            None => {}
        }
        bump(match status {
            None => &self.no_answer,
            Some(200..=399) => &self.answered_ok,
            Some(404) => &self.not_found,
            Some(409 | 412) => &self.conflicts,
            Some(400..=499) => &self.client_errors,
            Some(_) => &self.server_errors,
        });
    }

    /// Counts one write whose answer was lost, by what reading it back found (`None`: it
    /// could not tell).
    pub fn settled(&self, applied: Option<bool>) {
        bump(match applied {
            Some(true) => &self.settled_applied,
            Some(false) => &self.settled_not_applied,
            None => &self.outcomes_unknown,
        });
    }

    /// Estimated cost of the requests counted so far, in US dollars.
    pub fn cost_usd(&self) -> f64 {
        let n = |c: &AtomicU64| c.load(Relaxed) as f64 / 1000.0;
        n(&self.get) * self.prices.get_per_1000
            + n(&self.put) * self.prices.put_per_1000
            + n(&self.delete) * self.prices.delete_per_1000
    }

    /// The cost so far spread over the hours the counts ran (at least a minute, so the
    /// first requests after a start do not read as a huge rate).
    pub fn cost_per_hour_usd(&self) -> f64 {
        let since = *self.since.lock().expect("since lock");
        let hours = since.elapsed().as_secs_f64().max(60.0) / 3600.0;
        self.cost_usd() / hours
    }

    /// Rows for `stats`: requests by class and answer, and the cost in nano-dollars
    /// (stats values are integers; a GET costs 400 of them at the default price).
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("s3_get_requests", self.get.load(Relaxed)),
            ("s3_put_requests", self.put.load(Relaxed)),
            ("s3_delete_requests", self.delete.load(Relaxed)),
            ("s3_answers_ok", self.answered_ok.load(Relaxed)),
            ("s3_answers_not_found", self.not_found.load(Relaxed)),
            ("s3_answers_conflict", self.conflicts.load(Relaxed)),
            ("s3_answers_client_error", self.client_errors.load(Relaxed)),
            ("s3_answers_server_error", self.server_errors.load(Relaxed)),
            ("s3_throttled", self.throttled.load(Relaxed)),
            ("s3_in_flight_limit", self.in_flight.limit() as u64),
            ("s3_hedged_gets", self.hedging.sent.load(Relaxed)),
            ("s3_hedge_wins", self.hedging.won.load(Relaxed)),
            ("s3_hedge_delay_us", self.hedging.delay().as_micros() as u64),
            ("s3_no_answer", self.no_answer.load(Relaxed)),
            (
                "s3_writes_settled_applied",
                self.settled_applied.load(Relaxed),
            ),
            (
                "s3_writes_settled_not_applied",
                self.settled_not_applied.load(Relaxed),
            ),
            (
                "s3_write_outcomes_unknown",
                self.outcomes_unknown.load(Relaxed),
            ),
            (
                "s3_write_settled_depth_max",
                self.settled_depth_max.load(Relaxed),
            ),
            ("s3_cost_nanousd", (self.cost_usd() * 1e9).round() as u64),
            (
                "s3_cost_per_hour_nanousd",
                (self.cost_per_hour_usd() * 1e9).round() as u64,
            ),
        ]
    }

    /// `stats reset`: zero the counts and restart the hourly cost.
    pub fn reset(&self) {
        for c in [
            &self.get,
            &self.put,
            &self.delete,
            &self.answered_ok,
            &self.not_found,
            &self.conflicts,
            &self.client_errors,
            &self.server_errors,
            &self.throttled,
            &self.no_answer,
            &self.settled_applied,
            &self.settled_not_applied,
            &self.outcomes_unknown,
            &self.settled_depth_max,
            &self.hedging.sent,
            &self.hedging.won,
        ] {
            c.store(0, Relaxed);
        }
        *self.since.lock().expect("since lock") = tokio::time::Instant::now();
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_classed_as_aws_bills_them() {
        use RequestClass::*;
        assert_eq!(RequestClass::of("GET", ""), Get);
        assert_eq!(RequestClass::of("HEAD", ""), Get);
        assert_eq!(RequestClass::of("GET", "x-id=GetObject"), Get);
        assert_eq!(RequestClass::of("GET", "list-type=2&prefix=a"), Put);
        assert_eq!(RequestClass::of("PUT", "x-id=PutObject"), Put);
        assert_eq!(RequestClass::of("POST", "delete"), Delete);
        assert_eq!(RequestClass::of("POST", "delete="), Delete);
        assert_eq!(RequestClass::of("POST", "uploads"), Put);
        assert_eq!(RequestClass::of("DELETE", "x-id=DeleteObject"), Delete);
    }

    #[test]
    fn cost_follows_the_prices_and_shows_in_stats() {
        let s3 = S3Requests::new(AWS_S3_STANDARD_PRICES, 4, HedgeSettings::OFF);
        for _ in 0..1000 {
            s3.sent(RequestClass::Get);
        }
        for _ in 0..2000 {
            s3.sent(RequestClass::Put);
        }
        s3.sent(RequestClass::Delete);
        let expected = 0.0004 + 2.0 * 0.005;
        assert!((s3.cost_usd() - expected).abs() < 1e-12);
        let rows = s3.snapshot();
        let row = |name| rows.iter().find(|(n, _)| *n == name).unwrap().1;
        assert_eq!(row("s3_get_requests"), 1000);
        assert_eq!(row("s3_put_requests"), 2000);
        assert_eq!(row("s3_cost_nanousd"), 10_400_000);
        // Under a minute of counting: the cost is spread over one minute.
        assert_eq!(row("s3_cost_per_hour_nanousd"), 60 * 10_400_000);
        s3.reset();
        assert_eq!(s3.cost_usd(), 0.0);
    }
}
