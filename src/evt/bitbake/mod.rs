//! The BitBake front end: event logs and the live XMLRPC interface.
//!
//! - [`pickle`]: a non-executing decoder of the pickled event objects;
//! - [`codec`]: one event-log line (an event, or the build's variables) to a typed event;
//! - [`pyformat`]: Python's `%`-formatting of log records;
//! - [`translate`]: the live model of a BitBake command that turns events into messages;
//! - [`xmlrpc`], [`live`]: BitBake's live UI interface (we are the UI), and [`replay`],
//!   a server that replays a recorded session;
//! - [`session`]: a live session fed through the translator.

pub mod codec;
pub mod live;
pub mod pickle;
pub mod pyformat;
pub mod replay;
pub mod session;
pub mod translate;
pub mod xmlrpc;

pub use translate::BitbakeTranslator;
