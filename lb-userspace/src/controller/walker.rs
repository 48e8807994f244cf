//! The controller's walks of the flow table: live flows per real for status and the metrics,
//! and the sweep that removes flows idle past their listener's timeout. A walk reads the whole
//! table (32 MB at the default size, up to 4 GiB), so each runs in a thread of its own and
//! reports back through [`WalkerInbox`] while the loop keeps serving.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::{
    control::{Call, Request},
    flow_table::FlowTable,
};

/// How old a flow-table walk may be before status or metrics walk again.
const FLOW_WALK_EVERY: Duration = Duration::from_secs(2);

/// Live flows per real.
pub type LiveFlows = BTreeMap<u32, usize>;

/// The receiving ends the controller's loop selects on.
pub struct WalkerInbox {
    pub walked: mpsc::Receiver<LiveFlows>,
    pub swept: mpsc::Receiver<usize>,
}

/// Walks for live flows (one at a time, requests waiting for it) and expiry sweeps (one at a
/// time, every [`FlowWalker::sweep_due`]).
pub struct FlowWalker {
    /// Live flows per real, from the last walk, and when it ended.
    live: Option<(Instant, LiveFlows)>,
    /// A walk runs; requests wait for it, with the way back; and where it reports.
    walking: bool,
    waiting: Vec<Call>,
    walked: mpsc::Sender<LiveFlows>,
    /// When the running walk and sweep started, and how long the last of each took.
    walk_started: Instant,
    sweep_started: Instant,
    last_walk: Option<Duration>,
    last_sweep: Option<Duration>,
    /// Flows removed for idleness since start, whether a sweep runs now, where it reports, and
    /// when the next is due.
    expired_total: u64,
    sweeping: bool,
    swept: mpsc::Sender<usize>,
    next_sweep: Instant,
}

impl FlowWalker {
    pub fn new() -> (Self, WalkerInbox) {
        let (walked, walked_rx) = mpsc::channel(1);
        let (swept, swept_rx) = mpsc::channel(1);
        let flow_walker = Self {
            live: None,
            walking: false,
            waiting: Vec::new(),
            walked,
            walk_started: Instant::now(),
            sweep_started: Instant::now(),
            last_walk: None,
            last_sweep: None,
            expired_total: 0,
            sweeping: false,
            swept,
            next_sweep: Instant::now(),
        };
        (flow_walker, WalkerInbox { walked: walked_rx, swept: swept_rx })
    }

    /// Live flows per real from the last walk (empty before the first).
    pub fn live_flows(&self) -> LiveFlows {
        self.live.as_ref().map(|(_, flows)| flows.clone()).unwrap_or_default()
    }

    /// Flows removed for idleness since start.
    pub const fn expired_total(&self) -> u64 {
        self.expired_total
    }

    /// How long the last walk for live flows and the last expiry sweep took, from their start
    /// to the loop taking their result (`None` before the first).
    pub const fn last_took(&self) -> (Option<Duration>, Option<Duration>) {
        (self.last_walk, self.last_sweep)
    }

    /// The table changed (flows removed or merged in): the next request walks again.
    pub fn forget(&mut self) {
        self.live = None;
    }

    /// A status or metrics request. Metrics reuse a walk up to [`FLOW_WALK_EVERY`] old: the
    /// call comes back, to answer now. Status waits for a walk that starts after it asked
    /// ([`Self::walk`] starts one, [`Self::walked`] gives the calls back).
    pub fn ask(&mut self, call: Call) -> Option<Call> {
        let fresh = self.live.as_ref().is_some_and(|(at, _)| at.elapsed() < FLOW_WALK_EVERY);
        if call.0 == Request::Metrics && fresh {
            return Some(call);
        }
        self.waiting.push(call);
        None
    }

    /// Starts a walk of `table` when requests wait and none runs; flows idle `expire[listener]`
    /// age units at `now` are over.
    pub fn walk(&mut self, table: Arc<FlowTable>, now: u32, expire: BTreeMap<u32, u32>) {
        if self.walking || self.waiting.is_empty() {
            return;
        }
        self.walking = true;
        self.walk_started = Instant::now();
        let done = self.walked.clone();
        tokio::task::spawn_blocking(move || {
            let flows = table.live_per_real(now, |l| expire.get(&l).copied().unwrap_or(u32::MAX));
            let _ = done.blocking_send(flows);
        });
    }

