//! Direct server return: rewrite the Ethernet addresses and bounce the frame out (`XDP_TX`).

use aya_ebpf::programs::XdpContext;
use lb_common::RealInfo;

/// Writes the real's (backend's) MAC as destination and the balancer's as source: the 12 bytes that
/// open `RealInfo`, copied as six u16 (the struct is 4-aligned and packet data 2-aligned;
/// a byte-array copy would become a call to a memmove subprogram). The bounds check repeats
/// the parser's because the verifier does not carry it across the map lookups in between.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, real: &RealInfo) -> bool {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return false;
    }
    let dst = start as *mut u16;
    let src = (&raw const *real).cast::<u16>();
    // SAFETY: the first 12 bytes of the frame are in bounds (checked above) and the first 12
    // of `RealInfo` are its two MACs.
    unsafe {
        for i in 0..6 {
            *dst.add(i) = *src.add(i);
        }
    }
    true
}
