//! `dsrlb trace`, the client: asks the controller for a trace, then reads, filters, prints and
//! writes the frames it streams until `--count` or a signal.

use std::time::Duration;

use anyhow::{Context as _, bail};
use lb_userspace::{
    control::{self, Request, Response, TraceLine, TraceStart},
    trace::{Cidr, Filters, Names, Pcap, decode, interface_name, line, verdict_words},
};

/// What `dsrlb trace` was asked for.
#[derive(Debug, Default)]
pub struct Options {
    pub listener: Option<String>,
    pub backend: Option<String>,
    pub client: Option<Cidr>,
    pub verdict: Option<String>,
    pub sample: u32,
    /// Stop after this many frames shown.
    pub count: Option<u64>,
    pub pcap: Option<std::path::PathBuf>,
    /// One JSON object per frame instead of a line.
    pub json: bool,
    /// Ask the controller to leave MQTT CONNECT credentials in the frames.
    pub raw: bool,
}

/// What a trace saw.
#[derive(Debug, Default)]
pub struct Summary {
    pub received: u64,
    pub shown: u64,
    pub lost: u64,
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Asks the controller for the trace; returns the connection and its answer (the names).
fn start(socket: &std::path::Path, opts: &Options) -> anyhow::Result<(std::io::BufReader<std::os::unix::net::UnixStream>, Response)> {
    use std::io::{BufRead as _, Write as _};
    let mut stream = control::connect(socket)?;
    let req = Request::Trace { listener: opts.listener.clone(), backend: opts.backend.clone(), sample: opts.sample, raw: opts.raw };
    let mut request = serde_json::to_string(&req)?;
    request.push('\n');
    stream.write_all(request.as_bytes())?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut reader = std::io::BufReader::new(stream);
    let mut buf = String::new();
    // The controller's answer first: the names, or why there is no trace.
    loop {
        match reader.read_line(&mut buf) {
            Ok(0) => bail!("the controller closed the connection"),
            Ok(_) if buf.ends_with('\n') => break,
            Ok(_) => {}
            Err(e)
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted) =>
            {
                anyhow::ensure!(!STOP.load(std::sync::atomic::Ordering::Relaxed), "interrupted before the trace started");
            }
            Err(e) => return Err(e).context("reading the controller's answer"),
        }
    }
    let resp: Response = serde_json::from_str(&buf).with_context(|| format!("the controller answered {buf:?}"))?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_else(|| "the controller refused the trace".into()));
    }
    Ok((reader, resp))
}

/// Runs `dsrlb trace` against the controller at `socket`, printing to `out`, until `--count`
/// frames are shown or SIGINT/SIGTERM; the pcap file is complete either way.
///
/// # Errors
/// When a filter is invalid, the controller refuses the trace, or writing fails.
pub fn run(socket: &std::path::Path, opts: &Options, out: &mut impl std::io::Write) -> anyhow::Result<Summary> {
    use std::io::BufRead as _;
    if let Some(v) = &opts.verdict {
        let words = verdict_words();
        anyhow::ensure!(words.contains(&v.as_str()), "--verdict {v:?}: give one of {}", words.join(", "));
    }
    let (mut reader, resp) = start(socket, opts)?;
    let mut buf = String::new();
    let answer: TraceStart = resp.data_as().context("the controller's answer to the trace")?;
    let names = Names { listeners: answer.listeners, backends: answer.backends };
    // Created once the trace is accepted: a refused one leaves an existing file alone.
    let mut pcap = match &opts.pcap {
        None => None,
        Some(path) => {
            let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
            Some(Pcap::new(std::io::BufWriter::new(file))?)
        }
    };
    eprintln!(
        "dsrlb trace: tracing {}{}; Ctrl-C stops",
        answer.interface,
        if opts.sample > 1 { format!(", one frame in {}", opts.sample) } else { String::new() }
    );
    let mut interfaces = std::collections::BTreeMap::new();
    let filters = Filters { client: opts.client, backend: opts.backend.clone(), verdict: opts.verdict.clone() };
    let mut summary = Summary::default();
    while !STOP.load(std::sync::atomic::Ordering::Relaxed) && opts.count.is_none_or(|c| summary.shown < c) {
        match reader.read_line(&mut buf) {
            Ok(0) => {
                eprintln!("dsrlb trace: the controller went away");
                break;
            }
            Ok(_) if !buf.ends_with('\n') => continue,
            Ok(_) => {}
            Err(e)
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted) =>
            {
                continue;
            }
            Err(e) => return Err(e).context("reading the trace"),
        }
        let text = std::mem::take(&mut buf);
        match serde_json::from_str::<TraceLine>(&text) {
            Ok(TraceLine::Lost { lost }) => summary.lost = lost,
            Ok(TraceLine::Event(ev)) => {
                summary.received += 1;
                let headers = decode(&ev.bytes());
                if !filters.keep(&ev, &headers, &names) {
                    continue;
                }
                summary.shown += 1;
                if let Some(p) = &mut pcap {
                    p.write(&ev, &names)?;
                }
                if opts.json {
                    let mut v = serde_json::to_value(&ev)?;
                    v["listener_name"] = names.listener(ev.listener).into();
                    v["backend"] = names.backend(ev.real).into();
                    writeln!(out, "{v}")?;
                } else {
                    let iface = interfaces.entry(ev.ifindex).or_insert_with(|| interface_name(ev.ifindex));
                    writeln!(out, "{}", line(&ev, &headers, &names, iface))?;
                }
            }
            Err(e) => bail!("a trace line that does not parse ({e}): {text:?}"),
        }
    }
    if let Some(p) = &mut pcap {
        p.flush()?;
    }
    out.flush()?;
    Ok(summary)
}
