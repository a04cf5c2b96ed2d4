//! BitBake (Yocto): event logs and live sessions, translated.
//!
//! - [`codec`]: one event-log line (an event, or the build's variables) to a typed
//!   event, through the non-executing [pickle reader](crate::decode::pickle);
//! - [`pyformat`]: Python's `%`-formatting of log records;
//! - [`translate`]: the live model of a BitBake command that turns events into messages.

pub mod codec;
pub mod pyformat;
pub mod translate;

pub use translate::BitbakeTranslator;
