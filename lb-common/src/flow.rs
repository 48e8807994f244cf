//! The flow table: its keys, buckets and slots, a slot's state (real, kind, age) and the rules
//! by which a segment changes it ([`flow_step`]), the buckets a flow may live in, and the
//! per-CPU flow cache in front of it.

use crate::{Addr6, Ip6, REAL_SLOTS, RealInfo, mix64};

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

/// `FlowKey::dst_be` bits set in the key of every IPv6 flow: its first address byte is 0xf0 or
/// more, an address in 240.0.0.0/4, which no IPv4 VIP may be (see [`flow_key6`]).
pub const FLOW_KEY6_MARK: u32 = 0xf000_0000_u32.to_be();

/// Whether a flow key is an IPv6 flow's ([`flow_key6`]).
#[inline(always)]
#[must_use]
pub const fn is_key6(key: &FlowKey) -> bool {
    key.dst_be & FLOW_KEY6_MARK == FLOW_KEY6_MARK
}

/// The 12-byte key an IPv6 flow has in `FLOWS` and `FLOW_CACHE`: its ports, and a 60-bit hash
/// of its addresses seeded with the table's seed (`Layout::flow_seed`) in place of the two
/// addresses, marked with [`FLOW_KEY6_MARK`]. The table keeps the full addresses of the slot in
/// `FLOW_ADDRS6` and a lookup compares them, so two flows whose hashes collide never share a
/// slot; a cache entry is only made after such a lookup (a collision there, which needs the
/// seed to aim, would only send the colliding frame where the other flow goes).
#[inline(always)]
#[must_use]
pub const fn flow_key6(src: &Addr6, dst: &Addr6, sport_be: u16, dport_be: u16, seed: u64) -> FlowKey {
    // Four independent products, then one finaliser: a short dependency chain per frame.
    let x = (src[0] ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (dst[1] ^ seed.rotate_left(17)).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    let y = (src[1] ^ seed.rotate_left(32)).wrapping_mul(0xff51_afd7_ed55_8ccd)
        ^ (dst[0] ^ seed.rotate_left(47)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    let h = mix64(x ^ y.rotate_left(31));
    #[expect(clippy::cast_possible_truncation, reason = "the two halves")]
    let (lo, hi) = (h as u32, (h >> 32) as u32);
    FlowKey { src_be: lo, dst_be: hi | FLOW_KEY6_MARK, sport_be, dport_be }
}

/// Value of `FLOW_ADDRS6`, indexed by flow table slot (bucket × [`FLOW_WAYS`] + way): the
/// addresses of the IPv6 flow in that slot, written after the slot is claimed and before its
/// state is published (see [`FLOW_WAYS`]). Meaningless for a slot holding an IPv4 flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowAddrs6 {
    pub src: Ip6,
    pub dst: Ip6,
}

/// A TCP 4-tuple as it appears on the wire (only TCP is balanced, so no protocol field): the
/// key of a flow in `FLOWS` and `FLOW_CACHE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
}

impl FlowKey {
    /// The key as the first word of a [`FlowSlot`] (addresses) and the low half of its second
    /// (ports), in the slot's memory order.
    #[inline(always)]
    #[must_use]
    pub const fn words(&self) -> (u64, u32) {
        // SAFETY: integers to integers of the same size.
        unsafe {
            (
                core::mem::transmute::<[u32; 2], u64>([self.src_be, self.dst_be]),
                core::mem::transmute::<[u16; 2], u32>([self.sport_be, self.dport_be]),
            )
        }
    }

    /// The key of a slot's two words.
    #[inline(always)]
    #[must_use]
    pub const fn from_words(addrs: u64, ports: u32) -> Self {
        // SAFETY: as above.
        let ([src_be, dst_be], [sport_be, dport_be]) =
            unsafe { (core::mem::transmute::<u64, [u32; 2]>(addrs), core::mem::transmute::<u32, [u16; 2]>(ports)) };
        Self { src_be, dst_be, sport_be, dport_be }
    }
}

