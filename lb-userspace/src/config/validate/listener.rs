//! `[[listener]]`: VIPs, ports, hashing, backends, and each listener's failure policy, storm
//! control and idle timeout.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use lb_common::MAX_LISTENERS;
use toml::Spanned;

use super::{Places, Validator, host_address};
use crate::config::{
    AllDown, Backend, ConfigError, ConnRateLimit, FailurePolicy, HashMode, Health, Listener, MAX_CONN_RATE, OnDown, parse_duration_within,
    raw::{RawHealth, RawListener},
};

impl Validator<'_> {
    pub(super) fn listeners(
        &self,
        raw: Vec<Spanned<RawListener>>,
        (backends, places): (&[Backend], &Places),
        defaults: &Health,
        backend_health: &BTreeMap<String, Spanned<RawHealth>>,
        flow_idle_timeout: Duration,
        failure: FailurePolicy,
    ) -> Result<Vec<Listener>, ConfigError> {
        if raw.is_empty() {
            return Err(self.err(&(0..0), "listener", "at least one [[listener]] is needed"));
        }
        if raw.len() > MAX_LISTENERS as usize {
            return Err(self.err(&raw[MAX_LISTENERS as usize].span(), "listener", format!("at most {MAX_LISTENERS} listeners")));
        }
        let mut out = Vec::with_capacity(raw.len());
        let mut names = BTreeSet::new();
        let mut endpoints = BTreeMap::new();
        for (i, l) in raw.into_iter().enumerate() {
            let l = l.into_inner();
            let f = |name: &str| format!("listener[{i}].{name}");
            let name = self.name(&l.name, &f("name"))?;
            if !names.insert(name.clone()) {
                return Err(self.err(&l.name.span(), f("name"), format!("duplicate listener name {name:?}")));
            }
            let vip = self.vip(&l.vip, &f("vip"))?;
            let source_prefix64 = self.source_prefix(&l, i, vip)?;
            let port = *l.port.get_ref();
            if port == 0 {
                return Err(self.err(&l.port.span(), f("port"), "must be between 1 and 65535"));
            }
            if let Some(other) = endpoints.insert((vip, port), name.clone()) {
                let at = std::net::SocketAddr::new(vip, port);
                return Err(self.err(&l.port.span(), f("port"), format!("{at} is already listener {other:?}")));
            }
            let members: Vec<String> = match &l.backends {
                None => backends.iter().map(|b| b.name.clone()).collect(),
                Some(list) => {
                    let mut set = BTreeSet::new();
                    for (j, b) in list.get_ref().iter().enumerate() {
                        if !backends.iter().any(|x| &x.name == b.get_ref()) {
                            return Err(self.err(
                                &b.span(),
                                format!("listener[{i}].backends[{j}]"),
                                format!("no [[backend]] is named {:?}", b.get_ref()),
                            ));
                        }
                        if !set.insert(b.get_ref().clone()) {
                            return Err(self.err(
                                &b.span(),
                                format!("listener[{i}].backends[{j}]"),
                                format!("{:?} is listed twice", b.get_ref()),
                            ));
                        }
                    }
                    set.into_iter().collect()
                }
            };
            if members.is_empty() {
                let span = l.backends.as_ref().map_or_else(|| l.name.span(), Spanned::span);
                return Err(self.err(&span, f("backends"), "a listener needs at least one backend (a [[backend]] to name)"));
            }
            self.families(&l, i, vip, &members, (backends, places))?;
            if let Some(b) = backends.iter().find(|b| b.address.map(IpAddr::V4) == Some(vip) || b.address6.map(IpAddr::V6) == Some(vip)) {
                return Err(self.err(
                    &l.vip.span(),
                    f("vip"),
                    format!("{vip} is backend {:?}'s own address: a VIP is an address the brokers hold on lo, not a real one", b.name),
                ));
            }
            let base = match &l.health {
                None => defaults.clone(),
                Some(h) => self.health(defaults, h, &f("health"))?,
            };
            let mut health = BTreeMap::new();
            for m in &members {
                let h = match backend_health.get(m.as_str()) {
                    None => base.clone(),
                    Some(h) => {
                        let index = places.get(m.as_str()).map(|p| p.0).expect("member is a backend");
                        self.health(&base, h, &format!("backend[{index}].health (for listener {name})"))?
                    }
                };
                health.insert(m.clone(), h);
            }
            let flow_idle_timeout = match &l.flow_idle_timeout {
                None => flow_idle_timeout,
                Some(s) => self.idle_timeout(s, &f("flow_idle_timeout"))?,
            };
            let conn_rate = self.conn_rate(l.max_conn_rate.as_ref(), l.max_conn_burst.as_ref(), &f)?;
            let failure = self.failure(&failure, l.on_down, l.on_down_grace.as_ref(), l.all_down, &format!("listener[{i}]."))?;
            out.push(Listener {
                name,
                vip,
                port,
                hash: l.hash,
                source_prefix64,
                flow_idle_timeout,
                conn_rate,
                failure,
                backends: members,
                health,
            });
        }
        Ok(out)
    }

    /// A listener's `vip`: an address of either family that can be one.
    fn vip(&self, raw: &Spanned<String>, field: &str) -> Result<IpAddr, ConfigError> {
        let vip: IpAddr = raw
            .get_ref()
            .parse()
            .map_err(|_| self.err(&raw.span(), field, format!("{:?} is not an IPv4 or IPv6 address", raw.get_ref())))?;
        if !host_address(vip) {
            return Err(self.err(&raw.span(), field, format!("{vip} cannot be a VIP")));
        }
        Ok(vip)
    }

    /// `source_prefix`: 64 (true) or 128, only for an IPv6 VIP with `hash = "source"`.
    fn source_prefix(&self, listener: &RawListener, index: usize, vip: IpAddr) -> Result<bool, ConfigError> {
        let f = |name: &str| format!("listener[{index}].{name}");
        Ok(match &listener.source_prefix {
            None => false,
            Some(p) if !vip.is_ipv6() || listener.hash != HashMode::Source => {
                return Err(self.err(&p.span(), f("source_prefix"), "only for an IPv6 VIP with hash = \"source\""));
            }
            Some(p) => match *p.get_ref() {
                64 => true,
                128 => false,
                n => return Err(self.err(&p.span(), f("source_prefix"), format!("{n}: must be 64 or 128"))),
            },
        })
    }

    /// Every member of listener `i` has an address of its VIP's family.
    fn families(
        &self,
        l: &RawListener,
        i: usize,
        vip: IpAddr,
        members: &[String],
        (backends, places): (&[Backend], &Places),
    ) -> Result<(), ConfigError> {
        let f = |name: &str| format!("listener[{i}].{name}");
        for (j, m) in members.iter().enumerate() {
            let b = backends.iter().find(|b| &b.name == m).expect("member is a backend");
            if b.address_for(vip).is_none() {
                let span = l.backends.as_ref().map_or_else(|| l.vip.span(), |list| list.get_ref()[j].span());
                let (family, field) = if vip.is_ipv6() { ("IPv6", "address6") } else { ("IPv4", "address") };
                let (index, at) = places[&b.name];
                return Err(self.err(
                    &span,
                    f("backends"),
                    format!(
                        "backend {:?} has no {family} address for VIP {vip}: give it one (backend[{index}].{field}, line {}), or \
                         list this listener's backends without it",
                        b.name,
                        self.line(at)
                    ),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn failure(
        &self,
        base: &FailurePolicy,
        on_down: Option<OnDown>,
        grace: Option<&Spanned<String>>,
        all_down: Option<AllDown>,
        prefix: &str,
    ) -> Result<FailurePolicy, ConfigError> {
        let mut p = *base;
        if let Some(o) = on_down {
            p.on_down = o;
        }
        if let Some(a) = all_down {
            p.all_down = a;
        }
        if let Some(g) = grace {
            p.on_down_grace = parse_duration_within(g.get_ref(), Duration::ZERO, Duration::from_hours(1))
                .map_err(|m| self.err(&g.span(), format!("{prefix}on_down_grace"), m))?;
        }
        Ok(p)
    }

    fn conn_rate(
        &self,
        rate: Option<&Spanned<u32>>,
        burst: Option<&Spanned<u32>>,
        f: &dyn Fn(&str) -> String,
    ) -> Result<Option<ConnRateLimit>, ConfigError> {
        let Some(rate) = rate else {
            return match burst {
                Some(b) => Err(self.err(&b.span(), f("max_conn_burst"), "needs max_conn_rate")),
                None => Ok(None),
            };
        };
        let r = *rate.get_ref();
        if !(1..=MAX_CONN_RATE).contains(&r) {
            return Err(self.err(
                &rate.span(),
                f("max_conn_rate"),
                format!("must be between 1 and {MAX_CONN_RATE} new connections per second"),
            ));
        }
        let b = match burst {
            None => (r / 10).max(1),
            Some(b) if (1..=r.max(1)).contains(b.get_ref()) => *b.get_ref(),
            Some(b) => return Err(self.err(&b.span(), f("max_conn_burst"), format!("must be between 1 and max_conn_rate ({r})"))),
        };
        Ok(Some(ConnRateLimit { rate: r, burst: b }))
    }
}
