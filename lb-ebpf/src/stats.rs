//! Per-CPU counters: one per verdict reason, and packets/bytes/new flows per real.

use crate::maps::{REAL_STATS, VERDICT_STATS};

#[inline(always)]
pub fn count_verdict(reason: u32) {
    if let Some(c) = VERDICT_STATS.get_ptr_mut(reason) {
        // SAFETY: a per-CPU slot; only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

/// Counts one forwarded frame against its real (listener and backend).
#[inline(always)]
pub fn count_forward(real: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = REAL_STATS.get_ptr_mut(real) {
        // SAFETY: as above, a per-CPU slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += u64::from(new_flow);
        }
    }
}
