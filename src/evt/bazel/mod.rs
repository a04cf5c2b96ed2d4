//! The Bazel front end: Build Event Protocol in, normalized messages out.
//!
//! - [`proto`]: our own `.proto` subset of BEP, generated into prost types with pbjson
//!   serde impls, so the JSON and the binary file decode into the same typed events;
//! - [`codec`]: one framed event (a JSON line or a varint frame) to a typed event;
//! - [`sparse`]: the binary codec's shortcut that leaves out, at the wire level, the
//!   parts of an event the translator never reads;
//! - [`translate`]: the live model of an invocation that turns events into messages.
//!
//! - [`bes`]: the Build Event Service (gRPC) backend feeding the same translator live.

pub mod bes;
pub mod codec;
pub mod proto;
pub mod sparse;
pub mod translate;

pub use translate::BazelTranslator;
