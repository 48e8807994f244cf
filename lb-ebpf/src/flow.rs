//! Real selection: this CPU's flow cache first, then the flow table, then the listener's Maglev
//! ring on a miss, when the recorded real is down, or for a new connection that reuses a
//! closing flow's 4-tuple. Only for frames addressed to this node; new connections pass the
//! listener's storm control.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    FLOW_CACHE_REVALIDATE, FLOW_S_CLOSING, FLOW_S_CONFIRMED, FLOW_S_REAL, FlowKey, LISTENER_F_CONN_RATE, LISTENER_F_HASH_SOURCE,
    ListenerInfo, MAX_LISTENERS, NO_BACKEND, PortInfo, RING_NONE, RING_SLOTS_PER_ENTRY, RealInfo, flow_age, flow_cache_slot, flow_hash,
    flow_state, ring_base, ring_slot, source_hash, table_event,
};

use crate::{
    Verdict,
    maps::{FLOW_CACHE, LISTEN_PORTS, LISTENERS, REALS, RINGS},
    node,
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tcp4},
    stats, storm, table,
};

/// The real a frame goes to.
pub struct Pick {
    pub real_id: u32,
    pub real: &'static RealInfo,
    pub new_flow: bool,
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

/// Reads an 8-byte map value whole (see `lb_common::ListenerInfo`).
#[inline(always)]
fn load_word<T>(value: &T) -> u64 {
    // SAFETY: the values read this way are 8 bytes and 8-aligned (map values are).
    unsafe { core::ptr::read_volatile((&raw const *value).cast::<u64>()) }
}

/// The listener at the frame's destination among those on its port.
#[inline(always)]
fn listener(tcp: &Tcp4, port: PortInfo) -> Result<Listener, Verdict> {
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
            if info.vip_be == tcp.dst_be && info.port_be == tcp.dport_be {
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
fn ring_id(listener: Listener, tcp: &Tcp4) -> Result<u32, Verdict> {
    let hash = if listener.info.flags & LISTENER_F_HASH_SOURCE != 0 {
        source_hash(tcp.src_be)
    } else {
        flow_hash(tcp.src_be, tcp.dst_be, tcp.sport_be, tcp.dport_be)
    };
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

#[inline(always)]
const fn closing_flag(tcp: &Tcp4) -> u32 {
    if tcp.flags & (TCP_FIN | TCP_RST) != 0 { FLOW_S_CLOSING } else { 0 }
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
pub fn pick_for_icmp(ctx: &XdpContext, tcp: &Tcp4) -> Result<Pick, Verdict> {
    let (port, _) = arrival(ctx, tcp)?;
    let listener = listener(tcp, port)?;
    let key = FlowKey { src_be: tcp.src_be, dst_be: tcp.dst_be, sport_be: tcp.sport_be, dport_be: tcp.dport_be };
    let place = table::place(&key)?;
    if let Some(found) = table::find(&place, &mut table::Seen::new())
        && let Some(real) = REALS.get(found.state & FLOW_S_REAL)
        && real.usable()
    {
        return Ok(Pick { real_id: found.state & FLOW_S_REAL, real, new_flow: false });
    }
    let (real_id, real) = usable_real(ring_id(listener, tcp)?)?;
    Ok(Pick { real_id, real, new_flow: false })
}

/// Finds (or makes) the flow entry for the segment `tcp`; `PassNoListener` when it is not for
/// a listener, `PassNotOurMac` when the frame is not addressed to this node.
#[inline(always)]
pub fn pick(ctx: &XdpContext, tcp: &Tcp4) -> Result<Pick, Verdict> {
    let (port, node) = arrival(ctx, tcp)?;
    let tag = port.tag;
    let key = FlowKey { src_be: tcp.src_be, dst_be: tcp.dst_be, sport_be: tcp.sport_be, dport_be: tcp.dport_be };
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
            return Ok(Pick { real_id: entry.real, real: &entry.info, new_flow: false });
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
    let listener = listener(tcp, port)?;
    // A new connection's ring slot is read before the flow table, though it is only used on a
    // miss: both reads are usually cache misses, and issued back to back they overlap.
    let syn = tcp.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let early = if syn { ring_id(listener, tcp)? } else { NO_BACKEND };
    let place = table::place(&key)?;
    let closing = closing_flag(tcp);
    // Any segment without SYN after the one that recorded the flow confirms it.
    let confirm = if tcp.flags & TCP_SYN == 0 { FLOW_S_CONFIRMED } else { 0 };
    let mut seen = table::Seen::new();
    let found = table::find(&place, &mut seen);
    if let Some(found) = &found {
        let recorded = found.state & FLOW_S_REAL;
        let reopened = found.state & FLOW_S_CLOSING != 0 && syn;
        if !reopened
            && let Some(real) = REALS.get(recorded)
            && real.usable()
        {
            if syn {
                stats::count_table(table_event::SYN_AGAIN);
            }
            // The established path: a write only when the client closes, the flow confirms or
            // the age moves on (about once a second).
            let state = flow_state(recorded, found.state | closing | confirm, now);
            if state != found.state && table::set_state(&place, found, state) && confirm & !found.state != 0 {
                stats::count_table(table_event::CONFIRMED);
            }
            // Only confirmed flows are cached: an unconfirmed one's next segment must reach the
            // table to confirm it.
            if state & FLOW_S_CONFIRMED != 0 {
                fill(recorded, real);
            }
            return Ok(Pick { real_id: recorded, real, new_flow: false });
        }
    }
    let (real_id, real) = usable_real(if syn { early } else { ring_id(listener, tcp)? })?;
    if syn && listener.info.flags & LISTENER_F_CONN_RATE != 0 {
        storm::admit(listener.id, node.now_ns)?;
    }
    match found {
        // The recorded real went down (or was removed): repoint the slot, confirmed as it was.
        // Or a new connection reuses the tuple of a closed one: it starts unconfirmed.
        Some(found) => {
            let kept = if syn { 0 } else { found.state & FLOW_S_CONFIRMED };
            table::set_state(&place, &found, flow_state(real_id, closing | kept, now));
            if kept != 0 {
                fill(real_id, real);
            }
        }
        // A miss: a new connection, or one whose slot was replaced or predates this balancer.
        // Both follow the ring, so a flow whose backend set did not change keeps its broker. It
        // is recorded unconfirmed, so a flood of them never displaces a confirmed flow.
        None => stats::count_table(table::insert(&place, &seen, flow_state(real_id, closing, now), now, node.idle_expire)),
    }
    Ok(Pick { real_id, real, new_flow: true })
}