/// The flow table (`FLOWS`): buckets of [`FLOW_WAYS`] slots, one 64-byte cache line each, in
/// two halves, [`FLOW_SLOTS_PER_FLOW`] slots per flow of `flow_table_size`. A flow lives in one
/// of two buckets, one per half, picked by a seeded hash of its 4-tuple ([`flow_buckets`]); it
/// is inserted into the emptier of the two (d-left hashing, which keeps buckets even), and when
/// both are full it replaces the best slot of the eight to replace: a closing or expired flow,
/// else the least recently recorded unconfirmed one (see [`FLOW_K_CONFIRMED`]).
/// A lookup reads two cache lines and nothing else.
///
/// A slot is two 8-byte words, each read and written whole: the addresses, then ports and
/// `state`. The program reads a slot lock-free (state, addresses, state again) and writes one
/// by compare-and-swap on the second word: a writer first swaps in [`FLOW_S_BUSY`], then
/// writes the addresses, then the final state, so a reader that sees a live state sees the
/// addresses written with it.
///
/// The ordering edges this relies on (`FLOW_ADDRS6` is written and read where the addresses
/// are), for the program and the controller alike:
/// 1. the claim is a compare-and-swap that is fully ordered (a BPF atomic with fetch; in the
///    controller an `AcqRel` one, and every store after it a release): [`FLOW_S_BUSY`] is
///    visible before anything stored after it;
/// 2. the publishing state store is a release: the addresses are visible before it;
/// 3. the reader's first state load is an acquire: the addresses are read after it;
/// 4. the reader's address loads are acquires: the state is read again after them.
///
/// `tests/model/flow_slot.pml` models it for spin with two writers, a refresher and a reader:
/// no reader accepts addresses written with another state, and with any one of 2 to 4 relaxed
/// spin finds one that does (`tests/tests/model.rs`; the model's header says what it leaves
/// out). The controller's mapped words are Rust atomics with exactly these orderings. In the
/// program, x86-64's total store order makes every load an acquire and every store a release,
/// so the default object's plain (volatile) loads and stores give 2 to 4; on other CPUs the
/// controller loads the `ordered` build (`lb_ebpf::order`), whose loads and stores there are
/// BPF load-acquire and store-release (Linux 6.15).
pub const FLOW_WAYS: usize = 4;

/// One slot of a [`FlowBucket`]. `state` is 0 when the slot is empty, [`FLOW_S_BUSY`] while a
/// writer fills it, else [`flow_state`]: the real, the kind (`FLOW_K_*`) and the age.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSlot {
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub state: u32,
}

/// Value of `FLOWS`, indexed by bucket number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBucket {
    pub slots: [FlowSlot; FLOW_WAYS],
}

/// `FlowSlot::state`: the real (listener and backend) the flow is pinned to.
pub const FLOW_S_REAL: u32 = 0x1fff;
/// `FlowSlot::state` bits 13..16: the kind of flow the slot holds, `FLOW_K_*` (0: none; the
/// slot is empty, or [`FLOW_S_BUSY`]). What the table knows of a flow:
/// - how it was recorded: by a SYN that storm control admitted (`OPENED`), or by a segment
///   without SYN (`MIDFLOW`: a miss in mid-flow, a session that predates this node's table,
///   e.g. after a failover);
/// - whether it is confirmed: it sent a segment without SYN [`FLOW_CONFIRM_UNITS`] or more
///   after it was recorded. A real MQTT session does (its next PINGREQ or PUBLISH); a flood
///   that sends its frames back to back never does. An unconfirmed flow keeps the age it was
///   recorded at until it confirms;
/// - whether it is closing: the client sent FIN or RST, in the age unit the state's age names
///   (a closing flow's age is that of the mark, not of its later frames).
///
/// Which flow an insert replaces (the flood guard): a stale one first (expired, closing and
/// unconfirmed, or closing for [`FLOW_REOPEN_UNITS`]), then the least recently recorded
/// unconfirmed one; a SYN's insert then also takes a flow confirmed mid-flow
/// ([`FLOW_K_MIDFLOW_CONFIRMED`]) that has been silent for [`FLOW_MIDFLOW_QUIET_UNITS`], then
/// an `OPENED` flow younger than [`FLOW_OPENED_GRACE_UNITS`]. Any
/// other confirmed flow is never replaced: one that opened through this node
/// ([`FLOW_K_CONFIRMED`], also what a cluster peer's copy is), one confirmed mid-flow that
/// talks, one closing for less than [`FLOW_REOPEN_UNITS`].
pub const FLOW_S_KIND: u32 = 7 << 13;
/// Kind: confirmed, recorded mid-flow. A flood can make these (made-up ACKs to the same tuples
/// a few seconds apart), so once one has been silent for [`FLOW_MIDFLOW_QUIET_UNITS`] a SYN's
/// insert may replace it.
pub const FLOW_K_MIDFLOW_CONFIRMED: u32 = 1 << 13;
/// Kind: recorded by a segment without SYN, not yet confirmed.
pub const FLOW_K_MIDFLOW: u32 = 2 << 13;
/// Kind: closing and unconfirmed.
pub const FLOW_K_UNCONFIRMED_CLOSING: u32 = 3 << 13;
/// Kind: recorded by a SYN that storm control admitted, not yet confirmed. Its retransmitted
/// SYNs within [`FLOW_SYN_RETRY_UNITS`] are charged to storm control's retransmit budget, not
/// its connection budget.
pub const FLOW_K_OPENED: u32 = 4 << 13;
/// Kind: closing, confirmed mid-flow.
pub const FLOW_K_MIDFLOW_CONFIRMED_CLOSING: u32 = 5 << 13;
/// Kind: confirmed, opened through this node (or a peer's copy).
pub const FLOW_K_CONFIRMED: u32 = 6 << 13;
/// Kind: closing, confirmed. A closing flow still steers the rest of the close. A SYN on its
/// tuple follows the ring only once the mark is [`FLOW_REOPEN_UNITS`] old; before, it goes
/// where the flow went. A segment without SYN, FIN or RST [`FLOW_CONFIRM_UNITS`] or more after
/// the mark clears it: the session is alive (a spoofed RST, or a close the client took back).
/// The controller does not count a closing flow as live.
pub const FLOW_K_CONFIRMED_CLOSING: u32 = 7 << 13;
/// `FlowSlot::state` while a writer owns the slot: no kind (not live), and not empty (0).
pub const FLOW_S_BUSY: u32 = !FLOW_S_KIND;
/// What layout version 3 wrote while a writer owned a slot (`!(1 << 14)`). A reader during an
/// upgrade, while the old program may still run, takes it as busy too.
pub const FLOW_S_BUSY_V3: u32 = !(1 << 14);
/// Age units between a flow's recording and the segment that confirms it (at least one unit,
/// 1.07 s, apart: the age is kept in whole units).
pub const FLOW_CONFIRM_UNITS: u32 = 2;
/// Age units a closing mark must be old before a SYN on the tuple re-picks by the ring: 57
/// units, over 61 s (a mark is the unit it was made in), a client's TIME_WAIT. A client that
/// closes first cannot reuse its tuple sooner; a session that a spoofed RST marked and that
/// speaks within a minute (an MQTT keepalive of 60 s or less) clears the mark before a spoofed
/// SYN can move it. A confirmed flow closing for less than this is not replaced either.
pub const FLOW_REOPEN_UNITS: u32 = 57;
/// Age units after its recording in which a SYN on an `OPENED` flow is a retransmit (Linux
/// retries a SYN after 1, 3 and 7 s): charged to storm control's retransmit budget. Later, it
/// is a new connection's, charged like one.
pub const FLOW_SYN_RETRY_UNITS: u32 = 8;

