//! Consumers: what takes normalized messages off the bus, one folder each.
//!
//! - [`client`]: the client library: filtered subscriptions with callbacks (Pulse's
//!   `pulsebuildmonitor` done right), behind `buildbus monitor`;
//! - [`dsi`]: the Data Store Interface: the pool of storage workers on the shared
//!   durable queue, writing the permanent record into a [store](crate::stores).
//!
//! A new consumer is a new folder here (built on [`client`] or on [`crate::bus`]),
//! and one command in `cli/`.

pub mod client;
pub mod dsi;
