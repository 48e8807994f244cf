//! Validation: the file as written to the config as used, each error naming the file, line and
//! field. The top level here, one file per section below.

use std::{collections::BTreeMap, fmt, net::IpAddr, path::Path, time::Duration};

use lb_common::{DEFAULT_FLOW_TABLE_SIZE, DEFAULT_RING_SIZE, MAX_FLOW_IDLE_TIMEOUT_S, MAX_NODE_MACS, TUNNEL_MIN_MTU};
use toml::Spanned;

use super::{
    Config, ConfigError, DEFAULT_FLOW_IDLE_TIMEOUT, FailurePolicy, Group, Health, MAX_FLOW_TABLE_SIZE, MAX_RING_SIZE,
    MIN_FLOW_IDLE_TIMEOUT, MIN_FLOW_TABLE_SIZE, MIN_RING_SLOTS_PER_BACKEND, Tunnel, group_id, is_prime, parse_duration_within, parse_mac,
    raw::{RawConfig, RawHealth},
    read_sync_key,
};

mod backend;
mod cluster;
mod health;
mod listener;

/// Backend name to where it is in the file: its index among the backends, and the offset of
/// its name.
type Places = BTreeMap<String, (usize, usize)>;

pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) file: &'a str,
}

impl Validator<'_> {
    fn line(&self, at: usize) -> usize {
        self.text[..at.min(self.text.len())].matches('\n').count() + 1
    }

    fn err(&self, span: &std::ops::Range<usize>, field: impl fmt::Display, message: impl fmt::Display) -> ConfigError {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
        ConfigError { file: self.file.to_owned(), line, column, field: field.to_string(), message: message.to_string() }
    }

    fn interface(&self, raw: &Spanned<String>) -> Result<String, ConfigError> {
        let interface = raw.get_ref().trim().to_owned();
        if interface.is_empty() || interface.len() >= 16 || interface.contains(['/', ' ']) {
            return Err(self.err(&raw.span(), "interface", "must be a network interface name (1 to 15 characters, no '/' or space)"));
        }
        Ok(interface)
    }

    /// `next_program`: an absolute path (the pin is opened when the balancer starts).
    fn next_program(&self, p: &Spanned<String>) -> Result<std::path::PathBuf, ConfigError> {
        if p.get_ref().starts_with('/') && !p.get_ref().contains('\n') {
            Ok(std::path::PathBuf::from(p.get_ref()))
        } else {
            Err(self.err(
                &p.span(),
                "next_program",
                "must be the absolute path of a pinned XDP program on a BPF filesystem (e.g. /sys/fs/bpf/xdp-filter/programs/eth0/xdpfilt_alw_all)",
            ))
        }
    }

    /// A group of this host, by name or gid.
    fn group(&self, g: &Spanned<String>, field: &str) -> Result<Group, ConfigError> {
        group_id(g.get_ref()).map(|gid| Group { name: g.get_ref().clone(), gid }).map_err(|m| self.err(&g.span(), field, m))
    }

    /// `ring_seed_file`: read at load (and reload) with the cluster key's rules (owner-only, long
    /// enough).
    fn ring_seed(&self, f: &Spanned<String>) -> Result<crate::maglev::RingSeed, ConfigError> {
        read_sync_key(Path::new(f.get_ref()))
            .map(|k| crate::maglev::RingSeed::new(&k.0))
            .map_err(|e| self.err(&f.span(), "ring_seed_file", format!("{e:#}")))
    }

    pub(super) fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let interface = self.interface(&raw.interface)?;
        let ring_size = match &raw.ring_size {
            None => DEFAULT_RING_SIZE,
            Some(s) => {
                let n = *s.get_ref();
                if !(3..=MAX_RING_SIZE).contains(&n) || !is_prime(n) {
                    return Err(self.err(
                        &s.span(),
                        "ring_size",
                        format!("{n} is not a prime between 3 and {MAX_RING_SIZE} (65537 is a good choice)"),
                    ));
                }
                n
            }
        };
        let ring_seed = raw.ring_seed_file.as_ref().map(|f| self.ring_seed(f)).transpose()?;
        let flow_table_size = match &raw.flow_table_size {
            None => DEFAULT_FLOW_TABLE_SIZE,
            Some(s) => {
                let n = *s.get_ref();
                if !(MIN_FLOW_TABLE_SIZE..=MAX_FLOW_TABLE_SIZE).contains(&n) {
                    return Err(self.err(
                        &s.span(),
                        "flow_table_size",
                        format!("{n} is outside {MIN_FLOW_TABLE_SIZE}..={MAX_FLOW_TABLE_SIZE}"),
                    ));
                }
                n
            }
        };
        let health = match &raw.health {
            None => Health::default(),
            Some(h) => self.health(&Health::default(), h, "health")?,
        };
        let accept_macs = self.accept_macs(raw.accept_macs.as_ref())?;
        let flow_idle_timeout = match &raw.flow_idle_timeout {
            None => DEFAULT_FLOW_IDLE_TIMEOUT,
            Some(s) => self.idle_timeout(s, "flow_idle_timeout")?,
        };
        let failure = self.failure(&FailurePolicy::default(), raw.on_down, raw.on_down_grace.as_ref(), raw.all_down, "")?;
        let tunnel = self.tunnel(&raw)?;

        let backend_health: BTreeMap<String, Spanned<RawHealth>> =
            raw.backends.iter().filter_map(|b| Some((b.get_ref().name.get_ref().clone(), b.get_ref().health.clone()?))).collect();
        let (backends, places) = self.backends(raw.backends)?;
        let listeners = self.listeners(raw.listeners, (&backends, &places), &health, &backend_health, flow_idle_timeout, failure)?;
        if let Some(l) = listeners.iter().max_by_key(|l| l.backends.len()) {
            let need = MIN_RING_SLOTS_PER_BACKEND * u32::try_from(l.backends.len()).unwrap_or(u32::MAX);
            if ring_size < need {
                let span = raw.ring_size.as_ref().map_or(0..0, Spanned::span);
                let prime = (need..=need.saturating_mul(2)).find(|&n| is_prime(n)).unwrap_or(DEFAULT_RING_SIZE);
                return Err(self.err(
                    &span,
                    "ring_size",
                    format!(
                        "{ring_size} is too small for listener {:?}'s {} backends: Maglev keeps their shares within about 1% only \
                         with at least {MIN_RING_SLOTS_PER_BACKEND} slots per backend; use a prime of at least {need}, e.g. {prime}",
                        l.name,
                        l.backends.len()
                    ),
                ));
            }
        }
        let announce = raw.announce.as_ref().map(|a| self.announce(a.get_ref())).transpose()?;
        let shortest_idle = listeners.iter().map(|l| l.flow_idle_timeout).min().unwrap_or(flow_idle_timeout);
        let cluster = raw.cluster.as_ref().map(|c| self.cluster(c, shortest_idle)).transpose()?;
        let next_program = raw.next_program.as_ref().map(|p| self.next_program(p)).transpose()?;
        let read_only_group = raw.read_only_group.as_ref().map(|g| self.group(g, "read_only_group")).transpose()?;
        Ok(Config {
            interface,
            xdp_mode: raw.xdp_mode,
            next_program,
            ring_size,
            ring_seed,
            flow_table_size,
            accept_macs,
            flow_idle_timeout,
            failure,
            health,
            listeners,
            backends,
            announce,
            cluster,
            read_only_group,
            tunnel,
        })
    }

    /// `accept_macs`: at most `MAX_NODE_MACS - 1`, none twice.
    fn accept_macs(&self, raw: Option<&Spanned<Vec<Spanned<String>>>>) -> Result<Vec<[u8; 6]>, ConfigError> {
        let mut accept_macs = Vec::new();
        if let Some(list) = raw {
            if list.get_ref().len() >= MAX_NODE_MACS {
                return Err(self.err(
                    &list.span(),
                    "accept_macs",
                    format!("at most {} MACs besides the interface's own", MAX_NODE_MACS - 1),
                ));
            }
            for (i, m) in list.get_ref().iter().enumerate() {
                let mac = parse_mac(m.get_ref()).map_err(|msg| self.err(&m.span(), format!("accept_macs[{i}]"), msg))?;
                if accept_macs.contains(&mac) {
                    return Err(self.err(&m.span(), format!("accept_macs[{i}]"), format!("{} is listed twice", m.get_ref())));
                }
                accept_macs.push(mac);
            }
        }
        Ok(accept_macs)
    }

    /// `tunnel_source`, `tunnel_source6`, `tunnel_mtu` and `gue_port`.
    fn tunnel(&self, raw: &RawConfig) -> Result<Tunnel, ConfigError> {
        let mut t = Tunnel::default();
        if let Some(s) = &raw.tunnel_source {
            match s.get_ref().parse::<IpAddr>() {
                Ok(IpAddr::V4(a)) if host_address(IpAddr::V4(a)) => t.source = Some(a),
                _ => return Err(self.err(&s.span(), "tunnel_source", format!("{:?} is not a unicast IPv4 address", s.get_ref()))),
            }
        }
        if let Some(s) = &raw.tunnel_source6 {
            match s.get_ref().parse::<IpAddr>() {
                Ok(IpAddr::V6(a)) if host_address(IpAddr::V6(a)) => t.source6 = Some(a),
                _ => {
                    return Err(self.err(&s.span(), "tunnel_source6", format!("{:?} is not a global unicast IPv6 address", s.get_ref())));
                }
            }
        }
        if let Some(m) = &raw.tunnel_mtu {
            let mtu = *m.get_ref();
            if !(TUNNEL_MIN_MTU..=u32::from(u16::MAX)).contains(&mtu) {
                return Err(self.err(
                    &m.span(),
                    "tunnel_mtu",
                    format!("{mtu} is outside {TUNNEL_MIN_MTU}..=65535 (IPv6's 1280 plus the largest tunnel header must fit)"),
                ));
            }
            t.mtu = Some(mtu);
        }
        if let Some(p) = &raw.gue_port {
            if *p.get_ref() == 0 {
                return Err(self.err(&p.span(), "gue_port", "must be a UDP port between 1 and 65535"));
            }
            t.gue_port = *p.get_ref();
        }
        Ok(t)
    }

    fn idle_timeout(&self, s: &Spanned<String>, field: &str) -> Result<Duration, ConfigError> {
        parse_duration_within(s.get_ref(), MIN_FLOW_IDLE_TIMEOUT, Duration::from_secs(MAX_FLOW_IDLE_TIMEOUT_S))
            .map_err(|m| self.err(&s.span(), field, m))
    }

    fn name(&self, s: &Spanned<String>, field: &str) -> Result<String, ConfigError> {
        let n = s.get_ref();
        let ok = !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok { Ok(n.clone()) } else { Err(self.err(&s.span(), field, format!("{n:?}: names are 1 to 64 of [A-Za-z0-9._-]"))) }
    }
}

/// Whether `a` can be a VIP or a broker's address: a unicast address outside loopback, IPv4's
/// 240.0.0.0/4 (reserved; the flow table marks IPv6 flows with it, see `lb_common::flow_key6`),
/// IPv6 link-local and IPv4-mapped addresses.
fn host_address(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_loopback() || v4.octets()[0] >= 240),
        IpAddr::V6(v6) => {
            !(v6.is_unspecified() || v6.is_multicast() || v6.is_loopback() || v6.is_unicast_link_local() || v6.to_ipv4_mapped().is_some())
        }
    }
}
