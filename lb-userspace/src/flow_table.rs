//! The controller's side of the flow table (`lb_common::FLOW_WAYS` says how it works): look a
//! flow up, walk the slots in use, remove flows, through the mapped `FLOWS` map and with the
//! program's slot protocol (a slot is read state, addresses, state; changed by
//! compare-and-swap on its state word).
//!
//! A peer's copy of a flow must live as long as the original may: when the peer fails, the
//! session's next frame comes here, a keepalive later. Two things make the age in the slot
//! older than that:
//! - a merge writes a copy older than the peer's last frame when that frame is recent
//!   ([`MERGE_IDLE_FLOOR`]), so that "idle less than the floor" means a frame seen here, which
//!   no peer overrides;
//! - the peer sends a live flow's idle time again only every `refresh` (see `crate::cluster`),
//!   in its next round, from its last walk: the original may have had frames since, up to that
//!   lag before the peer fails ([`FlowTable::set_peer_lag`]).
//!
//! So the table also remembers, in this process, the peers' open copies it wrote ([`Idle`]):
//! while such a slot keeps the age the merge wrote (no frame here since), its flow counts as
//! idle as on the peer less the lag, for expiry, the live count and whether this node shares
//! it in turn (as idle as the peer said). A flow that ended without a FIN or RST (a vanished
//! client) and was an exception thus goes up to the lag after its timeout, on every node (a
//! copy passed back to its own node counts as a copy there too).
//!
//! The told frame is not the last one the peer may have seen: a peer tells a live flow again
//! only every `refresh`, from its last walk, so the frame before its failure may be a lag
//! after its last word, and that word may tell a frame a keepalive older. So a copy whose slot
//! a peer's word wrote also counts as idle from the last word of its holder (a word of the
//! peer's own frames, not one it relays), less the lag, until that peer ends a round (its
//! `SYNCED` mark, [`FlowTable::peer_synced`]) on the same connection a lag or more after that
//! word without telling it again: a peer that failed leaves its copies here a lag and a timeout
//! past its last word on each, even after it comes back (with an empty table, its new
//! connection's rounds say nothing of them); a peer that is up and no longer holds the flow (it
//! expired or closed there) ends a round without it within a lag, and the copy then counts from
//! the told frame again. It counts so no longer than a timeout past the told frame: a peer that
//! holds a flow by its own frames has stopped telling it by then (a keepalive is shorter than
//! the timeout), so copies two nodes keep telling each other end.
//!
//! A copy a peer passes on (its copy of a third node's flow, or of this node's from before a
//! restart: [`PeerFlow::relayed`]) lives two lags past the word: that node's frames may be a lag
//! more recent, and the peer's own frames since come with its next refresh.
//!
//! Limits: a copy in its lag window looks expired to the program and to a merge of another
//! real, so in a full bucket it is the first replaced; a restarted controller forgets the
//! copies until its peers send them again (at once, on their new connections), and then
//! remembers them even where a slot keeps its own age (`FlowTable::merge`), as copies when the
//! word is unrelayed (a peer tells its own frames so, and this node's flows relayed, unless it
//! restarted too). A round is taken to have started after the words received a lag before its
//! mark (a lag is the refresh and two rounds): a round that takes longer than two
//! `sync_interval`s to reach this node can end a copy's count from its last word early, and
//! then it counts from the told frame, as before that rule.

use lb_common::{
    FLOW_K_CONFIRMED, FLOW_K_CONFIRMED_CLOSING, FLOW_K_MIDFLOW, FLOW_K_OPENED, FLOW_K_UNCONFIRMED_CLOSING, FLOW_OPENED_GRACE_UNITS,
    FLOW_REOPEN_UNITS, FLOW_S_AGE_SHIFT, FLOW_S_BUSY, FLOW_S_BUSY_V3, FLOW_S_KIND, FLOW_S_REAL, FLOW_WAYS, FlowAddrs6, FlowKey, Ip6,
    flow_buckets, flow_closing, flow_confirmed, flow_idle, flow_live, flow_meta, flow_meta_split, flow_state, is_key6, kind_closing,
};

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{
        Mutex, PoisonError, RwLock, RwLockReadGuard,
        atomic::{AtomicU32, Ordering},
    },
};

use crate::mapped::Mapped;

