//! The `portcullis.v1` gRPC/protobuf API (control service, events, the
//! collector stream), generated at build time from the `.proto` files under
//! `proto/portcullis/` (protox + tonic-prost-build, no system `protoc`):
//! the knock datagram and its reply (`portcullis/v1/knock.proto`), and the
//! audit events with the collector service (`portcullis/v1/audit.proto`).

/// Package `portcullis.v1`. Field numbers are stable wire contracts; see the
/// `.proto` files.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/portcullis.v1.rs"));
}
