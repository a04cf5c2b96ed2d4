//! The bus: RabbitMQ, as buildbus uses it.
//!
//! - [`topology`]: the exchanges and queues every component declares (idempotently);
//! - [`message`]: how an [`Envelope`](crate::model::Envelope) becomes an AMQP message
//!   (properties, filter headers, CloudEvents headers) and back;
//! - [`connect`]: connecting with backoff;
//! - [`publish`]: the confirmed publisher: bounded in-flight window, a message counts as
//!   published only when the broker acked it, and unconfirmed messages are resent after a
//!   reconnect;

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

#[cfg(test)]
mod tests {
    #[test]
    fn url_passwords_are_hidden() {
        assert_eq!(
            super::redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(super::redact_url("amqp://h/"), "amqp://h/");
    }
}
