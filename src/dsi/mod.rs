//! The Data Store Interface (DSI): the pool of storage workers that consume normalized
//! messages from the shared queue and keep the permanent record.
//!
//! Delivery on the bus is at-least-once and unordered; the DSI makes the effect
//! exactly-once and order-independent:
//!
//! - [`store`]: the storage layer (SQLite, PostgreSQL). One batch of envelopes is
//!   written in one transaction, deduplicated by `message_id`, and every row converges
//!   to the same final state whatever order its messages arrive in. It also answers the
//!   queries of `buildbus query`.
//!
//! The AMQP consumer modules (queue, acknowledgements after commit, worker threads)
//! live next to `store` and call it from plain threads: the store API is synchronous.

pub mod store;
pub mod validate;
pub mod worker;