/// A slot in use, read whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub key: FlowKey,
    /// `FlowSlot::state`.
    pub state: u32,
    /// An IPv6 flow's addresses (`FLOW_ADDRS6`); `None` for an IPv4 flow.
    pub addrs6: Option<FlowAddrs6>,
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
        flow_closing(self.state)
    }

    /// Confirmed by time (see `lb_common::FLOW_S_KIND`), closing or not.
    #[must_use]
    pub const fn confirmed(&self) -> bool {
        flow_confirmed(self.state)
    }

    /// `lb_common::FLOW_K_*`: how the table learnt of it, and whether it is confirmed or
    /// closing.
    #[must_use]
    pub const fn kind(&self) -> u32 {
        self.state & FLOW_S_KIND
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

/// What [`FlowTable::merge`] did with a flow another node holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merged {
    /// The table did not hold it: now it does.
    Inserted,
    /// The table held it, pinned to the same real: its age (and closing mark) brought up to date.
    Refreshed,
    /// The table holds the flow as this node's own: confirmed and open, pinned elsewhere; or
    /// with a frame seen here within [`MERGE_IDLE_FLOOR`] (a peer never closes or repoints
    /// it). This node's own traffic wins.
    Kept,
    /// Both buckets hold only flows a peer may not replace (open confirmed ones, connections
    /// this node saw open): nothing is replaced for it (the flood guard's rule).
    Full,
    /// The table does not hold it, and the peer has inserted its share already
    /// (`exceptions::PeerBudget`): not taken.
    Capped,
}

/// Whether a state's flow is one an insert never replaces: confirmed, opened through this node
/// or a peer's copy (closing or not; closing ones only until they are old).
const fn protected(state: u32) -> bool {
    let kind = state & FLOW_S_KIND;
    kind == FLOW_K_CONFIRMED || kind == FLOW_K_CONFIRMED_CLOSING
}

/// A flow another node of the cluster holds, to take in ([`FlowTable::merge`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerFlow {
    pub key: FlowKey,
    /// An IPv6 flow's addresses.
    pub addrs6: Option<FlowAddrs6>,
    /// This node's id for the peer's listener and backend.
    pub real: u32,
    pub closing: bool,
    /// A connection an admitted SYN opened on the peer, not confirmed yet: its copy here is
    /// not confirmed either (`FLOW_K_OPENED`), until its own next segment here or the peer's
    /// word that it confirmed.
    pub opened: bool,
    /// The age of its last frame on the peer (of its closing mark, when closing; of its
    /// recording, when opened).
    pub age: u32,
    /// The peer holds it as a copy of a third node's word (or of this node's, from before a
    /// restart): its last frame may be up to that node's refresh lag more recent than `age`,
    /// and the peer's own frames since its word another lag more ([`Idle::of`]).
    pub relayed: bool,
}

/// Age units a flow from a peer is taken to be idle at least (half the flow idle timeout when
/// that is shorter): a peer's copy is never as fresh as a frame this node saw within a
/// keepalive of 60 s, so a flow idle less than this here had a frame here (or was recorded,
/// confirmed or marked closing here), and no peer closes or repoints it. The table remembers
/// the peer's own age of such a copy ([`Idle`]), so that it does not expire before the original.
pub const MERGE_IDLE_FLOOR: u32 = FLOW_REOPEN_UNITS + 3;

/// The age a merge writes for a peer's flow of age `peer` at `now` (floored: see
/// [`MERGE_IDLE_FLOOR`]).
const fn merged_age(now: u32, peer: u32, floor: u32) -> u32 {
    if flow_idle(now, peer) < floor { now.wrapping_sub(floor) & 0xffff } else { peer }
}

/// A peer's open copy as a merge left it: its real, a tag of its IPv6 addresses, the age in
/// the slot, the newest age of the flow a peer told, whether that word was relayed, and when
/// and from which peer the last word on it came (24 bytes, the 12 of its key, and the hash
/// table's own: about 60 bytes a copy).
#[derive(Clone, Copy, Debug)]
struct PeerCopy {
    real: u32,
    written: u16,
    peer: u16,
    /// The age at which its holder's last word on it was taken in (a word of the peer's own
    /// frames: see `FlowTable::merge`).
    heard: u16,
    /// Who said it (an IPv4 address, as a number); 0: no holder's word (a relayed word made
    /// the record), the copy counts from the told frame.
    from: u32,
    addrs6: u64,
    relayed: bool,
    /// The slot's age is a peer's word (a merge wrote it, or, after a restart, an unrelayed
    /// word found it there): the flow's frames are elsewhere, and it is shared relayed. Else
    /// the slot kept its own age (this node's flow told back to it): it counts from the told
    /// frame only, and is shared as this node's.
    wrote: bool,
}

/// A peer's connection as the table knows it: when it began (its greeting, after the words
/// before it), and when its last round ended (its `SYNCED` mark, after the words before it),
/// in age units.
#[derive(Clone, Copy, Debug)]
struct PeerRounds {
    since: u16,
    synced: Option<u16>,
}

