//! The Build Event Service (BES) source: buildbus as Bazel's `--bes_backend`, so a
//! build is on the bus while it runs.
//!
//! - [`proto`]: our own subset of `google.devtools.build.v1` (tonic stubs, pbjson);
//! - [`server`]: the gRPC service: lifecycle calls, event streams, auth and TLS;
//! - [`task`]: what the service tells an invocation's task and how it starts one
//!   (the task itself, which orders, translates, publishes and acks, is the
//!   pipeline's: [`crate::pipeline::bes`]);
//! - [`spool`]: open invocations' raw events on disk, so a restarted backend can take
//!   Bazel's retried stream;
//! - [`capture`]: recorded sessions and a client that replays them (tests, bench,
//!   `buildbus bes-replay`).

pub mod capture;
pub mod proto;
pub mod server;
pub mod spool;
pub mod task;

pub use server::{start, Auth, Backend, BesConfig, BesError};
