//! The controller's part in a multi-node deployment: it tells its two parts, [`Announcing`]
//! (what this node announces to the routers) and [`ClusterLink`] (the flows it shares with the
//! other nodes), what the rings and the link hold, and takes in the flows peers send.
//!
//! [`Announcing`]: super::announcing::Announcing
//! [`ClusterLink`]: super::cluster_link::ClusterLink

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use lb_common::{NO_BACKEND, real_id};

use super::{Controller, cluster_link};
use crate::{
    cluster, config,
    control::status::{AnnounceStatus, ClusterStatus},
    dataplane,
    exceptions::{self, Done, Incoming, RingView},
    flow_table::PeerFlow,
};

impl Controller {
    /// Starts the announcer and the cluster sync the config asks for. Before the program is
    /// attached: a node joining a cluster takes the others' exceptions into its table first.
    pub(super) fn ha_start(&mut self) -> anyhow::Result<()> {
        self.link.start(cluster_link::cluster_settings(&self.config)?, self.join_wait())?;
        self.announcing.start(self.config.announce)?;
        self.ha_after_apply();
        Ok(())
    }

    fn join_wait(&self) -> Duration {
        self.config.cluster.as_ref().map_or(Duration::ZERO, |c| c.join_wait)
    }

    fn sync_interval(&self) -> Duration {
        self.config.cluster.as_ref().map_or(config::DEFAULT_SYNC_INTERVAL, |c| c.sync_interval)
    }

    /// After every apply: a ring may have changed (walk for exceptions), and a listener may
    /// have gained or lost its last usable backend (announce or withdraw its VIP).
    pub(super) fn ha_after_apply(&mut self) {
        self.link.ring_changed();
        self.update_announcement();
    }

    /// VIPs with a listener that can take new flows: a backend in its ring. A listener that
    /// fails open (`all_down = "forward"`) counts: its ring then holds every backend with a
    /// weight, as every node's does when all are up, and when every node's checks fail at
    /// once (a shared cause), withdrawing everywhere would take the VIP off the network.
    fn usable_vips(&self) -> BTreeSet<IpAddr> {
        self.desired.listeners.iter().filter(|l| l.ring.iter().any(|&s| s != NO_BACKEND)).map(|l| l.vip).collect()
    }

    /// The program is attached: from now on, what is usable is announced.
    pub(super) fn ha_attached(&mut self) {
        self.announcing.attach();
        self.update_announcement();
    }

    /// Whether the loop may take another cluster event (the merge thread keeps up).
    pub(super) const fn ha_takes_events(&self) -> bool {
        self.link.takes_events()
    }

    fn update_announcement(&self) {
        self.announcing.update(self.config.announce, self.link.joining(), || self.usable_vips());
    }

    /// Every second: the link still attached, the join's deadline, a walk due, repairs.
    pub(super) fn ha_tick(&mut self) {
        let (pins, interface) = (&self.opts.pin_dir, &self.config.interface);
        let changed = self.announcing.forwarding(|| {
            if !dataplane::link_live(pins, interface) {
                Some(format!("the XDP link in {} is no longer attached to {interface}", pins.display()))
            } else if !dataplane::interface_running(interface).unwrap_or(false) {
                Some(format!("{interface} is down or has no carrier"))
            } else {
                None
            }
        });
        if changed {
            self.update_announcement();
        }
        self.announcing.repair(self.link.joining());
        if self.link.tick_join(self.config.cluster.as_ref().map(|c| c.join_wait)) {
            self.update_announcement();
        }
        if self.link.walk_due() {
            self.walk_exceptions();
        }
    }

