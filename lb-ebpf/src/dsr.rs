//! Direct server return: rewrite the Ethernet addresses and bounce the frame out (`XDP_TX`).

use aya_ebpf::programs::XdpContext;
use lb_common::BackendInfo;

/// Writes the backend's MAC as destination and the balancer's as source. The frame was parsed
/// past its Ethernet header already, so the first 12 bytes are in bounds; the check is repeated
/// here because the verifier does not carry it across the earlier calls.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, backend: &BackendInfo) -> bool {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return false;
    }
    let dst = start as *mut [u8; 6];
    // SAFETY: both 6-byte halves lie inside the frame (checked above).
    unsafe {
        dst.write_unaligned(backend.dst_mac);
        dst.add(1).write_unaligned(backend.src_mac);
    }
    true
}
