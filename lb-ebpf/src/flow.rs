//! Real selection: this CPU's flow cache first, then the flow table, then the listener's Maglev
//! ring on a miss, when the recorded real is down, or for a new connection that reuses the
//! 4-tuple of a flow closed long enough (`lb_common::flow_step` has the table's rules). Only
//! for frames addressed to this node; every SYN that opens a connection passes the listener's
//! storm control once.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    FLOW_CACHE_REVALIDATE, FLOW_K_CONFIRMED, FLOW_K_MIDFLOW, FLOW_K_MIDFLOW_CONFIRMED, FLOW_K_OPENED, FLOW_K_UNCONFIRMED_CLOSING,
    FLOW_S_AGE_SHIFT, FLOW_S_KIND, FLOW_S_REAL, FlowKey, LISTENER_F_CONN_RATE, LISTENER_F_HASH_SOURCE, LISTENER_F_IPV6,
    LISTENER_F_SOURCE_PREFIX64, ListenerInfo, MAX_LISTENERS, NO_BACKEND, PortInfo, RING_NONE, RING_SLOTS_PER_ENTRY, RealInfo, charge,
    flow_age, flow_cache_slot, flow_hash, flow_hash6, flow_key6, flow_state, flow_step, ring_base, ring_slot, segment, source_hash,
    source_hash6, table_event, trace_how,
};

use crate::{
    Verdict, events,
    maps::{FLOW_ADDRS6, FLOW_CACHE, LISTEN_PORTS, LISTENER_VIP6, LISTENERS, REALS, RINGS},
    node,
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tcp4, Tcp6},
    stats, storm, table,
};

/// A TCP segment of either family, as the flow code needs it. The IPv4 side compiles to what
/// it was before IPv6; the IPv6 side adds the full-address checks.
pub trait Segment {
    /// Ports and flags; for IPv6 the addresses' folds (`lb_common::fold6`).
    fn tcp(&self) -> &Tcp4;
    /// The key in the flow table and cache (`lb_common::flow_key6` for IPv6).
    fn key(&self, seed: u64) -> FlowKey;
    /// Whether listener `id`, whose `vip_be` and port matched, is at this destination.
    fn is_vip(&self, id: u32, info: ListenerInfo) -> bool;
    /// The ring hash under the listener's hash mode.
    fn ring_hash(&self, info: ListenerInfo) -> u64;
    /// Whether flow table slot `slot`, whose key matched, holds this flow (IPv6: its addresses).
    fn holds(&self, slot: u32) -> bool;
    /// Records what [`Self::holds`] compares, in a slot being written.
    fn record(&self, slot: u32);
    /// Whether it is IPv6.
    fn ipv6(&self) -> bool;
    /// A hash of the 4-tuple for a tunnel's GUE source port and IPv6 flow label
    /// (`lb_common::tunnel_hash`): spread, not a ring's choice.
    fn tuple_hash(&self) -> u64;
}

impl Segment for Tcp4 {
    #[inline(always)]
    fn tcp(&self) -> &Tcp4 {
        self
    }

    #[inline(always)]
    fn key(&self, _seed: u64) -> FlowKey {
        FlowKey { src_be: self.src_be, dst_be: self.dst_be, sport_be: self.sport_be, dport_be: self.dport_be }
    }

    #[inline(always)]
    fn is_vip(&self, _id: u32, info: ListenerInfo) -> bool {
        info.flags & LISTENER_F_IPV6 == 0
    }

    #[inline(always)]
    fn ring_hash(&self, info: ListenerInfo) -> u64 {
        if info.flags & LISTENER_F_HASH_SOURCE != 0 {
            source_hash(self.src_be)
        } else {
            flow_hash(self.src_be, self.dst_be, self.sport_be, self.dport_be)
        }
    }

    #[inline(always)]
    fn holds(&self, _slot: u32) -> bool {
        true
    }

    #[inline(always)]
    fn record(&self, _slot: u32) {}

    #[inline(always)]
    fn ipv6(&self) -> bool {
        false
    }

