//! AAM, the Artifacts Analysis Module: what a finished build left on disk, as
//! `artifact` messages.
//!
//! The AAM takes a build directory, finds the trees in it that hold the build's output
//! (a Yocto deploy directory, Bazel's `bazel-bin`/`bazel-testlogs`), walks them,
//! classifies each file by ordered rules (`config/artifacts.toml`), records path, size,
//! mtime and SHA-256 (files hashed in parallel, streamed), and turns the records into
//! envelopes that carry the build's id and Pulse fields. One idea per module:
//! - [`rules`]: the rules file: exclusions, ordered classification with captures;
//! - [`locate`](mod@locate): which trees of a build directory to scan (BitBake's deploy directory
//!   from the build's own variables, Bazel's convenience links);
//! - [`walk`](mod@walk): walking the trees: classification, symbolic links (recorded, never
//!   followed out of their tree), special files (never opened);
//! - [`hash`]: streaming SHA-256 of regular files on all cores, with the checks that a
//!   file is still the one the walk found;
//! - [`tree`]: the trees to scan, the report, and the file facts the phases share;
//! - [`scan`](mod@scan): walk + hash = [`Artifact`] records and a [`ScanReport`];
//! - [`emit`]: records → envelopes for a build, and the hook the EVT calls when a build
//!   finishes ([`BuildScanner`], [`artifacts_for_build`]);
//! - [`progress`]: counters and the terminal progress bar.
//!
//! Nothing here panics on what it finds on disk: a file that cannot be read, vanishes,
//! changes type mid-scan, a symbolic-link loop, a FIFO or a socket is skipped with a
//! warning (in the report and in the log) and the scan goes on.

pub mod emit;
pub mod hash;
pub mod locate;
pub mod progress;
pub mod rules;
pub mod scan;
pub mod tree;
pub mod walk;

pub use emit::{artifacts_for_build, envelopes, BuildArtifacts, BuildScanner};
pub use locate::{locate, Located};
pub use progress::ScanProgress;
pub use rules::{Class, Rules};
pub use scan::{scan, Artifact, Root, Scan, ScanOptions, ScanReport, Skipped};
pub use walk::{walk, Walked};

/// What can stop the AAM as a whole (single files never do: they are skipped).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AamError {
    /// A rules file cannot be read or is not valid.
    #[error("rules {origin}: {reason}")]
    Rules { origin: String, reason: String },
    /// The directory to scan is missing or not a directory.
    #[error("{path}: {reason}")]
    Root { path: String, reason: String },
    /// The message given as "the finished build" is not one.
    #[error("message {message_id}: {reason}")]
    NotAFinishedBuild { message_id: String, reason: String },
    /// Whether a directory is a Bazel workspace or a BitBake build cannot be told.
    #[error("{path}: cannot tell whether this is a Bazel workspace or a BitBake build directory (no bazel-* links, WORKSPACE or MODULE.bazel; no deploy directory); say which with --system")]
    UnknownSystem { path: String },
}
