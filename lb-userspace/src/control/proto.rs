//! The control protocol: one JSON request ([`Request`]) and one JSON response ([`Response`]) per
//! line, and the lines a trace streams after its first answer ([`TraceLine`]). Both sides, the
//! controller's [`super::server`] and the CLI's [`super::client`], speak it through these types.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Where `dsrlb run` listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/dsrlb/control.sock";

/// The read-only socket beside the control socket `socket`: `control.sock` → `control-ro.sock`.
#[must_use]
pub fn read_only_path(socket: &Path) -> PathBuf {
    let name = socket.file_name().map_or_else(|| "control.sock".into(), |n| n.to_string_lossy().into_owned());
    let ro = name.strip_suffix(".sock").map_or_else(|| format!("{name}-ro"), |stem| format!("{stem}-ro.sock"));
    socket.with_file_name(ro)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    Drain {
        backend: String,
    },
    Undrain {
        backend: String,
    },
    Weight {
        backend: String,
        weight: u32,
    },
    Reload,
    Flow {
        client: String,
        vip: String,
    },
    /// Detach, remove the pins, and exit.
    Stop,
    /// The Prometheus text (what `GET /metrics` serves).
    Metrics,
    /// Whether the controller serves and its program is attached: cheap (no walk of the flow
    /// table), for keepalived's health script.
    Ping,
    /// `dsrlb trace`: the controller answers with the names of listener and real ids, then the
    /// socket streams the data plane's decisions ([`TraceLine`]) until the client closes it.
    Trace {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listener: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend: Option<String>,
        /// One frame in `sample` (0 or 1: all).
        #[serde(default)]
        sample: u32,
        /// Keep MQTT CONNECT credentials in the frames (root and the controller's user only);
        /// by default the controller masks them before they leave it (`crate::redact`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        raw: bool,
    },
}

impl Request {
    /// The request as the CLI names it.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Drain { .. } => "drain",
            Self::Undrain { .. } => "undrain",
            Self::Weight { .. } => "weight",
            Self::Reload => "reload",
            Self::Flow { .. } => "flow",
            Self::Stop => "stop",
            Self::Metrics => "metrics",
            Self::Ping => "ping",
            Self::Trace { .. } => "trace",
        }
    }

    /// Why the read-only socket refuses it; `None` for the requests it serves (status and
    /// stats, flow, metrics, ping).
    #[must_use]
    pub const fn not_read_only(&self) -> Option<&'static str> {
        match self {
            Self::Status | Self::Flow { .. } | Self::Metrics | Self::Ping => None,
            Self::Drain { .. } | Self::Undrain { .. } | Self::Weight { .. } | Self::Reload => Some("it changes the balancer"),
            Self::Stop => Some("it stops the balancer"),
            Self::Trace { .. } => Some("a trace shows the clients' traffic"),
        }
    }
}

/// A line a trace streams after its first answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TraceLine {
    Event(crate::trace::Event),
    /// Events lost so far to a full buffer (sent when the number grows).
    Lost {
        lost: u64,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Response {
    #[must_use]
    pub fn ok(data: serde_json::Value) -> Self {
        Self { ok: true, error: None, data }
    }

    #[must_use]
    pub fn err(e: impl std::fmt::Display) -> Self {
        Self { ok: false, error: Some(e.to_string()), data: serde_json::Value::Null }
    }

    /// The answer's data as the type its request answers with: [`Status`](super::status::Status)
    /// for [`Request::Status`], [`FlowAnswer`], [`Pong`], [`TraceStart`], and a message (a
    /// `String`) for the requests that change something.
    ///
    /// # Errors
    /// When the data is not of that shape.
    pub fn data_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.data)
    }
}