    #[inline(always)]
    fn tuple_hash(&self) -> u64 {
        lb_common::tunnel_hash(u64::from(self.src_be) << 32 | u64::from(self.dst_be), self.sport_be, self.dport_be)
    }
}

impl Segment for Tcp6 {
    #[inline(always)]
    fn tcp(&self) -> &Tcp4 {
        &self.tcp
    }

    #[inline(always)]
    fn key(&self, seed: u64) -> FlowKey {
        flow_key6(&self.src, &self.dst, self.tcp.sport_be, self.tcp.dport_be, seed)
    }

    #[inline(always)]
    fn is_vip(&self, id: u32, info: ListenerInfo) -> bool {
        info.flags & LISTENER_F_IPV6 != 0
            && LISTENER_VIP6.get(id).is_some_and(|vip| {
                let vip = vip.words();
                vip[0] == self.dst[0] && vip[1] == self.dst[1]
            })
    }

    #[inline(always)]
    fn ring_hash(&self, info: ListenerInfo) -> u64 {
        if info.flags & LISTENER_F_HASH_SOURCE != 0 {
            source_hash6(&self.src, info.flags & LISTENER_F_SOURCE_PREFIX64 != 0)
        } else {
            flow_hash6(&self.src, &self.dst, self.tcp.sport_be, self.tcp.dport_be)
        }
    }

    #[inline(always)]
    fn holds(&self, slot: u32) -> bool {
        FLOW_ADDRS6.get_ptr_mut(slot).is_some_and(|a| {
            // SAFETY: a map value, read word by word (the writer publishes the slot's state after
            // writing these, see `table`), each an acquire: the slot's state is read again after.
            let w = |i: usize| unsafe { lb_ebpf::order::load_acquire((&raw const *a).cast::<u64>().add(i)) };
            (w(0) ^ self.src[0]) | (w(1) ^ self.src[1]) | (w(2) ^ self.dst[0]) | (w(3) ^ self.dst[1]) == 0
        })
    }

    #[inline(always)]
    fn record(&self, slot: u32) {
        if let Some(a) = FLOW_ADDRS6.get_ptr_mut(slot) {
            // SAFETY: a map value, written word by word while the slot is claimed.
            unsafe {
                let w = (&raw mut *a).cast::<u64>();
                core::ptr::write_volatile(w, self.src[0]);
                core::ptr::write_volatile(w.add(1), self.src[1]);
                core::ptr::write_volatile(w.add(2), self.dst[0]);
                core::ptr::write_volatile(w.add(3), self.dst[1]);
            }
        }
    }

    #[inline(always)]
    fn ipv6(&self) -> bool {
        true
    }

    #[inline(always)]
    fn tuple_hash(&self) -> u64 {
        let words = self.src[0] ^ self.src[1].rotate_left(17) ^ self.dst[0].rotate_left(31) ^ self.dst[1].rotate_left(47);
        lb_common::tunnel_hash(words, self.tcp.sport_be, self.tcp.dport_be)
    }
}

/// The real a frame goes to.
pub struct Pick {
    pub real_id: u32,
    pub real: &'static RealInfo,
    pub new_flow: bool,
    /// How the real was chosen (`lb_common::trace_how`), for `dsrlb trace`.
    pub how: u32,
}

/// Slots per ring, the same for every listener; set by the loader.
#[unsafe(no_mangle)]
static RING_SIZE: u32 = lb_common::DEFAULT_RING_SIZE;

/// A listener as the ring lookup needs it.
#[derive(Clone, Copy)]
struct Listener {
    id: u32,
    info: ListenerInfo,
}

/// Reads an 8-byte map value whole (see `lb_common::ListenerInfo`), with an acquire: the
/// controller writes the rings and reals a listener or port word points to before it (with a
/// release), and they are read after it.
#[inline(always)]
fn load_word<T>(value: &T) -> u64 {
    // SAFETY: the values read this way are 8 bytes and 8-aligned (map values are).
    unsafe { lb_ebpf::order::load_acquire((&raw const *value).cast::<u64>()) }
}

