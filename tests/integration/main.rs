//! All integration tests in one binary (one link, shared helpers in `harness`).
//!
//! Every test runs on the real recorded streams in `tests/fixtures/` and asserts real
//! outcomes: counts, fields, ids, exit codes and error positions.

mod harness;

mod aam;
mod bazel;
mod bes;
mod bitbake;
mod bitbake_live;
mod bitbake_replay;
mod bitbake_session;
mod bus;
mod cli;
mod client;
mod connect_failures;
mod dsi_store;
mod fuzz;
mod pipeline;
mod redaction;
mod schema;
mod scripts;
mod tls;
