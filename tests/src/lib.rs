//! Test support for portcullis: crafted packets for BPF_PROG_TEST_RUN.
//! (Network-namespace helpers live in `portcullis_agent::netns`, shared with
//! the demo.)

pub mod bench_admission;
pub mod packet;