/// The listener at the frame's destination among those on its port.
#[inline(always)]
fn listener(seg: &impl Segment, port: PortInfo) -> Result<Listener, Verdict> {
    let tcp = seg.tcp();
    let mut rest = port.listeners;
    // Usually one round: a port is seldom shared between VIPs.
    for _ in 0..MAX_LISTENERS {
        if rest == 0 {
            break;
        }
        let id = lowest_bit(rest);
        rest &= rest - 1;
        if let Some(slot) = LISTENERS.get(id) {
            let info = ListenerInfo::from_word(load_word(slot));
            if info.vip_be == tcp.dst_be && info.port_be == tcp.dport_be && seg.is_vip(id, info) {
                return Ok(Listener { id, info });
            }
        }
    }
    Err(Verdict::PassNoListener)
}

/// The index of the lowest set bit of a non-zero `x`, by arithmetic alone (a population count
/// of the bits below it).
#[inline(always)]
const fn lowest_bit(x: u32) -> u32 {
    let mut v = (x & x.wrapping_neg()).wrapping_sub(1);
    v -= (v >> 1) & 0x5555_5555;
    v = (v & 0x3333_3333) + ((v >> 2) & 0x3333_3333);
    ((v + (v >> 4)) & 0x0f0f_0f0f).wrapping_mul(0x0101_0101) >> 24
}

/// The real id in the listener's ring slot for this tuple (`NO_BACKEND` included).
#[inline(always)]
fn ring_id(listener: Listener, seg: &impl Segment) -> Result<u32, Verdict> {
    let hash = seg.ring_hash(listener.info);
    // SAFETY: a plain read of a loader-set constant; volatile so the compiler does not fold the
    // default in.
    let size = unsafe { core::ptr::read_volatile(&raw const RING_SIZE) };
    let slot = ring_slot(hash, size);
    let entry = ring_base(listener.id, u32::from(listener.info.ring_copy), size).wrapping_add(slot / RING_SLOTS_PER_ENTRY);
    let ids = RINGS.get(entry).ok_or(Verdict::DropInternal)?;
    // SAFETY: the lane is below RING_SLOTS_PER_ENTRY, inside the entry.
    let id = unsafe { *ids.as_ptr().add((slot % RING_SLOTS_PER_ENTRY) as usize) };
    Ok(if id == RING_NONE { NO_BACKEND } else { u32::from(id) })
}

#[inline(always)]
fn usable_real(id: u32) -> Result<(u32, &'static RealInfo), Verdict> {
    if id == NO_BACKEND {
        return Err(Verdict::DropNoBackend);
    }
    let real = REALS.get(id).ok_or(Verdict::DropInternal)?;
    if !real.usable() {
        return Err(Verdict::DropNoBackend);
    }
    Ok((id, real))
}

/// Whether a flow in `state` goes into this CPU's flow cache: confirmed and open. An
/// unconfirmed one's next segment must reach the table to confirm it, a closing one's to clear
/// its mark.
#[inline(always)]
const fn cached_kind(state: u32) -> bool {
    let kind = state & FLOW_S_KIND;
    kind == FLOW_K_CONFIRMED || kind == FLOW_K_MIDFLOW_CONFIRMED
}

/// The segment's class for the flow table (`lb_common::segment`): a SYN with ACK, FIN or RST
/// is no client's opening.
#[inline(always)]
const fn segment_of(tcp: &Tcp4) -> u32 {
    if tcp.flags & (TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST) == TCP_SYN {
        segment::SYN
    } else if tcp.flags & TCP_SYN != 0 {
        segment::ODD
    } else if tcp.flags & (TCP_FIN | TCP_RST) != 0 {
        segment::CLOSE
    } else {
        segment::PLAIN
    }
}

/// A frame to a listener's port, addressed to this node: the port's slot, and the node.
#[inline(always)]
fn arrival(ctx: &XdpContext, tcp: &Tcp4) -> Result<(PortInfo, node::Node), Verdict> {
    // Most TCP that is not ours goes to a port no listener uses: one inlined array read. A used
    // port's slot holds the tag that this CPU's cached flows must carry to be valid.
    let port = match LISTEN_PORTS.get(u32::from(tcp.dport_be)) {
        Some(slot) => PortInfo::from_word(load_word(slot)),
        None => return Err(Verdict::PassNoListener),
    };
    if port.tag == 0 {
        return Err(Verdict::PassNoListener);
    }
    Ok((port, node::check(ctx)?))
}

