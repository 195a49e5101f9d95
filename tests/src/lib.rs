//! Test support for portcullis: crafted packets for BPF_PROG_TEST_RUN.
//! (Network-namespace helpers live in `portcullis_agent::netns`, shared with
//! the demo.)

pub mod bench_admission;
pub mod bench_events;
pub mod bench_policy;
pub mod bench_support;
pub mod packet;

/// Keeps a measurement on one CPU (per-CPU maps, stable caches).
pub fn pin_to_current_cpu() {
    // SAFETY: plain libc calls on a zeroed cpu_set_t owned by this frame.
    unsafe {
        let cpu = libc::sched_getcpu();
        if cpu < 0 {
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
