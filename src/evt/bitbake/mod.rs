//! The BitBake front end: event logs and the live XMLRPC interface.
//!
//! - [`pickle`]: a non-executing decoder of the pickled event objects;
//! - [`codec`]: one event-log line (an event, or the build's variables) to a typed event;
//! - [`pyformat`]: Python's `%`-formatting of log records;
//! - [`translate`]: the live model of a BitBake command that turns events into messages.

pub mod codec;
pub mod pickle;
pub mod pyformat;
pub mod translate;

pub use translate::BitbakeTranslator;
