//! The test and benchmark object (`dsrlb-test`), never loaded by `dsrlb run`: the floor program
//! benchmarks compare against, a driver that gives each benchmark run a flow of its own (and
//! tail-calls the balancer of the production object), and a pass-all program that the receiving
//! side of a veth pair needs for `XDP_TX` to reach it; and a witness that stands for an older
//! balancer's program while a controller adopts its pins (`xdp_adopt_witness`).
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// The destination MAC the floor program writes; set by the loader. Aligned so it can be read
/// as three u16, like the frame it is written to.
#[repr(C, align(2))]
struct Mac([u8; 6]);
#[unsafe(no_mangle)]
static FLOOR_DST_MAC: Mac = Mac([0; 6]);

/// The cheapest possible bounce: one bounds check, a MAC swap, `XDP_TX`. No parsing, no maps.
#[xdp]
pub fn xdp_floor(ctx: XdpContext) -> u32 {
    bounce(&ctx)
}

/// The floor's bounce.
#[inline(always)]
fn bounce(ctx: &XdpContext) -> u32 {
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

/// The floor with a round trip of the frame's start (`bpf_xdp_adjust_head` 20 bytes out and
/// back) before its bounce: what one such call costs, which the tunnel rows' driver adds.
#[xdp]
pub fn xdp_floor_adjust(ctx: XdpContext) -> u32 {
    use aya_ebpf::helpers::bpf_xdp_adjust_head;
    // SAFETY: the helper checks the bounds.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -20) } != 0 || unsafe { bpf_xdp_adjust_head(ctx.ctx, 20) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    bounce(&ctx)
}

/// The program `xdp_bench_flows` jumps to (slot 0), set by benchmarks and tests.
#[aya_ebpf::macros::btf_map]
static BENCH_TARGET: aya_ebpf::btf_maps::ProgramArray<1> = aya_ebpf::btf_maps::ProgramArray::new();

/// `xdp_bench_flows`' sequence: [next, wrap, MAC low, MAC high, keep, restore, bytes, started,
/// per_cpu].
/// Run `next` is client
/// 11.0.0.0 + `next` / 16384, port 1024 + 2 × (`next` % 16384), as Linux clients pick even
/// ports; `next` goes back to 0 at `wrap` (0: never). The MAC (its first four bytes, then its
/// last two, as little-endian integers) is written as every run's destination: the balancer's
/// own, so each run is addressed to it again after the last one rewrote the frame for a
/// backend. `keep` non-zero: the frame keeps its addresses and ports (only the MAC is written).
/// `restore` undoes what the last run did to the frame's length, since `BPF_PROG_TEST_RUN`
/// runs each repeat on the previous run's output: [`RESTORE_UNWRAP`] strips the `bytes` a
/// tunnel added in front (keeping the Ethernet header), [`RESTORE_REWRAP`] puts back the
/// Ethernet header and `bytes` of outer headers of `BENCH_WRAP` that a decap removed; not
/// before the first run (`started` 0; the driver sets it). `per_cpu` non-zero: each CPU runs a
/// sequence of its own (`BENCH_CPU`), so CPUs running at once neither share tuples nor write
/// a shared counter.
#[aya_ebpf::macros::btf_map]
static BENCH_FLOWS: aya_ebpf::btf_maps::Array<u32, 9> = aya_ebpf::btf_maps::Array::new();

/// Per CPU, with `BENCH_FLOWS[8]`: [next, base]: this CPU's run `next` stamps tuple `base +
/// next` (`next` wraps at `BENCH_FLOWS[1]`).
#[aya_ebpf::macros::btf_map]
static BENCH_CPU: aya_ebpf::btf_maps::PerCpuArray<[u32; 2], 1> = aya_ebpf::btf_maps::PerCpuArray::new();

/// `BENCH_FLOWS[5]`: nothing to undo.
const RESTORE_NONE: u32 = 0;
/// `BENCH_FLOWS[5]`: the last run wrapped the frame in `bytes` of outer headers.
const RESTORE_UNWRAP: u32 = 1;
/// `BENCH_FLOWS[5]`: the last run stripped `bytes` of outer headers.
const RESTORE_REWRAP: u32 = 2;

/// The Ethernet header and outer headers `RESTORE_REWRAP` puts back (14 + `bytes` bytes).
#[aya_ebpf::macros::btf_map]
static BENCH_WRAP: aya_ebpf::btf_maps::Array<[u16; 32], 1> = aya_ebpf::btf_maps::Array::new();

/// Undoes the last run's change of length (see `BENCH_FLOWS`); false when it cannot.
#[inline(always)]
fn restore(ctx: &XdpContext, mode: u32, bytes: u32) -> bool {
    match (mode, bytes) {
        (RESTORE_UNWRAP, 20) => unwrap::<20>(ctx),
        (RESTORE_UNWRAP, 28) => unwrap::<28>(ctx),
        (RESTORE_UNWRAP, 40) => unwrap::<40>(ctx),
        (RESTORE_UNWRAP, 48) => unwrap::<48>(ctx),
        (RESTORE_REWRAP, 20) => rewrap::<20>(ctx),
        (RESTORE_REWRAP, 28) => rewrap::<28>(ctx),
        (RESTORE_REWRAP, 40) => rewrap::<40>(ctx),
        (RESTORE_REWRAP, 48) => rewrap::<48>(ctx),
        _ => mode == RESTORE_NONE,
    }
}

/// Strips the `N` bytes of outer headers after the Ethernet header, keeping its EtherType.
#[inline(always)]
fn unwrap<const N: usize>(ctx: &XdpContext) -> bool {
    use aya_ebpf::helpers::bpf_xdp_adjust_head;
    let start = ctx.data();
    if start + 14 + N > ctx.data_end() {
        return false;
    }
    // SAFETY: both EtherType fields are inside the frame (checked above).
    unsafe { *((start + 12 + N) as *mut u16) = *((start + 12) as *const u16) };
    // SAFETY: the helper checks the bounds.
    unsafe { bpf_xdp_adjust_head(ctx.ctx, N as i32) == 0 }
}

/// Puts back the Ethernet header and `N` bytes of outer headers from `BENCH_WRAP`.
#[inline(always)]
fn rewrap<const N: usize>(ctx: &XdpContext) -> bool {
    use aya_ebpf::helpers::bpf_xdp_adjust_head;
    // SAFETY: the helper checks the bounds.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(N as i32)) } != 0 {
        return false;
    }
    let Some(wrap) = BENCH_WRAP.get(0) else { return false };
    let start = ctx.data();
    if start + 14 + N > ctx.data_end() {
        return false;
    }
    let dst = start as *mut u16;
    for i in 0..(14 + N) / 2 {
        // SAFETY: 14 + N bytes are inside the frame (checked above).
        unsafe { *dst.add(i) = wrap[i] };
    }
    true
}

