//! The `portcullis.v1` gRPC/protobuf API (control service, events, the
//! collector stream), generated at build time from the `.proto` files under
//! `proto/portcullis/` (protox + prost-build, no system `protoc`). Today it
//! holds the knock (single-packet authorization) datagram and its reply
//! (`portcullis/v1/knock.proto`); the control service, events and the
//! collector stream join it as they land.

/// Package `portcullis.v1`. Field numbers are stable wire contracts; see the
/// `.proto` files.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/portcullis.v1.rs"));
}