    /// Starts a walk of the flow table for exceptions, in a thread of its own.
    fn walk_exceptions(&mut self) {
        let now = match self.dp.now_age() {
            Ok(now) => now,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reading the flow clock failed; no exception walk this round");
                return;
            }
        };
        let view = RingView::new(&self.desired, &self.ids, self.config.ring_size);
        let interval = self.sync_interval();
        self.link.walk(self.dp.flow_table_handle(), now, view, (self.config.clone(), self.ids.clone()), interval);
    }

    /// A walk ended: every peer gets what it lacks.
    pub(super) fn exceptions_found(&mut self, e: Option<cluster::Exceptions>) {
        self.link.found(e);
    }

    /// Flows from another node: named by listener and backend, taken in as this node's reals.
    pub(super) fn on_cluster_event(&mut self, event: cluster::Event) {
        match event {
            cluster::Event::Flows { from, group } => {
                let real = group.listener.and_then(|at| {
                    let l = self.config.listeners.iter().find(|l| l.vip == at.ip() && l.port == at.port())?;
                    l.backends.contains(&group.backend).then_some(())?;
                    Some((real_id(self.ids.listeners[&l.name], self.ids.backends[&group.backend]), plan_expire(l), at))
                });
                let Some((real, expire, at)) = real else {
                    tracing::debug!(%from, listener = ?group.listener, backend = %group.backend, "flows for a listener or backend this node does not have");
                    self.link.unknown(group.entries.len());
                    return;
                };
                let now = match self.dp.now_age() {
                    Ok(now) => now,
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "reading the flow clock failed; flows from {from} dropped");
                        return;
                    }
                };
                let table = self.dp.flow_table_handle();
                let seed = table.seed();
                // A peer keeps its copies of others' flows the refresh lag past the frame it told
                // (`FlowTable::idle_at`), two for a relayed word: so may this node. (It keeps them
                // longer while their holder may still be telling them: a session then has its
                // next frame within a keepalive, well inside this.)
                let lag = table.peer_lag();
                let live = |relayed: bool| expire.saturating_add(if relayed { lag.saturating_mul(2) } else { lag });
                let flows = group
                    .entries
                    .iter()
                    .filter(|e| u32::from(e.idle) < live(e.relayed) && e.client.is_ipv6() == at.is_ipv6())
                    .map(|e| {
                        let (key, addrs6) = exceptions::key_of(e.client, at, seed);
                        PeerFlow {
                            key,
                            addrs6,
                            real,
                            closing: e.closing,
                            opened: e.opened,
                            age: now.wrapping_sub(u32::from(e.idle)) & 0xffff,
                            relayed: e.relayed,
                        }
                    })
                    .collect();
                self.link.merge(Incoming { from, flows, now, expire });
            }
            cluster::Event::Greeted { from, same } => {
                let interval = self.sync_interval();
                let now = self.clock_or_warn(from, "connection");
                self.link.greeted(from, same, interval, now);
            }
            cluster::Event::Synced { from } => {
                let now = self.clock_or_warn(from, "round");
                self.link.synced(from, now);
            }
        }
    }

    /// The flow clock for noting a peer's `what` (its connection, or a round it ended), or
    /// `None` with a warning when it cannot be read: the peer's word is then not noted.
    fn clock_or_warn(&self, from: std::net::Ipv4Addr, what: &str) -> Option<u32> {
        self.dp
            .now_age()
            .inspect_err(|e| tracing::warn!(error = %format!("{e:#}"), "reading the flow clock failed; {from}'s {what} is not noted"))
            .ok()
    }

    #[expect(clippy::needless_pass_by_value, reason = "taken from the channel whole")]
    pub(super) fn on_merge_done(&mut self, done: Done) {
        let (inserted, joined) = self.link.merge_done(&done);
        if inserted {
            self.flows.forget();
        }
        if joined {
            self.update_announcement();
        }
    }

    /// Why `dsrlb ping` must fail for keepalived: still joining, or not forwarding.
    pub(super) fn ha_not_ready(&self) -> Option<String> {
        if let Some(why) = self.announcing.not_forwarding() {
            return Some(why.to_owned());
        }
        self.link.not_ready(self.join_wait())
    }

    /// `announce` and `cluster` for `dsrlb status`.
    pub(super) fn ha_status(&self) -> (Option<AnnounceStatus>, Option<ClusterStatus>) {
        let vips = self.config.listeners.iter().map(|l| l.vip).collect();
        let announce = self.announcing.status(self.config.announce, vips, self.link.joining(), &self.usable_vips());
        (announce, self.link.status())
    }

    /// Applies a reload's `[announce]` and `[cluster]` (the config is already the new one;
    /// `settings` were computed from it before anything changed).
    pub(super) fn ha_reconfigure(&mut self, settings: Option<cluster::Settings>) -> anyhow::Result<()> {
        self.link.reconfigure(settings)?;
        self.announcing.reconfigure(self.config.announce)?;
        self.update_announcement();
        Ok(())
    }

    /// On the way out: the sync stops; `dsrlb stop` withdraws and waits for the traffic to go
    /// (see [`Announcing::leave`](super::announcing::Announcing::leave)).
    pub(super) async fn ha_shutdown(&mut self) {
        self.link.stop();
        let dp = &self.dp;
        self.announcing.leave(self.stopping, self.config.announce, || dp.stats().map_or(0, |s| s.total().packets)).await;
    }
}

fn plan_expire(l: &config::Listener) -> u32 {
    crate::plan::expire_units(l.flow_idle_timeout)
}