/// The real for an ICMP error about the flow `tcp` (as its client sends it): found as the
/// flow's own segments would be, in the flow table and else in the ring; nothing is recorded,
/// refreshed or confirmed.
#[inline(always)]
pub fn pick_for_icmp(ctx: &XdpContext, seg: &impl Segment, matched: &mut u32) -> Result<Pick, Verdict> {
    let tcp = seg.tcp();
    let (port, _) = arrival(ctx, tcp)?;
    let listener = listener(seg, port)?;
    *matched = listener.id;
    let seed = table::seed()?;
    let key = seg.key(seed);
    let place = table::place(&key, seed)?;
    if let Some(found) = table::find(&place, &mut table::Seen::new(), |slot| seg.holds(slot))
        && let Some(real) = REALS.get(found.state & FLOW_S_REAL)
        && real.usable()
    {
        return Ok(Pick { real_id: found.state & FLOW_S_REAL, real, new_flow: false, how: trace_how::ICMP_TABLE });
    }
    let (real_id, real) = usable_real(ring_id(listener, seg)?)?;
    Ok(Pick { real_id, real, new_flow: false, how: trace_how::ICMP_RING })
}

/// Finds (or makes) the flow entry for the segment `tcp`; `PassNoListener` when it is not for
/// a listener, `PassNotOurMac` when the frame is not addressed to this node. `matched` gets the
/// listener's id once it is known (for `dsrlb trace`).
#[inline(always)]
pub fn pick(ctx: &XdpContext, seg: &impl Segment, matched: &mut u32) -> Result<Pick, Verdict> {
    let tcp = seg.tcp();
    let (port, node) = arrival(ctx, tcp)?;
    let tag = port.tag;
    let seed = table::seed()?;
    let key = seg.key(seed);
    let now = flow_age(node.now_ns);
    #[expect(clippy::cast_possible_truncation, reason = "ages are 16 bits")]
    let now16 = now as u16;
    // The busiest path: an established frame of a flow this CPU saw recently, in the same unit
    // of the table's clock (so the table's age of a flow is that of its last frame). SYN, FIN
    // and RST always go to the flow table (new flows, reopened tuples, the closing mark).
    let cache_slot = || FLOW_CACHE.get_ptr_mut(flow_cache_slot(&key));
    if tcp.flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0
        && let Some(c) = cache_slot()
    {
        // SAFETY: a per-CPU slot, read and written only by this CPU while the program runs.
        let entry = unsafe { &mut *c };
        if entry.tag == tag && entry.key == key && entry.hits < FLOW_CACHE_REVALIDATE && entry.age == now16 {
            entry.hits += 1;
            return Ok(Pick { real_id: entry.real, real: &entry.info, new_flow: false, how: trace_how::CACHE });
        }
    }
    let fill = |real: u32, info: &RealInfo| {
        // The slot is found again rather than kept: a pointer held across the table code
        // doubles what the verifier walks, and a new flow never gets here.
        if let Some(c) = cache_slot() {
            // SAFETY: as above. Field by field: a struct copy would call a memmove subprogram.
            unsafe {
                (*c).key.src_be = key.src_be;
                (*c).key.dst_be = key.dst_be;
                (*c).key.sport_be = key.sport_be;
                (*c).key.dport_be = key.dport_be;
                (*c).real = real;
                (*c).tag = tag;
                (*c).hits = 0;
                (*c).age = now16;
                (*c).info = *info;
            }
        }
    };
    // The listener is looked up here, once: the verifier walks its search (up to one round per
    // listener) once per way into it, so one place keeps the program small.
    let listener = listener(seg, port)?;
    *matched = listener.id;
    // A new connection's ring slot is read before the flow table, though it is only used on a
    // miss: both reads are usually cache misses, and issued back to back they overlap.
    let class = segment_of(tcp);
    let syn = class == segment::SYN;
    let early = if syn { ring_id(listener, seg)? } else { NO_BACKEND };
    let place = table::place(&key, seed)?;
    let mut seen = table::Seen::new();
    let found = table::find(&place, &mut seen, |slot| seg.holds(slot));
    if let Some(found) = &found {
        let recorded = found.state & FLOW_S_REAL;
        let real = REALS.get(recorded).filter(|r| r.usable());
        // What this segment does to the flow (`lb_common::flow_step` has the rules).
        let step = flow_step(found.state, class, real.is_some(), now);
        if !step.repick
            && let Some(real) = real
        {
            if step.charge != charge::NONE && listener.info.flags & LISTENER_F_CONN_RATE != 0 {
                storm::admit(listener.id, node.now_ns, step.charge).inspect_err(|_| events::storm(ctx, listener.id, node.now_ns))?;
            }
            // The established path: a write only when the flow confirms, closes, clears its
            // close or its age moves on (about once a second, and only for confirmed flows).
            // A confirmation or a cleared close counts when its write stands; a SYN always.
            let written = step.state != found.state && table::set_state(&place, found, step.state);
            let stands = written || step.state == found.state;
            if stands {
                stats::count_table(step.event);
            }
            // The cache stands for "the table's age of this flow is now": filled only when it
            // is. A SYN on a confirmed flow leaves its old age; had it filled the cache, the
            // handshake that follows would never reach the table and the sweep would expire
            // the new session under it.
            if stands && cached_kind(step.state) && step.state >> FLOW_S_AGE_SHIFT == now {
                fill(recorded, real);
            }
            return Ok(Pick { real_id: recorded, real, new_flow: false, how: trace_how::TABLE });
        }
        // The recorded real went down (or was removed), or a SYN reuses the tuple of a flow
        // closed long enough (the recorded real is usable then): repoint the slot by the ring,
        // in the state the step gives.
        let how = if real.is_some() { trace_how::REOPENED } else { trace_how::REPICK };
        let (real_id, real) = usable_real(if syn { early } else { ring_id(listener, seg)? })?;
        if step.charge != charge::NONE && listener.info.flags & LISTENER_F_CONN_RATE != 0 {
            storm::admit(listener.id, node.now_ns, step.charge).inspect_err(|_| events::storm(ctx, listener.id, node.now_ns))?;
        }
        let state = step.state & !FLOW_S_REAL | real_id;
        if table::set_state(&place, found, state) && cached_kind(state) && state >> FLOW_S_AGE_SHIFT == now {
            fill(real_id, real);
        }
        return Ok(Pick { real_id, real, new_flow: true, how });
    }
    // A miss: a new connection, or one whose slot was replaced or predates this balancer. Both
    // follow the ring, so a flow whose backend set did not change keeps its broker. It is
    // recorded unconfirmed, so a flood of them never displaces a confirmed flow; and one
    // recorded without SYN never displaces one an admitted SYN recorded.
    let (real_id, real) = usable_real(if syn { early } else { ring_id(listener, seg)? })?;
    if syn && listener.info.flags & LISTENER_F_CONN_RATE != 0 {
        storm::admit(listener.id, node.now_ns, charge::CONNECTION).inspect_err(|_| events::storm(ctx, listener.id, node.now_ns))?;
    }
    let state = match class {
        segment::SYN => flow_state(real_id, FLOW_K_OPENED, now),
        segment::CLOSE => flow_state(real_id, FLOW_K_UNCONFIRMED_CLOSING, now),
        _ => flow_state(real_id, FLOW_K_MIDFLOW, now),
    };
    let event = table::insert(&place, &seen, state, now, node.idle_expire, |slot| seg.record(slot));
    stats::count_table(event);
    if event == table_event::REFUSED {
        events::refused(ctx, listener.id, node.now_ns);
    } else if event != table_event::RACED {
        events::recorded(ctx, node.now_ns);
    }
    Ok(Pick { real_id, real, new_flow: true, how: trace_how::RING })
}
