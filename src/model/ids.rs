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

/// A SHA-256 over a domain and length-prefixed parts.
struct IdHasher(Sha256);

impl IdHasher {
    fn new(domain: &str) -> IdHasher {
        let mut h = Sha256::new();
        h.update(domain.as_bytes());
        IdHasher(h)
    }

    fn part(&mut self, p: &str) {
        // Length prefixes keep ("ab","c") and ("a","bc") apart.
        self.0.update((p.len() as u64).to_le_bytes());
        self.0.update(p.as_bytes());
    }

    /// `prefix` followed by the first 128 bits of the hash in lower-case hex.
    fn finish(self, prefix: &str) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let hash = self.0.finalize();
        let mut id = String::with_capacity(prefix.len() + 32);
        id.push_str(prefix);
        for b in &hash[..16] {
            id.push(char::from(HEX[usize::from(b >> 4)]));
            id.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        id
    }
}

/// The id of an entity: `kind` plus the parts that name it within build `build_id`.
pub fn entity_id(system: &str, build_id: &str, kind: &str, parts: &[&str]) -> String {
    let mut h = IdHasher::new("entity");
    for p in [system, build_id, kind].iter().chain(parts) {
        h.part(p);
    }
    h.finish("bb1e-")
}

/// The id of one message: an entity in one state.
pub fn message_id(entity_id: &str, state: &str) -> String {
    let mut h = IdHasher::new("message");
    h.part(entity_id);
    h.part(state);
    h.finish("bb1m-")
}

/// A short stable hash of a string, for shortened routing-key words and build ids.
pub fn short_hash(s: &str) -> String {
    let mut h = IdHasher::new("short");
    h.part(s);
    let mut hex = h.finish("");
    hex.truncate(16);
    hex
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

    /// The ids are stored and deduplicated on: their values must never change.
    #[test]
    fn ids_keep_their_values() {
        let e = entity_id("bazel", "b1", "task", &["//a:b", "build"]);
        assert_eq!(e, "bb1e-a5920dac8ee56c5be1cb8b3edddd699b");
        assert_eq!(
            message_id(&e, "succeeded"),
            "bb1m-641e3078b84741ab11e9842e57275eb6"
        );
        assert_eq!(short_hash("x"), "92e8937097dfb3d0");
    }
}
