//! Per-CPU counters: one per verdict reason, and packets/bytes/new flows per listener and backend.

use lb_common::Counters;

use crate::maps::{BACKEND_STATS, LISTENER_STATS, VERDICT_STATS};

#[inline(always)]
pub fn count_verdict(reason: u32) {
    if let Some(c) = VERDICT_STATS.get_ptr_mut(reason) {
        // SAFETY: a per-CPU slot; only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn add(c: Option<*mut Counters>, bytes: u64, new_flow: bool) {
    if let Some(c) = c {
        // SAFETY: as above, a per-CPU slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += u64::from(new_flow);
        }
    }
}

/// Counts one forwarded frame against its listener and backend.
#[inline(always)]
pub fn count_forward(listener: u32, backend: u32, bytes: u64, new_flow: bool) {
    add(LISTENER_STATS.get_ptr_mut(listener), bytes, new_flow);
    add(BACKEND_STATS.get_ptr_mut(backend), bytes, new_flow);
}
