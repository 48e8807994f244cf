//! The flow table (`lb_common::FLOW_WAYS` says how it works): find a 4-tuple's slot in its two
//! buckets, change a slot's state, insert a flow (never over a confirmed live one: the flood
//! guard, see `lb_common::FLOW_K_CONFIRMED`).
//!
//! # Layout and what a lookup touches
//!
//! ```text
//! FLOWS value = one bucket = one 64-byte cache line (the map's values are page-aligned):
//!   way 0: [addresses u64][ports u32 | state u32]   16 bytes
//!   way 1: [addresses u64][ports u32 | state u32]
//!   way 2: ...                                      4 ways x 16 = 64 bytes
//!   way 3: ...
//! FLOW_ADDRS6 value (IPv6 flows only) = 32 bytes per slot, indexed bucket x 4 + way
//! ```
//!
//! A slot holds the whole key of an IPv4 flow (both addresses in the first word, both ports in
//! the second beside the state), so a lookup is two cache lines, the flow's two buckets, and
//! nothing else: their addresses come from the hash, the loader's bucket mask and the map's
//! base, with no load in between (the array lookup is inlined by the verifier). [`find`] issues
//! the eight state loads of both lines before it compares any of them, so in a table larger
//! than the cache the two misses overlap: one miss's latency, not two in a row (the default
//! 1M-flow table, 32 MB: a new flow 291 -> 252 ns, an established flow that misses the flow
//! cache 325 -> 288 ns, against 164-174 ns for one dependent load over 32 MB in the same runs,
//! `xdp_bench --large`). An IPv6 flow's slot holds a 60-bit seeded hash of its tuple as its
//! key; its addresses are checked in `FLOW_ADDRS6`, a third line, read only for the slot whose
//! key matched.

use core::intrinsics::{
    AtomicOrdering::{Relaxed, SeqCst},
    atomic_cxchg,
};

use lb_common::{
    FLOW_AGE_AHEAD, FLOW_MIDFLOW_QUIET_UNITS, FLOW_OPENED_GRACE_UNITS, FLOW_REOPEN_UNITS, FLOW_S_AGE_SHIFT, FLOW_S_BUSY, FLOW_S_KIND,
    FLOW_WAYS, FlowBucket, FlowKey, flow_buckets, flow_live, flow_meta, flow_meta_split, table_event,
};

use crate::{
    Verdict,
    maps::{FLOWS, LAYOUT},
};

/// Buckets in the table less one; set by the loader from `flow_table_size`.
#[unsafe(no_mangle)]
static FLOW_BUCKET_MASK: u32 = lb_common::flow_table_buckets(lb_common::DEFAULT_FLOW_TABLE_SIZE) - 1;

/// A flow's key as a slot holds it, and its two buckets (and their numbers).
pub struct Place {
    addrs: u64,
    ports: u32,
    buckets: [*mut FlowBucket; 2],
    index: [u32; 2],
}

/// A slot that holds the key, and the state read there.
pub struct Found {
    meta: *mut u64,
    pub state: u32,
}

/// The slot's two words: addresses, then ports and state.
#[inline(always)]
fn words(bucket: *mut FlowBucket, way: usize) -> (*mut u64, *mut u64) {
    // SAFETY: `way < FLOW_WAYS`; a 16-byte slot is two 8-aligned words (bucket values are
    // 8-aligned, and page-aligned in an mmapable map).
    unsafe {
        let word = (&raw mut (*bucket).slots).cast::<u64>().add(way * 2);
        (word, word.add(1))
    }
}

/// The table's hash seed (`lb_common::Layout::flow_seed`).
#[inline(always)]
pub fn seed() -> Result<u64, Verdict> {
    Ok(LAYOUT.get(0).ok_or(Verdict::DropInternal)?.flow_seed)
}

/// The `FLOW_ADDRS6` index of slot `way` of bucket `bucket`.
#[inline(always)]
#[expect(clippy::cast_possible_truncation, reason = "way < FLOW_WAYS")]
const fn slot_index(bucket: u32, way: usize) -> u32 {
    bucket.wrapping_mul(FLOW_WAYS as u32).wrapping_add(way as u32)
}

