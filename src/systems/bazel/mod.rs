//! Bazel: Build Event Protocol events, translated.
//!
//! - [`translate`]: the live model of an invocation that turns BEP events (decoded by
//!   [`crate::decode::bep`]) into messages.

pub mod translate;

pub use translate::BazelTranslator;
