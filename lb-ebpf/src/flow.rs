//! Backend selection: the flow table first, the listener's Maglev ring on a miss or when the
//! recorded backend is down.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    BackendInfo, FlowKey, FlowValue, IPPROTO_TCP, LISTENER_F_HASH_SOURCE, ListenerInfo, NO_BACKEND,
    flow_hash, source_hash,
};

use crate::{
    Verdict,
    maps::{BACKENDS, FLOWS, RINGS},
    parse::Tcp4,
};

/// The backend a frame goes to.
pub struct Pick {
    pub backend_id: u32,
    pub backend: &'static BackendInfo,
    pub new_flow: bool,
}

#[inline(always)]
fn ring_pick(listener: &ListenerInfo, tcp: &Tcp4) -> Result<(u32, &'static BackendInfo), Verdict> {
    let hash = if listener.flags & LISTENER_F_HASH_SOURCE != 0 {
        source_hash(tcp.src_be)
    } else {
        flow_hash(tcp.src_be, tcp.dst_be, tcp.sport_be, tcp.dport_be)
    };
    let size = u64::from(listener.ring_size);
    if size == 0 {
        return Err(Verdict::DropNoBackend);
    }
    // The remainder is below `ring_size`, which is a u32.
    #[expect(clippy::cast_possible_truncation, reason = "hash % size < size <= u32::MAX")]
    let slot = listener.ring_base.wrapping_add((hash % size) as u32);
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

/// Finds (or makes) the flow entry for `tcp` on `listener`.
#[inline(always)]
pub fn pick(listener: &ListenerInfo, tcp: &Tcp4) -> Result<Pick, Verdict> {
    let key = FlowKey {
        src_be: tcp.src_be,
        dst_be: tcp.dst_be,
        sport_be: tcp.sport_be,
        dport_be: tcp.dport_be,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    if let Some(entry) = FLOWS.get_ptr_mut(&key) {
        // SAFETY: the pointer is into the map's element, valid for this program run; the value
        // is a single u32, so a concurrent update on another CPU cannot tear it.
        let recorded = unsafe { (*entry).backend };
        if let Some(backend) = BACKENDS.get(recorded)
            && backend.usable()
        {
            return Ok(Pick { backend_id: recorded, backend, new_flow: false });
        }
        // The recorded backend went down (or was removed): re-pick and repoint the entry.
        let (backend_id, backend) = ring_pick(listener, tcp)?;
        // SAFETY: as above.
        unsafe { (*entry).backend = backend_id };
        return Ok(Pick { backend_id, backend, new_flow: true });
    }
    // A miss: a new connection, or one whose entry was evicted or predates this balancer. Both
    // follow the ring, so a flow whose backend set did not change keeps its broker.
    let (backend_id, backend) = ring_pick(listener, tcp)?;
    // A full LRU evicts, so the insert only fails on allocation failure; the frame is still
    // forwarded by the ring, which is what the next frame would do too.
    let _ = FLOWS.insert(&key, &FlowValue { backend: backend_id }, u64::from(BPF_ANY));
    Ok(Pick { backend_id, backend, new_flow: true })
}
