//! # buildbus: a build-event bridge
//!
//! Build systems emit a flood of raw events; buildbus turns them into clean, normalized
//! messages on RabbitMQ, where other teams subscribe with filters and a pool of storage
//! workers keeps the permanent record.
//!
//! The source tree is the pipeline, in the order data flows through it:
//!
//! ```text
//!  source ──► translate ──────► publish ──► consume ──► store
//!  evt/<system>/                bus/        dsi/worker  dsi/store/{sqlite,postgres}
//!  (framing, codec, translator)
//! ```
//!
//! - [`model`]: the normalized message model v1 (envelope, payload kinds, routing keys,
//!   deterministic ids): the contract between all other parts;
//! - [`evt`]: the Event Translation Layer; one folder per build system
//!   ([`evt::bazel`], [`evt::bitbake`]), sharing framing, errors, redaction, the
//!   Pulse-field rules and the stream driver (files, followed files);
//! - [`bus`]: RabbitMQ: topology, the AMQP form of a message, the confirmed publisher,
//!   file sources with checkpoints;
//! - [`dsi`]: the Data Store Interface: the storage worker pool (validate, batch,
//!   commit, then ack) and the stores (SQLite, PostgreSQL) with their queries;
//! - [`config`]: `config/buildbus.toml`, compiled in as the defaults;
//! - [`report`]: human summaries of translated builds;
//! - [`client`]: filtered subscriptions with callbacks, behind `buildbus monitor`;
//! - [`aam`]: the Artifacts Analysis Module: scans a finished build's directory,
//!   classifies and hashes what it finds, and gives `artifact` messages of that build
//!   (`buildbus aam`, and `--build-dir` of `publish`/`bitbake-live`);
//! - [`logging`]: log output on stderr, as the command line sets it up;
//! - [`cli`]: the `buildbus` command line (`anyhow` lives only there and in `main.rs`).
//!
//! Still to come (see the issues): the Bazel Build Event Service source.

pub mod aam;
pub mod bus;
pub mod cli;
pub mod client;
pub mod config;
pub mod dsi;
pub mod evt;
pub mod logging;
pub mod model;
pub mod report;
