//! Writing a desired state as the difference from what was written before, in the order that
//! keeps packets in flight safe.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, bail, ensure};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use lb_common::{
    Addr6, ConnRate, Counters, FLOW_CACHE_VALID, Ip6, LISTENER_F_CONN_RATE, LISTENER_F_HASH_SOURCE, LISTENER_F_IPV6,
    LISTENER_F_SOURCE_PREFIX64, ListenerCounters, ListenerInfo, MAX_BACKENDS, MAX_LISTENERS, MAX_NODE_MACS, NO_BACKEND, NodeInfo, PortInfo,
    REAL_F_ACTIVE, REAL_F_DOWN, REAL_F_GUE, REAL_F_IPIP, REAL_F_TUNNEL, REAL_SLOTS, RING_COPIES, RING_NONE, RING_SLOTS_PER_ENTRY, RealInfo,
    RealTunnel, RingEntry, TUNNEL_GUE, TUNNEL_IPIP, VipInfo, mac_word, map_names as names, real_backend, real_id, real_listener, ring_base,
};

use super::{ApplyReport, ConnRateWanted, Dataplane, Desired, DesiredListener, addr6, map_mut};

impl Dataplane {
    /// Writes `want` as the difference from what was written before.
    ///
    /// Order matters for packets in flight: reals first (so no ring slot names an unset
    /// real), then each changed listener's standby ring copy, then the listener entry that
    /// switches to it in one update, and only then removals. Each step below is one of them.
    ///
    /// # Errors
    /// When `want` is inconsistent (ids out of range, ring of the wrong size) or a map write
    /// fails. Validation happens before any write.
    pub fn apply(&mut self, want: &Desired) -> anyhow::Result<ApplyReport> {
        let reals = self.check(want)?;
        let mut report = ApplyReport::default();
        self.forget_fresh_ids(want, &mut report)?;
        self.write_node_of(want);
        self.write_reals(&reals, &mut report)?;
        self.write_probe_tunnels(want)?;
        self.write_conn_rates(want)?;
        for l in &want.listeners {
            self.switch_listener(l, &mut report)?;
        }
        self.remove_listeners(want, &mut report);
        self.write_vips()?;
        self.retire_reals(&reals, &mut report)?;
        if report.reals_written > 0 || report.flows_purged > 0 {
            self.invalidate_flow_caches();
        }
        self.clear_stale_tunnels(&reals)?;
        *self.events.names.write().unwrap_or_else(std::sync::PoisonError::into_inner) = want.listener_names.clone();
        Ok(report)
    }

    /// Validates `want` before anything is written: ids in range and used once, rings of the
    /// loaded size naming only the listener's reals. Returns every real it wants.
    fn check(&self, want: &Desired) -> anyhow::Result<BTreeMap<u32, (RealInfo, RealTunnel)>> {
        let size = self.ring_size as usize;
        let mut ids = BTreeSet::new();
        let mut reals: BTreeMap<u32, (RealInfo, RealTunnel)> = BTreeMap::new();
        for l in &want.listeners {
            ensure!(l.id < MAX_LISTENERS, "listener id {} out of range", l.id);
            ensure!(ids.insert(l.id), "listener id {} used twice", l.id);
            ensure!(l.ring.len() == size, "listener {}: ring has {} slots, not {size}", l.id, l.ring.len());
            for r in &l.reals {
                ensure!(r.backend < MAX_BACKENDS, "backend id {} out of range", r.backend);
                let forward = match r.tunnel.map(|t| t.mode) {
                    None => 0,
                    Some(TUNNEL_IPIP) => REAL_F_IPIP,
                    Some(TUNNEL_GUE) => REAL_F_GUE,
                    Some(m) => bail!("listener {}: backend {}: tunnel mode {m} unknown", l.id, r.backend),
                };
                let info = RealInfo {
                    dst_mac: r.dst_mac,
                    src_mac: want.src_mac,
                    flags: REAL_F_ACTIVE | forward | if r.down { REAL_F_DOWN } else { 0 },
                };
                let tunnel = r.tunnel.unwrap_or_default();
                ensure!(reals.insert(real_id(l.id, r.backend), (info, tunnel)).is_none(), "listener {}: backend {} twice", l.id, r.backend);
            }
            for &s in &l.ring {
                ensure!(
                    s == NO_BACKEND || l.reals.iter().any(|r| r.backend == s),
                    "listener {}: ring names backend {s}, which is not among its reals",
                    l.id
                );
            }
        }
        ensure!(want.accept_macs.len() < MAX_NODE_MACS, "at most {} accepted MACs", MAX_NODE_MACS - 1);
        Ok(reals)
    }

