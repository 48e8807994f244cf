//! Entry points: the DSR balancer, the floor program benchmarks compare against, and a pass-all
//! program that the receiving side of a veth pair needs for `XDP_TX` to reach it.
#![no_std]
#![no_main]

mod dsr;
mod flow;
mod maps;
mod parse;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::reason;

use crate::{maps::VIPS, parse::Parsed};

/// Why a frame was not forwarded. Each maps to one XDP action and one counter.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Verdict {
    PassNotIpv4 = reason::PASS_NOT_IPV4,
    PassNotTcp = reason::PASS_NOT_TCP,
    PassNoListener = reason::PASS_NO_LISTENER,
    PassMalformed = reason::PASS_MALFORMED,
    PassVlanStacked = reason::PASS_VLAN_STACKED,
    DropFragment = reason::DROP_FRAGMENT,
    DropNoBackend = reason::DROP_NO_BACKEND,
    DropInternal = reason::DROP_INTERNAL,
}

impl Verdict {
    #[inline(always)]
    const fn action(self) -> u32 {
        match self {
            Self::PassNotIpv4
            | Self::PassNotTcp
            | Self::PassNoListener
            | Self::PassMalformed
            | Self::PassVlanStacked => xdp_action::XDP_PASS,
            Self::DropFragment | Self::DropNoBackend | Self::DropInternal => xdp_action::XDP_DROP,
        }
    }
}

#[xdp]
pub fn dsrlb(ctx: XdpContext) -> u32 {
    match try_dsrlb(&ctx) {
        // Forwarded frames are counted once, against their real (`stats::count_forward`); the
        // controller reports the `tx` verdict as the sum.
        Ok(()) => xdp_action::XDP_TX,
        Err(verdict) => {
            stats::count_verdict(verdict as u32);
            verdict.action()
        }
    }
}

#[inline(always)]
fn try_dsrlb(ctx: &XdpContext) -> Result<(), Verdict> {
    let tcp = match parse::parse(ctx)? {
        Parsed::Tcp(tcp) => tcp,
        Parsed::TcpFragment { dst_be } => {
            // SAFETY: read-only use of a map value.
            return match unsafe { VIPS.get(&dst_be) } {
                Some(_) => Err(Verdict::DropFragment),
                None => Err(Verdict::PassNoListener),
            };
        }
    };
    let pick = flow::pick(&tcp)?;
    if !dsr::rewrite(ctx, pick.real) {
        return Err(Verdict::PassMalformed);
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    stats::count_forward(pick.real_id, bytes, pick.new_flow);
    Ok(())
}

/// The destination MAC the floor program writes; set by the loader. Aligned so it can be read
/// as three u16, like the frame it is written to.
#[repr(C, align(2))]
struct Mac([u8; 6]);
#[unsafe(no_mangle)]
static FLOOR_DST_MAC: Mac = Mac([0; 6]);

/// The cheapest possible bounce: one bounds check, a MAC swap, `XDP_TX`. No parsing, no maps.
#[xdp]
pub fn xdp_floor(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 14 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    let eth = start as *mut u16;
    // SAFETY: the first 12 bytes are inside the frame (checked above); packet data is 2-byte
    // aligned. The volatile read stops the compiler from folding the loader-set constant to
    // its zero initialiser.
    unsafe {
        let new_dst = core::ptr::read_volatile((&raw const FLOOR_DST_MAC).cast::<[u16; 3]>());
        for i in 0..3 {
            *eth.add(i + 3) = *eth.add(i);
            *eth.add(i) = new_dst[i];
        }
    }
    xdp_action::XDP_TX
}

/// Passes everything. Attached to the receiving peer of a veth pair, it makes the kernel deliver
/// frames that the other side bounces with `XDP_TX`.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
