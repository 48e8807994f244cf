//! Storm control: a listener's `max_conn_rate` as a generic cell rate algorithm over all CPUs
//! (`lb_common::ConnRate` says how).

use core::intrinsics::{
    AtomicOrdering::{Relaxed, SeqCst},
    atomic_cxchg,
};

use crate::{Verdict, maps::CONN_RATE, stats};

/// Compare-and-swap attempts before a contended SYN is dropped (the client retries it).
const TRIES: usize = 4;

/// Admits a SYN of listener `id` at `now_ns` on the budget `charge` names
/// (`lb_common::charge`: a new connection's, or a retransmit's), or drops it (`DropConnRate`).
#[inline(always)]
pub fn admit(id: u32, now_ns: u64, charge: u32) -> Result<(), Verdict> {
    let rate = CONN_RATE.get_ptr_mut(id).ok_or(Verdict::DropInternal)?;
    // SAFETY: a map value; the controller writes the settings, programs on every CPU the
    // `tat_ns` word, by compare-and-swap.
    unsafe {
        let interval = core::ptr::read_volatile(&raw const (*rate).interval_ns);
        if interval == 0 {
            return Ok(());
        }
        let tolerance = core::ptr::read_volatile(&raw const (*rate).tolerance_ns);
        let tat = if charge == lb_common::charge::RETRANSMIT { &raw mut (*rate).retry_tat_ns } else { &raw mut (*rate).tat_ns };
        for _ in 0..TRIES {
            let was = core::ptr::read_volatile(tat);
            let from = if was > now_ns { was } else { now_ns };
            if from - now_ns > tolerance {
                break;
            }
            if atomic_cxchg::<u64, { SeqCst }, { Relaxed }>(tat, was, from + interval).1 {
                return Ok(());
            }
        }
    }
    stats::count_conn_rate_drop(id);
    Err(Verdict::DropConnRate)
}
