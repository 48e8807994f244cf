//! The dsrlb controller: config, Maglev rings, and the XDP data plane they are written to.
//!
//! # Layers
//!
//! Each module uses only the modules of the layers below its own (and those before it in its
//! layer); nothing points up. From the bottom:
//!
//! 1. Foundations, no kernel: [`maglev`], [`mapped`], [`mqtt`], [`netlink`] (the handle),
//!    [`redact`], [`tls`], then [`config`].
//! 2. The kernel: [`flow_table`], [`dataplane`] (the loaded program, its maps and its clock),
//!    [`decap`] (the brokers' decapsulation program), [`neigh`], [`probe_route`], [`announce`].
//! 3. What the controller decides: [`health`] (probes), [`cluster`] (the sync with other
//!    nodes), [`plan`] (config to desired maps), [`exceptions`] (flows the rings do not hold).
//! 4. What crosses the control socket: [`trace`] (a traced frame, its printing and pcap), then
//!    [`control`] (the protocol and its [`control::status::Status`], the server, the client).
//! 5. Services on the protocol: [`metrics`].
//! 6. [`controller`]: `dsrlb run`, the one place that holds all of the above.
//!
//! The CLI (`src/cli/`, in the `dsrlb` binary) sits on top, outside the library: it reaches a
//! controller through [`control::client`]. `layers_point_down` below checks every `crate::`
//! path against this order.

pub mod announce;
pub mod cluster;
pub mod config;
pub mod control;
pub mod controller;
pub mod dataplane;
pub mod decap;
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

/// The same program for weakly ordered CPUs (`lb-ebpf` feature `ordered`): BPF ISA v4, with
/// load-acquire and store-release where the flow table's protocol needs them (Linux 6.15).
pub static EBPF_OBJ_ORDERED: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dsrlb-ordered"));

#[cfg(test)]
mod tests {
    /// The modules in the order of the layers (see the crate's documentation): each may use only
    /// those before it.
    const ORDER: [&str; 24] = [
        "maglev",
        "mapped",
        "mqtt",
        "netlink",
        "redact",
        "tls",
        "config",
        "flow_table",
        "dataplane",
        "decap",
        "neigh",
        "probe_route",
        "announce",
        "health",
        "cluster",
        "plan",
        "exceptions",
        "trace",
        "control",
        "metrics",
        "controller",
        // Not modules: the crate root's items.
        "EBPF_OBJ",
        "EBPF_OBJ_ORDERED",
        "lib",
    ];

    /// `text` with its string and character literals blanked (`"…"`, `r#"…"#`, `'{'`), so
    /// that braces and slashes in them count for nothing.
    fn blank_literals(text: &str) -> String {
        let b = text.as_bytes();
        let mut out = b.to_vec();
        let mut i = 0;
        while i < b.len() {
            let raw = b[i] == b'r' && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'));
            let hashes = if raw { b[i + 1..].iter().take_while(|&&c| c == b'#').count() } else { 0 };
            if raw && b.get(i + 1 + hashes) == Some(&b'"') {
                let end = "\"".to_owned() + &"#".repeat(hashes);
                let from = i + 2 + hashes;
                let to = text[from..].find(&end).map_or(b.len(), |n| from + n);
                out[from..to].fill(b' ');
                i = to + end.len();
            } else if b[i] == b'"' {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                out[i + 1..j.min(b.len())].fill(b' ');
                i = j + 1;
            } else if b[i] == b'\'' && (b.get(i + 2) == Some(&b'\'') || (b.get(i + 1) == Some(&b'\\') && b.get(i + 3) == Some(&b'\''))) {
                let len = if b[i + 1] == b'\\' { 4 } else { 3 };
                out[i + 1..i + len - 1].fill(b' ');
                i += len;
            } else {
                i += 1;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// `text` without comments and without its `#[cfg(test)]` modules (tests may use anything).
    fn code(text: &str) -> String {
        let text = blank_literals(text);
        let mut code: String = text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
        while let Some(at) = code.find("#[cfg(test)]\nmod ") {
            let open = at + code[at..].find('{').expect("a module body");
            let mut depth = 0;
            let close = code[open..]
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map(|(i, _)| open + i)
                .expect("a closed module body");
            code.replace_range(at..=close, "");
        }
        code
    }

    /// The crate's modules that `code` names: `crate::x` and `use crate::{x, y::z}`.
    fn used(code: &str) -> Vec<String> {
        let ident = |s: &str| s.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
        let mut out = Vec::new();
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let mut depth = 0;
                let mut item = true;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item = true,
                        c if item && !c.is_whitespace() => {
                            item = false;
                            out.push(ident(&group[i..]));
                        }
                        _ => {}
                    }
                }
            } else {
                out.push(ident(rest));
            }
        }
        out
    }

    fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// Every `crate::` path of a module names a module of a layer below it (or before it in
    /// its own): no module reaches up, so there is no import cycle.
    #[test]
    fn layers_point_down() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut paths = Vec::new();
        files(&src, &mut paths);
        let mut wrong = Vec::new();
        for path in paths {
            let top = path.strip_prefix(&src).expect("under src").iter().next().expect("a name").to_string_lossy().replace(".rs", "");
            // The binary's modules are above the library.
            if top == "main" || top == "cli" {
                continue;
            }
            let rank = |m: &str| ORDER.iter().position(|o| *o == m);
            let me = rank(&top).unwrap_or_else(|| panic!("{top} is in no layer: add it to ORDER and to the crate's documentation"));
            for m in used(&code(&std::fs::read_to_string(&path).expect("read"))) {
                match rank(&m) {
                    Some(r) if r < me || m == top || m.starts_with("EBPF_OBJ") => {}
                    _ => wrong.push(format!("{} uses crate::{m}", path.display())),
                }
            }
        }
        assert!(wrong.is_empty(), "modules that reach up a layer:\n{}", wrong.join("\n"));
    }
}
