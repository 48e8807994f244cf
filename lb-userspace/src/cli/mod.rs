//! The CLI's commands on top of the library: they talk to a controller through
//! `lb_userspace::control::client` and show what it answers. Nothing in the library depends on
//! them.

pub mod decap;
pub mod status;
pub mod trace;

use lb_userspace::control::FlowAnswer;

/// `dsrlb flow`'s line: the backend, where the answer comes from, and the flow's state.
pub fn flow(a: &FlowAnswer) -> String {
    let (listener, backend, source) = match a {
        FlowAnswer::Pinned { listener, backend, source, .. } | FlowAnswer::Ring { listener, backend, source, .. } => {
            (listener, backend, source)
        }
    };
    let (closing, cached) = match a {
        FlowAnswer::Pinned { closing, cached_cpus, .. } => (*closing, *cached_cpus),
        FlowAnswer::Ring { .. } => (false, 0),
    };
    let cached = match cached {
        0 => String::new(),
        n => format!("; in the flow cache of {n} CPU{}", if n == 1 { "" } else { "s" }),
    };
    format!(
        "{} -> {source} ({}; listener {listener}{cached})",
        backend.as_deref().unwrap_or("(no backend)"),
        if closing { "closing" } else { "live" }
    )
}
