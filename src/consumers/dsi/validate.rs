//! Checking a delivered message before it is stored: valid JSON, a known kind, and
//! valid against that kind's JSON Schema (`schemas/<kind>.schema.json`, compiled in).
//! What fails here is poison: dead-lettered with the reason, never retried.

use std::collections::BTreeMap;

use jsonschema::{Draft, Registry, Validator};
use serde_json::Value;

use crate::model::{Envelope, Kind};

const SCHEMAS: [(&str, &str); 7] = [
    (
        "common",
        include_str!("../../../schemas/common.schema.json"),
    ),
    (
        "envelope",
        include_str!("../../../schemas/envelope.schema.json"),
    ),
    ("build", include_str!("../../../schemas/build.schema.json")),
    ("task", include_str!("../../../schemas/task.schema.json")),
    ("test", include_str!("../../../schemas/test.schema.json")),
    (
        "artifact",
        include_str!("../../../schemas/artifact.schema.json"),
    ),
    ("log", include_str!("../../../schemas/log.schema.json")),
];

/// The compiled schema of every kind.
pub struct Validators {
    by_kind: BTreeMap<Kind, Validator>,
}

impl Validators {
    /// Compiles the bundled schemas (they are tested to compile).
    pub fn new() -> Result<Validators, String> {
        let docs: Vec<(String, Value)> = SCHEMAS
            .iter()
            .map(|(name, text)| {
                let doc: Value =
                    serde_json::from_str(text).map_err(|e| format!("schema {name}: {e}"))?;
                let id = doc
                    .get("$id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("schema {name} has no $id"))?
                    .to_string();
                Ok((id, doc))
            })
            .collect::<Result<_, String>>()?;
        let registry = Registry::new()
            .draft(Draft::Draft202012)
            .extend(docs.iter().cloned())
            .and_then(|b| b.prepare())
            .map_err(|e| format!("schema registry: {e}"))?;
        let mut by_kind = BTreeMap::new();
        for kind in Kind::ALL {
            let doc = SCHEMAS
                .iter()
                .position(|(n, _)| *n == kind.as_str())
                .map(|i| &docs[i].1)
                .ok_or_else(|| format!("no schema for {kind}"))?;
            let v = jsonschema::options()
                .with_draft(Draft::Draft202012)
                .offline()
                .with_registry(&registry)
                .build(doc)
                .map_err(|e| format!("schema {kind}: {e}"))?;
            by_kind.insert(kind, v);
        }
        Ok(Validators { by_kind })
    }

    /// Parses and checks one message body; `Err` says why it is poison.
    pub fn check(&self, body: &[u8]) -> Result<Envelope, String> {
        let v: Value = serde_json::from_slice(body).map_err(|e| format!("not valid JSON: {e}"))?;
        let kind = v
            .pointer("/_meta/kind")
            .and_then(Value::as_str)
            .and_then(Kind::parse)
            .ok_or_else(|| "no known _meta.kind".to_string())?;
        if let Some(validator) = self.by_kind.get(&kind).filter(|v2| !v2.is_valid(&v)) {
            if let Some(e) = validator.iter_errors(&v).next() {
                return Err(format!(
                    "violates schema buildbus/{kind}/v1 at {:?}: {e}",
                    e.instance_path().as_str()
                ));
            }
        }
        let env: Envelope =
            serde_json::from_value(v).map_err(|e| format!("does not fit the {kind} model: {e}"))?;
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poison_is_told_apart() {
        let v = Validators::new().unwrap();
        assert!(v.check(b"{nope").unwrap_err().contains("not valid JSON"));
        assert!(v
            .check(b"{\"_meta\":{\"kind\":\"x\"}}")
            .unwrap_err()
            .contains("kind"));
        let err = v
            .check(b"{\"_meta\":{\"kind\":\"task\"},\"payload\":{}}")
            .unwrap_err();
        assert!(err.contains("violates schema buildbus/task/v1"), "{err}");
    }
}