impl PeerRounds {
    /// Whether the peer has ended a round, on the connection a word at `heard` came by, a lag
    /// or more after that word (all idle units at one age): it says again every flow it holds
    /// within a lag, so the flow is no longer one it holds. A round of a later connection
    /// says nothing of it: a node that came back with an empty table holds nothing.
    fn ended(self, now: u32, heard: u32, lag: u32) -> bool {
        self.synced
            .is_some_and(|r| heard <= flow_idle(now, u32::from(self.since)) && heard >= flow_idle(now, u32::from(r)).saturating_add(lag))
    }
}

/// The peers' connections, by address.
type Rounds = HashMap<u32, PeerRounds>;

impl PeerCopy {
    /// The lag units its word may be behind the flow's last frame: one peer's refresh lag, two
    /// for a relayed word.
    const fn lag(&self, lag: u32) -> u32 {
        if self.relayed { lag.saturating_mul(2) } else { lag }
    }

    /// Age units it counts as idle at `now` while its slot keeps the written age (`expire`:
    /// its listener's timeout): since the told frame, or, for a slot a peer's word wrote, until
    /// its peer ends a round a lag or more after its last word on it without saying it again,
    /// since that word, but no more than a timeout after the told frame (see the module's doc);
    /// less its lag.
    fn idle(&self, now: u32, lag: u32, expire: u32, rounds: &Rounds) -> u32 {
        let told = flow_idle(now, u32::from(self.peer));
        // Over, whatever else: its ages must not reach the clock's wrap, where they would read
        // as fresh (with the longest timeout, two timeouts and a lag would).
        if told >= COPY_IDLE_MAX {
            return u32::MAX;
        }
        let heard = flow_idle(now, u32::from(self.heard));
        let ended = !self.wrote || self.from == 0 || rounds.get(&self.from).is_some_and(|r| r.ended(now, heard, lag));
        let since = if ended { told } else { heard.min(told).max(told.saturating_sub(expire)) };
        since.saturating_sub(self.lag(lag))
    }
}

/// A slot's age, as a record keeps it.
#[expect(clippy::cast_possible_truncation, reason = "ages are 16 bits")]
const fn word_written(f: &Flow) -> u16 {
    f.age() as u16
}

/// Whether age `a` is more recent than age `b` (by less than half the clock's wrap).
const fn newer(a: u32, b: u32) -> bool {
    let d = a.wrapping_sub(b) & 0xffff;
    d != 0 && d < 0x8000
}

/// A tag of an IPv6 flow's addresses (0 for IPv4): tells apart two flows whose keys collide.
fn addrs6_tag(a: Option<&FlowAddrs6>) -> u64 {
    a.map_or(0, |a| {
        let (s, d) = (a.src.words(), a.dst.words());
        s[0] ^ s[1].rotate_left(17) ^ d[0].rotate_left(31) ^ d[1].rotate_left(47) | 1
    })
}

/// Idle times at one age of the clock, with the peers' copies ([`FlowTable::idle_at`]). Merges
/// wait while it is held (walks need not).
pub struct Idle<'a> {
    copies: RwLockReadGuard<'a, HashMap<FlowKey, PeerCopy>>,
    rounds: Rounds,
    now: u32,
    lag: u32,
}

impl Idle<'_> {
    /// For a peer's copy that has seen no frame here since a merge wrote it: age units since
    /// the flow's last frame, as a peer last told it, and its record.
    fn on_peer(&self, f: &Flow) -> Option<(u32, &PeerCopy)> {
        let c = self.copies.get(&f.key)?;
        (u32::from(c.written) == f.age() && c.real == f.real() && c.addrs6 == addrs6_tag(f.addrs6.as_ref()) && !f.closing())
            .then(|| (flow_idle(self.now, u32::from(c.peer)), c))
    }

    /// Age units the flow counts as idle, for its expiry (after `expire` units) and the live
    /// count: a peer's copy (see [`Self::on_peer`]) as idle as a peer told, or since its
    /// holder's last word on it until that peer has ended a round without it (but not from
    /// later than `expire` after the told frame), less the peer's refresh lag (its frames since
    /// its last word may be that recent), less two lags for a relayed word.
    #[must_use]
    pub fn of(&self, f: &Flow, expire: u32) -> u32 {
        let here = f.idle(self.now);
        self.on_peer(f).map_or(here, |(_, c)| c.idle(self.now, self.lag, expire, &self.rounds).min(here))
    }

    /// Age units since the flow's last frame that this node knows of, to share: a peer's copy
    /// as idle as the peer last told (never less: copies passed back and forth must not make
    /// each other younger).
    #[must_use]
    pub fn known(&self, f: &Flow) -> u32 {
        self.shared(f).0
    }

    /// [`Self::known`], and whether it is a peer's word passed on (relayed): a node that takes
    /// it then keeps its copy a lag longer than of a word of the node's own frames, as the
    /// flow may have had frames a lag more recent on that peer, and this node's frames since
    /// reach it only with this node's next refresh. (A relayed word passed on again stays
    /// relayed, with no more than that lag: with two nodes a chain is never longer.) Only a
    /// copy whose slot a peer's word wrote is relayed: this node's own flow told back to it is
    /// shared as its own.
    #[must_use]
    pub fn shared(&self, f: &Flow) -> (u32, bool) {
        let here = f.idle(self.now);
        self.on_peer(f).map_or((here, false), |(p, c)| (p.min(here), c.wrote))
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
    /// `FLOW_ADDRS6`, mapped: four words per slot.
    addrs6: Mapped,
    seed: u64,
    /// The peers' open copies (see the module's doc), by key.
    copies: RwLock<HashMap<FlowKey, PeerCopy>>,
    /// Each peer's connection: when it began and when it last ended a round
    /// ([`Self::peer_connected`], [`Self::peer_synced`]).
    rounds: Mutex<Rounds>,
    /// Age units a peer's frames may be more recent than its last word on them (its `refresh`
    /// and two rounds).
    peer_lag: AtomicU32,
}

