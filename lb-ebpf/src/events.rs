//! The data plane's rare events, logged through aya-log (`AYA_LOGS`, a ring buffer the
//! controller reads into its log): the flood guard engaging and releasing, storm control
//! starting to drop, an internal drop. Never per packet: each kind is logged at most once per
//! second per CPU, and the flood guard's only when its state changes.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::XdpContext};
use aya_log_ebpf::{info, warn};

use crate::maps::LOG_STATE;

/// Nanoseconds between two records of one kind on one CPU; also how long without a refused
/// insert before the flood guard counts as released.
const QUIET_NS: u64 = 1_000_000_000;

/// `LogState` slots: when each kind was last logged, and when the flood guard last refused.
const STORM: usize = 0;
const INTERNAL: usize = 1;
const REFUSED_AT: usize = 2;
const GUARD_ON: usize = 3;

/// Whether a record of kind `slot` may go out at `now_ns` (and if so, notes it).
#[inline(always)]
fn due(slot: usize, now_ns: u64) -> bool {
    let Some(s) = LOG_STATE.get_ptr_mut(0) else { return false };
    // SAFETY: a per-CPU value, only this CPU's program writes it.
    let last = unsafe { &mut (*s)[slot] };
    if *last != 0 && now_ns.wrapping_sub(*last) < QUIET_NS {
        return false;
    }
    *last = now_ns;
    true
}

/// An insert refused by the flood guard, for a flow of listener `listener`.
#[inline(always)]
pub fn refused(ctx: &XdpContext, listener: u32, now_ns: u64) {
    let Some(s) = LOG_STATE.get_ptr_mut(0) else { return };
    // SAFETY: as in `due`.
    let state = unsafe { &mut *s };
    state[REFUSED_AT] = now_ns;
    if state[GUARD_ON] == 0 {
        state[GUARD_ON] = 1;
        warn!(
            ctx,
            "flood guard engaged: a new flow of listener #{} found no flow in its buckets it may replace (confirmed flows, connections just opened)",
            listener
        );
    }
}

/// A flow recorded: when the guard refused nothing for a second, it is released.
#[inline(always)]
pub fn recorded(ctx: &XdpContext, now_ns: u64) {
    let Some(s) = LOG_STATE.get_ptr_mut(0) else { return };
    // SAFETY: as in `due`.
    let state = unsafe { &mut *s };
    if state[GUARD_ON] != 0 && now_ns.wrapping_sub(state[REFUSED_AT]) >= QUIET_NS {
        state[GUARD_ON] = 0;
        info!(ctx, "flood guard released: new flows are recorded again");
    }
}

/// A SYN of listener `listener` dropped by its `max_conn_rate`.
#[inline(always)]
pub fn storm(ctx: &XdpContext, listener: u32, now_ns: u64) {
    if due(STORM, now_ns) {
        warn!(ctx, "storm control dropping SYNs of listener #{} above its max_conn_rate", listener);
    }
}

/// A frame dropped because a lookup that cannot fail did.
#[inline(always)]
pub fn internal(ctx: &XdpContext) {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if due(INTERNAL, now) {
        warn!(ctx, "internal drop: a map lookup that cannot fail did");
    }
}