    /// Ids given to new names: whatever the maps still hold for their reals belongs to a name
    /// that is gone. Deletes its flows (they would move to the newcomer) and zeroes its
    /// counters before the newcomer's reals are written.
    fn forget_fresh_ids(&mut self, want: &Desired, report: &mut ApplyReport) -> anyhow::Result<()> {
        if want.fresh_backends.is_empty() && want.fresh_listeners.is_empty() {
            return Ok(());
        }
        let fresh = |real: u32| want.fresh_backends.contains(&real_backend(real)) || want.fresh_listeners.contains(&real_listener(real));
        report.flows_purged += self.flows.remove_where(|f| fresh(f.real()));
        let stale: Vec<u32> = (0..REAL_SLOTS).filter(|&r| fresh(r)).collect();
        self.zero_counters(&stale, &want.fresh_listeners)?;
        for r in &stale {
            self.written.reals.remove(r);
        }
        Ok(())
    }

    /// Step 0: the node's clock, MACs and the flows' expiry, before any listener can match.
    fn write_node_of(&mut self, want: &Desired) {
        let mut node = NodeInfo { ns_per_jiffy: self.ns_per_jiffy, ..NodeInfo::default() };
        for (word, mac) in node.macs.iter_mut().zip(std::iter::once(&want.src_mac).chain(&want.accept_macs)) {
            *word = mac_word(*mac);
        }
        node.idle_expire = want.listeners.iter().map(|l| l.idle_expire).max().unwrap_or(u32::from(u16::MAX));
        if self.written.node != Some(node) {
            self.write_node(&node);
        }
    }

    /// Step 1: reals that are new or changed.
    fn write_reals(&mut self, reals: &BTreeMap<u32, (RealInfo, RealTunnel)>, report: &mut ApplyReport) -> anyhow::Result<()> {
        // A real's tunnel before the real that names it; a tunnel no longer named after it.
        let mut tunnels: Array<&mut MapData, RealTunnel> = map_mut(&mut self.ebpf, names::REAL_TUNNELS)?;
        for (&id, (info, tunnel)) in reals {
            if info.flags & REAL_F_TUNNEL != 0 && self.written.tunnels.get(&id) != Some(tunnel) {
                tunnels.set(id, tunnel, 0).with_context(|| format!("writing the tunnel of real {id}"))?;
                self.written.tunnels.insert(id, *tunnel);
            }
        }
        let mut map: Array<&mut MapData, RealInfo> = map_mut(&mut self.ebpf, names::REALS)?;
        for (&id, (info, _)) in reals {
            if self.written.reals.get(&id) != Some(info) {
                map.set(id, info, 0).with_context(|| format!("writing real {id}"))?;
                self.written.reals.insert(id, *info);
                self.counted.insert(id);
                report.reals_written += 1;
            }
        }
        Ok(())
    }

    /// Step 1b: how the health probes of tunnelled backends are wrapped.
    fn write_probe_tunnels(&mut self, want: &Desired) -> anyhow::Result<()> {
        let mut map: Array<&mut MapData, RealTunnel> = map_mut(&mut self.ebpf, names::PROBE_TUNNELS)?;
        for (&slot, t) in &want.probe_tunnels {
            if self.written.probe_tunnels.get(&slot) != Some(t) {
                map.set(slot, t, 0).with_context(|| format!("writing probe tunnel {slot}"))?;
                self.written.probe_tunnels.insert(slot, *t);
            }
        }
        let gone: Vec<u32> = self.written.probe_tunnels.keys().copied().filter(|s| !want.probe_tunnels.contains_key(s)).collect();
        for slot in gone {
            map.set(slot, RealTunnel::default(), 0).with_context(|| format!("clearing probe tunnel {slot}"))?;
            self.written.probe_tunnels.remove(&slot);
        }
        Ok(())
    }

    /// Step 2: storm control, before a listener it limits is switched on; a listener no longer
    /// limited (or gone) drops its settings.
    fn write_conn_rates(&mut self, want: &Desired) -> anyhow::Result<()> {
        let wanted: BTreeMap<u32, ConnRateWanted> = want.listeners.iter().filter_map(|l| Some((l.id, l.conn_rate?))).collect();
        let mut map: Array<&mut MapData, ConnRate> = map_mut(&mut self.ebpf, names::CONN_RATE)?;
        for (&id, r) in &wanted {
            if self.written.conn_rates.get(&id) != Some(r) {
                let value = ConnRate { tat_ns: 0, interval_ns: r.interval_ns, tolerance_ns: r.tolerance_ns, retry_tat_ns: 0 };
                map.set(id, value, 0).with_context(|| format!("writing the storm control of listener {id}"))?;
            }
        }
        for &id in self.written.conn_rates.keys().filter(|id| !wanted.contains_key(id)) {
            map.set(id, ConnRate::default(), 0).with_context(|| format!("clearing the storm control of listener {id}"))?;
        }
        self.written.conn_rates = wanted;
        Ok(())
    }