/// `FLOW_ADDRS6` index of a slot.
#[expect(clippy::cast_possible_truncation, reason = "way < FLOW_WAYS")]
const fn slot_index(bucket: u32, way: usize) -> u32 {
    bucket * FLOW_WAYS as u32 + way as u32
}

/// Age units a connection's start or a round is told apart by (about 18.3 hours, below
/// `flow_idle`'s limit of 19.2).
const ROUND_KEPT: u32 = 0xf000;

/// Age units past its told frame at which a copy is over, whatever its holder's word says
/// (about 18.6 hours: two of the longest timeouts and a lag would reach the clock's wrap,
/// where its ages would read as fresh; sweeps, a minute apart at most, remove it first).
const COPY_IDLE_MAX: u32 = 0xf400;

/// Reads of a slot in flux before it is passed over.
const SETTLE_TRIES: usize = 1000;

impl FlowTable {
    /// `mem`: the mapped `FLOWS`; `addrs6`: the mapped `FLOW_ADDRS6`; `seed`: the table's
    /// hash seed (`LAYOUT`).
    #[must_use]
    pub fn new(mem: Mapped, addrs6: Mapped, seed: u64) -> Self {
        Self { mem, addrs6, seed, copies: RwLock::default(), rounds: Mutex::default(), peer_lag: AtomicU32::new(0) }
    }

    /// How long after their last word on a flow the peers may have seen frames of it (their
    /// `refresh` and two rounds, in age units): a copy lives that much longer than its last
    /// word says.
    pub fn set_peer_lag(&self, units: u32) {
        self.peer_lag.store(units, Ordering::Relaxed);
    }

    /// The peers' refresh lag ([`Self::set_peer_lag`]).
    #[must_use]
    pub fn peer_lag(&self) -> u32 {
        self.peer_lag.load(Ordering::Relaxed)
    }

