//! The bus: RabbitMQ, as buildbus uses it.
//!
//! - [`topology`]: the exchanges and queues every component declares (idempotently);
//! - [`message`]: how an [`Envelope`](crate::model::Envelope) becomes an AMQP message
//!   (properties, filter headers, CloudEvents headers) and back;
//! - [`connect`]: connecting with backoff;
//! - [`tls`]: TLS for `amqps` URLs (trusted CAs, client certificate, TLS refusals);
//! - [`publish`]: the confirmed publisher: bounded in-flight window, a message counts as
//!   published only when the broker acked it, and unconfirmed messages are resent after a
//!   reconnect;
//! - [`Destination`]: where messages go (broker host, port, vhost and exchange prefix,
//!   never the credentials): the key of file checkpoints.

pub mod connect;
pub mod message;
pub mod publish;
pub mod tls;
pub mod topology;

pub use tls::{BrokerTls, TlsError, TlsOptions};

/// Errors talking to the broker.
///
/// [`BusError::is_permanent`] is the one place that says which of them retrying cannot
/// fix (a wrong password, a missing vhost, a refused permission, a bad URL): every
/// connect and reconnect loop ends on those at once and retries only the rest.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("broker {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: lapin::Error,
    },
    /// The broker (or the URL) refused us for good: retrying cannot help.
    #[error("broker {url}: {reason}")]
    Refused { url: String, reason: String },
    /// Transient failures went on past the connect timeout.
    #[error(
        "broker {url}: gave up connecting after {attempts} attempts in {secs:.1} s \
         (--connect-timeout): {last}"
    )]
    GaveUp {
        url: String,
        attempts: u32,
        secs: f64,
        last: String,
    },
    #[error("broker: {what}: {source}")]
    Amqp {
        what: String,
        #[source]
        source: lapin::Error,
    },
    #[error("broker: {0}")]
    Other(String),
}

impl BusError {
    pub fn amqp(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> BusError {
        let what = what.into();
        move |source| BusError::Amqp { what, source }
    }

    /// True when retrying cannot fix it: the command should end at once.
    pub fn is_permanent(&self) -> bool {
        match self {
            BusError::Refused { .. } | BusError::GaveUp { .. } => true,
            BusError::Connect { source, .. } | BusError::Amqp { source, .. } => {
                refusal(source, Stage::Channel).is_some()
            }
            BusError::Other(_) => false,
        }
    }

    /// A permanent `Amqp` error turned into `Refused` naming the broker at `url`
    /// (password hidden); anything else unchanged.
    pub fn at(self, url: &str) -> BusError {
        match self {
            BusError::Amqp { what, source } => match refusal(&source, Stage::Channel) {
                Some(reason) => BusError::Refused {
                    url: redact_url(url),
                    reason: format!("{what}: {reason}"),
                },
                None => BusError::Amqp { what, source },
            },
            e => e,
        }
    }
}

/// Where an error happened: opening the connection (where 403 means bad credentials)
/// or on a channel (where it means a refused permission).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Handshake,
    Channel,
}

/// Why `e` is permanent, in words, or `None` when it is worth retrying (I/O errors,
/// connection resets, a broker shutting down, timeouts).
pub(crate) fn refusal(e: &lapin::Error, stage: Stage) -> Option<String> {
    use lapin::ErrorKind as K;
    match e.kind() {
        K::ProtocolError(a) => {
            let said = a.get_message().as_str();
            match a.get_id() {
                403 if stage == Stage::Handshake => Some(format!(
                    "access refused: wrong user name or password (broker said: {said})"
                )),
                403 => Some(format!("access refused: permission denied ({said})")),
                530 => Some(format!("vhost not found or not allowed ({said})")),
                402 => Some(format!("invalid vhost path ({said})")),
                406 => Some(format!("precondition failed ({said})")),
                540 => Some(format!("not implemented by the broker ({said})")),
                _ => None,
            }
        }
        K::AuthProviderError(s) => Some(format!("authentication failed: {s}")),
        K::InvalidProtocolVersion(v) => Some(format!("the broker only speaks AMQP {v}")),
        // A TLS failure (untrusted certificate, a port that does not speak TLS, the broker
        // refusing our certificate); plain I/O faults stay transient.
        K::IOError(io) => tls::tls_refusal(io),
        _ => None,
    }
}

