//! The Data Store Interface (DSI): the pool of storage workers that consume normalized
//! messages from the shared queue and keep the permanent record.
//!
//! Delivery on the bus is at-least-once and unordered; the DSI makes the effect
//! exactly-once and order-independent: each batch is validated ([`validate`]) and
//! written in one transaction to a [store](crate::stores), deduplicated by
//! `message_id`, and acknowledged only after the commit ([`worker`]). The store API is
//! synchronous: workers call it from plain threads.

pub mod validate;
pub mod worker;