    /// Step 3, for one listener: fill its standby ring copy, then switch to it in one store.
    /// A listener whose address or family changed is switched off first, and its flows purged.
    fn switch_listener(&mut self, l: &DesiredListener, report: &mut ApplyReport) -> anyhow::Result<()> {
        let (vip_be, vip6) = match l.vip {
            std::net::IpAddr::V4(a) => (u32::from_ne_bytes(a.octets()), None),
            std::net::IpAddr::V6(a) => {
                let a = addr6(&a);
                (lb_common::fold6(&a), Some(a))
            }
        };
        let port_be = u16::from_ne_bytes(l.port.to_be_bytes());
        let flags = if l.hash_source { LISTENER_F_HASH_SOURCE } else { 0 }
            | if l.conn_rate.is_some() { LISTENER_F_CONN_RATE } else { 0 }
            | if vip6.is_some() { LISTENER_F_IPV6 } else { 0 }
            | if l.hash_source && l.source_prefix64 { LISTENER_F_SOURCE_PREFIX64 } else { 0 };
        let current = self.written.listeners.get(&l.id).copied();
        let moved = self.written.vip6.get(&l.id) != vip6.as_ref();
        let ring: Vec<u32> = l.ring.iter().map(|&b| if b == NO_BACKEND { NO_BACKEND } else { real_id(l.id, b) }).collect();
        if let Some(info) = current {
            let same_ring = self.written.rings.get(&(l.id * RING_COPIES + u32::from(info.ring_copy))) == Some(&ring);
            if info.vip_be == vip_be && info.port_be == port_be && info.flags == flags && same_ring && !moved {
                return Ok(());
            }
        }
        let copy = current.map_or(0, |info| (u32::from(info.ring_copy) + 1) % RING_COPIES);
        report.ring_slots_written += self.write_ring(l.id, copy, ring)?;
        if current.is_some_and(|old| (old.vip_be, old.port_be) != (vip_be, port_be) || moved) {
            // A listener that moves is switched off first: no frame matches its old address
            // from here on, nor its new one with the old entry, and the flows recorded for
            // the old address are gone before a flow for the new one can be made. Its port
            // bits follow in step 5. Forgotten as written, so a failure below leaves it to
            // be written whole by the next apply.
            self.listeners.store(l.id, 0, ListenerInfo::default().to_word());
            self.written.listeners.remove(&l.id);
            report.flows_purged += self.purge_flows(l.id);
        }
        if moved {
            // The IPv6 address before the entry that points frames at it. A listener that
            // was IPv6 and is no longer keeps a stale address here: its flags say IPv4.
            if let Some(a) = &vip6 {
                let mut map: Array<&mut MapData, Ip6> = map_mut(&mut self.ebpf, names::LISTENER_VIP6)?;
                map.set(l.id, Ip6::from_words(*a), 0).with_context(|| format!("writing the IPv6 VIP of listener {}", l.id))?;
                self.written.vip6.insert(l.id, *a);
            } else {
                self.written.vip6.remove(&l.id);
            }
        }
        #[expect(clippy::cast_possible_truncation, reason = "copy < RING_COPIES")]
        let info = ListenerInfo { vip_be, port_be, flags, ring_copy: copy as u8 };
        self.listeners.store(l.id, 0, info.to_word());
        self.written.listeners.insert(l.id, info);
        report.listeners_switched += 1;
        Ok(())
    }

    /// Writes `ring` (real ids) to copy `copy` of listener `id`'s ring, entry by entry where it
    /// differs from what that copy held; returns the slots that changed.
    fn write_ring(&mut self, id: u32, copy: u32, ring: Vec<u32>) -> anyhow::Result<usize> {
        let copy_no = id * RING_COPIES + copy;
        let base = ring_base(id, copy, self.ring_size);
        let size = self.ring_size as usize;
        let old = self.written.rings.entry(copy_no).or_insert_with(|| vec![0; size]).clone();
        let changed = ring.iter().zip(&old).filter(|(new, was)| new != was).count();
        let (new_entries, old_entries) = (pack_ring(&ring), pack_ring(&old));
        let mut rings: Array<&mut MapData, RingEntry> = map_mut(&mut self.ebpf, names::RINGS)?;
        for (e, (new, was)) in (0..).zip(new_entries.iter().zip(&old_entries)) {
            if new != was {
                rings.set(base + e, new, 0).with_context(|| format!("writing ring entry {e} of listener {id}"))?;
            }
        }
        self.written.rings.insert(copy_no, ring);
        Ok(changed)
    }

