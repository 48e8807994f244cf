//! The program's clock, as userspace reads it: `bpf_ktime_get_ns()` is `CLOCK_MONOTONIC`, and
//! [`Clock`] turns it into wall-clock time.

/// `bpf_ktime_get_ns()` to the wall clock: the offset of `CLOCK_REALTIME` from
/// `CLOCK_MONOTONIC`, read once per trace.
pub struct Clock {
    offset_ns: i128,
}

fn clock_ns(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a timespec to write.
    unsafe { libc::clock_gettime(id, &raw mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// `CLOCK_MONOTONIC` in nanoseconds: what the program's `bpf_ktime_get_ns()` reads.
#[must_use]
pub fn monotonic_ns() -> u64 {
    u64::try_from(clock_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0)
}

impl Clock {
    #[must_use]
    pub fn now() -> Self {
        Self { offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC) }
    }

    #[must_use]
    pub fn wall_ns(&self, mono_ns: u64) -> u64 {
        u64::try_from(i128::from(mono_ns) + self.offset_ns).unwrap_or(0)
    }
}

#[cfg(test)]
impl Clock {
    /// A clock whose monotonic time is the wall-clock time (for tests of fixed timestamps).
    pub(crate) const fn unshifted() -> Self {
        Self { offset_ns: 0 }
    }
}
