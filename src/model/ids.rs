//! Deterministic ids: the dedupe keys that make at-least-once delivery idempotent.
//!
//! An *entity* is one thing a build describes (the build itself, one task, one test
//! attempt, one artifact, one log record). Its `entity_id` is a hash of the build id, the
//! kind and the fields that name the entity; a `message_id` adds the *state* the message
//! describes (`started`, `finished`, a task's final outcome, ...). Both are pure functions
//! of the source stream, so translating the same stream twice gives the same ids, while
//! two builds (different build ids) or two states of one entity never share one.
//!
//! Ids are the first 128 bits of a SHA-256 over the length-prefixed parts, in hex, with a
//! short prefix saying what they are (`bb1m-` for messages, `bb1e-` for entities).

use sha2::{Digest, Sha256};

fn digest(domain: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    h.update(domain.as_bytes());
    for p in parts {
        // Length prefixes keep ("ab","c") and ("a","bc") apart.
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// The id of an entity: `kind` plus the parts that name it within build `build_id`.
pub fn entity_id(system: &str, build_id: &str, kind: &str, parts: &[&str]) -> String {
    let mut all = Vec::with_capacity(parts.len() + 3);
    all.extend_from_slice(&[system, build_id, kind]);
    all.extend_from_slice(parts);
    format!("bb1e-{}", digest("entity", &all))
}

/// The id of one message: an entity in one state.
pub fn message_id(entity_id: &str, state: &str) -> String {
    format!("bb1m-{}", digest("message", &[entity_id, state]))
}

/// A short stable hash of a string, for shortened routing-key words and build ids.
pub fn short_hash(s: &str) -> String {
    digest("short", &[s])[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let a = entity_id("bazel", "b1", "task", &["//a:b", "build"]);
        assert_eq!(a, entity_id("bazel", "b1", "task", &["//a:b", "build"]));
        assert_ne!(a, entity_id("bazel", "b2", "task", &["//a:b", "build"]));
        assert_ne!(a, entity_id("bazel", "b1", "task", &["//a:bb", "uild"]));
        assert_ne!(message_id(&a, "started"), message_id(&a, "finished"));
        assert!(a.starts_with("bb1e-") && a.len() == 5 + 32);
    }
}
