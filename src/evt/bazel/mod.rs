//! The Bazel front end: Build Event Protocol in, normalized messages out.
//!
//! - [`proto`]: our own `.proto` subset of BEP, generated into prost types with pbjson
//!   serde impls, so the JSON and the binary file decode into the same typed events;
//! - [`codec`]: one framed event (a JSON line or a varint frame) to a typed event;
//! - [`translate`]: the live model of an invocation that turns events into messages.
//!
//! Later: the Build Event Service (gRPC) source feeds the same translator.

pub mod bes;
pub mod codec;
pub mod proto;
pub mod translate;

pub use translate::BazelTranslator;
