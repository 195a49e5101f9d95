//! Builds the eBPF object (nightly, bpf-linker, BTF) into OUT_DIR so the
//! agent can embed it; see ../shared/notes/ebpf-toolchain.md.
fn main() -> anyhow::Result<()> {
    let package = aya_build::Package {
        name: "portcullis-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
