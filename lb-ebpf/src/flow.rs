//! Real selection: this CPU's flow cache first, then the flow table, then the listener's Maglev
//! ring on a miss, when the recorded real is down, or for a new connection that reuses a
//! closing flow's 4-tuple.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    FLOW_CACHE_REVALIDATE, FLOW_F_CLOSING, FlowKey, FlowValue, LISTENER_F_HASH_SOURCE, ListenerInfo,
    MAX_LISTENERS, NO_BACKEND, PortInfo, RealInfo, flow_cache_slot, flow_hash, ring_base, ring_slot, source_hash,
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
    let mut id = 0;
    // At most MAX_LISTENERS rounds, usually one: a port is seldom shared between VIPs.
    while rest != 0 && id < MAX_LISTENERS {
        if rest & 1 != 0
            && let Some(slot) = LISTENERS.get(id)
        {
            let info = ListenerInfo::from_word(load_word(slot));
            if info.vip_be == tcp.dst_be && info.port_be == tcp.dport_be {
                return Ok(Listener { id, info });
            }
        }
        rest >>= 1;
        id += 1;
    }
    Err(Verdict::PassNoListener)
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
    let slot = ring_base(listener.id, u32::from(listener.info.ring_copy), size).wrapping_add(ring_slot(hash, size));
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

/// The ring's choice for `tcp`; for a new connection (`syn`) the id was already read (`early`).
#[inline(always)]
fn from_ring(tcp: &Tcp4, port: PortInfo, syn: bool, early: u32) -> Result<(u32, &'static RealInfo), Verdict> {
    usable_real(if syn { early } else { ring_id(listener(tcp, port)?, tcp)? })
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
    let port = match LISTEN_PORTS.get(u32::from(tcp.dport_be)) {
        Some(slot) => PortInfo::from_word(load_word(slot)),
        None => return Err(Verdict::PassNoListener),
    };
    let tag = port.tag;
    if tag == 0 {
        return Err(Verdict::PassNoListener);
    }
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
    let early = if syn { ring_id(listener(tcp, port)?, tcp)? } else { NO_BACKEND };
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
        let (real_id, real) = from_ring(tcp, port, syn, early)?;
        // SAFETY: as above.
        unsafe { *entry = FlowValue { real: real_id, flags: closing_flags(tcp) } };
        fill(real_id, real);
        return Ok(Pick { real_id, real, new_flow: true });
    }
    // A miss: a new connection, or one whose entry was evicted or predates this balancer. Both
    // follow the ring, so a flow whose backend set did not change keeps its broker.
    let (real_id, real) = from_ring(tcp, port, syn, early)?;
    // A full LRU evicts, so the insert only fails on allocation failure; the frame is still
    // forwarded by the ring, which is what the next frame would do too.
    let _ = FLOWS.insert(&key, &FlowValue { real: real_id, flags: closing_flags(tcp) }, u64::from(BPF_ANY));
    Ok(Pick { real_id, real, new_flow: true })
}
