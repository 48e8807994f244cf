//! Per-CPU counters: one per verdict reason, packets/bytes/new flows per real, what each
//! listener's guards did, and what flow table inserts did.

use crate::maps::{LISTENER_STATS, REAL_STATS, TABLE_STATS, VERDICT_STATS};

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

/// Counts a flow table insert's outcome (`lb_common::table_event`).
#[inline(always)]
pub fn count_table(event: u32) {
    if let Some(c) = TABLE_STATS.get_ptr_mut(event) {
        // SAFETY: as above, a per-CPU slot.
        unsafe { *c += 1 };
    }
}

/// A SYN that listener `id`'s `max_conn_rate` dropped.
#[inline(always)]
pub fn count_conn_rate_drop(id: u32) {
    if let Some(c) = LISTENER_STATS.get_ptr_mut(id) {
        // SAFETY: as above, a per-CPU slot.
        unsafe { (*c).conn_rate_dropped += 1 };
    }
}

/// An ICMP "fragmentation needed" forwarded for listener `id`.
#[inline(always)]
pub fn count_icmp_too_big(id: u32) {
    if let Some(c) = LISTENER_STATS.get_ptr_mut(id) {
        // SAFETY: as above, a per-CPU slot.
        unsafe { (*c).icmp_too_big += 1 };
    }
}
