//! The dsrlb controller: config, Maglev rings, and the XDP data plane they are written to.

pub mod announce;
pub mod cluster;
pub mod config;
pub mod control;
pub mod controller;
pub mod dataplane;
pub mod exceptions;
pub mod flow_table;
pub mod health;
pub mod maglev;
pub mod mapped;
pub mod metrics;
pub mod mqtt;
pub mod neigh;
pub mod netlink;
pub mod plan;
pub mod probe_route;
pub mod redact;
pub mod tls;
pub mod trace;

/// The XDP object built from `lb-ebpf` by `build.rs`.
pub static EBPF_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dsrlb"));
