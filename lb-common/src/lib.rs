//! Map types shared by the XDP program and the controller, plus the hashes both must agree on,
//! by topic: the maps' names, sizes and values (`maps`), the flow table (`flow`), the ring
//! hashes (`hash`), the verdicts' reasons ([`reason`]) and trace events (`trace`), each
//! re-exported here.
//!
//! Every key and value is `#[repr(C)]`, has no implicit padding (each module asserts its sizes)
//! and uses plain integers for flags. Fields in network byte order end in `_be`.
#![no_std]
#![expect(clippy::inline_always, reason = "the XDP program needs these inlined into its hot path")]

mod decap;
mod flow;
mod hash;
mod maps;
pub mod reason;
mod trace;

pub use decap::*;
pub use flow::*;
pub use hash::*;
pub use maps::*;
pub use trace::*;
