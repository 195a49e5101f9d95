//! The eBPF programs are the `portcullis` binary target (built for bpfel by
//! agent/build.rs). This empty library lets the agent name the crate as a
//! build-dependency, so cargo rebuilds the object when its sources change.
#![no_std]