/// Age units a flow confirmed mid-flow must be silent before a SYN's insert may replace it (8:
/// more than 8.6 s). Under pressure (both buckets of a new connection full), a session picked
/// up mid-flow that is idle between its keepalives gives way to a new connection, and is
/// recorded again by its next segment, by the ring; a flood's flows confirmed mid-flow keep
/// new connections out only while the flood sends to each of them every few seconds.
pub const FLOW_MIDFLOW_QUIET_UNITS: u32 = 8;

/// Age units for which a flow an admitted SYN recorded is replaced only by another SYN's: a
/// connection just opened (its CONNECT, CONNACK and SUBSCRIBE take well under a second) is not
/// pushed out by made-up ACKs, and a SYN flood's leftovers make way for mid-flow records soon.
/// The same as [`FLOW_MIDFLOW_QUIET_UNITS`]: the program tells both apart with one compare.
pub const FLOW_OPENED_GRACE_UNITS: u32 = FLOW_MIDFLOW_QUIET_UNITS;

/// Whether a state's flow is closing.
#[inline(always)]
#[must_use]
pub const fn flow_closing(state: u32) -> bool {
    // One bit per kind: 3, 5 and 7.
    (0b1010_1000 >> ((state & FLOW_S_KIND) >> 13)) & 1 != 0
}

/// Whether a state's flow is confirmed (closing or not).
#[inline(always)]
#[must_use]
pub const fn flow_confirmed(state: u32) -> bool {
    // One bit per kind: 1, 5, 6 and 7.
    (0b1110_0010 >> ((state & FLOW_S_KIND) >> 13)) & 1 != 0
}

/// The closing kind of an open one (a closing kind stays).
#[inline(always)]
#[must_use]
pub const fn kind_closing(kind: u32) -> u32 {
    match kind {
        FLOW_K_MIDFLOW_CONFIRMED | FLOW_K_MIDFLOW_CONFIRMED_CLOSING => FLOW_K_MIDFLOW_CONFIRMED_CLOSING,
        FLOW_K_CONFIRMED | FLOW_K_CONFIRMED_CLOSING => FLOW_K_CONFIRMED_CLOSING,
        _ => FLOW_K_UNCONFIRMED_CLOSING,
    }
}

/// The confirmed open kind a flow of `kind` becomes when it confirms, or when its close is
/// cleared: one recorded mid-flow stays marked so (an unconfirmed close, whose origin is not
/// kept, counts as mid-flow).
#[inline(always)]
#[must_use]
pub const fn kind_confirmed(kind: u32) -> u32 {
    match kind {
        FLOW_K_OPENED | FLOW_K_CONFIRMED | FLOW_K_CONFIRMED_CLOSING => FLOW_K_CONFIRMED,
        _ => FLOW_K_MIDFLOW_CONFIRMED,
    }
}

/// Whether a state holds a flow (a kind; not empty, not a writer's).
#[inline(always)]
#[must_use]
pub const fn flow_live(state: u32) -> bool {
    state & FLOW_S_KIND != 0 && state != FLOW_S_BUSY_V3
}