/// The answer to [`Request::Flow`]: the backend a flow is pinned to, or the one the ring would
/// give it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FlowAnswer {
    /// In the flow table (`source`: `flow table`).
    Pinned {
        listener: String,
        backend: Option<String>,
        source: String,
        closing: bool,
        confirmed: bool,
        idle_s: u64,
        /// CPUs whose flow cache holds it.
        cached_cpus: usize,
        /// The flow table buckets it may be in.
        buckets: [u32; 2],
    },
    /// Not in the table: what its listener's ring gives (`source`: `ring (not in the flow
    /// table)`). A field not sent reads as empty, as in [`Status`](super::status::Status).
    Ring {
        #[serde(default)]
        listener: String,
        #[serde(default)]
        backend: Option<String>,
        #[serde(default)]
        source: String,
        #[serde(default)]
        slot: u32,
    },
}

/// The answer to [`Request::Ping`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    pub serving: bool,
    /// The attached XDP program's id.
    pub program: u32,
}

/// The controller's first answer to [`Request::Trace`]: its filters checked, the listener id
/// the program filters by, and the names of listener and backend ids.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceStart {
    pub interface: String,
    pub listener_id: Option<u32>,
    pub listeners: BTreeMap<u32, String>,
    pub backends: BTreeMap<u32, String>,
}

/// The longest request line the controller reads; a longer one is refused and the connection
/// closed (a request is a few hundred bytes).
pub const MAX_REQUEST_LINE: u64 = 64 * 1024;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Both shapes of a flow's answer read back as what they were.
    #[test]
    fn flow_answers_keep_their_shape() {
        let pinned = FlowAnswer::Pinned {
            listener: "mqtt".into(),
            backend: Some("b1".into()),
            source: "flow table".into(),
            closing: false,
            confirmed: true,
            idle_s: 3,
            cached_cpus: 1,
            buckets: [4, 5],
        };
        let ring = FlowAnswer::Ring { listener: "mqtt".into(), backend: None, source: "ring (not in the flow table)".into(), slot: 9 };
        for a in [pinned, ring] {
            let v = serde_json::to_value(&a).expect("json");
            assert_eq!(serde_json::from_value::<FlowAnswer>(v).expect("reads"), a);
        }
        let v = serde_json::to_value(FlowAnswer::Ring { listener: "l".into(), backend: None, source: "s".into(), slot: 2 }).expect("json");
        assert_eq!(v, serde_json::json!({ "listener": "l", "backend": null, "source": "s", "slot": 2 }), "as before");
    }

    #[test]
    fn the_read_only_socket_sits_beside_the_control_socket() {
        assert_eq!(read_only_path(Path::new(DEFAULT_SOCKET)), Path::new("/run/dsrlb/control-ro.sock"));
        assert_eq!(read_only_path(Path::new("/tmp/x/dsrlb")), Path::new("/tmp/x/dsrlb-ro"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        /// Any bytes on the socket: a request, or an error to answer with; never a panic.
        #[test]
        fn any_request_line_parses_or_is_refused(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = serde_json::from_slice::<Request>(&bytes);
        }

        /// Requests of the right shape with any field values.
        #[test]
        fn any_request_shaped_line_parses_or_is_refused(
            cmd in prop::sample::select(vec!["status", "drain", "undrain", "weight", "reload", "flow", "stop", "metrics", "ping", "x"]),
            backend in "[ -~]{0,20}",
            weight in any::<i64>(),
            extra in prop::option::of("[a-z]{1,8}"),
        ) {
            let mut v = serde_json::json!({ "cmd": cmd, "backend": backend, "weight": weight, "client": backend, "vip": backend });
            if let Some(k) = extra {
                v[k] = serde_json::json!(1);
            }
            let line = serde_json::to_vec(&v).expect("json");
            if let Ok(req) = serde_json::from_slice::<Request>(&line) {
                // What parses says again what it was.
                let again: Request = serde_json::from_str(&serde_json::to_string(&req).expect("json")).expect("round trip");
                prop_assert_eq!(again, req);
            }
        }
    }
}
