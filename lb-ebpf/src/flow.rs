//! Backend selection: the flow table first, the listener's Maglev ring on a miss or when the
//! recorded backend is down.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    BackendInfo, FlowKey, FlowValue, IPPROTO_TCP, LISTENER_F_HASH_SOURCE, ListenerInfo, ListenerKey,
    NO_BACKEND, flow_hash, ring_slot, source_hash,
};

use crate::{
    Verdict,
    maps::{BACKENDS, FLOWS, LISTEN_PORTS, LISTENERS, RINGS},
    parse::Tcp4,
};

/// The backend a frame goes to, and the listener it is counted under.
pub struct Pick {
    pub listener_id: u32,
    pub backend_id: u32,
    pub backend: &'static BackendInfo,
    pub new_flow: bool,
}

#[inline(always)]
fn listener(tcp: &Tcp4) -> Result<&'static ListenerInfo, Verdict> {
    let key = ListenerKey { vip_be: tcp.dst_be, port_be: tcp.dport_be, proto: IPPROTO_TCP, _pad: 0 };
    // SAFETY: read-only; the controller replaces listener values whole, never in place.
    unsafe { LISTENERS.get(&key) }.ok_or(Verdict::PassNoListener)
}

#[inline(always)]
fn ring_pick(listener: &ListenerInfo, tcp: &Tcp4) -> Result<(u32, &'static BackendInfo), Verdict> {
    let hash = if listener.flags & LISTENER_F_HASH_SOURCE != 0 {
        source_hash(tcp.src_be)
    } else {
        flow_hash(tcp.src_be, tcp.dst_be, tcp.sport_be, tcp.dport_be)
    };
    let slot = listener.ring_base.wrapping_add(ring_slot(hash, listener.ring_size));
    let id = *RINGS.get(slot).ok_or(Verdict::DropInternal)?;
    if id == NO_BACKEND {
        return Err(Verdict::DropNoBackend);
    }
    let backend = BACKENDS.get(id).ok_or(Verdict::DropInternal)?;
    if !backend.usable() {
        return Err(Verdict::DropNoBackend);
    }
    Ok((id, backend))
}

/// Finds (or makes) the flow entry for `tcp`; `PassNoListener` when it is not for a listener.
#[inline(always)]
pub fn pick(tcp: &Tcp4) -> Result<Pick, Verdict> {
    // Most TCP that is not ours goes to a port no listener uses: one inlined array read.
    if LISTEN_PORTS.get(u32::from(tcp.dport_be)).is_none_or(|&n| n == 0) {
        return Err(Verdict::PassNoListener);
    }
    let key = FlowKey { src_be: tcp.src_be, dst_be: tcp.dst_be, sport_be: tcp.sport_be, dport_be: tcp.dport_be };
    if let Some(entry) = FLOWS.get_ptr_mut(&key) {
        // SAFETY: the pointer is into the map's element, valid for this program run. A
        // concurrent re-pick on another CPU writes the same fields; a torn read of the pair
        // would still name a valid backend and listener.
        let FlowValue { backend: recorded, listener: listener_id } = unsafe { *entry };
        // The established fast path: no listener lookup.
        if let Some(backend) = BACKENDS.get(recorded)
            && backend.usable()
        {
            return Ok(Pick { listener_id, backend_id: recorded, backend, new_flow: false });
        }
        // The recorded backend went down (or was removed): re-pick and repoint the entry.
        let listener = listener(tcp)?;
        let (backend_id, backend) = ring_pick(listener, tcp)?;
        // SAFETY: as above.
        unsafe { *entry = FlowValue { backend: backend_id, listener: listener.id } };
        return Ok(Pick { listener_id: listener.id, backend_id, backend, new_flow: true });
    }
    // A miss: a new connection, or one whose entry was evicted or predates this balancer. Both
    // follow the ring, so a flow whose backend set did not change keeps its broker.
    let listener = listener(tcp)?;
    let (backend_id, backend) = ring_pick(listener, tcp)?;
    // A full LRU evicts, so the insert only fails on allocation failure; the frame is still
    // forwarded by the ring, which is what the next frame would do too.
    let _ = FLOWS.insert(&key, &FlowValue { backend: backend_id, listener: listener.id }, u64::from(BPF_ANY));
    Ok(Pick { listener_id: listener.id, backend_id, backend, new_flow: true })
}
