//! The monitor's queue: naming, arguments, declaring, and keeping its bindings in line
//! with the filters across restarts.
//!
//! This module owns everything the monitor declares on the broker besides the shared
//! topology (which is [`bus::topology`](crate::bus::topology)'s):
//!
//! - **labelled** monitors get a durable quorum queue `queue/<user>/<label>` (the user
//!   of the AMQP URL), kept while the monitor is down, with a length limit
//!   (`x-max-length`, 100,000 messages by default, optionally `x-max-length-bytes`),
//!   `x-overflow: drop-head` and dead-lettering to the dead-letter exchange, so a
//!   forgotten consumer cannot grow the broker without bound: the oldest messages go
//!   to `queue/buildbus/dead-letter` instead. (`reject-publish` would make the broker
//!   nack the *publisher*, which would stall the whole bus for one slow consumer.)
//!   `x-delivery-limit` stops a message that crashes the consumer process (which no
//!   `catch_unwind` can catch) from being redelivered forever.
//! - **unlabelled** monitors get an exclusive, auto-delete queue with a server-made
//!   name: it lives as long as the connection.
//!
//! # Reconciling bindings
//!
//! AMQP cannot list a queue's bindings, yet a labelled queue outlives its monitor, and
//! a monitor restarted with other filters must drop the bindings it no longer wants
//! (or the old ones would keep filling the queue). So a labelled monitor records its
//! bindings in a small durable side queue, `queue/<user>/<label>/bindings` (labels
//! cannot hold `/`, so no label's queue can be another's side queue), one JSON record
//! per message. On every (re)connect:
//!
//! 1. read every record (without acking) → the old set, the union of all records;
//! 2. publish a record of the new set (confirmed), *before* touching a binding;
//! 3. bind the new set; unbind old − new;
//! 4. ack the old records.
//!
//! Whatever step a crash interrupts, the records left in the side queue cover every
//! binding that may exist, so the next start removes what it does not want.

use std::collections::BTreeSet;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde::{Deserialize, Serialize};

use super::bindings::Binding;

/// The default length limit of a labelled queue.
pub const DEFAULT_MAX_LENGTH: u64 = 100_000;
/// Deliveries of one message to labelled queues before the broker dead-letters it.
pub const DELIVERY_LIMIT: i64 = 20;
/// The longest label.
pub const MAX_LABEL: usize = 100;

/// Checks a label: 1 to 100 letters, digits or `-_.:@+`.
pub fn check_label(label: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "-_.:@+".contains(c);
    if label.is_empty() || label.len() > MAX_LABEL || !label.chars().all(ok) {
        return Err(format!(
            "label {label:?}: use 1 to {MAX_LABEL} letters, digits or -_.:@+"
        ));
    }
    Ok(())
}

/// The AMQP user of `url` (`guest` when the URL names none).
pub fn url_user(url: &str) -> Result<String, String> {
    url.parse::<lapin::uri::AMQPUri>()
        .map(|u| u.authority.userinfo.username)
        .map_err(|e| format!("AMQP URL {}: {e}", crate::bus::redact_url(url)))
}

/// `queue/<user>/<label>`.
pub fn queue_name(user: &str, label: &str) -> String {
    format!("queue/{user}/{label}")
}

/// The side queue holding a labelled queue's binding records.
pub fn record_queue(queue: &str) -> String {
    format!("{queue}/bindings")
}

/// How a labelled queue is declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueLimits {
    pub max_length: u64,
    pub max_length_bytes: Option<u64>,
}