/// `FlowSlot::state` bits 16..32: when the flow last sent a frame, in units of
/// 2^[`FLOW_AGE_NS_SHIFT`] ns of the shared clock ([`clock_ns`](crate::clock_ns); 1.07 s),
/// wrapping after 2^16 units (19.5 hours): far beyond any accepted `flow_idle_timeout`, and the
/// controller removes flows idle longer than their timeout well before (see
/// `MAX_FLOW_IDLE_TIMEOUT_S`).
pub const FLOW_S_AGE_SHIFT: u32 = 16;
pub const FLOW_AGE_NS_SHIFT: u32 = 30;
/// Ages a 16-bit field holds before it wraps.
pub const FLOW_AGE_WRAP: u32 = 1 << 16;
/// The longest `flow_idle_timeout` accepted, in seconds: 12 hours, well inside the age's wrap.
pub const MAX_FLOW_IDLE_TIMEOUT_S: u64 = 12 * 3600;
const _: () = assert!(age_units(MAX_FLOW_IDLE_TIMEOUT_S) < FLOW_AGE_WRAP * 2 / 3, "the longest timeout stays well inside the wrap");
const _: () =
    assert!(age_units(MAX_FLOW_IDLE_TIMEOUT_S) + 1 < 0xffff - FLOW_AGE_AHEAD, "the longest timeout is told apart from ages ahead");
const _: () = assert!(REAL_SLOTS - 1 <= FLOW_S_REAL, "a real id fits FLOW_S_REAL");

/// A slot's second word: its ports (the low half of a [`FlowKey::words`] pair) and its state,
/// in the slot's memory order.
#[inline(always)]
#[must_use]
pub const fn flow_meta(ports: u32, state: u32) -> u64 {
    // SAFETY: integers to an integer of the same size.
    unsafe { core::mem::transmute::<[u32; 2], u64>([ports, state]) }
}

/// The ports and the state of a slot's second word.
#[inline(always)]
#[must_use]
pub const fn flow_meta_split(meta: u64) -> (u32, u32) {
    // SAFETY: an integer to integers of the same size.
    let [ports, state] = unsafe { core::mem::transmute::<u64, [u32; 2]>(meta) };
    (ports, state)
}

/// The state of a live slot: `kind` is a `FLOW_K_*` (not 0).
#[inline(always)]
#[must_use]
pub const fn flow_state(real: u32, kind: u32, age: u32) -> u32 {
    (real & FLOW_S_REAL) | (kind & FLOW_S_KIND) | age << FLOW_S_AGE_SHIFT
}

/// A TCP segment as the flow table's states tell them apart ([`flow_step`]).
pub mod segment {
    /// SYN without ACK: a client opening a connection.
    pub const SYN: u32 = 0;
    /// FIN or RST without SYN: a client closing.
    pub const CLOSE: u32 = 1;
    /// Neither SYN, FIN nor RST: what a live session sends, and what confirms a flow.
    pub const PLAIN: u32 = 2;
    /// Anything else (SYN with ACK, SYN with FIN): forwarded where the flow goes, changes nothing.
    pub const ODD: u32 = 3;
}

/// What a segment does to the flow the table holds for it ([`flow_step`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowStep {
    /// The state to write; the old one when nothing changes. Its real is the recorded one even
    /// when `repick` is set: the caller puts the ring's in.
    pub state: u32,
    /// What a SYN is charged to in storm control before anything is written ([`charge`]).
    pub charge: u32,
    /// Picked again by the ring: the recorded real is not usable, or a SYN reuses the tuple of
    /// a flow closing for [`FLOW_REOPEN_UNITS`] or more.
    pub repick: bool,
    /// A `table_event` to count, or `table_event::NONE`.
    pub event: u32,
}

/// What storm control charges a SYN to ([`FlowStep::charge`]).
pub mod charge {
    /// Nothing: not a SYN.
    pub const NONE: u32 = 0;
    /// The listener's connection budget (`max_conn_rate`): a SYN that opens a connection.
    pub const CONNECTION: u32 = 1;
    /// The listener's retransmit budget (as large): a SYN retransmitted within
    /// `FLOW_SYN_RETRY_UNITS` of the admitted one.
    pub const RETRANSMIT: u32 = 2;
}

