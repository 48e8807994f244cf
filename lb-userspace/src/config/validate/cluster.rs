//! `[announce]` and `[cluster]`.

use std::{net::SocketAddrV4, path::Path, time::Duration};

use toml::Spanned;

use super::Validator;
use crate::config::{
    Announce, Cluster, ConfigError, DEFAULT_ANNOUNCE_TABLE, DEFAULT_JOIN_WAIT, DEFAULT_SYNC_INTERVAL, DEFAULT_WITHDRAW_WAIT,
    MAX_CLUSTER_NODES, parse_duration_within,
    raw::{RawAnnounce, RawCluster},
    read_sync_key, show_duration,
};

impl Validator<'_> {
    pub(super) fn announce(&self, raw: &RawAnnounce) -> Result<Announce, ConfigError> {
        let table = match &raw.table {
            None => DEFAULT_ANNOUNCE_TABLE,
            Some(t) => {
                let n = *t.get_ref();
                if n == 0 || (253..=255).contains(&n) || (0xd_5b00..=0xd_5bff).contains(&n) {
                    return Err(self.err(
                        &t.span(),
                        "announce.table",
                        format!(
                            "{n} is not a table of its own: 0 and 253-255 are the kernel's (default, main, local), 0xd5b00-0xd5bff \
                             dsrlb's probe routes'"
                        ),
                    ));
                }
                n
            }
        };
        let withdraw_wait = match &raw.withdraw_wait {
            None => DEFAULT_WITHDRAW_WAIT,
            Some(w) => parse_duration_within(w.get_ref(), Duration::ZERO, Duration::from_mins(5))
                .map_err(|m| self.err(&w.span(), "announce.withdraw_wait", m))?,
        };
        Ok(Announce { table, withdraw_wait })
    }

    pub(super) fn cluster(&self, section: &Spanned<RawCluster>, shortest_idle: Duration) -> Result<Cluster, ConfigError> {
        let raw = section.get_ref();
        let list = raw.nodes.get_ref();
        if !(2..=MAX_CLUSTER_NODES).contains(&list.len()) {
            return Err(self.err(
                &raw.nodes.span(),
                "cluster.nodes",
                format!("list every node's sync address, this one's included: 2 to {MAX_CLUSTER_NODES}, not {}", list.len()),
            ));
        }
        let mut nodes = Vec::with_capacity(list.len());
        for (i, n) in list.iter().enumerate() {
            let addr: SocketAddrV4 = n
                .get_ref()
                .parse()
                .map_err(|_| self.err(&n.span(), format!("cluster.nodes[{i}]"), format!("{:?} is not IPv4:PORT", n.get_ref())))?;
            if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_loopback() || addr.ip().is_multicast() {
                return Err(self.err(
                    &n.span(),
                    format!("cluster.nodes[{i}]"),
                    format!("{addr}: a node's address on the balancer network and a port other than 0"),
                ));
            }
            if nodes.iter().any(|a: &SocketAddrV4| a.ip() == addr.ip()) {
                return Err(self.err(&n.span(), format!("cluster.nodes[{i}]"), format!("{} is listed twice", addr.ip())));
            }
            nodes.push(addr);
        }
        let sync_interval = match &raw.sync_interval {
            None => DEFAULT_SYNC_INTERVAL,
            Some(w) => parse_duration_within(w.get_ref(), Duration::from_secs(1), Duration::from_mins(10))
                .map_err(|m| self.err(&w.span(), "cluster.sync_interval", m))?,
        };
        // A live flow is sent again at least every max(idle/4, sync_interval): twice per idle
        // timeout at least, so the other nodes' copies never expire while it lives.
        if sync_interval > shortest_idle / 2 {
            let span = raw.sync_interval.as_ref().map_or_else(|| section.span(), Spanned::span);
            return Err(self.err(
                &span,
                "cluster.sync_interval",
                format!(
                    "{} is more than half the shortest flow_idle_timeout ({}): the other nodes' copies of a live flow would expire \
                     before it is sent again; use at most {}",
                    show_duration(sync_interval),
                    show_duration(shortest_idle),
                    show_duration(shortest_idle / 2)
                ),
            ));
        }
        let join_wait = match &raw.join_wait {
            None => DEFAULT_JOIN_WAIT,
            Some(w) => parse_duration_within(w.get_ref(), Duration::ZERO, Duration::from_mins(5))
                .map_err(|m| self.err(&w.span(), "cluster.join_wait", m))?,
        };
        let insecure = raw.insecure.as_ref().filter(|i| *i.get_ref());
        let key = match (&raw.key_file, insecure) {
            (Some(_), Some(i)) => {
                return Err(self.err(
                    &i.span(),
                    "cluster.insecure",
                    "true beside a key_file: with a key the sync is authenticated; remove insecure (or the key_file)",
                ));
            }
            (Some(k), None) => {
                Some(read_sync_key(Path::new(k.get_ref())).map_err(|e| self.err(&k.span(), "cluster.key_file", format!("{e:#}")))?)
            }
            (None, Some(_)) => None,
            (None, None) => {
                return Err(self.err(
                    &section.span(),
                    "cluster.key_file",
                    "missing: without a key, anything that can reach a node's sync port (another user on a node, a host that takes \
                     over a node's address) can send flows that move live sessions to other brokers, and can receive this node's \
                     exceptions (which client goes to which broker). Give every node the same key_file (`head -c 32 /dev/urandom | \
                     base64 > /etc/dsrlb/cluster.key; chmod 600`), or, where only the balancers can reach the sync port, set \
                     cluster.insecure = true",
                ));
            }
        };
        Ok(Cluster { nodes, sync_interval, join_wait, key })
    }
}
