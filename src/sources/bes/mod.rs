//! The Build Event Service (BES) source: buildbus as Bazel's `--bes_backend`, so a
//! build is on the bus while it runs.
//!
//! - [`proto`]: our own subset of `google.devtools.build.v1` (tonic stubs, pbjson);
//! - [`server`]: the gRPC service: lifecycle calls, event streams, auth and TLS;
//! - [`invocation`]: one invocation's task: order and de-duplicate by sequence
//!   number, translate with the same [`BazelTranslator`](crate::systems::bazel::BazelTranslator) as
//!   files, publish with confirms, and ack only what the broker confirmed;
//! - [`spool`]: open invocations' raw events on disk, so a restarted backend can take
//!   Bazel's retried stream;
//! - [`capture`]: recorded sessions and a client that replays them (tests, bench,
//!   `buildbus bes-replay`).

pub mod capture;
pub mod invocation;
pub mod proto;
pub mod server;
pub mod spool;

pub use server::{start, Auth, Backend, BesConfig, BesError, FinishedHook};
