//! Entry points of the production object: the DSR balancer, and the clock the controller reads
//! flows' ages by. (Test and benchmark programs are in `dsrlb-test`, an object of their own.)
#![no_std]
#![no_main]
#![feature(core_intrinsics, asm_experimental_arch)]
#![expect(internal_features, reason = "the flow table's compare-and-swap: the BPF target has no AtomicU64::compare_exchange")]

mod dsr;
mod events;
mod flow;
mod maps;
mod node;
mod parse;
mod probe;
mod stats;
mod storm;
mod table;
mod trace;
mod tunnel;

use aya_ebpf::{bindings::xdp_action, helpers::bpf_jiffies64, macros::xdp, programs::XdpContext};
use lb_common::{Ip6, REAL_F_TUNNEL, TRACE_NONE, real_listener, reason, trace_how};

use crate::{
    flow::Segment,
    maps::{CLOCK, NEXT, VIPS, VIPS6},
    parse::Parsed,
    tunnel::Sent,
};

/// Why a frame was not forwarded. Each maps to one XDP action and one counter.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Verdict {
    PassNotIp = reason::PASS_NOT_IP,
    PassNotTcp = reason::PASS_NOT_TCP,
    PassNoListener = reason::PASS_NO_LISTENER,
    PassMalformed = reason::PASS_MALFORMED,
    PassVlanStacked = reason::PASS_VLAN_STACKED,
    PassNotOurMac = reason::PASS_NOT_OUR_MAC,
    DropFragment = reason::DROP_FRAGMENT,
    DropNoBackend = reason::DROP_NO_BACKEND,
    DropInternal = reason::DROP_INTERNAL,
    DropConnRate = reason::DROP_CONN_RATE,
    DropTooBig = reason::DROP_TOO_BIG,
}

impl Verdict {
    #[inline(always)]
    const fn action(self) -> u32 {
        match self {
            Self::PassNotIp
            | Self::PassNotTcp
            | Self::PassNoListener
            | Self::PassMalformed
            | Self::PassVlanStacked
            | Self::PassNotOurMac => xdp_action::XDP_PASS,
            Self::DropFragment | Self::DropNoBackend | Self::DropInternal | Self::DropConnRate | Self::DropTooBig => xdp_action::XDP_DROP,
        }
    }
}

/// Frames the `upgrade-test` build has seen: what tells it apart from the production build.
#[cfg(feature = "upgrade-test")]
#[aya_ebpf::macros::btf_map]
static UPGRADE: aya_ebpf::btf_maps::PerCpuArray<u64, 1> = aya_ebpf::btf_maps::PerCpuArray::new();

// `inline(always)`: the macro wraps this function in the entry point, which LLVM would
// otherwise call as a subprogram, a call and return on every frame.
#[xdp]
#[inline(always)]
pub fn dsrlb(ctx: XdpContext) -> u32 {
    #[cfg(feature = "upgrade-test")]
    if let Some(c) = UPGRADE.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot.
        unsafe { *c += 1 };
    }
    let mut listener = TRACE_NONE;
    let decision = match try_dsrlb(&ctx, &mut listener) {
        // Forwarded frames are counted once, against their real (`stats::count_forward`); the
        // controller reports the `tx` verdict as the sum.
        Ok((reason, pick)) => {
            trace::Decision { action: xdp_action::XDP_TX, reason, listener: real_listener(pick.real_id), real: pick.real_id, how: pick.how }
        }
        Err(verdict) => {
            stats::count_verdict(verdict as u32);
            if matches!(verdict, Verdict::DropInternal) {
                events::internal(&ctx);
            }
            trace::Decision { action: verdict.action(), reason: verdict as u32, listener, real: TRACE_NONE, how: trace_how::NONE }
        }
    };
    trace::emit(&ctx, &decision);
    if decision.action == xdp_action::XDP_PASS {
        // What is not ours goes to the next program when one is configured; without one (an
        // empty slot) the tail call returns and the frame goes to the kernel.
        // SAFETY: a tail call with this program's own context.
        unsafe { NEXT.tail_call(&ctx, 0) };
    }
    decision.action
}

