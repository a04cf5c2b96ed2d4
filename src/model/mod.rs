//! The normalized message model v1: the contract between every part of buildbus.
//!
//! Whatever build system a message came from, it leaves the EVT as an [`Envelope`]:
//! `{"_meta": {...}, "payload": {...}}`. `_meta` says where it goes on the bus (exchange,
//! routing key), what it is (kind, schema) and how to deduplicate it (`message_id`,
//! `entity_id`); `payload` carries the Pulse fields every consumer filters on (tree,
//! platform, buildtype, product, ...) plus the fields of its kind.
//!
//! The pieces live in small modules:
//! - [`envelope`]: `Envelope`, `Meta`, `Kind`, and the typed payloads of the five kinds;
//! - [`routing`]: the fixed-position routing keys and their reversible escaping;
//! - [`ids`]: deterministic message and entity ids;
//! - [`time`]: RFC 3339 timestamps from the clocks build systems use.
//!
//! The JSON Schemas in `schemas/` describe exactly what `serde` writes here; a test
//! validates every message produced from every fixture against them.

pub mod envelope;
pub mod ids;
mod json;
pub mod routing;
pub mod time;

pub use envelope::*;