    /// Forgets the peers' copies and rounds, as a restarted controller has (tests: its records
    /// are in this process only).
    #[doc(hidden)]
    pub fn forget_copies(&self) {
        self.copies.write().unwrap_or_else(PoisonError::into_inner).clear();
        self.rounds.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// Peer `from` connected at age `now` (its greeting, once the flows it sent before are
    /// merged): its rounds from now on end only the copies it said on this connection. `None`
    /// (the clock could not be read): none of its rounds ends a copy until it connects again.
    pub fn peer_connected(&self, from: Ipv4Addr, now: Option<u32>) {
        let mut rounds = self.rounds.lock().unwrap_or_else(PoisonError::into_inner);
        match now {
            Some(now) => rounds.insert(u32::from(from), PeerRounds { since: (now & 0xffff) as u16, synced: None }),
            None => rounds.remove(&u32::from(from)),
        };
    }

    /// Peer `from` ended a round at age `now` (its `SYNCED` mark, once the flows it sent before
    /// are merged): it has said again every flow it still holds and last said a refresh ago,
    /// so its copies it last told on this connection a lag or more before now count from their
    /// told frames again (see the module's doc). Not noted for a peer whose connection's start
    /// is not ([`Self::peer_connected`]).
    pub fn peer_synced(&self, from: Ipv4Addr, now: u32) {
        if let Some(r) = self.rounds.lock().unwrap_or_else(PoisonError::into_inner).get_mut(&u32::from(from)) {
            r.synced = Some((now & 0xffff) as u16);
        }
    }

    fn rounds(&self) -> Rounds {
        self.rounds.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Idle times at age `now` ([`Idle::of`]); merges wait until it is dropped.
    #[must_use]
    pub fn idle_at(&self, now: u32) -> Idle<'_> {
        let rounds = self.rounds();
        Idle { copies: self.copies.read().unwrap_or_else(PoisonError::into_inner), rounds, now, lag: self.peer_lag.load(Ordering::Relaxed) }
    }

    /// Removes the flows idle `expire(listener id)` age units or more at age `now` (a peer's
    /// copy: idle that long on its peer, see [`Idle::of`]); returns how many were removed. Then
    /// forgets the copies that are over (gone from the table, or soon) or of a listener that
    /// is gone (`expire` gives it `u32::MAX`).
    pub fn remove_idle(&self, now: u32, expire: impl Fn(u32) -> u32) -> usize {
        let removed = {
            let idle = self.idle_at(now);
            self.remove_where(|f| {
                let e = expire(lb_common::real_listener(f.real()));
                f.idle(now) >= e && idle.of(f, e) >= e
            })
        };
        let lag = self.peer_lag();
        let rounds = {
            // Ages older than the clock can tell apart would read as recent once it wraps: a
            // connection's start stays at most that old (it then began before any word that
            // counts), a round that old is forgotten (its peer's copies then count from their
            // last words, which are older than any copy lives).
            let mut r = self.rounds.lock().unwrap_or_else(PoisonError::into_inner);
            let oldest = (now.wrapping_sub(ROUND_KEPT) & 0xffff) as u16;
            for p in r.values_mut() {
                if flow_idle(now, u32::from(p.since)) > ROUND_KEPT {
                    p.since = oldest;
                }
                p.synced = p.synced.filter(|&s| flow_idle(now, u32::from(s)) <= ROUND_KEPT);
            }
            r.clone()
        };
        let mut copies = self.copies.write().unwrap_or_else(PoisonError::into_inner);
        copies.retain(|_, c| {
            let e = expire(lb_common::real_listener(c.real));
            e != u32::MAX && c.idle(now, lag, e, &rounds) < e
        });
        // Memory back once a burst of copies (a joining node's, configs that differed) is over.
        if copies.capacity() > 4 * copies.len().max(1024) {
            copies.shrink_to_fit();
        }
        removed
    }

    /// The table's hash seed (`lb_common::flow_key6` takes it too).
    #[must_use]
    pub const fn seed(&self) -> u64 {
        self.seed
    }

    /// The IPv6 addresses recorded for a slot.
    fn load_addrs6(&self, bucket: u32, way: usize) -> FlowAddrs6 {
        let i = slot_index(bucket, way);
        let w = |n: usize| self.addrs6.load(i, n);
        FlowAddrs6 { src: Ip6::from_words([w(0), w(1)]), dst: Ip6::from_words([w(2), w(3)]) }
    }

    fn store_addrs6(&self, bucket: u32, way: usize, a: &FlowAddrs6) {
        let i = slot_index(bucket, way);
        let (src, dst) = (a.src.words(), a.dst.words());
        for (n, w) in [src[0], src[1], dst[0], dst[1]].into_iter().enumerate() {
            self.addrs6.store(i, n, w);
        }
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
            let busy = state == FLOW_S_BUSY || state == FLOW_S_BUSY_V3;
            if !flow_live(state) && !busy {
                return None;
            }
            if !busy {
                let addrs = self.mem.load(bucket, way * 2);
                let key = FlowKey::from_words(addrs, ports);
                let addrs6 = is_key6(&key).then(|| self.load_addrs6(bucket, way));
                if self.mem.load(bucket, way * 2 + 1) == meta {
                    return Some((Flow { key, state, addrs6 }, Seen { bucket, way, meta }));
                }
            }
            std::hint::spin_loop();
        }
        None
    }

