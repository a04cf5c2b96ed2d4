//! The topology every component declares, idempotently, before it uses the bus.
//!
//! | name | type | what for |
//! |---|---|---|
//! | `<prefix>/build`, `/task`, `/test`, `/artifact`, `/log` | durable topic exchanges | one per message kind; routing keys as in `schemas/README.md` |
//! | `<prefix>/dead-letter` | durable fanout exchange | poison messages and messages over a queue's delivery or length limit |
//! | `queue/buildbus/dead-letter` | durable quorum queue | where dead letters wait to be inspected (`x-buildbus-error` says why) |
//! | `queue/buildbus/dsi` | durable quorum queue, delivery limit, dead-lettering | the DSI workers' shared queue, bound to every kind exchange with `#` |
//!
//! `<prefix>` is `exchange/buildbus/v1` unless configured otherwise. Declaring what
//! already exists with the same arguments is a no-op, so every process declares.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use super::BusError;
use crate::model::Kind;

/// The DSI workers' shared queue.
pub const DSI_QUEUE: &str = "queue/buildbus/dsi";
/// Where dead letters go.
pub const DEAD_LETTER_QUEUE: &str = "queue/buildbus/dead-letter";
/// How often a message may be delivered to the DSI before it is dead-lettered.
pub const DSI_DELIVERY_LIMIT: i64 = 20;

/// The names of one deployment's exchanges and queues.
#[derive(Debug, Clone)]
pub struct Topology {
    pub prefix: String,
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

impl Topology {
    pub fn new(prefix: &str) -> Topology {
        Topology {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    pub fn exchange(&self, kind: Kind) -> String {
        kind.exchange(&self.prefix).into_owned()
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}/dead-letter", self.prefix)
    }

    /// Declares the kind exchanges and the dead-letter exchange and queue.
    pub async fn declare_exchanges(&self, ch: &Channel) -> Result<(), BusError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for kind in Kind::ALL {
            let name = self.exchange(kind);
            ch.exchange_declare(
                name.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(BusError::amqp(format!("declare exchange {name}")))?;
        }
        let dlx = self.dead_letter_exchange();
        ch.exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(BusError::amqp(format!("declare exchange {dlx}")))?;
        self.declare_queue(
            ch,
            DEAD_LETTER_QUEUE,
            table(&[("x-queue-type", string("quorum"))]),
        )
        .await?;
        ch.queue_bind(
            DEAD_LETTER_QUEUE.into(),
            dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BusError::amqp(format!("bind {DEAD_LETTER_QUEUE}")))?;
        Ok(())
    }

    /// Declares a durable queue with `args`.
    pub async fn declare_queue(
        &self,
        ch: &Channel,
        name: &str,
        args: FieldTable,
    ) -> Result<(), BusError> {
        let opts = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(name.into(), opts, args)
            .await
            .map_err(BusError::amqp(format!("declare queue {name}")))?;
        Ok(())
    }

    /// The arguments of a quorum queue that dead-letters to our exchange.
    pub fn quorum_args(&self, delivery_limit: i64) -> FieldTable {
        table(&[
            ("x-queue-type", string("quorum")),
            ("x-delivery-limit", AMQPValue::LongLongInt(delivery_limit)),
            (
                "x-dead-letter-exchange",
                string(&self.dead_letter_exchange()),
            ),
        ])
    }

    /// Declares everything, including the DSI queue bound to every kind.
    pub async fn declare_all(&self, ch: &Channel) -> Result<(), BusError> {
        self.declare_exchanges(ch).await?;
        self.declare_queue(ch, DSI_QUEUE, self.quorum_args(DSI_DELIVERY_LIMIT))
            .await?;
        for kind in Kind::ALL {
            let ex = self.exchange(kind);
            ch.queue_bind(
                DSI_QUEUE.into(),
                ex.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BusError::amqp(format!("bind {DSI_QUEUE} to {ex}")))?;
        }
        Ok(())
    }
}
