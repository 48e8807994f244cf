//! The config file as written: what serde reads, every value with its place in the file
//! (`Spanned`) for the messages of validation. Unknown fields are refused.

use serde::Deserialize;
use toml::Spanned;

use super::{AllDown, CheckKind, Forward, HashMode, OnDown, XdpModeCfg};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) interface: Spanned<String>,
    #[serde(default = "default_mode")]
    pub(super) xdp_mode: XdpModeCfg,
    pub(super) next_program: Option<Spanned<String>>,
    pub(super) ring_size: Option<Spanned<u32>>,
    pub(super) ring_seed_file: Option<Spanned<String>>,
    pub(super) flow_table_size: Option<Spanned<u32>>,
    pub(super) accept_macs: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) flow_idle_timeout: Option<Spanned<String>>,
    pub(super) on_down: Option<OnDown>,
    pub(super) on_down_grace: Option<Spanned<String>>,
    pub(super) all_down: Option<AllDown>,
    #[serde(default)]
    pub(super) health: Option<Spanned<RawHealth>>,
    #[serde(default, rename = "listener")]
    pub(super) listeners: Vec<Spanned<RawListener>>,
    #[serde(default, rename = "backend")]
    pub(super) backends: Vec<Spanned<RawBackend>>,
    pub(super) announce: Option<Spanned<RawAnnounce>>,
    pub(super) cluster: Option<Spanned<RawCluster>>,
    pub(super) read_only_group: Option<Spanned<String>>,
    pub(super) tunnel_source: Option<Spanned<String>>,
    pub(super) tunnel_source6: Option<Spanned<String>>,
    pub(super) tunnel_mtu: Option<Spanned<u32>>,
    pub(super) gue_port: Option<Spanned<u16>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnnounce {
    pub(super) table: Option<Spanned<u32>>,
    pub(super) withdraw_wait: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) nodes: Spanned<Vec<Spanned<String>>>,
    pub(super) sync_interval: Option<Spanned<String>>,
    pub(super) join_wait: Option<Spanned<String>>,
    pub(super) key_file: Option<Spanned<String>>,
    pub(super) insecure: Option<Spanned<bool>>,
}

pub(super) const fn default_mode() -> XdpModeCfg {
    XdpModeCfg::Auto
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) check: Option<CheckKind>,
    pub(super) inter: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) fall: Option<Spanned<u32>>,
    pub(super) rise: Option<Spanned<u32>>,
    pub(super) alpha: Option<bool>,
    pub(super) vip_check: Option<bool>,
    pub(super) username: Option<Spanned<String>>,
    pub(super) password: Option<Spanned<String>>,
    pub(super) tls_ca: Option<Spanned<String>>,
    pub(super) tls_server_name: Option<Spanned<String>>,
    pub(super) http_port: Option<Spanned<u16>>,
    pub(super) http_path: Option<Spanned<String>>,
    pub(super) http_host: Option<Spanned<String>>,
    pub(super) http_expect: Option<Spanned<Vec<u16>>>,
    pub(super) http_refusing: Option<Spanned<Vec<u16>>>,
    pub(super) http_auth_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) name: Spanned<String>,
    pub(super) vip: Spanned<String>,
    pub(super) port: Spanned<u16>,
    #[serde(default = "default_hash")]
    pub(super) hash: HashMode,
    pub(super) source_prefix: Option<Spanned<u8>>,
    pub(super) backends: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) health: Option<Spanned<RawHealth>>,
    pub(super) flow_idle_timeout: Option<Spanned<String>>,
    pub(super) max_conn_rate: Option<Spanned<u32>>,
    pub(super) max_conn_burst: Option<Spanned<u32>>,
    pub(super) on_down: Option<OnDown>,
    pub(super) on_down_grace: Option<Spanned<String>>,
    pub(super) all_down: Option<AllDown>,
}

pub(super) const fn default_hash() -> HashMode {
    HashMode::FourTuple
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) name: Spanned<String>,
    pub(super) address: Spanned<String>,
    pub(super) address6: Option<Spanned<String>>,
    pub(super) mac: Option<Spanned<String>>,
    pub(super) weight: Option<Spanned<u32>>,
    pub(super) health: Option<Spanned<RawHealth>>,
    pub(super) forward: Option<Spanned<Forward>>,
}