/// Hides the password of an AMQP URL for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Where published messages go: the broker (`host:port`), the vhost and the exchange
/// prefix. The user and password are not part of it: the same broker reached with other
/// credentials is the same destination. This is what a file checkpoint belongs to, so
/// publishing a file to a new destination sends all of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Destination {
    /// `host:port`, the host in lower case, the port explicit (5672 for `amqp`, 5671 for
    /// `amqps` when the URL has none).
    pub broker: String,
    /// The vhost as the connection uses it (`%2f` decoded: `/`).
    pub vhost: String,
    /// The exchange prefix, without a trailing `/`.
    pub prefix: String,
}

impl Destination {
    /// The destination of `url` with exchange `prefix`. A URL that does not parse (the
    /// connection would fail on it anyway) keeps its text without the user information.
    pub fn of(url: &str, prefix: &str) -> Destination {
        let prefix = prefix.trim_end_matches('/').to_string();
        let parsed = url::Url::parse(url)
            .ok()
            .zip(url.parse::<lapin::uri::AMQPUri>().ok());
        match parsed {
            Some((u, amqp)) => {
                let host = u.host_str().unwrap_or("localhost").to_ascii_lowercase();
                Destination {
                    broker: format!("{host}:{}", amqp.authority.port),
                    vhost: amqp.vhost,
                    prefix,
                }
            }
            None => {
                let rest = url.split_once("://").map_or(url, |(_, r)| r);
                let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
                Destination {
                    broker: rest.to_string(),
                    vhost: String::new(),
                    prefix,
                }
            }
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} vhost {:?} prefix {:?}",
            self.broker, self.vhost, self.prefix
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Destination;

    #[test]
    fn destinations_are_host_port_vhost_and_prefix() {
        let d = Destination::of(
            "amqp://guest:secret@127.0.0.1:5673/%2f",
            "exchange/buildbus/v1/",
        );
        assert_eq!(
            d,
            Destination {
                broker: "127.0.0.1:5673".into(),
                vhost: "/".into(),
                prefix: "exchange/buildbus/v1".into(),
            }
        );
        let d = Destination::of("amqps://u:p@MQ.Example.com/builds", "x");
        assert_eq!(d.broker, "mq.example.com:5671");
        assert_eq!(d.vhost, "builds");
        assert_eq!(Destination::of("amqp://h", "x").broker, "h:5672");
        assert_eq!(
            Destination::of("amqp://[::1]:5700/v", "x").broker,
            "[::1]:5700"
        );
        // Not a URL: kept, without the user information.
        let d = Destination::of("nonsense://u:pw@@host:1/v", "x");
        assert!(!d.broker.contains("pw"), "{d}");
    }

    #[test]
    fn url_passwords_are_hidden() {
        assert_eq!(
            super::redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(super::redact_url("amqp://h/"), "amqp://h/");
    }

    fn amqp(code: u16) -> lapin::Error {
        let e = lapin::protocol::AMQPError::from_id(code, "broker text".into());
        lapin::ErrorKind::ProtocolError(e.expect("known code")).into()
    }

    #[test]
    fn refusals_are_permanent_and_faults_transient() {
        use super::{refusal, BusError, Stage};
        let login = refusal(&amqp(403), Stage::Handshake).unwrap_or_default();
        assert!(login.contains("wrong user name or password"), "{login}");
        let perm = refusal(&amqp(403), Stage::Channel).unwrap_or_default();
        assert!(perm.contains("permission denied"), "{perm}");
        for code in [402, 403, 406, 530, 540] {
            let e = BusError::amqp("declare")(amqp(code));
            assert!(e.is_permanent(), "{code}");
            let e = e.at("amqp://u:pw@h:1/v");
            assert!(matches!(e, BusError::Refused { .. }), "{code}: {e:?}");
            assert!(e.to_string().contains("u:***@h:1"), "{e}");
        }
        // CONNECTION_FORCED (a broker shutting down), RESOURCE_ERROR, NOT_FOUND, and
        // I/O errors are worth retrying.
        for code in [320, 404, 506, 541] {
            assert!(!BusError::amqp("x")(amqp(code)).is_permanent(), "{code}");
        }
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = BusError::Connect {
            url: "amqp://h".into(),
            source: io.into(),
        };
        assert!(!e.is_permanent());
    }
}
