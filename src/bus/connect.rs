//! Connecting to the broker, with exponential backoff and jitter, never a busy loop.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

use super::{redact_url, BusError};

/// Backoff between connection attempts: 100 ms doubling to `max`, with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The delay to wait now; the next one is longer.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        // Up to 25% jitter from the clock's nanoseconds: no RNG needed.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|t| t.subsec_nanos())
            .unwrap_or(0);
        d + d.mul_f64(f64::from(nanos % 1000) / 4000.0)
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// One connection attempt.
pub async fn connect_once(url: &str) -> Result<Connection, BusError> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|source| BusError::Connect {
            url: redact_url(url),
            source,
        })
}

/// Connects, retrying with backoff until it works or `deadline` (if any) passes.
pub async fn connect(url: &str, deadline: Option<Duration>) -> Result<Connection, BusError> {
    let start = tokio::time::Instant::now();
    let mut backoff = Backoff::default();
    loop {
        match connect_once(url).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                if deadline.is_some_and(|d| start.elapsed() >= d) {
                    return Err(e);
                }
                let delay = backoff.next_delay();
                tracing::warn!("{e}; retrying in {} ms", delay.as_millis());
                tokio::time::sleep(delay).await;
            }
        }
    }
}
