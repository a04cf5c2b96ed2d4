//! Decoders: bytes in, typed values out, and nothing else.
//!
//! Every module here is a pure function of the bytes it is given: no sockets, no
//! files, no clocks, no broker, no knowledge of what a build is. That is what makes
//! them easy to fuzz and safe to feed hostile input: each one returns a positioned
//! error instead of panicking.
//!
//! - [`error`]: input errors with origin, position and reason (shared by every reader);
//! - [`framing`]: cutting a byte stream into events (JSON lines, varint-delimited);
//! - [`pickle`]: a non-executing reader of Python pickles (BitBake's events);
//! - [`xmlrpc`]: XML-RPC bodies (BitBake's live interface);
//! - [`bep`]: Bazel's Build Event Protocol: the typed events and their JSON and
//!   binary decoders (with the sparse binary shortcut).
//!
//! What an event *means* is not decided here: that is the job of the build systems
//! in [`crate::systems`].

pub mod bep;
pub mod error;
pub mod framing;
pub mod pickle;
pub mod xmlrpc;

pub use error::{InputError, Position, Reason};