fn put(t: &mut FieldTable, k: &str, v: AMQPValue) {
    t.insert(ShortString::from(k), v);
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// The arguments of a labelled queue.
pub fn durable_args(limits: &QueueLimits, dead_letter_exchange: &str) -> FieldTable {
    let mut t = FieldTable::default();
    put(&mut t, "x-queue-type", string("quorum"));
    put(
        &mut t,
        "x-max-length",
        AMQPValue::LongLongInt(limits.max_length.min(i64::MAX as u64) as i64),
    );
    if let Some(b) = limits.max_length_bytes {
        put(
            &mut t,
            "x-max-length-bytes",
            AMQPValue::LongLongInt(b.min(i64::MAX as u64) as i64),
        );
    }
    put(&mut t, "x-overflow", string("drop-head"));
    put(
        &mut t,
        "x-dead-letter-exchange",
        string(dead_letter_exchange),
    );
    put(
        &mut t,
        "x-delivery-limit",
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    t
}

/// Declares the labelled queue `name`.
pub async fn declare_durable(
    ch: &Channel,
    name: &str,
    limits: &QueueLimits,
    dead_letter_exchange: &str,
) -> Result<(), lapin::Error> {
    let opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(
        name.into(),
        opts,
        durable_args(limits, dead_letter_exchange),
    )
    .await
    .map(|_| ())
}

/// Declares an exclusive, auto-delete queue; returns the name the server gave it.
pub async fn declare_exclusive(ch: &Channel) -> Result<String, lapin::Error> {
    let opts = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let q = ch
        .queue_declare("".into(), opts, FieldTable::default())
        .await?;
    Ok(q.name().as_str().to_string())
}

/// Binds `queue` with every binding.
pub async fn bind_all(ch: &Channel, queue: &str, bindings: &[Binding]) -> Result<(), lapin::Error> {
    for b in bindings {
        ch.queue_bind(
            queue.into(),
            b.exchange.as_str().into(),
            b.routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}

/// One record in the side queue.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    queue: String,
    written: String,
    bindings: Vec<Binding>,
}

/// What reconciling did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Bindings removed because the filters no longer want them.
    pub removed: Vec<Binding>,
    /// Records read from the side queue.
    pub records: usize,
}

/// Binds the labelled `queue` with `bindings` and removes the bindings that earlier
/// runs recorded but these filters no longer want (see the module documentation).
pub async fn reconcile(
    conn: &Connection,
    queue: &str,
    bindings: &[Binding],
) -> Result<Reconciled, lapin::Error> {
    let records = record_queue(queue);
    let rch = conn.create_channel().await?;
    rch.confirm_select(ConfirmSelectOptions::default()).await?;
    rch.queue_declare(
        records.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    // 1. Every record, unacked.
    let mut old: BTreeSet<Binding> = BTreeSet::new();
    let mut last = None;
    let mut count = 0;
    while let Some(m) = rch
        .basic_get(records.as_str().into(), BasicGetOptions { no_ack: false })
        .await?
    {
        count += 1;
        match serde_json::from_slice::<Record>(&m.delivery.data) {
            Ok(r) => old.extend(r.bindings),
            Err(e) => tracing::warn!("{records}: skipping an unreadable record: {e}"),
        }
        last = Some(m.delivery.acker.clone());
    }
    // 2. The new set, recorded before any binding changes.
    let record = Record {
        queue: queue.to_string(),
        written: crate::model::time::now().to_string(),
        bindings: bindings.to_vec(),
    };
    let body = serde_json::to_vec(&record).unwrap_or_default();
    let confirm = rch
        .basic_publish(
            "".into(),
            records.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into()),
        )
        .await?
        .await?;
    if !confirm.is_ack() {
        return Err(lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
            lapin::ChannelState::Error,
            "the broker refused a binding record",
        )));
    }
    // 3. Bind the new set, then drop what is no longer wanted.
    let ch = conn.create_channel().await?;
    bind_all(&ch, queue, bindings).await?;
    let new: BTreeSet<&Binding> = bindings.iter().collect();
    let mut removed = Vec::new();
    let mut uch = conn.create_channel().await?;
    for b in old.iter().filter(|b| !new.contains(b)) {
        let r = uch
            .queue_unbind(
                queue.into(),
                b.exchange.as_str().into(),
                b.routing_key.as_str().into(),
                FieldTable::default(),
            )
            .await;
        match r {
            Ok(()) => removed.push(b.clone()),
            Err(e) => {
                // An exchange that is gone (another prefix) takes its bindings with it.
                tracing::warn!(
                    "{queue}: cannot unbind {} {}: {e}",
                    b.exchange,
                    b.routing_key
                );
                uch = conn.create_channel().await?;
            }
        }
    }
    // 4. The old records are settled.
    if let Some(acker) = last {
        acker.ack(BasicAckOptions { multiple: true }).await?;
    }
    let _ = ch.close(200, "bound".into()).await;
    let _ = uch.close(200, "unbound".into()).await;
    let _ = rch.close(200, "recorded".into()).await;
    Ok(Reconciled {
        removed,
        records: count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_users() {
        assert!(check_label("tbpl-dash_1.0:x@y+z").is_ok());
        for bad in ["", "a/b", "a b", "a#b", &"x".repeat(101), "ünï"] {
            assert!(check_label(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            url_user("amqp://alice:secret@127.0.0.1:5672/%2f").unwrap(),
            "alice"
        );
        assert_eq!(url_user("amqp://127.0.0.1/").unwrap(), "guest");
        assert_eq!(url_user("amqp://b%40c:x@h/").unwrap(), "b@c");
        assert!(url_user("http://x").is_err());
        assert_eq!(queue_name("alice", "dash"), "queue/alice/dash");
        assert_eq!(
            record_queue("queue/alice/dash"),
            "queue/alice/dash/bindings"
        );
    }

    #[test]
    fn durable_queues_are_bounded_and_dead_letter() {
        let t = durable_args(
            &QueueLimits {
                max_length: 5,
                max_length_bytes: Some(1000),
            },
            "dlx",
        );
        let m = t.inner();
        assert_eq!(m.get("x-max-length"), Some(&AMQPValue::LongLongInt(5)));
        assert_eq!(
            m.get("x-max-length-bytes"),
            Some(&AMQPValue::LongLongInt(1000))
        );
        assert_eq!(m.get("x-overflow"), Some(&string("drop-head")));
        assert_eq!(m.get("x-dead-letter-exchange"), Some(&string("dlx")));
        assert_eq!(m.get("x-queue-type"), Some(&string("quorum")));
    }
}
