//! Rate limits for log lines that clients can cause at will, so no client floods the log.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Lets one log line through per interval and counts the ones it holds back.
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    last: Option<Instant>,
    suppressed: u64,
}

/// Lines about connections refused for speaking another protocol (binary, HTTP).
pub static REFUSED_CONNECTIONS: LogThrottle = LogThrottle::new(Duration::from_secs(1));

impl LogThrottle {
    pub const fn new(interval: Duration) -> Self {
        LogThrottle {
            interval,
            state: Mutex::new(State {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// Whether to log now; if so, how many lines were held back since the last one.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// [`allow`](Self::allow) at a given moment.
    pub fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let due = state
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if due {
            state.last = Some(now);
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let throttle = LogThrottle::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(throttle.allow_at(at(0)), Some(0));
        assert_eq!(throttle.allow_at(at(10)), None);
        assert_eq!(throttle.allow_at(at(999)), None);
        assert_eq!(throttle.allow_at(at(1000)), Some(2));
        assert_eq!(throttle.allow_at(at(1500)), None);
        assert_eq!(throttle.allow_at(at(5000)), Some(1));
        assert_eq!(throttle.allow_at(at(5001)), None);
    }
}