/// What the segment of class `seg` ([`segment`]) does to the flow in `state` at age `now`, its
/// recorded real `usable` or not. The flow table's rules in one place, for the program and
/// its tests: a flow confirms by time ([`FLOW_S_KIND`]); a closing mark keeps its age and is
/// cleared by a later plain segment ([`FLOW_K_CONFIRMED_CLOSING`]); every SYN is charged by
/// storm control, a retransmit to its own budget ([`FLOW_K_OPENED`]); a SYN moves a flow only
/// when its real is not usable or its close is old.
#[inline(always)]
#[must_use]
pub const fn flow_step(state: u32, seg: u32, usable: bool, now: u32) -> FlowStep {
    let kind = state & FLOW_S_KIND;
    let closing = flow_closing(state);
    let real = state & FLOW_S_REAL;
    let idle = flow_idle(now, state >> FLOW_S_AGE_SHIFT);
    let mut step = FlowStep { state, charge: charge::NONE, repick: !usable, event: table_event::NONE };
    if seg == segment::SYN {
        let retransmit = kind == FLOW_K_OPENED && idle < FLOW_SYN_RETRY_UNITS;
        step.charge = if retransmit { charge::RETRANSMIT } else { charge::CONNECTION };
        step.repick |= closing && idle >= FLOW_REOPEN_UNITS;
        if !retransmit && (step.repick || kind == FLOW_K_MIDFLOW || kind == FLOW_K_OPENED) {
            // A new connection on the tuple: recorded as an admitted SYN records one.
            step.state = flow_state(real, FLOW_K_OPENED, now);
        }
        if !step.repick {
            step.event = if retransmit { table_event::SYN_AGAIN } else { table_event::SYN_CHARGED };
        }
    } else if seg == segment::CLOSE {
        if !closing {
            step.state = flow_state(real, kind_closing(kind), now);
        }
    } else if seg == segment::PLAIN {
        if closing {
            if idle >= FLOW_CONFIRM_UNITS {
                step.state = flow_state(real, kind_confirmed(kind), now);
                step.event = table_event::CLOSE_CLEARED;
            }
        } else if flow_confirmed(state) {
            // Refreshed to now. An age at or ahead of now (written by another CPU that read the
            // clock after a tick this one has not seen) stays: moving it back would leave the
            // table older than that CPU's flow cache says the flow is.
            if idle != 0 {
                step.state = flow_state(real, kind, now);
            }
        } else if idle >= FLOW_CONFIRM_UNITS {
            step.state = flow_state(real, kind_confirmed(kind), now);
            step.event = table_event::CONFIRMED;
        }
    }
    step
}

/// The flow table age (see [`FLOW_S_AGE_SHIFT`]) at `ns` of the shared clock
/// ([`clock_ns`](crate::clock_ns)).
#[inline(always)]
#[must_use]
pub const fn flow_age(ns: u64) -> u32 {
    ((ns >> FLOW_AGE_NS_SHIFT) & 0xffff) as u32
}

/// Ages this far ahead of a `now` are taken as now: a flow refreshed after `now` was read (by
/// another CPU, or while the controller walks the table) has an age a unit or two ahead, which
/// must read as idle 0, not as idle for 2^16 units.
pub const FLOW_AGE_AHEAD: u32 = 1024;

/// Age units since `age` (a state's age field) at `now`, correct for any true idle time below
/// `FLOW_AGE_WRAP - FLOW_AGE_AHEAD` units (19.2 hours); an age up to [`FLOW_AGE_AHEAD`] units
/// ahead of `now` is idle 0.
#[inline(always)]
#[must_use]
pub const fn flow_idle(now: u32, age: u32) -> u32 {
    let idle = now.wrapping_sub(age) & 0xffff;
    if idle > 0xffff - FLOW_AGE_AHEAD { 0 } else { idle }
}

/// Whole age units in `secs` seconds, rounded up (a timeout never fires early).
#[must_use]
pub const fn age_units(secs: u64) -> u32 {
    let units = (secs * 1_000_000_000).div_ceil(1 << FLOW_AGE_NS_SHIFT);
    #[expect(clippy::cast_possible_truncation, reason = "at most 0xffff")]
    let units = if units > 0xffff { 0xffff } else { units as u32 };
    units
}

/// Slots per flow the table is sized for: at half load, two-choice buckets of four hold every
/// flow but about two in a million (at 80% load, one in a hundred would replace another).
pub const FLOW_SLOTS_PER_FLOW: u32 = 2;

/// Buckets for a `flow_table_size` of flows: a power of two, at least two (one per half).
#[must_use]
pub const fn flow_table_buckets(flows: u32) -> u32 {
    let b = (flows as u64 * FLOW_SLOTS_PER_FLOW as u64).div_ceil(FLOW_WAYS as u64).next_power_of_two();
    #[expect(clippy::cast_possible_truncation, reason = "2^32 flows make 2^31 buckets at most")]
    if b < 2 { 2 } else { b as u32 }
}

