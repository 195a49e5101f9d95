//! The `portcullis.v1` gRPC/protobuf API (control service, events, the
//! collector stream). Empty until those land: the kernel enforcement and its
//! break-glass CLI need no wire protocol yet, and an unused generated API
//! would only add build time.
