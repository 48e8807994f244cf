//! Real selection: this CPU's flow cache first, then the flow table, then the listener's Maglev
//! ring on a miss, when the recorded real is down, or for a new connection that reuses a
//! closing flow's 4-tuple.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    FLOW_CACHE_REVALIDATE, FLOW_F_CLOSING, FlowCacheEntry, FlowKey, FlowValue, IPPROTO_TCP,
    LISTENER_F_HASH_SOURCE, ListenerInfo, ListenerKey, NO_BACKEND, RealInfo, flow_cache_slot, flow_hash,
    ring_slot, source_hash,
};

use crate::{
    Verdict,
    maps::{FLOW_CACHE, FLOWS, LISTEN_PORTS, LISTENERS, REALS, RINGS},
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tcp4},
};

/// The real a frame goes to.
pub struct Pick {
    pub real_id: u32,
    pub real: &'static RealInfo,
    pub new_flow: bool,
}

#[inline(always)]
fn listener(tcp: &Tcp4) -> Result<&'static ListenerInfo, Verdict> {
    let key = ListenerKey { vip_be: tcp.dst_be, port_be: tcp.dport_be, proto: IPPROTO_TCP, _pad: 0 };
    // SAFETY: read-only; the controller replaces listener values whole, never in place.
    unsafe { LISTENERS.get(&key) }.ok_or(Verdict::PassNoListener)
}

/// The real id in the listener's ring slot for this tuple (`NO_BACKEND` included).
#[inline(always)]
fn ring_id(listener: &ListenerInfo, tcp: &Tcp4) -> Result<u32, Verdict> {
    let hash = if listener.flags & LISTENER_F_HASH_SOURCE != 0 {
        source_hash(tcp.src_be)
    } else {
        flow_hash(tcp.src_be, tcp.dst_be, tcp.sport_be, tcp.dport_be)
    };
    let slot = listener.ring_base.wrapping_add(ring_slot(hash, listener.ring_size));
    RINGS.get(slot).copied().ok_or(Verdict::DropInternal)
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
fn ring_pick(listener: &ListenerInfo, tcp: &Tcp4) -> Result<(u32, &'static RealInfo), Verdict> {
    usable_real(ring_id(listener, tcp)?)
}

/// The ring's choice for `tcp`; for a new connection (`syn`) the id was already read (`early`).
#[inline(always)]
fn from_ring(tcp: &Tcp4, syn: bool, early: u32) -> Result<(u32, &'static RealInfo), Verdict> {
    if syn { usable_real(early) } else { ring_pick(listener(tcp)?, tcp) }
}

#[inline(always)]
const fn closing_flags(tcp: &Tcp4) -> u32 {
    if tcp.flags & (TCP_FIN | TCP_RST) != 0 { FLOW_F_CLOSING } else { 0 }
}

/// Finds (or makes) the flow entry for `tcp`; `PassNoListener` when it is not for a listener.
#[inline(always)]
pub fn pick(tcp: &Tcp4) -> Result<Pick, Verdict> {
    // Most TCP that is not ours goes to a port no listener uses: one inlined array read. A used
    // port's slot holds the tag that this CPU's cached flows must carry to be valid.
    let tag = match LISTEN_PORTS.get(u32::from(tcp.dport_be)) {
        Some(&tag) if tag != 0 => tag,
        _ => return Err(Verdict::PassNoListener),
    };
    let key = FlowKey { src_be: tcp.src_be, dst_be: tcp.dst_be, sport_be: tcp.sport_be, dport_be: tcp.dport_be };
    // The busiest path: an established frame of a flow this CPU saw recently. SYN, FIN and RST
    // always go to the flow table (new flows, reopened tuples, the closing mark).
    let cached = FLOW_CACHE.get_ptr_mut(flow_cache_slot(&key));
    if let Some(c) = cached
        && tcp.flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0
    {
        // SAFETY: a per-CPU slot, read and written only by this CPU while the program runs.
        let entry = unsafe { &mut *c };
        if entry.tag == tag && entry.key == key && entry.hits < FLOW_CACHE_REVALIDATE {
            entry.hits += 1;
            return Ok(Pick { real_id: entry.real, real: &entry.info, new_flow: false });
        }
    }
    let fill = |real: u32, info: &RealInfo| {
        if let Some(c) = cached {
            // SAFETY: as above. Field by field: a struct copy would call a memmove subprogram.
            unsafe {
                (*c).key.src_be = key.src_be;
                (*c).key.dst_be = key.dst_be;
                (*c).key.sport_be = key.sport_be;
                (*c).key.dport_be = key.dport_be;
                (*c).real = real;
                (*c).tag = tag;
                (*c).hits = 0;
                (*c).info = *info;
            }
        }
    };
    // A new connection's ring slot is read before the flow table, though it is only used on a
    // miss: both reads are usually cache misses, and issued back to back they overlap.
    let syn = tcp.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let early = if syn { ring_id(listener(tcp)?, tcp)? } else { NO_BACKEND };
    if let Some(entry) = FLOWS.get_ptr_mut(&key) {
        // SAFETY: the pointer is into the map's element, valid for this program run. Another
        // CPU may rewrite it concurrently with the same kind of value; either write is valid.
        let FlowValue { real: recorded, flags } = unsafe { *entry };
        let reopened = flags & FLOW_F_CLOSING != 0 && syn;
        // The established fast path: no listener lookup, no write unless the client closes.
        if !reopened
            && let Some(real) = REALS.get(recorded)
            && real.usable()
        {
            let closing = closing_flags(tcp);
            if closing & !flags != 0 {
                // SAFETY: as above.
                unsafe { (*entry).flags = flags | closing };
            }
            fill(recorded, real);
            return Ok(Pick { real_id: recorded, real, new_flow: false });
        }
        // The recorded real went down (or was removed), or a new connection reuses the tuple
        // of a closed one: pick from the ring and repoint the entry.
        let (real_id, real) = from_ring(tcp, syn, early)?;
        // SAFETY: as above.
        unsafe { *entry = FlowValue { real: real_id, flags: closing_flags(tcp) } };
        fill(real_id, real);
        return Ok(Pick { real_id, real, new_flow: true });
    }
    // A miss: a new connection, or one whose entry was evicted or predates this balancer. Both
    // follow the ring, so a flow whose backend set did not change keeps its broker.
    let (real_id, real) = from_ring(tcp, syn, early)?;
    // A full LRU evicts, so the insert only fails on allocation failure; the frame is still
    // forwarded by the ring, which is what the next frame would do too.
    let _ = FLOWS.insert(&key, &FlowValue { real: real_id, flags: closing_flags(tcp) }, u64::from(BPF_ANY));
    Ok(Pick { real_id, real, new_flow: true })
}
