//! From config (and health state) to the [`Desired`] content of the maps: stable ids, Maglev
//! rings per listener.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{Context as _, bail};
use lb_common::{Ip6, MAX_BACKENDS, MAX_LISTENERS, NO_BACKEND, RealTunnel, age_units, tunnel_overhead};

use crate::{
    config::{AllDown, Backend, Config, Forward, HashMode},
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

/// Keeps the ids of `names` that have one, forgets the rest, and gives the new names the
/// lowest ids free. An id freed by this same call is given out only when no other is free (its
/// flows are deleted before it is used again either way: see [`Fresh`]). Returns the ids given.
fn assign<'a>(ids: &mut BTreeMap<String, u32>, names: impl Iterator<Item = &'a str>, max: u32) -> anyhow::Result<BTreeSet<u32>> {
    let wanted: BTreeSet<&str> = names.collect();
    let freed: BTreeSet<u32> = ids.iter().filter(|(name, _)| !wanted.contains(name.as_str())).map(|(_, &id)| id).collect();
    ids.retain(|name, _| wanted.contains(name.as_str()));
    let mut given = BTreeSet::new();
    for name in wanted {
        if ids.contains_key(name) {
            continue;
        }
        let used: BTreeSet<u32> = ids.values().copied().collect();
        let free = |avoid: &BTreeSet<u32>| (0..max).find(|i| !used.contains(i) && !avoid.contains(i));
        let Some(id) = free(&freed).or_else(|| free(&BTreeSet::new())) else {
            bail!("no free id left for {name} (at most {max})");
        };
        ids.insert(name.to_owned(), id);
        given.insert(id);
    }
    Ok(given)
}

/// Ids an [`Ids::update`] gave to names that had none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fresh {
    pub listeners: BTreeSet<u32>,
    pub backends: BTreeSet<u32>,
}

impl Ids {
    /// Keeps the ids of names still in `config`, gives new names the lowest free ids, forgets
    /// the rest; returns the ids given.
    ///
    /// # Errors
    /// When more names exist than ids (the config validator prevents that).
    pub fn update(&mut self, config: &Config) -> anyhow::Result<Fresh> {
        Ok(Fresh {
            listeners: assign(&mut self.listeners, config.listeners.iter().map(|l| l.name.as_str()), MAX_LISTENERS)?,
            backends: assign(&mut self.backends, config.backends.iter().map(|b| b.name.as_str()), MAX_BACKENDS)?,
        })
    }
}

/// Per-backend facts that are not in the config file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendRuntime {
    /// `None` until resolved (a broker powered off when the controller started): out of every
    /// ring until it answers. A tunnelled backend's is its route's next hop's.
    pub mac: Option<[u8; 6]>,
    /// A dual-stack tunnelled backend's IPv6 next hop's MAC (its IPv6 route may leave through
    /// another router); `None` for every other backend, or until resolved.
    pub mac6: Option<[u8; 6]>,
    /// Drained from the CLI: out of every ring, its flows stay.
    pub drained: bool,
}

/// How a (listener, backend) pair whose checks failed is treated: out of that listener's ring
/// (no new flows); with `reset`, the flows pinned to it are re-picked too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Out {
    pub reset: bool,
}

/// A backend of a listener as the plan weighs it.
struct Candidate<'a> {
    name: &'a str,
    backend: u32,
    /// Its weight, 0 when drained.
    weight: u32,
    mac: [u8; 6],
    out: Option<Out>,
    tunnel: Option<RealTunnel>,
}

/// (listener name, backend name) pairs whose checks failed, and how each is treated.
pub type DownSet = BTreeMap<(String, String), Out>;

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
        // Backends that can take flows at all: resolved, not drained, a weight above zero.
        let mut candidates: Vec<Candidate> = Vec::with_capacity(l.backends.len());
        for name in &l.backends {
            let b = config.backend(name).with_context(|| format!("listener {}: no backend {name}", l.name))?;
            let rt = runtime.get(name).with_context(|| format!("backend {name}: no runtime facts"))?;
            let backend = *ids.backends.get(name).with_context(|| format!("backend {name}: no id"))?;
            // A dual-stack tunnelled backend reaches IPv6 listeners' clients' packets through its
            // IPv6 route.
            let mac = if l.vip.is_ipv6() && b.forward != Forward::L2 && b.address.is_some() { rt.mac6 } else { rt.mac };
            let Some(mac) = mac else { continue };
            let weight = if rt.drained { 0 } else { b.weight };
            let tunnel = real_tunnel(config, l.vip, b)?;
            candidates.push(Candidate { name, backend, weight, mac, out: down.get(&(l.name.clone(), name.clone())).copied(), tunnel });
        }
        // Fail open: every backend that could serve is marked down. With `all_down = "forward"`
        // the checks are as likely to be what failed (a probe route, a firewall): spread new
        // flows over all of them, and reset nothing.
        let fail_open = l.failure.all_down == AllDown::Forward
            && candidates.iter().any(|c| c.weight > 0)
            && candidates.iter().filter(|c| c.weight > 0).all(|c| c.out.is_some());
        let mut members: Vec<(&str, u32)> = Vec::with_capacity(candidates.len());
        let mut reals = Vec::with_capacity(candidates.len());
        for c in &candidates {
            let out = if fail_open { None } else { c.out };
            members.push((c.name, if out.is_some() { 0 } else { c.weight }));
            reals.push(DesiredReal { backend: c.backend, dst_mac: c.mac, down: out.is_some_and(|o| o.reset), tunnel: c.tunnel });
        }
        let table = maglev::build(&members, config.ring_size, config.ring_seed.as_ref());
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
            source_prefix64: l.source_prefix64,
            ring,
            reals,
            conn_rate,
            idle_expire: expire_units(l.flow_idle_timeout),
            fail_open,
        });
    }
    let listener_names = config.listeners.iter().filter_map(|l| Some((*ids.listeners.get(&l.name)?, l.name.clone()))).collect();
    let mut probe_tunnels = BTreeMap::new();
    for b in config.backends.iter().filter(|b| b.forward != Forward::L2) {
        let Some(&id) = ids.backends.get(&b.name) else { continue };
        for any in [IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)] {
            // A family without an address or a tunnel source has no listener either (the plan
            // of the listeners above refuses that).
            if let Ok(Some(t)) = real_tunnel(config, any, b) {
                probe_tunnels.insert(lb_common::probe_tunnel_slot(id, any.is_ipv6()), t);
            }
        }
    }
    Ok(Desired { listeners, listener_names, src_mac, accept_macs: config.accept_macs.clone(), probe_tunnels, ..Desired::default() })
}

