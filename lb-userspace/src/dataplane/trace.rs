//! The controller's side of `dsrlb trace`: the program's `TRACE` ring buffer and its switch
//! (`TRACE_CONF`), lent to one trace client at a time. Tracing is on only while a [`Session`]
//! lives: dropping it (the client left, or the controller exits) switches it off.

use std::{
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray, RingBuf},
};
use lb_common::{TRACE_NONE, TraceConf, TraceEvent};
use tokio::io::unix::AsyncFd;

/// The program's trace maps.
pub struct Tracer {
    conf: Array<MapData, TraceConf>,
    ring: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
}

impl AsRawFd for Tracer {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

impl Tracer {
    pub(super) fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let mut take = |name: &str| ebpf.take_map(name).with_context(|| format!("map {name} missing from the object"));
        let conf = Array::try_from(take("TRACE_CONF")?).context("map TRACE_CONF")?;
        let ring = RingBuf::try_from(take("TRACE")?).context("map TRACE")?;
        let lost = PerCpuArray::try_from(take("TRACE_LOST")?).context("map TRACE_LOST")?;
        Ok(Self { conf, ring, lost })
    }

    /// Writes the switch and filters.
    ///
    /// # Errors
    /// When the map write fails.
    pub fn set(&mut self, conf: TraceConf) -> anyhow::Result<()> {
        self.conf.set(0, conf, 0).context("writing TRACE_CONF")
    }

    /// Events lost to a full ring buffer since the program was loaded, summed over CPUs.
    #[must_use]
    pub fn lost(&self) -> u64 {
        self.lost.get(&0, 0).map_or(0, |v| v.iter().sum())
    }

    /// Moves the events waiting in the ring buffer to `out`, at most `max`.
    pub fn drain(&mut self, out: &mut Vec<TraceEvent>, max: usize) {
        while out.len() < max {
            let Some(item) = self.ring.next() else { break };
            if item.len() >= size_of::<TraceEvent>() {
                // SAFETY: the program writes whole `TraceEvent`s (`#[repr(C)]`, integers only);
                // read unaligned from the ring's memory.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<TraceEvent>()) });
            }
        }
    }
}

/// What a trace client asked for, as the program filters it.
#[derive(Clone, Copy, Debug)]
pub struct Filter {
    /// Trace one frame in `sample`.
    pub sample: u32,
    /// Only this listener id.
    pub listener: Option<u32>,
}

enum Slot {
    /// The controller has not loaded its program yet.
    Unloaded,
    Idle(Box<Tracer>),
    /// Lent to a session.
    Busy,
}

/// The tracer, shared between the controller (which installs it) and the control socket (whose
/// trace clients borrow it).
pub struct TraceHub {
    slot: Mutex<Slot>,
}

impl Default for TraceHub {
    fn default() -> Self {
        Self { slot: Mutex::new(Slot::Unloaded) }
    }
}

impl TraceHub {
    /// Makes the program's tracer available to clients.
    pub fn install(&self, tracer: Tracer) {
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Slot::Idle(Box::new(tracer));
    }

    /// Switches tracing on for one client, filtered by `filter`.
    ///
    /// # Errors
    /// When another trace runs, the program is not loaded, or the switch cannot be written.
    pub fn start(self: &Arc<Self>, filter: Filter) -> anyhow::Result<Session> {
        let mut tracer = {
            let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
            match std::mem::replace(&mut *slot, Slot::Busy) {
                Slot::Idle(t) => *t,
                Slot::Busy => bail!("another `dsrlb trace` is running: the data plane has one trace buffer"),
                Slot::Unloaded => {
                    *slot = Slot::Unloaded;
                    bail!("the controller has not loaded its program yet");
                }
            }
        };
        // Events left from an earlier session are not this one's.
        let mut stale = Vec::new();
        tracer.drain(&mut stale, usize::MAX);
        let conf = TraceConf { until_ns: lease_end(), sample: filter.sample.max(1), listener: filter.listener.unwrap_or(TRACE_NONE) };
        let lost_before = tracer.lost();
        let idle = |tracer| *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Slot::Idle(Box::new(tracer));
        if let Err(e) = tracer.set(conf) {
            idle(tracer);
            return Err(e);
        }
        // SAFETY: the registered fd is the ring buffer map's, owned by the tracer the AsyncFd
        // owns: it stays open for as long as it is registered.
        match unsafe { AsyncFd::register(tracer) } {
            Ok(fd) => Ok(Session { hub: self.clone(), fd: Some(fd), lost_before, conf }),
            Err(e) => {
                let (mut tracer, err) = e.into_parts();
                let _ = tracer.set(TraceConf::OFF);
                idle(tracer);
                Err(anyhow::anyhow!("polling the trace buffer: {err}"))
            }
        }
    }
}

/// Tracing switched on for one client; switched off when dropped.
pub struct Session {
    hub: Arc<TraceHub>,
    fd: Option<AsyncFd<Tracer>>,
    lost_before: u64,
    conf: TraceConf,
}

/// How long a trace lease lasts unrenewed; [`Session::renew`] runs every second.
pub const LEASE: std::time::Duration = std::time::Duration::from_secs(3);

/// `CLOCK_MONOTONIC` now, as `bpf_ktime_get_ns()` reads it, plus [`LEASE`].
fn lease_end() -> u64 {
    super::clock::monotonic_ns() + u64::try_from(LEASE.as_nanos()).unwrap_or(u64::MAX)
}

impl Session {
    /// Waits for events and moves up to `max` of them to `out`.
    ///
    /// # Errors
    /// When polling the ring buffer fails.
    pub async fn next(&mut self, out: &mut Vec<TraceEvent>, max: usize) -> anyhow::Result<()> {
        let fd = self.fd.as_mut().context("session ended")?;
        loop {
            let mut guard = fd.readable_mut().await.context("polling the trace buffer")?;
            guard.get_inner_mut().drain(out, max);
            if out.is_empty() {
                guard.clear_ready();
                continue;
            }
            if out.len() < max {
                guard.clear_ready();
            }
            return Ok(());
        }
    }

    /// Extends the lease (the controller does every second while the client is connected).
    ///
    /// # Errors
    /// When the map write fails.
    pub fn renew(&mut self) -> anyhow::Result<()> {
        self.conf.until_ns = lease_end();
        let conf = self.conf;
        self.fd.as_mut().context("session ended")?.get_mut().set(conf)
    }

    /// Events lost to a full buffer during this session.
    #[must_use]
    pub fn lost(&self) -> u64 {
        self.fd.as_ref().map_or(0, |fd| fd.get_ref().lost().saturating_sub(self.lost_before))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(fd) = self.fd.take() {
            let mut tracer = fd.into_inner();
            if let Err(e) = tracer.set(TraceConf::OFF) {
                tracing::error!(error = %format!("{e:#}"), "switching tracing off failed");
            }
            *self.hub.slot.lock().unwrap_or_else(PoisonError::into_inner) = Slot::Idle(Box::new(tracer));
        }
    }
}
