//! Generates the Rust types for our Build Event Protocol subset
//! (`proto/build_event_stream.proto`) and for the Build Event Service API
//! (`proto/publish_build_event.proto`, with tonic server and client stubs).
//!
//! `protox` parses the proto in pure Rust (no `protoc` needed) into a
//! FileDescriptorSet; `prost-build` turns it into message structs (binary
//! decoding) and `pbjson-build` adds serde impls following the proto3 JSON
//! mapping, so one set of types reads both `--build_event_binary_file` and
//! `--build_event_json_file`. Well-known types (Timestamp, Duration) come from
//! `pbjson-types`, which has both prost and proto3-JSON support.

use std::error::Error;

const PROTO_DIR: &str = "proto";
const PROTO_FILE: &str = "build_event_stream.proto";
const BES_FILE: &str = "publish_build_event.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_DIR}");
    println!("cargo:rerun-if-changed={PROTO_DIR}/{PROTO_FILE}");
    println!("cargo:rerun-if-changed={PROTO_DIR}/{BES_FILE}");

    let mut compiler = protox::Compiler::new([PROTO_DIR])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_file(PROTO_FILE)?;
    let fds = compiler.file_descriptor_set();
    let fds_bytes = compiler.encode_file_descriptor_set();

    // BTreeMap for map fields: deterministic iteration, so Debug output and
    // re-encoded bytes of equal events are equal.
    prost_build::Config::new()
        .btree_map(["."])
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)?;

    pbjson_build::Builder::new()
        .register_descriptors(&fds_bytes)?
        .btree_map(["."])
        // JSON from newer Bazel versions may carry fields and enum names that
        // this subset does not declare: skip them instead of failing.
        .ignore_unknown_fields()
        .ignore_unknown_enum_variants()
        .build(&[".build_event_stream"])?;

    bes()
}

/// The Build Event Service: prost types + tonic stubs (`tonic-prost-build`), and
/// pbjson serde impls so recorded captures (proto3 JSON) decode into the same types.
fn bes() -> Result<(), Box<dyn Error>> {
    let mut compiler = protox::Compiler::new([PROTO_DIR])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_file(BES_FILE)?;
    let fds = compiler.file_descriptor_set();
    let fds_bytes = compiler.encode_file_descriptor_set();
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)?;

    pbjson_build::Builder::new()
        .register_descriptors(&fds_bytes)?
        .ignore_unknown_fields()
        .ignore_unknown_enum_variants()
        .build(&[".google.devtools.build.v1"])?;

    Ok(())
}
