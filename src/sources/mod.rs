//! Sources: the ways build events arrive, one folder each.
//!
//! A source owns the I/O of getting raw events in order and what "done with an event"
//! means to its sender; it knows nothing of what the events mean (that is
//! [`crate::systems`]) nor of the broker (that is [`crate::bus`]). The
//! [`pipeline`](crate::pipeline) wires a source to a build system's translator and the
//! confirmed publisher.
//!
//! - [`file`]: files read (and followed while they grow), with checkpoints of what the
//!   broker confirmed;
//! - [`bitbake_live`]: BitBake's live XML-RPC interface (buildbus is the UI);
//! - [`bes`]: the Bazel Build Event Service, a gRPC backend Bazel streams to.
//!
//! A new way events arrive is a new folder here, and one command in `cli/` that runs
//! it through the pipeline.

pub mod bes;
pub mod bitbake_live;
pub mod file;