/// The benchmarks' control for the driver's undo: what a row's target does to the frame's
/// length, and nothing else (`bpf_xdp_adjust_head` by `BENCH_FLOWS[6]` bytes, out for
/// [`RESTORE_UNWRAP`], in for [`RESTORE_REWRAP`]), then `XDP_TX`. Behind the driver it costs
/// about the floor (its two array reads stand in for the floor's MAC swap), the driver's undo
/// and one `bpf_xdp_adjust_head`: so a tunnel or decap row can be given net of the undo,
/// measured.
#[xdp]
pub fn xdp_bench_redo(ctx: XdpContext) -> u32 {
    use aya_ebpf::helpers::bpf_xdp_adjust_head;
    let (Some(mode), Some(bytes)) = (BENCH_FLOWS.get(5), BENCH_FLOWS.get(6)) else {
        return xdp_action::XDP_ABORTED;
    };
    let Ok(by) = i32::try_from(*bytes) else { return xdp_action::XDP_ABORTED };
    let by = match *mode {
        RESTORE_UNWRAP => -by,
        RESTORE_REWRAP => by,
        _ => return xdp_action::XDP_ABORTED,
    };
    // SAFETY: the helper checks the bounds.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, by) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    xdp_action::XDP_TX
}

/// A benchmark and test driver, never attached: gives each run's frame the balancer's MAC and
/// (unless told to keep them) the next client address and port of a sequence (an untagged IPv4
/// frame without options: source at offset 26, TCP source port at 34; an untagged IPv6 frame
/// without extension headers: the source's last four bytes at 34, the port at 54), then tail-calls
/// `BENCH_TARGET[0]`. So `BPF_PROG_TEST_RUN` with `repeat` runs the balancer on a new flow
/// each time (or cycles over `wrap` flows, or runs one frame again and again), and with the
/// floor as target measures its own cost.
#[xdp]
pub fn xdp_bench_flows(ctx: XdpContext) -> u32 {
    let (Some(mode), Some(bytes), Some(started)) = (BENCH_FLOWS.get(5), BENCH_FLOWS.get(6), BENCH_FLOWS.get_ptr_mut(7)) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: a map value.
    if unsafe { *started } != 0 {
        if !restore(&ctx, *mode, *bytes) {
            return xdp_action::XDP_ABORTED;
        }
    } else {
        // SAFETY: as above.
        unsafe { *started = 1 };
    }
    let start = ctx.data();
    if start + 36 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let (Some(next), Some(wrap), Some(mac_lo), Some(mac_hi), Some(keep)) =
        (BENCH_FLOWS.get_ptr_mut(0), BENCH_FLOWS.get(1), BENCH_FLOWS.get(2), BENCH_FLOWS.get(3), BENCH_FLOWS.get(4))
    else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: bytes 0..6, and the tuple's (IPv4: 26..30 and 34..36; IPv6: checked below) are
    // inside the frame (checked above), 2-aligned;
    // `next` is a map value. Runs on two CPUs at once may share a tuple now and then: harmless.
    unsafe {
        let dst = start as *mut u16;
        #[expect(clippy::cast_possible_truncation, reason = "the halves of a 32-bit word")]
        let halves = [*mac_lo as u16, (*mac_lo >> 16) as u16, *mac_hi as u16];
        for (i, h) in halves.iter().enumerate() {
            *dst.add(i) = u16::from_le(*h);
        }
        if *keep != 0 {
            BENCH_TARGET.tail_call(&ctx, 0);
            return xdp_action::XDP_ABORTED;
        }
        let per_cpu = BENCH_FLOWS.get(8).is_some_and(|p| *p != 0);
        let (next, base) = match BENCH_CPU.get_ptr_mut(0) {
            Some(cpu) if per_cpu => ((&raw mut (*cpu)[0]), (*cpu)[1]),
            _ => (next, 0),
        };
        let n = *next;
        let following = n.wrapping_add(1);
        *next = if following == *wrap { 0 } else { following };
        let n = base.wrapping_add(n);
        // An untagged IPv6 frame (EtherType 0x86dd, no extension headers): the last four
        // bytes of the source address (offset 34) and the TCP source port (offset 54).
        if *((start + 12) as *const u16) == 0x86dd_u16.to_be() {
            if start + 56 > ctx.data_end() {
                return xdp_action::XDP_ABORTED;
            }
            stamp((start + 34) as *mut u16, (start + 54) as *mut u16, n);
        } else {
            stamp((start + 26) as *mut u16, (start + 34) as *mut u16, n);
        }
        BENCH_TARGET.tail_call(&ctx, 0);
    }
    xdp_action::XDP_ABORTED
}

