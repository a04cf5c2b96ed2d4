//! The generated Build Event Service types (package `google.devtools.build.v1`).
//!
//! `proto/publish_build_event.proto` is our own subset of the BES API: the
//! `PublishBuildEvent` service Bazel calls with `--bes_backend` and the messages it
//! sends. `build.rs` generates prost structs with tonic server and client stubs
//! (`tonic-prost-build`) and pbjson serde impls, so a recorded capture (proto3 JSON)
//! decodes into the same types the server receives.

/// Generated from `proto/publish_build_event.proto`.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    missing_docs,
    rustdoc::all,
    unreachable_pub
)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/google.devtools.build.v1.rs"));
    include!(concat!(
        env!("OUT_DIR"),
        "/google.devtools.build.v1.serde.rs"
    ));
}

/// The type URL of a Bazel event inside `BuildEvent.bazel_event`.
pub const BAZEL_EVENT_TYPE: &str = "type.googleapis.com/build_event_stream.BuildEvent";
