//! Compiles every `.proto` file under this crate's `portcullis/` directory
//! with protox (pure Rust: no system `protoc`) and generates the Rust types
//! with prost-build.

use std::{
    io,
    path::{Path, PathBuf},
};

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_dir = root.join("portcullis");
    println!("cargo:rerun-if-changed={}", proto_dir.display());

    let mut files = Vec::new();
    collect_protos(&proto_dir, &mut files)?;
    files.sort();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    let fds = protox::compile(&files, [&root])?;
    // Messages always; the collector service's client and server stubs only
    // with the `grpc` feature (they need tonic and tokio).
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        // A watched event's bytes are handed from the audit writer to every
        // watcher and onto the wire without a copy.
        .bytes(".portcullis.v1.WatchEvent.event")
        // A service to add is large next to the other operations.
        .boxed(".portcullis.v1.ServicesRequest.op.add")
        .compile_fds(fds)?;
    Ok(())
}