/// Where `key` lives, with the table's `seed`.
#[inline(always)]
pub fn place(key: &FlowKey, seed: u64) -> Result<Place, Verdict> {
    // SAFETY: a plain read of a loader-set constant; volatile so the default is not folded in.
    let mask = unsafe { core::ptr::read_volatile(&raw const FLOW_BUCKET_MASK) };
    let [left, right] = flow_buckets(key, seed, mask);
    let (addrs, ports) = key.words();
    Ok(Place {
        addrs,
        ports,
        buckets: [FLOWS.get_ptr_mut(left).ok_or(Verdict::DropInternal)?, FLOWS.get_ptr_mut(right).ok_or(Verdict::DropInternal)?],
        index: [left, right],
    })
}

/// `x`, hidden from the optimiser. The slot arithmetic below is branch-free, so the verifier
/// walks one path through it whatever the slots hold and the CPU has no data-dependent jump to
/// mispredict. Left alone, LLVM turns it back into compares and selects, and the BPF
/// instruction set has no conditional move, so every select becomes a jump (measured: the
/// verifier then processes 31,000 instructions of the program instead of 21,000).
#[inline(always)]
fn opaque(mut x: u64) -> u64 {
    // SAFETY: one register move onto itself. (An empty sequence would leave two line-info
    // records at one instruction, which the kernel refuses.)
    unsafe { core::arch::asm!("{0} = {0}", inout(reg) x, options(pure, nomem, nostack, preserves_flags)) };
    x
}

/// 1 when `x` is zero, else 0, without a branch.
#[inline(always)]
fn is_zero(x: u64) -> u64 {
    (opaque(x | x.wrapping_neg()) >> 63) ^ 1
}

/// The way of the lowest set bit of a non-zero 4-bit mask, by table lookup in a constant (two
/// bits per mask value) rather than by branches.
#[inline(always)]
const fn lowest_way(mask: u32) -> usize {
    const CTZ4: u32 = {
        let mut table = 0;
        let mut m = 1;
        while m < 16 {
            table |= (m as u32).trailing_zeros() << (2 * m);
            m += 1;
        }
        table
    };
    ((CTZ4 >> ((mask & 0xf) * 2)) & 3) as usize
}

/// Bits of a slot's second word that an update of the same flow changes: its age, its closing
/// mark and its kind (`set_state` from the established path). A slot emptied or taken by
/// another flow changes its ports too (to 0, through `FLOW_S_BUSY`).
const REFRESHED: u64 = ((0xffff << FLOW_S_AGE_SHIFT) | FLOW_S_KIND as u64) << 32;

/// Whether any of the four state words carries `ports` in its low half: two 32-bit lanes per
/// 64-bit word, each tested for zero at once. A new flow's ports are seldom in a bucket, so a
/// miss costs four loads and a dozen instructions.
#[inline(always)]
fn ports_in(metas: &[u64; FLOW_WAYS], ports: u32) -> bool {
    let lane = |m: u64| u64::from(flow_meta_split(m).0 ^ ports);
    let pairs = [lane(metas[0]) | lane(metas[1]) << 32, lane(metas[2]) | lane(metas[3]) << 32];
    let zero = |v: u64| v.wrapping_sub(0x0000_0001_0000_0001) & !v & 0x8000_0000_8000_0000;
    zero(pairs[0]) | zero(pairs[1]) != 0
}

