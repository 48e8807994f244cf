//! `dsrlb trace`: one `TraceEvent` per frame into the `TRACE` ring buffer, only while the
//! controller has switched tracing on (`TRACE_CONF`) for a connected `dsrlb trace`. Off, a frame
//! pays one inlined array read and a branch.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use lb_common::{TRACE_NONE, TRACE_SNAP};

use crate::maps::{TRACE, TRACE_CONF, TRACE_LOST};

/// What the program decided for a frame.
#[derive(Clone, Copy)]
pub struct Decision {
    pub action: u32,
    pub reason: u32,
    pub listener: u32,
    pub real: u32,
    pub how: u32,
}

/// Sends `d` for the frame in `ctx` when a trace runs and its filters take it.
#[inline(always)]
pub fn emit(ctx: &XdpContext, d: &Decision) {
    let Some(conf) = TRACE_CONF.get(0) else { return };
    // SAFETY: a map value, read once per field.
    let until = unsafe { core::ptr::read_volatile(&raw const conf.until_ns) };
    if until == 0 {
        return;
    }
    record(ctx, d, until, conf.sample, conf.listener);
}

/// The traced path, out of line: the verifier walks it once rather than once per verdict.
#[inline(never)]
fn record(ctx: &XdpContext, d: &Decision, until: u64, sample: u32, listener: u32) {
    // The filters first, the clock only for a frame they take: reading it costs more than the
    // rest of a sampled-out frame (tens of ns in a VM).
    if listener != TRACE_NONE && listener != d.listener {
        return;
    }
    // SAFETY: a helper without arguments.
    if sample > 1 && unsafe { bpf_get_prandom_u32() } % sample != 0 {
        return;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // A lease nobody renewed: the controller that set it is gone.
    if now > until {
        return;
    }
    let Some(mut entry) = TRACE.reserve(0) else {
        if let Some(c) = TRACE_LOST.get_ptr_mut(0) {
            // SAFETY: a per-CPU slot.
            unsafe { *c += 1 };
        }
        return;
    };
    let ev = entry.as_mut_ptr();
    // The frame's length from the kernel rather than `data_end - data`: LLVM may narrow that
    // subtraction to 32 bits and keep `data` in a 32-bit stack slot across the calls below,
    // which the verifier refuses for a packet pointer (the ISA v4 build does).
    // SAFETY: the program's own context.
    #[expect(clippy::cast_possible_truncation, reason = "a frame is far below 4 GB")]
    let len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as u32;
    let cap = if len > TRACE_SNAP as u32 { TRACE_SNAP as u32 } else { len };
    // SAFETY: `ev` is the reserved entry, written field by field before it is submitted; the
    // copy is at most `TRACE_SNAP` bytes into `frame`, and the helpers take what they are given.
    unsafe {
        (*ev).ts_ns = now;
        (*ev).cpu = bpf_get_smp_processor_id();
        (*ev).ifindex = (*ctx.ctx).ingress_ifindex;
        (*ev).len = len;
        (*ev).action = d.action;
        (*ev).reason = d.reason;
        (*ev).listener = d.listener;
        (*ev).real = d.real;
        (*ev).how = d.how;
        (*ev).pad = 0;
        // 1..=TRACE_SNAP in a form the verifier tracks (a mask, then one added).
        let size = ((cap.wrapping_sub(1)) & (TRACE_SNAP as u32 - 1)) + 1;
        let copied = cap > 0 && bpf_xdp_load_bytes(ctx.ctx, 0, (&raw mut (*ev).frame).cast(), size) == 0;
        (*ev).caplen = if copied { cap } else { 0 };
    }
    entry.submit(0);
}
