//! One traced frame as the control socket streams it ([`Event`]): the data plane's
//! `TraceEvent` with its labels in words and its frame in hex.

use lb_common::{TRACE_NONE, TraceEvent, reason, trace_how};
use serde::{Deserialize, Serialize};

use crate::dataplane::clock::Clock;

/// One traced frame, as the control socket sends it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    pub cpu: u32,
    pub ifindex: u32,
    /// The frame's length; `frame` holds its first bytes.
    pub len: u32,
    /// `tx`, `pass` or `drop`.
    pub verdict: String,
    /// Why (`forwarded`, `icmp_too_big`, `no_listener`, ... as the metrics' `reason` label).
    pub reason: String,
    pub listener: Option<u32>,
    pub real: Option<u32>,
    /// How the real was chosen (`lb_common::trace_how::LABELS`).
    pub how: String,
    /// The frame's first bytes as they left the program, in hex (MQTT CONNECT credentials
    /// masked by the controller, unless the trace asked for `--raw`).
    pub frame: String,
    /// What the controller masked in `frame`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked: Option<crate::redact::Masked>,
}

impl Event {
    #[must_use]
    pub fn from_raw(ev: &TraceEvent, clock: &Clock) -> Self {
        let (verdict, why) = reason::LABELS.get(ev.reason as usize).copied().unwrap_or(("?", "?"));
        let caplen = (ev.caplen as usize).min(ev.frame.len());
        let frame = ev.frame[..caplen].iter().fold(String::with_capacity(caplen * 2), |mut s, b| {
            use std::fmt::Write as _;
            let _ = write!(s, "{b:02x}");
            s
        });
        let some = |v: u32| (v != TRACE_NONE).then_some(v);
        Self {
            ts_ns: clock.wall_ns(ev.ts_ns),
            cpu: ev.cpu,
            ifindex: ev.ifindex,
            len: ev.len,
            verdict: verdict.to_owned(),
            reason: why.to_owned(),
            listener: some(ev.listener),
            real: some(ev.real),
            how: trace_how::LABELS.get(ev.how as usize).copied().unwrap_or("?").to_owned(),
            frame,
            masked: None,
        }
    }

    /// The frame bytes.
    #[must_use]
    pub fn bytes(&self) -> Vec<u8> {
        (0..self.frame.len() / 2).filter_map(|i| u8::from_str_radix(self.frame.get(2 * i..2 * i + 2)?, 16).ok()).collect()
    }
}