/// The two buckets a flow may live in, one in each half of a table of `mask + 1` buckets.
/// Seeded, so nobody outside can aim flows at the buckets of another (the ring hash is not:
/// two balancers must pick the same backends).
#[inline(always)]
#[must_use]
pub const fn flow_buckets(key: &FlowKey, seed: u64, mask: u32) -> [u32; 2] {
    let (addrs, ports) = key.words();
    let h = mix64((addrs ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ ports as u64);
    let half = (mask >> 1) + 1;
    #[expect(clippy::cast_possible_truncation, reason = "the low half of the hash")]
    let left = (h as u32) & (half - 1);
    let right = half | ((h >> 32) as u32 & (half - 1));
    [left, right]
}

/// Slots of `FLOW_CACHE` per CPU: a direct-mapped copy of recently used `FLOWS` entries (with
/// their real), so a busy established flow costs one read of memory this CPU alone writes. A power of two;
/// 4,096 × 40 bytes stays within a core's L2 cache (16,384 measured slower under load in the
/// lab, where every slot read is likelier a cache and TLB miss).
pub const FLOW_CACHE_SLOTS: u32 = 1 << 12;

/// A cache entry serves this many frames, then the next frame of the flow goes through
/// `FLOWS` again, which picks up any change another CPU or the controller made to it. An entry
/// also goes back to `FLOWS` as soon as the flow table's clock has moved on since it was filled,
/// so the table's age of a flow is always that of its last frame (idle means idle).
pub const FLOW_CACHE_REVALIDATE: u16 = 256;

/// `FlowCacheEntry::tag` bit set in every valid entry, so zeroed slots never match.
pub const FLOW_CACHE_VALID: u32 = 1 << 31;

/// Value of `FLOW_CACHE` (per CPU). Valid when `tag` equals the flow's `LISTEN_PORTS` slot,
/// `FLOW_CACHE_VALID | generation`. The controller bumps the generation (rewriting every used
/// port slot) whenever it purges flows or writes any real, which invalidates every cached
/// entry on every CPU at once; so a valid entry's copy of the real (MACs, usable when cached)
/// is current and a hit reads no other map. The expiry sweep deletes without a bump: it
/// removes only flows idle past their timeout, and an entry is served only in the clock unit
/// it was filled in, in which the table holds the flow at that age (the program fills an
/// entry only then).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowCacheEntry {
    pub key: FlowKey,
    pub real: u32,
    pub tag: u32,
    /// Frames served since the entry was filled from `FLOWS`.
    pub hits: u16,
    /// The flow table age ([`flow_age`]) when the entry was filled: a hit needs the same now.
    pub age: u16,
    pub info: RealInfo,
}