/// Writes run `n`'s client address (its last four bytes, 11.0.0.0 + `n` / 16384) and port.
///
/// # Safety
/// `src` must point at four writable bytes and `port` at two, inside the frame.
#[inline(always)]
unsafe fn stamp(src: *mut u16, port: *mut u16, n: u32) {
    let addr = 0x0b00_0000_u32.wrapping_add(n >> 14).to_be_bytes();
    #[expect(clippy::cast_possible_truncation, reason = "below 2^15")]
    let p = (1024 + 2 * (n & 0x3fff)) as u16;
    // SAFETY: as the caller promises.
    unsafe {
        *src = u16::from_ne_bytes([addr[0], addr[1]]);
        *src.add(1) = u16::from_ne_bytes([addr[2], addr[3]]);
        *port = p.to_be();
    }
}

/// Passes everything. Attached to the receiving peer of a veth pair, it makes the kernel deliver
/// frames that the other side bounces with `XDP_TX`.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The balancer's real map, for `xdp_adopt_witness`: the test that loads it opens the pinned
/// one of a running balancer in its place.
#[aya_ebpf::macros::btf_map]
static REALS: aya_ebpf::btf_maps::Array<lb_common::RealInfo, { lb_common::REAL_SLOTS as usize }> = aya_ebpf::btf_maps::Array::new();

/// `xdp_adopt_witness`' real id to watch.
#[aya_ebpf::macros::btf_map]
static ADOPT_WATCH: aya_ebpf::btf_maps::Array<u32, 1> = aya_ebpf::btf_maps::Array::new();

/// `xdp_adopt_witness`' counts, per CPU: [frames seen, frames that found the real tunnelled].
#[aya_ebpf::macros::btf_map]
static ADOPT_SEEN: aya_ebpf::btf_maps::PerCpuArray<u64, 2> = aya_ebpf::btf_maps::PerCpuArray::new();

/// Stands for an older balancer's program on a pinned link while a controller adopts it: it
/// drops every frame and counts it, and counts apart those that found the watched real marked
/// tunnelled (a change an older program would misread) in the balancer's `REALS`.
#[xdp]
pub fn xdp_adopt_witness(_ctx: XdpContext) -> u32 {
    let count = |i: u32| {
        if let Some(n) = ADOPT_SEEN.get_ptr_mut(i) {
            // SAFETY: this CPU's slot of a per-CPU map.
            unsafe { *n += 1 };
        }
    };
    count(0);
    let watched = ADOPT_WATCH.get(0).map_or(u32::MAX, |&id| id);
    if REALS.get(watched).is_some_and(|r| r.flags & lb_common::REAL_F_TUNNEL != 0) {
        count(1);
    }
    xdp_action::XDP_DROP
}

lb_ebpf::object_end!();
