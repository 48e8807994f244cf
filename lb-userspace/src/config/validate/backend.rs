//! `[[backend]]`: names, addresses, MACs and weights.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
};

use lb_common::MAX_BACKENDS;
use toml::Spanned;

use super::{Places, Validator, host_address};
use crate::config::{Backend, ConfigError, Forward, MAX_WEIGHT, parse_mac, raw::RawBackend};

impl Validator<'_> {
    /// The backends, sorted by name, and where each is in the file: its index there and the
    /// offset of its name.
    pub(super) fn backends(&self, raw: Vec<Spanned<RawBackend>>) -> Result<(Vec<Backend>, Places), ConfigError> {
        let mut places = BTreeMap::new();
        if raw.len() > MAX_BACKENDS as usize {
            let span = raw[MAX_BACKENDS as usize].span();
            return Err(self.err(&span, "backend", format!("at most {MAX_BACKENDS} backends")));
        }
        let mut out: BTreeMap<String, Backend> = BTreeMap::new();
        let mut addresses = BTreeMap::new();
        for (i, b) in raw.into_iter().enumerate() {
            let b = b.into_inner();
            let f = |name: &str| format!("backend[{i}].{name}");
            let name = self.name(&b.name, &f("name"))?;
            if out.contains_key(&name) {
                return Err(self.err(&b.name.span(), f("name"), format!("duplicate backend name {name:?}")));
            }
            let first: IpAddr = b.address.get_ref().parse().map_err(|_| {
                self.err(&b.address.span(), f("address"), format!("{:?} is not an IPv4 or IPv6 address", b.address.get_ref()))
            })?;
            let mut given = vec![(first, b.address.span(), "address")];
            if let Some(a6) = &b.address6 {
                let second: Ipv6Addr = a6
                    .get_ref()
                    .parse()
                    .map_err(|_| self.err(&a6.span(), f("address6"), format!("{:?} is not an IPv6 address", a6.get_ref())))?;
                if first.is_ipv6() {
                    return Err(self.err(
                        &a6.span(),
                        f("address6"),
                        "address is already IPv6: give the IPv4 address as address and the IPv6 one as address6",
                    ));
                }
                given.push((IpAddr::V6(second), a6.span(), "address6"));
            }
            let (mut address, mut address6) = (None, None);
            for (a, span, field) in given {
                if !host_address(a) {
                    return Err(self.err(&span, f(field), format!("{a} cannot be a backend address")));
                }
                if let Some(other) = addresses.insert(a, name.clone()) {
                    return Err(self.err(&span, f(field), format!("{a} is already backend {other:?}'s address")));
                }
                match a {
                    IpAddr::V4(v4) => address = Some(v4),
                    IpAddr::V6(v6) => address6 = Some(v6),
                }
            }
            let mac = match &b.mac {
                None => None,
                Some(m) => Some(parse_mac(m.get_ref()).map_err(|msg| self.err(&m.span(), f("mac"), msg))?),
            };
            let weight = match &b.weight {
                None => 100,
                Some(w) if *w.get_ref() > MAX_WEIGHT => {
                    return Err(self.err(&w.span(), f("weight"), format!("must be between 0 and {MAX_WEIGHT}")));
                }
                Some(w) => *w.get_ref(),
            };
            let forward = b.forward.as_ref().map_or(Forward::L2, |f| *f.get_ref());
            if forward != Forward::L2
                && let Some(m) = &b.mac
            {
                return Err(self.err(
                    &m.span(),
                    f("mac"),
                    format!(
                        "a backend with forward = \"{}\" is reached through the next hop of its route, whose MAC the balancer \
                         resolves; mac is for forward = \"l2\" only",
                        forward.name()
                    ),
                ));
            }
            places.insert(name.clone(), (i, b.name.span().start));
            out.insert(name.clone(), Backend { name, address, address6, mac, weight, forward });
        }
        Ok((out.into_values().collect(), places))
    }
}
