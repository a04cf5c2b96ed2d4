//! Bazel's Build Event Protocol, decoded.
//!
//! - [`proto`]: our own `.proto` subset of BEP, generated into prost types with pbjson
//!   serde impls, so the JSON and the binary file decode into the same typed events;
//! - [`codec`]: one framed event (a JSON line or a varint frame) to a typed event;
//! - [`sparse`]: the binary codec's shortcut that leaves out, at the wire level, the
//!   parts of an event the translator never reads.

pub mod codec;
pub mod proto;
pub mod sparse;