/// The forwarding reason (`reason::TX`, `reason::TX_ICMP_TOO_BIG` or
/// `reason::TX_TOO_BIG_ANSWERED`) and the pick, or why not.
#[inline(always)]
fn try_dsrlb(ctx: &XdpContext, listener: &mut u32) -> Result<(u32, flow::Pick), Verdict> {
    match parse::parse(ctx)? {
        Parsed::Tcp(tcp) => send(ctx, flow::pick(ctx, &tcp, listener)?, &tcp, false),
        Parsed::Tcp6(tcp) => send(ctx, flow::pick(ctx, &tcp, listener)?, &tcp, false),
        Parsed::IcmpTooBig(tcp) => send(ctx, flow::pick_for_icmp(ctx, &tcp, listener)?, &tcp, true),
        Parsed::IcmpTooBig6(tcp) => send(ctx, flow::pick_for_icmp(ctx, &tcp, listener)?, &tcp, true),
        Parsed::TcpFragment { dst_be } => {
            // SAFETY: read-only use of a map value.
            if unsafe { VIPS.get(&dst_be) }.is_none() {
                return Err(Verdict::PassNoListener);
            }
            node::check(ctx)?;
            Err(Verdict::DropFragment)
        }
        Parsed::Fragment6 { dst } => {
            // SAFETY: read-only use of a map value.
            if unsafe { VIPS6.get(&Ip6::from_words(dst)) }.is_none() {
                return Err(Verdict::PassNoListener);
            }
            node::check(ctx)?;
            Err(Verdict::DropFragment)
        }
    }
}

/// Sends a frame to its real: the MAC rewrite, or the tunnel (`tunnel`). `icmp`: the frame is
/// an ICMP error about the flow `seg` names, forwarded to the flow's real and counted apart
/// from the flow's own frames.
#[inline(always)]
fn send(ctx: &XdpContext, pick: flow::Pick, seg: &impl Segment, icmp: bool) -> Result<(u32, flow::Pick), Verdict> {
    let bytes = if pick.real.flags & REAL_F_TUNNEL == 0 {
        if !dsr::rewrite(ctx, pick.real) {
            return Err(Verdict::PassMalformed);
        }
        (ctx.data_end() - ctx.data()) as u64
    } else {
        match tunnel::send(ctx, pick.real_id, pick.real, seg.ipv6(), || seg.tuple_hash(), !icmp)? {
            Sent::Forwarded(bytes) => bytes,
            Sent::Answered => {
                stats::count_verdict(reason::TX_TOO_BIG_ANSWERED);
                return Ok((reason::TX_TOO_BIG_ANSWERED, pick));
            }
        }
    };
    if icmp {
        // Counted apart from the flow's own frames: forwarded, but not by the flow.
        stats::count_verdict(reason::TX_ICMP_TOO_BIG);
        stats::count_icmp_too_big(real_listener(pick.real_id));
        return Ok((reason::TX_ICMP_TOO_BIG, pick));
    }
    stats::count_forward(pick.real_id, bytes, pick.new_flow);
    Ok((reason::TX, pick))
}

/// Wraps the controller's health probes to tunnelled backends (`probe`); attached to the
/// interface's TC egress while the config has tunnelled backends.
#[aya_ebpf::macros::classifier]
pub fn dsrlb_probe_encap(ctx: aya_ebpf::programs::TcContext) -> i32 {
    probe::encap(&ctx)
}

/// The clock flows are timed by, for the controller: `BPF_PROG_TEST_RUN` of this program (never
/// attached) stores `bpf_jiffies64()` in `CLOCK`.
#[xdp]
pub fn dsrlb_clock(_ctx: XdpContext) -> u32 {
    if let Some(c) = CLOCK.get_ptr_mut(0) {
        // SAFETY: a map value; a helper without arguments.
        unsafe { *c = bpf_jiffies64() };
    }
    xdp_action::XDP_PASS
}

lb_ebpf::object_end!();