/// The `FLOW_CACHE` slot of a 4-tuple: one multiply per half, the top bits kept (they depend
/// on every input bit below them). A cache index needs no more: collisions only cost a
/// `FLOWS` lookup.
#[inline(always)]
#[must_use]
pub const fn flow_cache_slot(key: &FlowKey) -> u32 {
    let a = ((key.src_be as u64) << 32 | key.dst_be as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let b = (((key.sport_be as u64) << 16 | key.dport_be as u64) ^ a).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    #[expect(clippy::cast_possible_truncation, reason = "the shift leaves log2(FLOW_CACHE_SLOTS) bits")]
    let slot = (b >> (64 - FLOW_CACHE_SLOTS.trailing_zeros())) as u32;
    slot
}
const _: () = assert!(FLOW_CACHE_SLOTS.is_power_of_two());

/// Indices of `TABLE_STATS` (per CPU, `u64`): what flow table inserts did.
pub mod table_event {
    /// A flow recorded in a free slot.
    pub const INSERT_FREE: u32 = 0;
    /// A flow recorded over a closing or expired one.
    pub const REPLACE_STALE: u32 = 1;
    /// A flow recorded over an unconfirmed one (a flood's flows replace each other).
    pub const REPLACE_UNCONFIRMED: u32 = 2;
    /// Not recorded: every slot of its two buckets holds a confirmed live flow. The flood
    /// guard at work (or a table too small for its flows); the frame still follows the ring.
    pub const REFUSED: u32 = 3;
    /// A recorded flow confirmed by its next frame.
    pub const CONFIRMED: u32 = 4;
    /// Not recorded: another CPU changed the slot first (the flow's next frame tries again).
    pub const RACED: u32 = 5;
    /// A SYN of a flow that an admitted SYN recorded less than `FLOW_SYN_RETRY_UNITS` ago and
    /// that has not confirmed: a retransmit (its SYN-ACK was slow or lost), forwarded on its
    /// flow, not a new flow, charged to storm control's retransmit budget only.
    pub const SYN_AGAIN: u32 = 6;
    /// A SYN on a flow the table holds that no SYN of it recorded (a segment without SYN came
    /// first), that is confirmed, or that is closing for less than `FLOW_REOPEN_UNITS`:
    /// charged by storm control like a new connection, then forwarded where the flow goes,
    /// which it does not move.
    pub const SYN_CHARGED: u32 = 7;
    /// A closing mark cleared: the flow sent a segment without SYN, FIN or RST
    /// `FLOW_CONFIRM_UNITS` or more after its FIN or RST (a spoofed RST, or a close the client
    /// took back). Its flow is confirmed and open again.
    pub const CLOSE_CLEARED: u32 = 8;
    /// A new connection recorded over a flow confirmed mid-flow (`FLOW_K_MIDFLOW_CONFIRMED`):
    /// its buckets held nothing less: a flood of made-up ACKs sent to the same tuples seconds
    /// apart, or many sessions picked up mid-flow after a failover.
    pub const REPLACE_MIDFLOW: u32 = 9;
    pub const COUNT: u32 = 10;
    pub const LABELS: [&str; COUNT as usize] = [
        "insert_free",
        "replace_stale",
        "replace_unconfirmed",
        "refused",
        "confirmed",
        "raced",
        "syn_again",
        "syn_charged",
        "close_cleared",
        "replace_midflow",
    ];
    /// No event (`FlowStep::event`).
    pub const NONE: u32 = u32::MAX;
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 12);
const _: () = assert!(core::mem::size_of::<FlowSlot>() == 16);
const _: () = assert!(core::mem::size_of::<FlowBucket>() == 64);
const _: () = assert!(core::mem::size_of::<FlowCacheEntry>() == 40);
const _: () = assert!(core::mem::size_of::<FlowAddrs6>() == 32);

#[cfg(feature = "user")]
mod pod {
    use super::{FlowAddrs6, FlowBucket, FlowCacheEntry, FlowKey};
    // SAFETY: all of these are `#[repr(C)]`, made only of integers, with no padding (asserted
    // above), so every bit pattern is valid.
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowBucket {}
    unsafe impl aya::Pod for FlowCacheEntry {}
    unsafe impl aya::Pod for FlowAddrs6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rule of [`flow_step`], one row each: (what, kind, age, segment, usable) → (kind
    /// written, age written, charged to, re-picked, event).
    #[test]
    fn flow_step_rules() {
        const NOW: u32 = 1000;
        let (mid, opened, confirmed) = (FLOW_K_MIDFLOW, FLOW_K_OPENED, FLOW_K_CONFIRMED);
        let (mid_confirmed, unconfirmed_closing) = (FLOW_K_MIDFLOW_CONFIRMED, FLOW_K_UNCONFIRMED_CLOSING);
        let (confirmed_closing, mid_closing) = (FLOW_K_CONFIRMED_CLOSING, FLOW_K_MIDFLOW_CONFIRMED_CLOSING);
        let (reopen, confirm, retry) = (FLOW_REOPEN_UNITS, FLOW_CONFIRM_UNITS, FLOW_SYN_RETRY_UNITS);
        let (conn, again, none) = (charge::CONNECTION, charge::RETRANSMIT, charge::NONE);
        /// (what, kind, age, segment, usable, kind written, age written, charged to, re-picked, event)
        type Row = (&'static str, u32, u32, u32, bool, u32, u32, u32, bool, u32);
        #[rustfmt::skip]
        let rows: [Row; 30] = [
            ("the handshake's ACK confirms nothing", opened, NOW, segment::PLAIN, true, opened, NOW, none, false, table_event::NONE),
            ("a segment a unit later confirms nothing", opened, NOW - 1, segment::PLAIN, true, opened, NOW - 1, none, false, table_event::NONE),
            ("a segment FLOW_CONFIRM_UNITS later confirms", opened, NOW - confirm, segment::PLAIN, true, confirmed, NOW, none, false, table_event::CONFIRMED),
            ("a mid-flow miss confirms, marked mid-flow", mid, NOW - confirm, segment::PLAIN, true, mid_confirmed, NOW, none, false, table_event::CONFIRMED),
            ("a confirmed flow's segment refreshes its age", confirmed, NOW - 5, segment::PLAIN, true, confirmed, NOW, none, false, table_event::NONE),
            ("so does one confirmed mid-flow's, which stays so", mid_confirmed, NOW - 5, segment::PLAIN, true, mid_confirmed, NOW, none, false, table_event::NONE),
            ("a confirmed flow's age ahead of now stays (another CPU saw the tick)", confirmed, NOW + 1, segment::PLAIN, true, confirmed, NOW + 1, none, false, table_event::NONE),
            ("a confirmed flow seen this unit is not written", confirmed, NOW, segment::PLAIN, true, confirmed, NOW, none, false, table_event::NONE),
            ("a retransmitted SYN: the retransmit budget", opened, NOW - 3, segment::SYN, true, opened, NOW - 3, again, false, table_event::SYN_AGAIN),
            ("a SYN on an opened flow after the retries: a new connection", opened, NOW - retry, segment::SYN, true, opened, NOW, conn, false, table_event::SYN_CHARGED),
            ("a SYN after an ACK: charged, and its retransmits are retransmits", mid, NOW - 1, segment::SYN, true, opened, NOW, conn, false, table_event::SYN_CHARGED),
            ("a SYN on a confirmed flow: charged, the flow unchanged", confirmed, NOW - 1, segment::SYN, true, confirmed, NOW - 1, conn, false, table_event::SYN_CHARGED),
            ("a SYN on a flow confirmed mid-flow: the same", mid_confirmed, NOW - 1, segment::SYN, true, mid_confirmed, NOW - 1, conn, false, table_event::SYN_CHARGED),
            ("FIN or RST marks the flow closing now", confirmed, NOW - 9, segment::CLOSE, true, confirmed_closing, NOW, none, false, table_event::NONE),
            ("on a flow confirmed mid-flow, it stays marked so", mid_confirmed, NOW - 9, segment::CLOSE, true, mid_closing, NOW, none, false, table_event::NONE),
            ("on an unconfirmed flow", opened, NOW - 1, segment::CLOSE, true, unconfirmed_closing, NOW, none, false, table_event::NONE),
            ("a second FIN keeps the mark's age", confirmed_closing, NOW - 9, segment::CLOSE, true, confirmed_closing, NOW - 9, none, false, table_event::NONE),
            ("the close's last ACK keeps the mark", confirmed_closing, NOW - 1, segment::PLAIN, true, confirmed_closing, NOW - 1, none, false, table_event::NONE),
            ("a segment 2 units after the mark clears it", confirmed_closing, NOW - confirm, segment::PLAIN, true, confirmed, NOW, none, false, table_event::CLOSE_CLEARED),
            ("an unconfirmed close cleared: confirmed mid-flow", unconfirmed_closing, NOW - confirm, segment::PLAIN, true, mid_confirmed, NOW, none, false, table_event::CLOSE_CLEARED),
            ("a mid-flow close cleared stays mid-flow", mid_closing, NOW - confirm, segment::PLAIN, true, mid_confirmed, NOW, none, false, table_event::CLOSE_CLEARED),
            ("a SYN right after a close goes where the flow went", confirmed_closing, NOW, segment::SYN, true, confirmed_closing, NOW, conn, false, table_event::SYN_CHARGED),
            ("a SYN just under FLOW_REOPEN_UNITS after it too", confirmed_closing, NOW - reopen + 1, segment::SYN, true, confirmed_closing, NOW - reopen + 1, conn, false, table_event::SYN_CHARGED),
            ("a SYN FLOW_REOPEN_UNITS after a close reopens by the ring", confirmed_closing, NOW - reopen, segment::SYN, true, opened, NOW, conn, true, table_event::NONE),
            ("a down real: a segment re-picks, its flow as it was", confirmed, NOW - 1, segment::PLAIN, false, confirmed, NOW, none, true, table_event::NONE),
            ("a down real: a new SYN is charged and re-picks", confirmed, NOW - 1, segment::SYN, false, opened, NOW, conn, true, table_event::NONE),
            ("a down real: a retransmit re-picks on its budget", opened, NOW - 1, segment::SYN, false, opened, NOW - 1, again, true, table_event::NONE),
            ("a down real: a FIN re-picks and marks", mid, NOW - 1, segment::CLOSE, false, unconfirmed_closing, NOW, none, true, table_event::NONE),
            ("SYN+ACK changes nothing", opened, NOW - 5, segment::ODD, true, opened, NOW - 5, none, false, table_event::NONE),
            ("an age ahead of now is idle 0", opened, NOW + 3, segment::PLAIN, true, opened, NOW + 3, none, false, table_event::NONE),
        ];
        for (what, kind, age, seg, usable, want_kind, want_age, charged, repick, event) in rows {
            let step = flow_step(flow_state(7, kind, age), seg, usable, NOW);
            assert_eq!(
                (step.state, step.charge, step.repick, step.event),
                (flow_state(7, want_kind, want_age), charged, repick, event),
                "{what}"
            );
        }
    }

    #[test]
    fn live_states_and_busy_ones() {
        assert!(flow_live(flow_state(0, FLOW_K_MIDFLOW_CONFIRMED, 0)), "a flow of real 0, age 0 is live");
        assert!(!flow_live(0) && !flow_live(FLOW_S_BUSY) && !flow_live(FLOW_S_BUSY_V3));
        // Layout 3's live states read as this layout's kinds: unconfirmed, confirmed, and
        // both closing.
        let (v3_closing, v3_live, v3_confirmed) = (1 << 13, 1 << 14, 1 << 15);
        assert_eq!(v3_live, FLOW_K_MIDFLOW);
        assert_eq!(v3_live | v3_confirmed, FLOW_K_CONFIRMED);
        assert_eq!(v3_live | v3_closing, FLOW_K_UNCONFIRMED_CLOSING);
        assert_eq!(v3_live | v3_confirmed | v3_closing, FLOW_K_CONFIRMED_CLOSING);
        for kind in [1, 2, 3, 4, 5, 6, 7].map(|k| k << 13) {
            let s = flow_state(0, kind, 0);
            assert_eq!(flow_closing(s), [3, 5, 7].contains(&(kind >> 13)), "{kind:#x}");
            assert_eq!(flow_confirmed(s), [1, 5, 6, 7].contains(&(kind >> 13)), "{kind:#x}");
            assert!(
                flow_closing(flow_state(0, kind_closing(kind), 0))
                    && flow_confirmed(s) == flow_confirmed(flow_state(0, kind_closing(kind), 0))
            );
        }
    }
}
