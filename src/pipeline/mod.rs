//! The pipeline: source → translate → publish.
//!
//! This is the one place where a source of raw events, a build system's translator
//! and the confirmed publisher meet. It owns what they share: the publisher's
//! in-flight window, which source position is durable once the broker confirmed every
//! message derived from it (checkpoints for files, acks for BES), and the artifact
//! scan when a build finishes.
//!
//! - [`file`]: a file (followed or not) to the broker, with its checkpoint;
//! - [`bitbake_live`]: a live BitBake session through the BitBake translator.

pub mod bitbake_live;
pub mod file;