    /// The flow's slot, if the table holds it (an IPv6 flow: `addrs6` too).
    #[must_use]
    pub fn find(&self, key: &FlowKey, addrs6: Option<&FlowAddrs6>) -> Option<Flow> {
        self.buckets_of(key)
            .into_iter()
            .flat_map(|b| (0..FLOW_WAYS).map(move |w| (b, w)))
            .find_map(|(b, w)| self.read(b, w).map(|(f, _)| f).filter(|f| f.key == *key && f.addrs6.as_ref() == addrs6))
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

    /// Moves the age of every flow `which` picks `units` back, as if that much time had passed
    /// since its last frame, mark or recording: for tests of what time does (a flow confirms by
    /// a segment [`lb_common::FLOW_CONFIRM_UNITS`] after its recording). Returns the flows moved.
    pub fn rewind(&self, units: u32, mut which: impl FnMut(&Flow) -> bool) -> usize {
        let mut moved = 0;
        for bucket in 0..self.buckets() {
            for way in 0..FLOW_WAYS {
                for _ in 0..SETTLE_TRIES {
                    let Some((f, seen)) = self.read(bucket, way) else { break };
                    if !which(&f) {
                        break;
                    }
                    let (ports, _) = flow_meta_split(seen.meta);
                    let state = f.state & !(0xffff << FLOW_S_AGE_SHIFT) | (f.age().wrapping_sub(units) & 0xffff) << FLOW_S_AGE_SHIFT;
                    if self.mem.compare_exchange(bucket, way * 2 + 1, seen.meta, flow_meta(ports, state)).is_ok() {
                        moved += 1;
                        break;
                    }
                }
            }
        }
        moved
    }

    /// Overwrites the IPv6 addresses recorded for a slot, for tests that make two IPv6 flows
    /// share a key (a 60-bit collision, which needs the seed to aim).
    pub fn set_raw_addrs6(&self, bucket: u32, way: usize, a: &FlowAddrs6) {
        self.store_addrs6(bucket, way, a);
    }

    /// How many live flows point at each real (a walk of the table): not closing, and idle less
    /// than `expire(listener id)` age units at age `now`.
    #[must_use]
    pub fn live_per_real(&self, now: u32, expire: impl Fn(u32) -> u32) -> std::collections::BTreeMap<u32, usize> {
        let mut out = std::collections::BTreeMap::new();
        let idle = self.idle_at(now);
        self.walk(|f| {
            let e = expire(lb_common::real_listener(f.real()));
            if !f.closing() && (f.idle(now) < e || idle.of(f, e) < e) {
                *out.entry(f.real()).or_default() += 1;
            }
        });
        out
    }

    /// Takes in a flow that another node of the cluster holds (see `crate::cluster`). The
    /// table then forwards it as the other node does, whichever node the routers send it to.
    /// The peer's age counts as at least [`MERGE_IDLE_FLOOR`] units old (half of `expire` when
    /// that is less): "recent" below means this node saw a frame of the flow since. With the
    /// same key:
    /// - pinned to the same real: the newer age stands; a closing mark is taken unless the
    ///   flow is recent here or this node saw it after the mark; a flow closing here opens
    ///   again when the peer saw it well after the mark;
    /// - pinned to another real: repointed only when this node's copy is a mid-flow miss that
    ///   only the ring picked, or is stale (expired, closed and unconfirmed, closed long ago),
    ///   or is an unconfirmed connection or a close that is not recent. A confirmed open flow,
    ///   or anything recent, stays.
    ///
    /// A new key goes into a free slot of the emptier bucket, else over the best stale or
    /// unconfirmed flow of the eight: never over a confirmed one, nor over a connection this
    /// node saw open within `FLOW_OPENED_GRACE_UNITS`. A flow the merge confirms, repoints or
    /// inserts is confirmed as one opened here (`FLOW_K_CONFIRMED`), or, when the peer has not
    /// confirmed it either, kept as a connection opened (`FLOW_K_OPENED`); either needs
    /// `may_insert` (the peer's budget): without it, `Capped`. `now` and `expire`: the clock's age and the
    /// idle units from which a flow is expired.
    ///
    /// The open copy the slot then holds is remembered with the peer's age, and when and from
    /// which peer (`from`) the word came (see [`Idle`]).
    #[must_use]
    pub fn merge(&self, flow: &PeerFlow, from: Ipv4Addr, now: u32, expire: u32, may_insert: bool) -> Merged {
        // Held over the write and its record: a sweep never sees one without the other.
        let mut copies = self.copies.write().unwrap_or_else(PoisonError::into_inner);
        // The slot's age before: whether this merge wrote the peer's word into it (the slot then
        // holds the word's age, and did not before; a kind changed alone, or a frame here in
        // between, is not the word's).
        let before = self.find(&flow.key, flow.addrs6.as_ref()).map(|f| f.age());
        let word_age = merged_age(now, flow.age, MERGE_IDLE_FLOOR.min(expire / 2));
        let merged = self.merge_slot(flow, now, expire, may_insert);
        if matches!(merged, Merged::Inserted | Merged::Refreshed) {
            // Remembered while the slot holds the flow open on that real, with the age in the
            // slot and the newest word of a peer on it; forgotten when the slot no longer holds
            // it so. See `record`.
            let held = self.find(&flow.key, flow.addrs6.as_ref()).filter(|f| f.real() == flow.real && !f.closing() && !flow.closing);
            let tag = addrs6_tag(flow.addrs6.as_ref());
            match held {
                Some(f) => {
                    let wrote = f.age() == word_age && before != Some(word_age);
                    let (heard, from) = ((now & 0xffff) as u16, u32::from(from));
                    match self.record(copies.get(&flow.key), flow, &f, wrote) {
                        // A relayed word tells of another node's frames, not of its sender's: the
                        // copy keeps counting from its holder's last word, if it had one, else
                        // from the told frame (two lags).
                        Some(c) if flow.relayed => {
                            let old = copies.get(&flow.key).filter(|o| o.wrote && o.real == c.real && o.addrs6 == tag);
                            let (heard, from) = old.map_or((0, 0), |o| (o.heard, o.from));
                            copies.insert(flow.key, PeerCopy { heard, from, ..c });
                        }
                        Some(c) => {
                            copies.insert(flow.key, PeerCopy { heard, from, ..c });
                        }
                        // The standing record, said again by a peer of its own frames: they may
                        // be a lag more recent than this word. (A relayed word is not counted:
                        // two nodes telling each other their copies would keep both alive.)
                        None if !flow.relayed => {
                            if let Some(c) = copies
                                .get_mut(&flow.key)
                                .filter(|c| c.wrote && c.written == word_written(&f) && c.real == f.real() && c.addrs6 == tag)
                            {
                                c.heard = heard;
                                c.from = from;
                            }
                        }
                        None => {}
                    }
                }
                None => {
                    if copies.get(&flow.key).is_some_and(|c| c.addrs6 == tag) {
                        copies.remove(&flow.key);
                    }
                }
            }
        }
        merged
    }

    /// The record a merge of `flow` leaves for the slot `f` now holds open on its real
    /// (`wrote`: the merge wrote the peer's word into it), or `None` to leave the standing one.
    /// - A word written into the slot is recorded, relayed or not.
    /// - A slot that kept its age (as recent as the word, or more) keeps a standing record for
    ///   that age, unless this word lasts longer; without one (a restart forgot them), the word
    ///   is recorded unless the slot is more recent than it by more than the units of rounding
    ///   two words of one frame may differ by (then it had a frame here: the flow is this
    ///   node's own). Such a word adds nothing this node did not know: not relayed.
    fn record(&self, standing: Option<&PeerCopy>, flow: &PeerFlow, f: &Flow, wrote: bool) -> Option<PeerCopy> {
        /// Units two words of one frame may differ by (each rounds the time since its walk up).
        const ROUNDING: u32 = 2;
        let peer = flow.age & 0xffff;
        let word = PeerCopy {
            real: flow.real,
            written: word_written(f),
            peer: peer as u16,
            heard: 0,
            from: 0,
            addrs6: addrs6_tag(flow.addrs6.as_ref()),
            relayed: wrote && flow.relayed,
            wrote,
        };
        let standing = standing.filter(|c| c.written == word.written && c.real == word.real && c.addrs6 == word.addrs6);
        // The slot still holds the age a peer's word wrote.
        let word = PeerCopy { wrote: wrote || standing.is_some_and(|c| c.wrote), ..word };
        let lag = self.peer_lag();
        let lasts = |c: &PeerCopy| u32::from(c.peer).wrapping_add(c.lag(lag)) & 0xffff;
        let keep = match standing {
            Some(c) => !wrote && !newer(lasts(&word), lasts(c)),
            None => !wrote && newer(f.age(), peer.wrapping_add(ROUNDING) & 0xffff),
        };
        // Without a record, a slot that kept its age is a copy this node forgot (a restart), or
        // this node's own flow told back to it. A peer tells its own frames unrelayed, and this
        // node's flow only as a copy, relayed (unless it too forgot its records).
        let word = if standing.is_none() && !wrote && !flow.relayed { PeerCopy { wrote: true, ..word } } else { word };
        (!keep).then_some(word)
    }

    fn merge_slot(&self, flow: &PeerFlow, now: u32, expire: u32, may_insert: bool) -> Merged {
        let PeerFlow { key, addrs6, real, closing, opened, .. } = *flow;
        let floor = MERGE_IDLE_FLOOR.min(expire / 2);
        let age = merged_age(now, flow.age, floor);
        let peer_idle = flow_idle(now, age);
        let kind = match (opened, closing) {
            (false, false) => FLOW_K_CONFIRMED,
            (false, true) => FLOW_K_CONFIRMED_CLOSING,
            (true, false) => FLOW_K_OPENED,
            (true, true) => FLOW_K_UNCONFIRMED_CLOSING,
        };
        let (addrs, ports) = key.words();
        for _ in 0..SETTLE_TRIES {
            let slots: Vec<(u32, usize)> = self.buckets_of(&key).into_iter().flat_map(|b| (0..FLOW_WAYS).map(move |w| (b, w))).collect();
            let found = slots.iter().find_map(|&(b, w)| self.read(b, w).filter(|(f, _)| f.key == key && f.addrs6 == addrs6));
            if let Some((f, seen)) = found {
                let idle = f.idle(now);
                let recent = idle < floor;
                let new_state = if f.real() == real {
                    let state = if f.closing() {
                        // Closed here: open again only when the peer saw the flow well after
                        // the mark.
                        if closing || idle < peer_idle + lb_common::FLOW_CONFIRM_UNITS {
                            return Merged::Refreshed;
                        }
                        flow_state(real, FLOW_K_CONFIRMED, age)
                    } else if closing {
                        // Closed on the peer: taken when this node has seen nothing of it since.
                        if recent || idle < peer_idle {
                            return Merged::Kept;
                        }
                        flow_state(real, kind_closing(f.kind()), age)
                    } else if opened {
                        // Not confirmed on the peer either: nothing to learn from it.
                        return Merged::Refreshed;
                    } else {
                        // The newer of the two ages: the smaller idle time at `now`.
                        flow_state(real, FLOW_K_CONFIRMED, if peer_idle < idle { age } else { f.age() })
                    };
                    if state == f.state {
                        return Merged::Refreshed;
                    }
                    // Making a flow one the table never replaces (confirmed as opened here) costs
                    // the peer's budget.
                    if protected(state) && !protected(f.state) && !may_insert {
                        return Merged::Capped;
                    }
                    state
                } else {
                    let stale = idle >= expire || f.closing() && (!f.confirmed() || idle >= FLOW_REOPEN_UNITS);
                    let guess = f.kind() == FLOW_K_MIDFLOW;
                    let loose = !recent && (f.kind() == FLOW_K_OPENED || f.closing());
                    if !(stale || guess || loose) {
                        return Merged::Kept;
                    }
                    if !may_insert {
                        return Merged::Capped;
                    }
                    flow_state(real, kind, age)
                };
                if self.mem.compare_exchange(seen.bucket, seen.way * 2 + 1, seen.meta, flow_meta(ports, new_state)).is_ok() {
                    let upgraded = protected(new_state) && !protected(f.state);
                    return if f.real() == real && !upgraded { Merged::Refreshed } else { Merged::Inserted };
                }
                continue; // changed under us: look again
            }
            if !may_insert {
                return Merged::Capped;
            }
            // Not held: a free slot of the emptier bucket (the left one on a tie), else the best to
            // replace: stale first, then unconfirmed, the longest idle first.
            let free = |b: u32| (0..FLOW_WAYS).filter(|&w| self.mem.load(b, w * 2 + 1) == 0).collect::<Vec<_>>();
            let [left, right] = self.buckets_of(&key);
            let (fl, fr) = (free(left), free(right));
            let target = if fr.len() > fl.len() {
                Some((right, fr[0], 0))
            } else if let Some(&w) = fl.first() {
                Some((left, w, 0))
            } else {
                slots
                    .iter()
                    .filter_map(|&(b, w)| {
                        let (f, seen) = self.read(b, w)?;
                        let idle = f.idle(now);
                        // As the program scores slots (lb-ebpf's `table::score`), but nothing
                        // confirmed is a peer's to take.
                        let class = if idle >= expire || f.closing() && (!f.confirmed() || idle >= FLOW_REOPEN_UNITS) {
                            2
                        } else if f.kind() == FLOW_K_MIDFLOW || f.kind() == FLOW_K_OPENED && idle >= FLOW_OPENED_GRACE_UNITS {
                            1
                        } else {
                            return None;
                        };
                        Some(((class, idle), (b, w, seen.meta)))
                    })
                    .max_by_key(|(score, _)| *score)
                    .map(|(_, t)| t)
            };
            let Some((bucket, way, was)) = target else { return Merged::Full };
            // Claim it as the program does (BUSY, addresses, state), unless it changed.
            if self.mem.compare_exchange(bucket, way * 2 + 1, was, flow_meta(0, FLOW_S_BUSY)).is_ok() {
                self.mem.store(bucket, way * 2, addrs);
                if let Some(a) = &addrs6 {
                    self.store_addrs6(bucket, way, a);
                }
                self.mem.store(bucket, way * 2 + 1, flow_meta(ports, flow_state(real, kind, age)));
                return Merged::Inserted;
            }
        }
        Merged::Full
    }

    /// Removes one flow; false when the table does not hold it.
    #[must_use]
    pub fn remove(&self, key: &FlowKey, addrs6: Option<&FlowAddrs6>) -> bool {
        let mut this = |f: &Flow| f.key == *key && f.addrs6.as_ref() == addrs6;
        self.buckets_of(key).into_iter().any(|b| (0..FLOW_WAYS).any(|w| self.remove_from(b, w, &mut this)))
    }
}