/// The slot in bucket `half` holding the key. The four slots are compared by arithmetic, so the
/// verifier sees one way through whatever they hold; only the slot found is read again.
/// `holds` checks what the key alone does not (an IPv6 flow's addresses) in the slot found,
/// before its state is read again; a slot whose key matches but whose addresses do not (two
/// IPv6 flows whose 60-bit keys collide) is passed over for the next that matches.
#[inline(always)]
fn find_in(half: usize, p: &Place, first: &[u64; FLOW_WAYS], holds: &impl Fn(u32) -> bool) -> Option<Found> {
    let bucket = p.buckets[half];
    if !ports_in(first, p.ports) {
        return None;
    }
    let mut hits = 0u32;
    for (way, &m) in first.iter().enumerate() {
        // SAFETY: inside the map value. An acquire: the state is read again after it.
        let a = unsafe { lb_ebpf::order::load_acquire(words(bucket, way).0) };
        let (ports, state) = flow_meta_split(m);
        // A slot a writer holds (`FLOW_S_BUSY`, no kind) is not live.
        let differs = (a ^ p.addrs) | u64::from(ports ^ p.ports) | is_zero(u64::from(state & FLOW_S_KIND));
        #[expect(clippy::cast_possible_truncation, reason = "0 or 1")]
        let hit = is_zero(differs) as u32;
        hits |= hit << way;
    }
    // One round per slot whose key matched; for IPv4, where `holds` is always true, the first
    // round returns.
    for _ in 0..FLOW_WAYS {
        if hits == 0 {
            return None;
        }
        let way = lowest_way(hits);
        hits &= hits - 1;
        if !holds(slot_index(p.index[half], way)) {
            continue;
        }
        let (_, meta) = words(bucket, way);
        let m = first[0] & way_mask(way, 0) | first[1] & way_mask(way, 1) | first[2] & way_mask(way, 2) | first[3] & way_mask(way, 3);
        // SAFETY: inside the map value. The slot held the key when its addresses were read if
        // its state word is the same now, or differs only by what an update of this flow writes
        // (another CPU refreshing its age meanwhile): a writer that replaces the flow swaps in
        // BUSY first.
        let again = unsafe { core::ptr::read_volatile(meta) };
        if (again ^ m) & !REFRESHED != 0 {
            return None;
        }
        return Some(Found { meta, state: flow_meta_split(again).1 });
    }
    None
}

/// All ones when `way == of`, else zero.
#[inline(always)]
fn way_mask(way: usize, of: usize) -> u64 {
    is_zero((way ^ of) as u64).wrapping_neg()
}

/// The slot holding the key, if any (and, by `holds`, the flow); `seen` gets the state words
/// read.
#[inline(always)]
pub fn find(p: &Place, seen: &mut Seen, holds: impl Fn(u32) -> bool) -> Option<Found> {
    // Both buckets' state words first, then the compares: in a table larger than the cache each
    // bucket is a cache (and TLB) miss, and loads issued back to back overlap, where a right
    // bucket read only once the left one's compares ran would wait for the left's miss first
    // (a lookup or insert in the default 1M-flow table: two misses in a row).
    for (half, row) in seen.0.iter_mut().enumerate() {
        for (way, m) in row.iter_mut().enumerate() {
            // SAFETY: inside the map value. Per slot: the state (an acquire: the addresses are
            // read after it), then (in `find_in`) the addresses; for the slot found, the state
            // once more.
            *m = unsafe { lb_ebpf::order::load_acquire(words(p.buckets[half], way).1) };
        }
    }
    let [left, right] = &seen.0;
    find_in(0, p, left, &holds).or_else(|| find_in(1, p, right, &holds))
}

/// The state words of both buckets as a lookup that found nothing read them: an insert
/// starts from them rather than reading them again (it checks the slot it takes once more).
pub struct Seen([[u64; FLOW_WAYS]; 2]);

impl Seen {
    #[inline(always)]
    pub const fn new() -> Self {
        Self([[0; FLOW_WAYS]; 2])
    }
}

/// Changes a found slot's state, unless another writer changed the slot since it was read (then
/// theirs stands: a newer age, a replaced flow). True when this write stands.
#[inline(always)]
pub fn set_state(p: &Place, found: &Found, state: u32) -> bool {
    // SAFETY: an 8-aligned word inside the map value.
    unsafe { atomic_cxchg::<u64, { SeqCst }, { Relaxed }>(found.meta, flow_meta(p.ports, found.state), flow_meta(p.ports, state)).1 }
}

/// Score classes above any idle time, by how a slot is to replace (the order
/// `lb_common::FLOW_S_KIND` gives): a flow an admitted SYN recorded within
/// `FLOW_OPENED_GRACE_UNITS` (only a SYN's insert takes it), then one confirmed mid-flow and
/// silent for `FLOW_MIDFLOW_QUIET_UNITS` (the same: a new connection goes before a flood's
/// leftovers),
/// then any other unconfirmed flow, then a stale one (expired; closing and unconfirmed; closing
/// for `FLOW_REOPEN_UNITS` or more) before all. Any other confirmed flow scores below
/// `OPENED`: those are never replaced.
const OPENED: u64 = 1 << 16;
const MIDFLOW_CONFIRMED: u64 = 2 << 16;
const UNCONFIRMED: u64 = 3 << 16;
const STALE: u64 = 4 << 16;

