//! The dsrlb controller: config, Maglev rings, and the XDP data plane they are written to.

pub mod config;
pub mod controller;
pub mod dataplane;
pub mod maglev;
pub mod mqtt;
pub mod neigh;
pub mod plan;

/// The XDP object built from `lb-ebpf` by `build.rs`.
pub static EBPF_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dsrlb"));
