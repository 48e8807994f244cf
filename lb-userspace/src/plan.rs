//! From config (and health state) to the [`Desired`] content of the maps: stable ids, Maglev
//! rings per listener.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, bail};
use lb_common::{MAX_BACKENDS, MAX_LISTENERS, NO_BACKEND, age_units};

use crate::{
    config::{Config, HashMode},
    dataplane::{ConnRateWanted, Desired, DesiredListener, DesiredReal},
    maglev,
};

/// Name to id, for listeners and backends. Ids index counters and ring copies, and flow entries
/// hold backend ids, so a name keeps its id for as long as it exists.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ids {
    pub listeners: BTreeMap<String, u32>,
    pub backends: BTreeMap<String, u32>,
}

fn assign<'a>(ids: &mut BTreeMap<String, u32>, names: impl Iterator<Item = &'a str>, max: u32) -> anyhow::Result<()> {
    let wanted: BTreeSet<&str> = names.collect();
    ids.retain(|name, _| wanted.contains(name.as_str()));
    for name in wanted {
        if ids.contains_key(name) {
            continue;
        }
        let used: BTreeSet<u32> = ids.values().copied().collect();
        let Some(free) = (0..max).find(|i| !used.contains(i)) else {
            bail!("no free id left for {name} (at most {max})");
        };
        ids.insert(name.to_owned(), free);
    }
    Ok(())
}

impl Ids {
    /// Keeps the ids of names still in `config`, gives new names the lowest free ids, forgets
    /// the rest.
    ///
    /// # Errors
    /// When more names exist than ids (the config validator prevents that).
    pub fn update(&mut self, config: &Config) -> anyhow::Result<()> {
        assign(&mut self.listeners, config.listeners.iter().map(|l| l.name.as_str()), MAX_LISTENERS)?;
        assign(&mut self.backends, config.backends.iter().map(|b| b.name.as_str()), MAX_BACKENDS)?;
        Ok(())
    }
}

/// Per-backend facts that are not in the config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendRuntime {
    pub mac: [u8; 6],
    /// Drained from the CLI: out of every ring, its flows stay.
    pub drained: bool,
}

/// (listener name, backend name) pairs whose checks failed: out of that listener's ring, and
/// flows pinned to them move.
pub type DownSet = BTreeSet<(String, String)>;

/// Builds the desired map content. `runtime` must hold every backend of `config`; `src_mac` is
/// the balancer interface's MAC.
///
/// # Errors
/// When a backend has no runtime facts or an id is missing.
pub fn desired(
    config: &Config,
    ids: &Ids,
    runtime: &BTreeMap<String, BackendRuntime>,
    down: &DownSet,
    src_mac: [u8; 6],
) -> anyhow::Result<Desired> {
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        let id = *ids.listeners.get(&l.name).with_context(|| format!("listener {}: no id", l.name))?;
        let mut members: Vec<(&str, u32)> = Vec::with_capacity(l.backends.len());
        let mut reals = Vec::with_capacity(l.backends.len());
        for name in &l.backends {
            let b = config.backend(name).with_context(|| format!("listener {}: no backend {name}", l.name))?;
            let rt = runtime.get(name).with_context(|| format!("backend {name}: MAC not resolved"))?;
            let backend = *ids.backends.get(name).with_context(|| format!("backend {name}: no id"))?;
            let is_down = down.contains(&(l.name.clone(), name.clone()));
            let weight = if is_down || rt.drained { 0 } else { b.weight };
            members.push((name.as_str(), weight));
            reals.push(DesiredReal { backend, dst_mac: rt.mac, down: is_down });
        }
        let table = maglev::build(&members, config.ring_size);
        let ring =
            table.into_iter().map(|slot| if slot == maglev::EMPTY { NO_BACKEND } else { ids.backends[members[slot as usize].0] }).collect();
        let conn_rate = l.conn_rate.map(|c| {
            let interval_ns = 1_000_000_000 / u64::from(c.rate);
            ConnRateWanted { interval_ns, tolerance_ns: interval_ns * u64::from(c.burst - 1) }
        });
        listeners.push(DesiredListener {
            id,
            vip: l.vip,
            port: l.port,
            hash_source: l.hash == HashMode::Source,
            ring,
            reals,
            conn_rate,
            idle_expire: expire_units(l.flow_idle_timeout),
        });
    }
    Ok(Desired { listeners, src_mac, accept_macs: config.accept_macs.clone() })
}

/// The idle age units from which a flow is over after `timeout`: an age only says which unit
/// of the clock a frame came in, so one more than the timeout's units guarantees the whole
/// timeout passed.
#[must_use]
pub fn expire_units(timeout: std::time::Duration) -> u32 {
    age_units(timeout.as_secs().max(1)) + 1
}