/// The class (0 to 4, `score`'s classes) of a slot by its kind, `(state >> 13) & 7`, three
/// bits each: no kind (a writer's slot) 4; confirmed mid-flow 0; mid-flow 3; closing and
/// unconfirmed 4; opened 1; closing, confirmed mid-flow 0; confirmed 0; closing and confirmed 0.
const CLASS_OF: u64 = 4 | 3 << 6 | 4 << 9 | 1 << 12;
/// What a kind's class is ORed with once quiet for `FLOW_MIDFLOW_QUIET_UNITS` (which is
/// `FLOW_OPENED_GRACE_UNITS`): confirmed mid-flow 2 (a SYN's to take), opened 2 (1 | 2 = 3:
/// unconfirmed like the rest).
const QUIET_CLASS_OF: u64 = 2 << 3 | 2 << 12;
/// What a kind's class is ORed with once idle for `FLOW_REOPEN_UNITS`: closing and confirmed
/// (mid-flow or not), 4 (stale).
const OLD_CLASS_OF: u64 = 4 << 15 | 4 << 21;

/// How good a taken slot is to replace, from its state word: its class (above), then how long
/// it has been idle (an unconfirmed flow: since it was recorded; a closing one: since its
/// mark). By arithmetic, without branches: lookups in three constants by the slot's kind,
/// masked by three compares (by subtraction) of its idle time. `expire_less_one`: one less
/// than the idle units from which a flow is expired. A slot a writer holds (`FLOW_S_BUSY`)
/// scores as stale; `claim` then finds it not live and gives up.
#[inline(always)]
fn score(meta: u64, now: u32, expire_less_one: u64) -> u64 {
    const _: () = assert!(FLOW_S_KIND == 7 << 13 && FLOW_OPENED_GRACE_UNITS == FLOW_MIDFLOW_QUIET_UNITS);
    let st = u64::from(flow_meta_split(meta).1);
    let idle = u64::from(now).wrapping_sub(st >> FLOW_S_AGE_SHIFT) & 0xffff;
    // An age ahead of `now` (another CPU refreshed the flow after this one read the clock) is
    // idle 0 (`lb_common::flow_idle`).
    let ahead = opaque(u64::from(0xffff - FLOW_AGE_AHEAD).wrapping_sub(idle)) >> 63;
    let idle = idle & ahead.wrapping_sub(1);
    // All ones when idle for `units` or more, else 0.
    let past = |units: u64| (opaque(units.wrapping_sub(1).wrapping_sub(idle)) >> 63).wrapping_neg();
    let shift = ((st >> 13) & 7) * 3;
    let class = (CLASS_OF >> shift) & 7
        | (QUIET_CLASS_OF >> shift) & 7 & past(u64::from(FLOW_MIDFLOW_QUIET_UNITS))
        | (OLD_CLASS_OF >> shift) & 7 & past(u64::from(FLOW_REOPEN_UNITS))
        | (opaque(expire_less_one.wrapping_sub(idle)) >> 63) << 2;
    idle | class << 16
}

/// The free slots of a bucket, one bit per way (a state of 0).
#[inline(always)]
fn free_ways(row: &[u64; FLOW_WAYS]) -> u32 {
    #[expect(clippy::cast_possible_truncation, reason = "0 or 1")]
    let free = |m: u64| is_zero(u64::from(flow_meta_split(m).1)) as u32;
    row.iter().enumerate().map(|(way, &m)| free(m) << way).fold(0, |a, b| a | b)
}

/// Set bits of a 4-bit mask, by table lookup in a constant (three bits per mask value).
#[inline(always)]
const fn ways_in(mask: u32) -> u64 {
    const POP4: u64 = {
        let mut table = 0u64;
        let mut m = 0;
        while m < 16 {
            table |= (m as u64).count_ones() as u64 * (1 << (3 * m));
            m += 1;
        }
        table
    };
    (POP4 >> ((mask & 0xf) * 3)) & 7
}