    /// Whether a walk must start: requests wait and none runs.
    pub fn walk_wanted(&self) -> bool {
        !self.walking && !self.waiting.is_empty()
    }

    /// A walk finished: the requests that waited for it, to answer now.
    pub fn walked(&mut self, flows: LiveFlows) -> Vec<Call> {
        self.walking = false;
        self.last_walk = Some(self.walk_started.elapsed());
        self.live = Some((Instant::now(), flows));
        std::mem::take(&mut self.waiting)
    }

    /// Whether the next sweep is due.
    pub fn sweep_due(&self, now: Instant) -> bool {
        now >= self.next_sweep
    }

    /// Starts removing the flows of `table` idle past their listener's timeout (`expire`, by
    /// listener id, in age units at `now`), in a thread of its own; [`Self::swept`] takes the
    /// count. One sweep at a time; the next is due `every` from now.
    pub fn sweep(&mut self, table: Arc<FlowTable>, now: u32, expire: BTreeMap<u32, u32>, every: Duration) {
        self.next_sweep = Instant::now() + every;
        if self.sweeping {
            return;
        }
        self.sweeping = true;
        self.sweep_started = Instant::now();
        let done = self.swept.clone();
        tokio::task::spawn_blocking(move || {
            let removed = table.remove_idle(now, |l| expire.get(&l).copied().unwrap_or(u32::MAX));
            let _ = done.blocking_send(removed);
        });
    }

    /// The next sweep is due `every` from now (none ran: at start, or the flow clock could not
    /// be read).
    pub fn next_sweep_in(&mut self, every: Duration) {
        self.next_sweep = Instant::now() + every;
    }

    /// A sweep finished, having removed `removed` flows.
    pub fn swept(&mut self, removed: usize) {
        self.sweeping = false;
        self.last_sweep = Some(self.sweep_started.elapsed());
        self.expired_total += removed as u64;
        if removed > 0 {
            tracing::debug!(removed, "expired idle flows");
            self.live = None;
        }
    }

    /// Requests waiting for a walk.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;

    fn call(req: Request) -> Call {
        (req, oneshot::channel().0)
    }

    /// Status always waits for a walk that starts after it asked; metrics reuse a recent one.
    #[test]
    fn status_waits_for_a_walk_and_metrics_reuse_a_fresh_one() {
        let (mut w, _inbox) = FlowWalker::new();
        assert!(w.ask(call(Request::Metrics)).is_none(), "no walk yet: metrics wait too");
        assert!(w.ask(call(Request::Status)).is_none());
        assert!(w.walk_wanted());
        assert_eq!(w.waiting(), 2);
        let answered = w.walked([(7, 3)].into());
        assert_eq!(answered.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>(), [Request::Metrics, Request::Status]);
        assert_eq!(w.live_flows(), [(7, 3)].into());
        assert!(w.ask(call(Request::Metrics)).is_some(), "a walk this fresh answers metrics at once");
        assert!(w.ask(call(Request::Status)).is_none(), "status walks again");
        w.forget();
        assert!(w.ask(call(Request::Metrics)).is_none(), "a table that changed is walked again");
        assert_eq!(w.live_flows(), LiveFlows::new());
    }

    /// Sweeps count what they removed; a sweep that removed flows makes the next request walk.
    #[test]
    fn sweeps_count_and_invalidate() {
        let (mut w, _inbox) = FlowWalker::new();
        assert!(w.sweep_due(Instant::now()), "due at start");
        w.next_sweep_in(Duration::from_mins(1));
        assert!(!w.sweep_due(Instant::now()));
        w.walked([(1, 1)].into());
        w.swept(0);
        assert!(w.ask(call(Request::Metrics)).is_some(), "nothing removed: the walk still holds");
        w.swept(5);
        w.swept(2);
        assert_eq!(w.expired_total(), 7);
        assert!(w.ask(call(Request::Metrics)).is_none(), "flows removed: walk again");
    }
}