    /// Step 4: listeners no longer wanted, and the flows that recorded them.
    fn remove_listeners(&mut self, want: &Desired, report: &mut ApplyReport) {
        let gone: Vec<u32> = self.written.listeners.keys().copied().filter(|id| want.listeners.iter().all(|l| l.id != *id)).collect();
        for id in gone {
            self.listeners.store(id, 0, ListenerInfo::default().to_word());
            self.written.listeners.remove(&id);
            self.written.vip6.remove(&id);
            report.flows_purged += self.purge_flows(id);
        }
    }

    /// Step 5: listener ports, tagged with the flow cache generation, and VIPs (for fragments).
    fn write_vips(&mut self) -> anyhow::Result<()> {
        self.write_ports();
        let mut vips: BTreeMap<u32, u32> = BTreeMap::new();
        let mut vips6: BTreeMap<Addr6, u32> = BTreeMap::new();
        for (id, info) in &self.written.listeners {
            match self.written.vip6.get(id) {
                Some(a) if info.flags & LISTENER_F_IPV6 != 0 => *vips6.entry(*a).or_default() += 1,
                _ => *vips.entry(info.vip_be).or_default() += 1,
            }
        }
        {
            let mut map: HashMap<&mut MapData, u32, VipInfo> = map_mut(&mut self.ebpf, names::VIPS)?;
            for (&vip, &n) in &vips {
                if self.written.vips.get(&vip) != Some(&n) {
                    map.insert(vip, VipInfo { listeners: n }, 0).context("writing a VIP")?;
                }
            }
            for vip in self.written.vips.keys().filter(|v| !vips.contains_key(v)) {
                map.remove(vip).context("removing a VIP")?;
            }
        }
        self.written.vips = vips;
        {
            let mut map: HashMap<&mut MapData, Ip6, VipInfo> = map_mut(&mut self.ebpf, names::VIPS6)?;
            for (vip, &n) in &vips6 {
                if self.written.vips6.get(vip) != Some(&n) {
                    map.insert(Ip6::from_words(*vip), VipInfo { listeners: n }, 0).context("writing an IPv6 VIP")?;
                }
            }
            for vip in self.written.vips6.keys().filter(|v| !vips6.contains_key(*v)) {
                map.remove(&Ip6::from_words(*vip)).context("removing an IPv6 VIP")?;
            }
        }
        self.written.vips6 = vips6;
        Ok(())
    }

    /// Step 6: reals no longer wanted, made inactive, so flows still pinned to them are
    /// re-picked.
    fn retire_reals(&mut self, reals: &BTreeMap<u32, (RealInfo, RealTunnel)>, report: &mut ApplyReport) -> anyhow::Result<()> {
        let gone: Vec<u32> = self.written.reals.keys().copied().filter(|id| !reals.contains_key(id)).collect();
        if gone.is_empty() {
            return Ok(());
        }
        let mut map: Array<&mut MapData, RealInfo> = map_mut(&mut self.ebpf, names::REALS)?;
        for id in gone {
            map.set(id, RealInfo { dst_mac: [0; 6], src_mac: [0; 6], flags: 0 }, 0).with_context(|| format!("clearing real {id}"))?;
            self.written.reals.remove(&id);
            report.reals_written += 1;
        }
        Ok(())
    }

    /// Step 8: the tunnels of reals no longer tunnelled (or gone), once no `REALS` entry and no
    /// flow cache entry (invalidated in step 7) names them.
    fn clear_stale_tunnels(&mut self, reals: &BTreeMap<u32, (RealInfo, RealTunnel)>) -> anyhow::Result<()> {
        let stale: Vec<u32> =
            self.written.tunnels.keys().copied().filter(|id| reals.get(id).is_none_or(|(i, _)| i.flags & REAL_F_TUNNEL == 0)).collect();
        if stale.is_empty() {
            return Ok(());
        }
        let mut tunnels: Array<&mut MapData, RealTunnel> = map_mut(&mut self.ebpf, names::REAL_TUNNELS)?;
        for id in stale {
            tunnels.set(id, RealTunnel::default(), 0).with_context(|| format!("clearing the tunnel of real {id}"))?;
            self.written.tunnels.remove(&id);
        }
        Ok(())
    }

