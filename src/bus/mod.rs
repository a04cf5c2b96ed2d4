//! The bus: RabbitMQ, as buildbus uses it.
//!
//! - [`topology`]: the exchanges and queues every component declares (idempotently);
//! - [`message`]: how an [`Envelope`](crate::model::Envelope) becomes an AMQP message
//!   (properties, filter headers, CloudEvents headers) and back;
//! - [`connect`]: connecting with backoff;
//! - [`publish`]: the confirmed publisher: bounded in-flight window, a message counts as
//!   published only when the broker acked it, and unconfirmed messages are resent after a
//!   reconnect;
//! - [`Destination`]: where messages go (broker host, port, vhost and exchange prefix,
//!   never the credentials): the key of file checkpoints.

pub mod connect;
pub mod message;
pub mod publish;
pub mod topology;

/// Errors talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("broker {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: lapin::Error,
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
}
