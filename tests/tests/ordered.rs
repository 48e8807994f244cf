//! The object for weakly ordered CPUs (issue 26): the flow table's ordering edges
//! (`lb_common::FLOW_WAYS`) are BPF load-acquire and store-release instructions in it, as
//! loaded into the kernel, and none are in the default object, whose x86-64 code is unchanged.
//! (`cargo xtask test` also runs every packet fixture against it: `DSRLB_TEST_OBJECT=ordered`.)

use lb_userspace::dataplane::{Dataplane, LoadOptions, Object};
use object::{Object as _, ObjectSection as _, SectionKind};
use tests::require_root;

/// `BPF_STX | BPF_ATOMIC | BPF_DW`, and the `imm` of a load-acquire and a store-release
/// (`include/uapi/linux/bpf.h`, Linux 6.15).
const ATOMIC_DW: u8 = 0x03 | 0xc0 | 0x18;
const LOAD_ACQ: i32 = 0x100;
const STORE_REL: i32 = 0x110;

/// (load-acquires, store-releases) among 8-byte BPF instructions.
fn count(insns: &[u8]) -> (usize, usize) {
    let (mut acq, mut rel) = (0, 0);
    for i in insns.chunks_exact(8) {
        let imm = i32::from_le_bytes([i[4], i[5], i[6], i[7]]);
        if i[0] == ATOMIC_DW {
            acq += usize::from(imm == LOAD_ACQ);
            rel += usize::from(imm == STORE_REL);
        }
    }
    (acq, rel)
}

/// Counted over an object's code sections.
fn in_object(bytes: &[u8]) -> (usize, usize) {
    let file = object::File::parse(bytes).expect("an ELF object");
    file.sections()
        .filter(|s| s.kind() == SectionKind::Text)
        .map(|s| count(s.data().expect("section data")))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

#[test]
fn the_ordered_object_has_acquires_and_releases_and_the_default_none() {
    let (acq, rel) = in_object(lb_userspace::EBPF_OBJ_ORDERED);
    // Per lookup: both buckets' eight state loads, the slot's addresses and IPv6 addresses, the
    // listener and port words; per insert, the publishing store.
    assert!(acq >= 16, "{acq} load-acquires in dsrlb-ordered");
    assert!(rel >= 1, "{rel} store-releases in dsrlb-ordered");
    assert_eq!(in_object(lb_userspace::EBPF_OBJ), (0, 0), "the default object changed");
}

/// The kernel keeps them: the ordered program as the verifier passed it (its translated
/// instructions, read back with bpftool) still holds them.
#[test]
fn the_kernel_loads_the_ordered_object_with_them() {
    require_root!();
    let dp = Dataplane::load(&LoadOptions { object: Object::Ordered, ..LoadOptions::new(lb_common::DEFAULT_RING_SIZE, 1024) })
        .expect("the ordered object verifies on this kernel");
    let id = dp.balancer().info().expect("program info").id();
    let dump = std::env::temp_dir().join(format!("dsrlb-ordered-xlated-{}", std::process::id()));
    let out = std::process::Command::new("bpftool")
        .args(["prog", "dump", "xlated", "id", &id.to_string(), "file"])
        .arg(&dump)
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "bpftool prog dump xlated: {}", String::from_utf8_lossy(&out.stderr));
    let insns = std::fs::read(&dump).expect("the dump");
    let _ = std::fs::remove_file(&dump);
    let (acq, rel) = count(&insns);
    assert!(acq >= 16 && rel >= 1, "the loaded program holds {acq} load-acquires and {rel} store-releases");
}
