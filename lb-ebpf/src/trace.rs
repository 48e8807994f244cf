//! `dsrlb trace`: one `TraceEvent` per frame into the `TRACE` ring buffer, only while the
//! controller has switched tracing on (`TRACE_CONF`) for a connected `dsrlb trace`. Off, a frame
//! pays one inlined array read and a branch.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use lb_common::{TRACE_NONE, TRACE_SNAP};

use crate::maps::{TRACE, TRACE_CONF, TRACE_LOST, TRACE_SAMPLE};

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
    // The filters here, so that a frame they leave out pays neither the call below nor the
    // clock (which costs more than the rest of a sampled-out frame: tens of ns in a VM).
    let (sample, listener) = (conf.sample, conf.listener);
    if listener != TRACE_NONE && listener != d.listener {
        return;
    }
    if sample > 1 && !sampled_in(sample) {
        return;
    }
    record(ctx, d, until);
}

/// Whether this frame is the one in `sample` this CPU traces. Each CPU counts down a gap drawn
/// at random, 1 to 2 × `sample` - 1 frames (`sample` on average, and no period for traffic to
/// beat against; a `sample` of 2^31 or more gets gaps of at most 2^32 - 1): a frame left out
/// costs a lookup, a read and a write of this CPU's own word, where a random number and a
/// division for every frame cost as much as the rest of a sampled-out frame. The next gap is
/// drawn by the frame after a traced one, and by one that finds a gap left from another trace's
/// larger `sample`.
#[inline(always)]
fn sampled_in(sample: u32) -> bool {
    let Some(left) = TRACE_SAMPLE.get_ptr_mut(0) else { return false };
    // SAFETY: this CPU's slot of a per-CPU map, and the program runs on one CPU at a time.
    let left = unsafe { &mut *left };
    let span = u64::from(sample) * 2 - 1;
    let n = if *left == 0 || u64::from(*left) > span {
        // A random 32-bit number times `span`, shifted down 32 bits: 0 to `span` - 1 (a multiply;
        // `%` would be a division).
        // SAFETY: a helper without arguments.
        let r = u64::from(unsafe { bpf_get_prandom_u32() });
        #[expect(clippy::cast_possible_truncation, reason = "the product is below 2^64 (both factors below 2^32): below 2^32 once shifted")]
        let gap = ((r * span.min(u64::from(u32::MAX))) >> 32) as u32 + 1;
        gap
    } else {
        *left
    };
    *left = n - 1;
    n == 1
}

/// The traced path, out of line: the verifier walks it once rather than once per verdict.
#[inline(never)]
fn record(ctx: &XdpContext, d: &Decision, until: u64) {
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
