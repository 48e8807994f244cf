//! Counters, summed over CPUs.

use std::collections::BTreeMap;

use aya::maps::{MapData, PerCpuArray};
use lb_common::{Counters, ListenerCounters, map_names as names, real_backend, real_listener, reason, table_event};

use super::Dataplane;

/// Counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub verdicts: Vec<u64>,
    /// Per real id.
    pub reals: BTreeMap<u32, Counters>,
    /// Per listener id (listeners in use).
    pub listeners: BTreeMap<u32, ListenerCounters>,
    /// Flow table inserts, by `lb_common::table_event`.
    pub table: Vec<u64>,
}

fn add(total: &mut Counters, c: &Counters) {
    total.packets += c.packets;
    total.bytes += c.bytes;
    total.new_flows += c.new_flows;
}

impl Stats {
    #[must_use]
    pub fn verdict(&self, reason: u32) -> u64 {
        self.verdicts.get(reason as usize).copied().unwrap_or(0)
    }

    /// Summed over a listener's reals.
    #[must_use]
    pub fn listener(&self, id: u32) -> Counters {
        let mut t = Counters::default();
        self.reals.iter().filter(|(r, _)| real_listener(**r) == id).for_each(|(_, c)| add(&mut t, c));
        t
    }

    /// Summed over a backend's reals (all its listeners).
    #[must_use]
    pub fn backend(&self, id: u32) -> Counters {
        let mut t = Counters::default();
        self.reals.iter().filter(|(r, _)| real_backend(**r) == id).for_each(|(_, c)| add(&mut t, c));
        t
    }

    /// Flow table inserts that did `event` (`lb_common::table_event`).
    #[must_use]
    pub fn table_event(&self, event: u32) -> u64 {
        self.table.get(event as usize).copied().unwrap_or(0)
    }

    /// Summed over everything forwarded.
    #[must_use]
    pub fn total(&self) -> Counters {
        let mut t = Counters::default();
        self.reals.values().for_each(|c| add(&mut t, c));
        t
    }
}

impl Dataplane {
    /// Reads every counter, summed over CPUs.
    ///
    /// # Errors
    /// When a map read fails.
    pub fn stats(&self) -> anyhow::Result<Stats> {
        let verdict_map: PerCpuArray<&MapData, u64> = self.map_ref(names::VERDICT_STATS)?;
        let mut verdicts = Vec::with_capacity(reason::COUNT as usize);
        for r in 0..reason::COUNT {
            verdicts.push(verdict_map.get(&r, 0)?.iter().sum());
        }
        let map: PerCpuArray<&MapData, Counters> = self.map_ref(names::REAL_STATS)?;
        let mut reals = BTreeMap::new();
        let mut forwarded = 0;
        for &id in &self.counted {
            let mut total = Counters::default();
            for c in map.get(&id, 0)?.iter() {
                add(&mut total, c);
            }
            forwarded += total.packets;
            if self.written.reals.contains_key(&id) {
                reals.insert(id, total);
            }
        }
        // The program counts a forwarded frame once, against its real; the `tx` verdict is
        // their sum (reals removed since included).
        verdicts[reason::TX as usize] = forwarded;
        let per_listener: PerCpuArray<&MapData, ListenerCounters> = self.map_ref(names::LISTENER_STATS)?;
        let mut listeners = BTreeMap::new();
        for &id in self.written.listeners.keys() {
            let mut total = ListenerCounters::default();
            for c in per_listener.get(&id, 0)?.iter() {
                total.conn_rate_dropped += c.conn_rate_dropped;
                total.icmp_too_big += c.icmp_too_big;
            }
            listeners.insert(id, total);
        }
        let table_map: PerCpuArray<&MapData, u64> = self.map_ref(names::TABLE_STATS)?;
        // Maps adopted from layout version 3 count fewer events (the pinned map keeps its size
        // until `dsrlb stop`): the newer ones read 0 there.
        let have = aya::maps::IterableMap::map(&table_map).info()?.max_entries();
        let mut table = Vec::with_capacity(table_event::COUNT as usize);
        for e in 0..table_event::COUNT {
            table.push(if e < have { table_map.get(&e, 0)?.iter().sum() } else { 0 });
        }
        Ok(Stats { verdicts, reals, listeners, table })
    }
}
