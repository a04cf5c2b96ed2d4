//! Connecting to the broker, with exponential backoff and jitter, never a busy loop.
//!
//! Only transient faults (connection refused or reset, a broker restarting, a timeout)
//! are retried, with a warning per attempt; a refusal that retrying cannot fix (wrong
//! user name or password, a missing vhost, a bad URL: see [`BusError::is_permanent`])
//! ends [`connect`] at once. An optional deadline bounds the retrying too.
//!
//! Every attempt opens its own TCP connection and, for an `amqps` URL, always runs the
//! TLS handshake with [`BrokerTls`]'s configuration (server certificate verified): a TLS
//! failure (an untrusted certificate, a port that does not speak TLS) is permanent.

use std::time::Duration;

use lapin::tcp::AsyncTcpStream;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};

use super::tls::{BrokerTls, REFUSAL_WAIT};
use super::{redact_url, refusal, BusError, Stage};

/// The longest one connection attempt may take (TCP, TLS and the AMQP handshake).
pub const ATTEMPT_LIMIT: Duration = Duration::from_secs(30);

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

/// One connection attempt (at most [`ATTEMPT_LIMIT`]).
pub async fn connect_once(url: &str, tls: &BrokerTls) -> Result<Connection, BusError> {
    connect_once_with(url, tls, ConnectionProperties::default(), ATTEMPT_LIMIT).await
}

/// One connection attempt with these properties, given up after `limit`. A permanent
/// refusal comes back as [`BusError::Refused`], a transient fault as
/// [`BusError::Connect`].
pub async fn connect_once_with(
    url: &str,
    tls: &BrokerTls,
    props: ConnectionProperties,
    limit: Duration,
) -> Result<Connection, BusError> {
    let uri: AMQPUri = url.parse().map_err(|e: String| BusError::Refused {
        url: redact_url(url),
        reason: format!("invalid broker URL: {}", scrub(&e, url)),
    })?;
    let vhost = uri.vhost.clone();
    // `amqps` always means TLS: the handshake is ours, not left to lapin's defaults.
    let attempt = match uri.scheme {
        AMQPScheme::AMQP => None,
        AMQPScheme::AMQPS => Some(tls.attempt().map_err(|reason| BusError::Refused {
            url: redact_url(url),
            reason,
        })?),
    };
    let runtime = lapin::runtime::default_runtime().map_err(|source| BusError::Connect {
        url: redact_url(url),
        source,
    })?;
    let open = Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, runtime| {
            let host = uri.authority.host.clone();
            let addrs = runtime.to_socket_addrs((host.clone(), uri.authority.port));
            let tcp = AsyncTcpStream::connect(&runtime, addrs).await?;
            let Some(attempt) = &attempt else {
                return Ok(tcp);
            };
            let mut stream = tcp.into_rustls(&attempt.connector, &host).await?;
            if attempt.asked_for_certificate() {
                await_refusal(&mut stream).await?;
            }
            Ok(stream)
        },
        props,
    );
    let source = match tokio::time::timeout(limit, open).await {
        Ok(Ok(c)) => return Ok(c),
        Ok(Err(e)) => e,
        Err(_) => lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connecting took over {} ms", limit.as_millis()),
        )),
    };
    Err(match refusal(&source, Stage::Handshake) {
        Some(reason) => BusError::Refused {
            url: redact_url(url),
            reason: match source.kind() {
                lapin::ErrorKind::ProtocolError(a) if a.get_id() == 530 => format!(
                    "vhost '{vhost}' not found or not allowed for this user ({})",
                    a.get_message()
                ),
                _ => reason,
            },
        },
        None => BusError::Connect {
            url: redact_url(url),
            source,
        },
    })
}

/// After a TLS 1.3 handshake in which the broker asked for a client certificate, waits
/// up to [`REFUSAL_WAIT`] for the broker to refuse ours (an alert: permanent) before
/// anything is written; a broker that accepted it sends nothing before the AMQP header.
async fn await_refusal<S>(stream: &mut AsyncTcpStream<S>) -> std::io::Result<()>
where
    S: futures_util::AsyncRead + futures_util::AsyncWrite + Send + Unpin + 'static,
{
    use futures_util::AsyncReadExt;
    let tls13 = match &*stream {
        AsyncTcpStream::Rustls(t) => {
            t.get_ref().1.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3)
        }
        _ => false,
    };
    if !tls13 {
        return Ok(());
    }
    let mut byte = [0u8; 1];
    match tokio::time::timeout(REFUSAL_WAIT, stream.read(&mut byte)).await {
        Err(_) => Ok(()),
        Ok(Err(e)) => Err(e),
        Ok(Ok(0)) => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the broker closed the connection right after the TLS handshake",
        )),
        Ok(Ok(_)) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the broker sent data before the AMQP header",
        )),
    }
}

/// Connects, retrying transient faults with backoff (a warning per attempt) until it
/// works, a permanent refusal comes, or `deadline` (if any) passes.
pub async fn connect(
    url: &str,
    tls: &BrokerTls,
    deadline: Option<Duration>,
) -> Result<Connection, BusError> {
    connect_with(url, tls, ConnectionProperties::default(), deadline).await
}

/// [`connect`] with these connection properties.
pub async fn connect_with(
    url: &str,
    tls: &BrokerTls,
    props: ConnectionProperties,
    deadline: Option<Duration>,
) -> Result<Connection, BusError> {
    let start = tokio::time::Instant::now();
    let mut backoff = Backoff::default();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let limit = match deadline {
            Some(d) => d
                .saturating_sub(start.elapsed())
                .clamp(Duration::from_millis(100), ATTEMPT_LIMIT),
            None => ATTEMPT_LIMIT,
        };
        let e = match connect_once_with(url, tls, props.clone(), limit).await {
            Ok(c) => return Ok(c),
            Err(e) if e.is_permanent() => return Err(e),
            Err(e) => e,
        };
        let mut delay = backoff.next_delay();
        if let Some(d) = deadline {
            let left = d.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(gave_up(url, attempts, start.elapsed(), &e));
            }
            delay = delay.min(left);
        }
        tracing::warn!(
            "{e}; attempt {attempts} failed, retrying in {} ms",
            delay.as_millis()
        );
        tokio::time::sleep(delay).await;
    }
}

/// The error of a connect loop that ran out of time after `attempts` attempts.
pub fn gave_up(url: &str, attempts: u32, elapsed: Duration, last: &BusError) -> BusError {
    let last = match last {
        BusError::Connect { source, .. } => source.to_string(),
        e => e.to_string(),
    };
    BusError::GaveUp {
        url: redact_url(url),
        attempts,
        secs: elapsed.as_secs_f64(),
        last,
    }
}

/// `msg` without `url`'s password (URL parse errors may quote the URL).
fn scrub(msg: &str, url: &str) -> String {
    let mut m = msg.replace(url, &redact_url(url));
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.rsplit_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, pw)| pw);
    if let Some(pw) = password.filter(|pw| !pw.is_empty()) {
        m = m.replace(pw, "***");
    }
    m
}

#[cfg(test)]
mod tests {
    #[test]
    fn url_errors_hide_the_password() {
        let url = "amqp://guest:s3cret@127.0.0.1:5672/%2f";
        let m = super::scrub(&format!("Invalid URL: '{url}' (s3cret)"), url);
        assert!(!m.contains("s3cret"), "{m}");
        assert!(m.contains("guest:***@127.0.0.1:5672"), "{m}");
    }
}