    /// Step 7, when a real changed or flows were purged: every CPU's flow cache is stale, and a
    /// new generation invalidates it at once. Written after the reals and the purges, so an
    /// entry filled before sees the old tag.
    fn invalidate_flow_caches(&mut self) {
        self.generation = self.generation.wrapping_add(1) & !FLOW_CACHE_VALID;
        self.write_ports();
    }

    /// Zeroes the per-CPU counters of `reals` and of `listeners`.
    fn zero_counters(&mut self, reals: &[u32], listeners: &BTreeSet<u32>) -> anyhow::Result<()> {
        use aya::maps::PerCpuValues;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        {
            let mut map: PerCpuArray<&mut MapData, Counters> = map_mut(&mut self.ebpf, names::REAL_STATS)?;
            for &r in reals.iter().filter(|r| self.counted.contains(r)) {
                let zero = PerCpuValues::try_from(vec![Counters::default(); cpus])?;
                map.set(r, zero, 0).with_context(|| format!("zeroing the counters of real {r}"))?;
            }
        }
        for r in reals {
            self.counted.remove(r);
        }
        let mut map: PerCpuArray<&mut MapData, ListenerCounters> = map_mut(&mut self.ebpf, names::LISTENER_STATS)?;
        for &l in listeners {
            let zero = PerCpuValues::try_from(vec![ListenerCounters::default(); cpus])?;
            map.set(l, zero, 0).with_context(|| format!("zeroing the counters of listener {l}"))?;
        }
        Ok(())
    }

    /// `NODE` as it is.
    pub(super) fn read_node(&self) -> NodeInfo {
        let (ns_per_jiffy, idle_expire) = lb_common::flow_meta_split(self.node.load(0, 0));
        let mut node = NodeInfo { ns_per_jiffy, idle_expire, ..NodeInfo::default() };
        for (i, word) in node.macs.iter_mut().enumerate() {
            *word = self.node.load(0, 1 + i);
        }
        node
    }

    /// Writes `NODE` word by word: a frame sees each MAC whole, old or new.
    fn write_node(&mut self, node: &NodeInfo) {
        self.node.store(0, 0, node.head());
        for (i, &word) in node.macs.iter().enumerate() {
            self.node.store(0, 1 + i, word);
        }
        self.written.node = Some(*node);
    }

    /// Makes `LISTEN_PORTS` say, for every port a listener uses, which listeners use it, with
    /// the current flow cache tag (`FLOW_CACHE_VALID | generation`) that `FLOW_CACHE` entries
    /// must carry to be used; every other slot is zero.
    fn write_ports(&mut self) {
        let tag = FLOW_CACHE_VALID | self.generation;
        let mut want: BTreeMap<u32, PortInfo> = BTreeMap::new();
        for (&id, info) in &self.written.listeners {
            want.entry(u32::from(info.port_be)).or_insert(PortInfo { tag, listeners: 0 }).listeners |= 1 << id;
        }
        for (&slot, &port) in &want {
            if self.written.ports.get(&slot) != Some(&port) {
                self.ports.store(slot, 0, port.to_word());
            }
        }
        for &slot in self.written.ports.keys().filter(|p| !want.contains_key(p)) {
            self.ports.store(slot, 0, PortInfo::default().to_word());
        }
        self.written.ports = want;
    }

    /// Deletes the flows of listener `id`, which moved or is gone: established flows skip the
    /// listener lookup, so they would otherwise keep being forwarded.
    fn purge_flows(&self, id: u32) -> usize {
        self.flows.remove_where(|f| real_listener(f.real()) == id)
    }
}

/// A ring (real ids, `NO_BACKEND` for none) as `RINGS` entries, four slots each.
fn pack_ring(ring: &[u32]) -> Vec<RingEntry> {
    ring.chunks(RING_SLOTS_PER_ENTRY as usize)
        .map(|chunk| {
            let mut entry = [RING_NONE; RING_SLOTS_PER_ENTRY as usize];
            for (lane, &id) in entry.iter_mut().zip(chunk) {
                *lane = u16::try_from(id).unwrap_or(RING_NONE);
            }
            entry
        })
        .collect()
}

/// The ring of `ring_size` slots that `RINGS` entries hold.
pub(super) fn unpack_ring(entries: &[RingEntry], ring_size: u32) -> Vec<u32> {
    entries.iter().flatten().take(ring_size as usize).map(|&id| if id == RING_NONE { NO_BACKEND } else { u32::from(id) }).collect()
}