/// Where backend `b`'s frames for a listener at `vip` go when it is tunnelled: the outer header
/// has the listener's family. `None` for `forward = "l2"`.
///
/// # Errors
/// When the tunnel source or MTU of that family is unknown (the controller fills them from the
/// interface; an interface without an address of the family leaves them unset).
pub fn real_tunnel(config: &Config, vip: IpAddr, b: &Backend) -> anyhow::Result<Option<RealTunnel>> {
    if b.forward == Forward::L2 {
        return Ok(None);
    }
    let t = &config.tunnel;
    let dst = b.address_for(vip).with_context(|| format!("backend {}: no address of {vip}'s family", b.name))?;
    let src: IpAddr = match vip {
        IpAddr::V4(_) => t.source.with_context(|| {
            format!("backend {} is tunnelled (forward = {:?}) but there is no tunnel_source (the interface has no IPv4 address): set one", b.name, b.forward.name())
        })?.into(),
        IpAddr::V6(_) => t.source6.with_context(|| {
            format!("backend {} is tunnelled (forward = {:?}) but there is no tunnel_source6 (the interface has no global IPv6 address): set one", b.name, b.forward.name())
        })?.into(),
    };
    let mtu = t.mtu.with_context(|| format!("backend {}: the tunnel MTU is unknown: set tunnel_mtu", b.name))?;
    let max_inner = mtu.saturating_sub(tunnel_overhead(b.forward.mode(), vip.is_ipv6()));
    Ok(Some(RealTunnel {
        dst: ip6_of(dst),
        src: ip6_of(src),
        mode: b.forward.mode(),
        pad: 0,
        max_inner: u16::try_from(max_inner).unwrap_or(u16::MAX),
        gue_port_be: t.gue_port.to_be(),
        pad2: 0,
    }))
}

/// An address as `RealTunnel` holds it: IPv6 as it is, IPv4 mapped.
#[must_use]
pub fn ip6_of(a: IpAddr) -> Ip6 {
    let v6 = match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    Ip6 { octets: v6.octets() }
}

/// The idle age units from which a flow is over after `timeout`: an age only says which unit
/// of the clock a frame came in, so one more than the timeout's units guarantees the whole
/// timeout passed.
#[must_use]
pub fn expire_units(timeout: std::time::Duration) -> u32 {
    age_units(timeout.as_secs().max(1)) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ring the data plane gets and the nominal ring the cluster walk compares flows with
    /// are built with the same seed: with every backend up they are the same ring, and not the
    /// unseeded one.
    #[test]
    fn the_planned_and_the_nominal_ring_share_the_seed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("dsrlb-plan-seed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let seed = dir.join("ring.seed");
        std::fs::write(&seed, "0123456789abcdef0123456789abcdef").expect("write");
        std::fs::set_permissions(&seed, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let text = |seeded: bool| {
            let seed_line = if seeded { format!("ring_seed_file = {seed:?}\n") } else { String::new() };
            format!(
                "interface = \"eth0\"\nring_size = 1009\n{seed_line}[[listener]]\nname = \"mqtt\"\nvip = \"192.0.2.100\"\nport = 1883\n\
                 [[backend]]\nname = \"b1\"\naddress = \"192.0.2.11\"\n[[backend]]\nname = \"b2\"\naddress = \"192.0.2.12\"\n\
                 [[backend]]\nname = \"b3\"\naddress = \"192.0.2.13\"\n"
            )
        };
        let ring_of = |config: &Config| {
            let mut ids = Ids::default();
            ids.update(config).expect("ids");
            let runtime = config
                .backends
                .iter()
                .map(|b| (b.name.clone(), BackendRuntime { mac: Some([2, 0, 0, 0, 0, 1]), ..BackendRuntime::default() }))
                .collect();
            let desired = desired(config, &ids, &runtime, &DownSet::new(), [2, 0, 0, 0, 0, 9]).expect("plan");
            let view = crate::exceptions::RingView::new(&desired, &ids, config.ring_size).with_nominal(config, &ids);
            let l = &view.listeners[&ids.listeners["mqtt"]];
            ((*l.ring).clone(), (*l.nominal).clone())
        };
        let seeded = crate::config::parse(&text(true), "t.toml").expect("valid");
        let (ring, nominal) = ring_of(&seeded);
        assert_eq!(ring, nominal, "the nominal ring is not built with the seed");
        let (unseeded, unseeded_nominal) = ring_of(&crate::config::parse(&text(false), "t.toml").expect("valid"));
        assert_eq!(unseeded, unseeded_nominal);
        assert_ne!(ring, unseeded, "the seed changed nothing");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