/// Inserts the flow with `state`: into a free slot of the emptier bucket (the left on a tie:
/// d-left hashing), else over the best slot of the eight to replace (see [`score`]), but never
/// over a confirmed flow that opened through this node, and for a flow recorded without SYN
/// (`FLOW_K_MIDFLOW`) never over one an admitted SYN recorded within
/// `FLOW_OPENED_GRACE_UNITS` nor one confirmed mid-flow. Gives up when another writer changes that slot first;
/// the frame is forwarded all the same and the flow's next frame inserts it. Returns what it
/// did (`lb_common::table_event`). `expire`: idle age units from which a flow is expired.
/// `record` writes what else the slot needs (an IPv6 flow's addresses) while it is claimed.
#[inline(always)]
pub fn insert(p: &Place, seen: &Seen, state: u32, now: u32, expire: u32, record: impl Fn(u32)) -> u32 {
    let metas = &seen.0;
    let free = [free_ways(&metas[0]), free_ways(&metas[1])];
    if free[0] | free[1] != 0 {
        let won = if ways_in(free[1]) > ways_in(free[0]) {
            claim(p, 1, lowest_way(free[1]), None, state, &record)
        } else {
            claim(p, 0, lowest_way(free[0]), None, state, &record)
        };
        return if won { table_event::INSERT_FREE } else { table_event::RACED };
    }
    // Every slot taken. The best (score, half, way), packed so that one maximum picks it; the
    // maximum by arithmetic too, so the choice is one value rather than a path per slot.
    let expire_less_one = u64::from(expire).wrapping_sub(1);
    let mut best = 0u64;
    for (half, row) in metas.iter().enumerate() {
        for (way, &m) in row.iter().enumerate() {
            let candidate = score(m, now, expire_less_one) << 3 | (half << 2 | way) as u64;
            let keep = (opaque(candidate.wrapping_sub(best)) >> 63).wrapping_neg();
            best = best & keep | candidate & !keep;
        }
    }
    let best_score = best >> 3;
    // What the new flow may replace: a SYN's, any unconfirmed flow and one confirmed mid-flow
    // but silent for long; a mid-flow miss's, neither a connection just opened nor a confirmed
    // flow (so made-up ACKs never push those out).
    let least = if state & FLOW_S_KIND == lb_common::FLOW_K_OPENED { OPENED } else { UNCONFIRMED };
    if best_score < least {
        return table_event::REFUSED;
    }
    let way = (best & 3) as usize;
    let chosen = Some((best_score, now, expire_less_one));
    let won = if best & 4 == 0 { claim(p, 0, way, chosen, state, &record) } else { claim(p, 1, way, chosen, state, &record) };
    if !won {
        table_event::RACED
    } else if best_score >= STALE {
        table_event::REPLACE_STALE
    } else if best_score >> 16 == MIDFLOW_CONFIRMED >> 16 {
        table_event::REPLACE_MIDFLOW
    } else {
        table_event::REPLACE_UNCONFIRMED
    }
}

/// Takes slot `way` of bucket `half` if it is still what it was chosen as (free, or with
/// `chosen` = (score, now, expire less one) a live flow scoring that), and writes the flow
/// there. True when it did.
#[inline(always)]
fn claim(p: &Place, half: usize, way: usize, chosen: Option<(u64, u32, u64)>, state: u32, record: &impl Fn(u32)) -> bool {
    let (addrs, meta) = words(p.buckets[half], way);
    // SAFETY: 8-aligned words inside the map value. Claim the slot (it must still hold what was
    // read; the compare-and-swap is fully ordered), write the addresses, then publish the state
    // with a release: no reader sees the state before the addresses (`lb_common::FLOW_WAYS`).
    unsafe {
        let old = core::ptr::read_volatile(meta);
        let st = flow_meta_split(old).1;
        let still = match chosen {
            None => st == 0,
            Some((score_was, now, expire_less_one)) => flow_live(st) && score(old, now, expire_less_one) == score_was,
        };
        if !still || !atomic_cxchg::<u64, { SeqCst }, { Relaxed }>(meta, old, flow_meta(0, FLOW_S_BUSY)).1 {
            return false;
        }
        core::ptr::write_volatile(addrs, p.addrs);
        record(slot_index(p.index[half], way));
        lb_ebpf::order::store_release(meta, flow_meta(p.ports, state));
    }
    true
}
