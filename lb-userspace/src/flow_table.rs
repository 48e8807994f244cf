//! The controller's side of the flow table (`lb_common::FLOW_WAYS` says how it works): look a
//! flow up, walk the slots in use, remove flows, through the mapped `FLOWS` map and with the
//! program's slot protocol (a slot is read state, addresses, state; changed by
//! compare-and-swap on its state word).

use lb_common::{
    FLOW_S_AGE_SHIFT, FLOW_S_BUSY, FLOW_S_CLOSING, FLOW_S_CONFIRMED, FLOW_S_LIVE, FLOW_S_REAL, FLOW_WAYS, FlowKey, flow_buckets, flow_idle,
    flow_meta_split,
};

use crate::mapped::Mapped;

/// A slot in use, read whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub key: FlowKey,
    /// `FlowSlot::state`.
    pub state: u32,
}

impl Flow {
    /// The real the flow is pinned to.
    #[must_use]
    pub const fn real(&self) -> u32 {
        self.state & FLOW_S_REAL
    }

    /// The client sent FIN or RST.
    #[must_use]
    pub const fn closing(&self) -> bool {
        self.state & FLOW_S_CLOSING != 0
    }

    /// A segment after the recording one was seen (see `lb_common::FLOW_S_CONFIRMED`).
    #[must_use]
    pub const fn confirmed(&self) -> bool {
        self.state & FLOW_S_CONFIRMED != 0
    }

    /// The age of its last frame (`lb_common::flow_age`).
    #[must_use]
    pub const fn age(&self) -> u32 {
        self.state >> FLOW_S_AGE_SHIFT
    }

    /// Age units since its last frame, at age `now`.
    #[must_use]
    pub const fn idle(&self, now: u32) -> u32 {
        flow_idle(now, self.age())
    }
}

/// Where a slot is, and the state word read there (for a compare-and-swap).
struct Seen {
    bucket: u32,
    way: usize,
    meta: u64,
}

pub struct FlowTable {
    mem: Mapped,
    seed: u64,
}

/// Reads of a slot in flux before it is passed over.
const SETTLE_TRIES: usize = 1000;

impl FlowTable {
    /// `mem`: the mapped `FLOWS`; `seed`: its bucket hash seed (`LAYOUT`).
    #[must_use]
    pub const fn new(mem: Mapped, seed: u64) -> Self {
        Self { mem, seed }
    }

    /// Buckets in the table.
    #[must_use]
    pub const fn buckets(&self) -> u32 {
        self.mem.entries()
    }

    /// The two buckets a flow may live in.
    #[must_use]
    pub const fn buckets_of(&self, key: &FlowKey) -> [u32; 2] {
        flow_buckets(key, self.seed, self.mem.entries() - 1)
    }

    /// The slot's flow when it is in use. A slot that a writer holds or rewrites while it is
    /// read is read again: writers hold one for nanoseconds.
    fn read(&self, bucket: u32, way: usize) -> Option<(Flow, Seen)> {
        for _ in 0..SETTLE_TRIES {
            let meta = self.mem.load(bucket, way * 2 + 1);
            let (ports, state) = flow_meta_split(meta);
            if state & FLOW_S_LIVE == 0 && state != FLOW_S_BUSY {
                return None;
            }
            if state != FLOW_S_BUSY {
                let addrs = self.mem.load(bucket, way * 2);
                if self.mem.load(bucket, way * 2 + 1) == meta {
                    return Some((Flow { key: FlowKey::from_words(addrs, ports), state }, Seen { bucket, way, meta }));
                }
            }
            std::hint::spin_loop();
        }
        None
    }

    /// The flow's slot, if the table holds it.
    #[must_use]
    pub fn find(&self, key: &FlowKey) -> Option<Flow> {
        self.buckets_of(key)
            .into_iter()
            .flat_map(|b| (0..FLOW_WAYS).map(move |w| (b, w)))
            .find_map(|(b, w)| self.read(b, w).map(|(f, _)| f).filter(|f| f.key == *key))
    }

    /// Calls `f` with every slot in use.
    pub fn walk(&self, mut f: impl FnMut(&Flow)) {
        for bucket in 0..self.buckets() {
            for way in 0..FLOW_WAYS {
                if let Some((flow, _)) = self.read(bucket, way) {
                    f(&flow);
                }
            }
        }
    }

    /// Empties the slot if it holds a flow that `doomed` picks, again when a writer changes it
    /// between the read and the compare-and-swap.
    fn remove_from(&self, bucket: u32, way: usize, doomed: &mut impl FnMut(&Flow) -> bool) -> bool {
        for _ in 0..SETTLE_TRIES {
            let Some((flow, seen)) = self.read(bucket, way) else { return false };
            if !doomed(&flow) {
                return false;
            }
            if self.mem.compare_exchange(seen.bucket, seen.way * 2 + 1, seen.meta, 0).is_ok() {
                return true;
            }
        }
        false
    }

    /// Removes every flow that `doomed` picks; returns how many were removed.
    pub fn remove_where(&self, mut doomed: impl FnMut(&Flow) -> bool) -> usize {
        let mut removed = 0;
        for bucket in 0..self.buckets() {
            for way in 0..FLOW_WAYS {
                removed += usize::from(self.remove_from(bucket, way, &mut doomed));
            }
        }
        removed
    }

    /// The two words of a slot as they are: addresses, then ports and state.
    #[must_use]
    pub fn raw(&self, bucket: u32, way: usize) -> (u64, u64) {
        (self.mem.load(bucket, way * 2), self.mem.load(bucket, way * 2 + 1))
    }

    /// Overwrites a slot's two words, for tests that put a slot in the states a writer passes
    /// through (`FLOW_S_BUSY`).
    pub fn set_raw(&self, bucket: u32, way: usize, addrs: u64, meta: u64) {
        self.mem.store(bucket, way * 2 + 1, 0);
        self.mem.store(bucket, way * 2, addrs);
        self.mem.store(bucket, way * 2 + 1, meta);
    }

    /// How many live flows point at each real (a walk of the table): not closing, and idle less
    /// than `expire(listener id)` age units at age `now`.
    #[must_use]
    pub fn live_per_real(&self, now: u32, expire: impl Fn(u32) -> u32) -> std::collections::BTreeMap<u32, usize> {
        let mut out = std::collections::BTreeMap::new();
        self.walk(|f| {
            if !f.closing() && f.idle(now) < expire(lb_common::real_listener(f.real())) {
                *out.entry(f.real()).or_default() += 1;
            }
        });
        out
    }

    /// Removes one flow; false when the table does not hold it.
    #[must_use]
    pub fn remove(&self, key: &FlowKey) -> bool {
        let mut this = |f: &Flow| f.key == *key;
        self.buckets_of(key).into_iter().any(|b| (0..FLOW_WAYS).any(|w| self.remove_from(b, w, &mut this)))
    }
}
