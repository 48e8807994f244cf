//! `dsrlb trace`: the events the program sends while a trace runs, and the switch that runs it.

/// `dsrlb trace`: what the program decided for one frame, sent through the `TRACE` ring buffer
/// while a trace runs (`TraceConf::on`). The frame's first [`TRACE_SNAP`] bytes are copied as
/// they leave (a forwarded frame with its new MACs), for the tuple, the flags and a pcap.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TraceEvent {
    /// `bpf_ktime_get_ns()` (`CLOCK_MONOTONIC`).
    pub ts_ns: u64,
    pub cpu: u32,
    pub ifindex: u32,
    /// The frame's length on the wire.
    pub len: u32,
    /// How many of `frame`'s bytes are the frame's.
    pub caplen: u32,
    /// The XDP action returned (`XDP_PASS` 2, `XDP_DROP` 1, `XDP_TX` 3).
    pub action: u32,
    /// A [`reason`](crate::reason) (`reason::TX` for a forwarded segment).
    pub reason: u32,
    /// The listener id, or [`TRACE_NONE`] when none was matched.
    pub listener: u32,
    /// The real id (`real_id`) forwarded to, or [`TRACE_NONE`].
    pub real: u32,
    /// How the real was chosen ([`trace_how`]).
    pub how: u32,
    pub pad: u32,
    pub frame: [u8; TRACE_SNAP],
}

/// Bytes of each traced frame copied: Ethernet, a VLAN tag, IPv6 with an extension header or
/// two, and TCP with options.
pub const TRACE_SNAP: usize = 128;

/// No listener or real in a [`TraceEvent`]; in [`TraceConf::listener`], any.
pub const TRACE_NONE: u32 = u32::MAX;

/// The trace switch (one entry): a lease the controller renews every second while a `dsrlb
/// trace` client is connected and clears when it leaves, so that tracing also stops a few
/// seconds after a controller that died without clearing it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceConf {
    /// Tracing until this `bpf_ktime_get_ns()` (`CLOCK_MONOTONIC`); 0: off.
    pub until_ns: u64,
    /// Trace one frame in `sample` (at random); 0 or 1 for every frame.
    pub sample: u32,
    /// Only frames matched to this listener id, or [`TRACE_NONE`] for all.
    pub listener: u32,
}

impl TraceConf {
    /// Off.
    pub const OFF: Self = Self { until_ns: 0, sample: 0, listener: TRACE_NONE };
}

/// How a traced frame's real was chosen (`TraceEvent::how`).
pub mod trace_how {
    /// No real was chosen (passed or dropped before).
    pub const NONE: u32 = 0;
    /// This CPU's flow cache.
    pub const CACHE: u32 = 1;
    /// The flow table's recorded real.
    pub const TABLE: u32 = 2;
    /// The listener's Maglev ring, for a flow the table did not hold (a new connection).
    pub const RING: u32 = 3;
    /// The ring again: the recorded real is down or gone.
    pub const REPICK: u32 = 4;
    /// The ring again: a SYN reusing the tuple of a closing flow.
    pub const REOPENED: u32 = 5;
    /// An ICMP error, by its inner tuple, from the flow table.
    pub const ICMP_TABLE: u32 = 6;
    /// An ICMP error, by its inner tuple, from the ring.
    pub const ICMP_RING: u32 = 7;
    pub const COUNT: u32 = 8;
    pub const LABELS: [&str; COUNT as usize] = ["-", "cache", "table", "ring", "repick_down", "reopened", "icmp_table", "icmp_ring"];
}

const _: () =
    assert!(core::mem::size_of::<TraceEvent>() == 48 + TRACE_SNAP && TRACE_SNAP.is_power_of_two(), "the program masks copy sizes by it");
const _: () = assert!(core::mem::size_of::<TraceConf>() == 16);

#[cfg(feature = "user")]
mod pod {
    use super::{TraceConf, TraceEvent};
    // SAFETY: all of these are `#[repr(C)]`, made only of integers, with no padding (asserted
    // above), so every bit pattern is valid.
    unsafe impl aya::Pod for TraceConf {}
    unsafe impl aya::Pod for TraceEvent {}
}
