//! How an envelope travels: AMQP properties and headers.
//!
//! Every message is persistent (delivery mode 2), `application/json`, carries
//! `message_id` (the deterministic id), `timestamp` (when it was sent), `type` (the
//! kind) and `app_id` `buildbus`. Headers let consumers filter without parsing the body:
//! `tree`, `platform`, `buildtype`, `product`, `system` (absent values are left out),
//! plus the CloudEvents attributes in the AMQP binding's `cloudEvents_` form: `id`,
//! `source` (`/buildbus/<system>/<build_id>`), `type` (`dev.buildbus.<kind>.<state>.v1`),
//! `time` and `specversion` (`1.0`).

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use crate::model::Envelope;

/// An envelope ready to publish: where it goes, its body and its properties.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub message_id: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

fn put(t: &mut FieldTable, k: &str, v: &str) {
    t.insert(
        ShortString::from(k),
        AMQPValue::LongString(LongString::from(v)),
    );
}

/// The CloudEvents `type` of an envelope.
pub fn cloudevents_type(env: &Envelope) -> String {
    format!("dev.buildbus.{}.{}.v1", env.meta.kind, env.meta.state)
}

impl Outgoing {
    pub fn from_envelope(env: &Envelope) -> Outgoing {
        let c = env.payload.common();
        let mut h = FieldTable::default();
        for (k, v) in [
            ("tree", &c.tree),
            ("platform", &c.platform),
            ("buildtype", &c.buildtype),
            ("product", &c.product),
        ] {
            if let Some(v) = v {
                put(&mut h, k, v);
            }
        }
        put(&mut h, "system", &c.system);
        put(&mut h, "kind", env.meta.kind.as_str());
        put(&mut h, "build_id", &c.build_id);
        put(&mut h, "cloudEvents_specversion", "1.0");
        put(&mut h, "cloudEvents_id", &env.meta.message_id);
        put(
            &mut h,
            "cloudEvents_source",
            &format!("/buildbus/{}/{}", c.system, c.build_id),
        );
        put(&mut h, "cloudEvents_type", &cloudevents_type(env));
        put(
            &mut h,
            "cloudEvents_time",
            c.timestamp.as_deref().unwrap_or(&env.meta.sent),
        );
        let sent = crate::model::time::to_millis(&env.meta.sent)
            .unwrap_or(0)
            .max(0) as u64
            / 1000;
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from(env.meta.message_id.as_str()))
            .with_timestamp(sent)
            .with_type(ShortString::from(env.meta.kind.as_str()))
            .with_app_id(ShortString::from("buildbus"))
            .with_headers(h);
        Outgoing {
            exchange: env.meta.exchange.to_string(),
            routing_key: env.meta.routing_key.clone(),
            message_id: env.meta.message_id.clone(),
            body: env.to_json(),
            properties,
        }
    }
}

/// A string header of a delivered message.
pub fn header(props: &BasicProperties, key: &str) -> Option<String> {
    let h = props.headers().as_ref()?;
    match h.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}
