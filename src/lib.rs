//! # buildbus: a build-event bridge
//!
//! Build systems emit a flood of raw events; buildbus turns them into clean, normalized
//! messages on RabbitMQ, where other teams subscribe with filters and a pool of storage
//! workers keeps the permanent record.
//!
//! The source tree is the pipeline, in the order data flows through it:
//!
//! ```text
//!  sources/ ──► systems/ ──► bus/ ═══► consumers/ ──► stores/
//!  (file, bes,   (bazel,     (topology,  (client,      (sqlite,
//!   bitbake_live) bitbake)    publisher)  dsi)          postgres)
//!        └──── pipeline/ wires these three ────┘
//! ```
//!
//! - [`model`]: the normalized message model v1 (envelope, payload kinds, routing keys,
//!   deterministic ids): the contract between all other parts;
//! - [`decode`]: pure decoders of bytes (framing, pickles, XML-RPC, BEP): no I/O;
//! - [`systems`]: one folder per build system (its translator and what it needs), and
//!   what they share: the [`Translator`](systems::Translator) trait, Pulse-field rules,
//!   redaction;
//! - [`sources`]: one folder per way events arrive (files, BitBake's live XML-RPC
//!   interface, the Bazel Build Event Service);
//! - [`bus`]: RabbitMQ: topology, the AMQP form of a message, the confirmed publisher;
//! - [`pipeline`]: source → translate → publish, with confirms, checkpoints and acks,
//!   and the artifact scan at a build's end;
//! - [`aam`]: the Artifacts Analysis Module: scans a finished build's directory,
//!   classifies and hashes what it finds, and gives `artifact` messages of that build;
//! - [`consumers`]: what reads the bus: the client library and the DSI storage workers;
//! - [`stores`]: the permanent record (SQLite, PostgreSQL) and its queries;
//! - [`config`]: `config/buildbus.toml`, compiled in as the defaults;
//! - [`cli`]: the `buildbus` command line (`anyhow` lives only there and in `main.rs`).

pub mod aam;
pub mod bus;
pub mod cli;
pub mod config;
pub mod consumers;
pub mod decode;
pub mod logging;
pub mod model;
pub mod pipeline;
pub mod sources;
pub mod stores;
pub mod systems;
