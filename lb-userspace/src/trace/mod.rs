//! `dsrlb trace`: the data plane's decisions as the control socket streams them ([`Event`]),
//! decoded from the frames' first bytes, filtered, printed one line each like tcpdump
//! ([`print`]), and written to a pcapng file with each decision as its frame's comment
//! ([`pcap`]).

pub mod event;
pub mod pcap;
pub mod print;

pub use self::{
    event::Event,
    pcap::Pcap,
    print::{Cidr, Filters, Headers, Names, decision, decode, interface_name, line, parse_sample, tcp_flags, verdict_words},
};
// Where tracing code has long found the clock; it lives with the data plane.
pub use crate::dataplane::clock::{Clock, monotonic_ns};
