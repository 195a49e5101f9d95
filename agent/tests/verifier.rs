//! The kernel's verifier accepts every program in the embedded object.
//! (Runs as root: loading BPF needs CAP_BPF.)

#[test]
fn verifier_accepts_all_programs() {
    match portcullis_agent::loader::Unattached::load() {
        Ok(_) => {}
        Err(e) => panic!("eBPF object rejected: {e}"),
    }
}
