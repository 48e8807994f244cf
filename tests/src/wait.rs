//! Waiting for a condition: the one polling loop every test and fixture uses, with a deadline
//! and a message that names what was awaited and what was last seen.
//!
//! ```ignore
//! // A bool: done or not.
//! wait::until("dsrlb attached", Duration::from_secs(20), || lb.attached());
//! // An Option: done with a value.
//! let status = wait::until("dsrlb to exit", Duration::from_secs(10), || child.try_wait().expect("wait"));
//! // A Result: not yet, and what was seen instead (it ends the panic message).
//! wait::until("b1 without flows", T, || match flows_of(&lb, "b1") { 0 => Ok(()), n => Err(format!("{n} flows")) });
//! ```

use std::{
    fmt::Display,
    process::Child,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

/// How often [`until`] polls, unless told otherwise ([`until_every`]).
pub const EVERY: Duration = Duration::from_millis(20);

/// What one poll of a condition says: done (with a value), or not yet (with what it saw, for
/// the message when the wait runs out).
pub trait Ready {
    type Value;
    /// `Ok(value)` when the condition holds; `Err(seen)` when it does not yet.
    ///
    /// # Errors
    /// When the condition does not hold yet: what was seen, if the poll says.
    fn ready(self) -> Result<Self::Value, Option<String>>;
}

impl Ready for bool {
    type Value = ();
    fn ready(self) -> Result<(), Option<String>> {
        if self { Ok(()) } else { Err(None) }
    }
}

impl<T> Ready for Option<T> {
    type Value = T;
    fn ready(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

/// `Err` is "not yet", and says what was seen instead.
impl<T, E: Display> Ready for Result<T, E> {
    type Value = T;
    fn ready(self) -> Result<T, Option<String>> {
        self.map_err(|seen| Some(seen.to_string()))
    }
}

/// Polls `check` every [`EVERY`] until it is ready, and returns its value.
///
/// # Panics
/// After `within`: "`what`: not within `within`", with what the last poll saw.
pub fn until<R: Ready>(what: impl Display, within: Duration, check: impl FnMut() -> R) -> R::Value {
    until_every(what, within, EVERY, check)
}

/// As [`until`], polling every `every`.
///
/// # Panics
/// As [`until`].
pub fn until_every<R: Ready>(what: impl Display, within: Duration, every: Duration, check: impl FnMut() -> R) -> R::Value {
    poll(within, every, check).unwrap_or_else(|seen| match seen {
        Some(seen) => panic!("{what}: not within {within:?}; last seen: {seen}"),
        None => panic!("{what}: not within {within:?}"),
    })
}

/// As [`until_every`], for a process started to serve: `up` says whether it does, and the
/// process must not exit meanwhile.
///
/// # Panics
/// When it exits first, or is not up within `within`.
pub fn until_up(what: impl Display, child: &mut Child, within: Duration, every: Duration, mut up: impl FnMut() -> bool) {
    until_every(&what, within, every, || {
        if up() {
            return true;
        }
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("{what}: the process exited ({status}) before it was up");
        }
        false
    });
}

/// Polls `check` every `every` for at most `limit`: its value once ready, `None` when the time
/// ran out (for waits that go on either way, as a kill that escalates to SIGKILL).
pub fn within<R: Ready>(limit: Duration, every: Duration, check: impl FnMut() -> R) -> Option<R::Value> {
    poll(limit, every, check).ok()
}

/// Polls `check` every `every` for the whole of `period`: what must hold throughout, not come
/// about.
///
/// # Panics
/// At the first poll it fails: "`what`: broken after `t`", with what that poll saw.
pub fn holds<R: Ready>(what: impl Display, period: Duration, every: Duration, mut check: impl FnMut() -> R) {
    let start = Instant::now();
    while start.elapsed() < period {
        match check().ready() {
            Ok(_) => {}
            Err(Some(seen)) => panic!("{what}: broken after {:?}; seen: {seen}", start.elapsed()),
            Err(None) => panic!("{what}: broken after {:?}", start.elapsed()),
        }
        std::thread::sleep(every);
    }
}

/// Runs `work` again and again until `stop` is set, for at most `cap`: a worker beside a test
/// that stops it, with a safety net should the test never get there.
pub fn repeat(cap: Duration, stop: &AtomicBool, mut work: impl FnMut()) {
    let deadline = Instant::now() + cap;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        work();
    }
}

/// The one loop: `check` until ready or past `limit`, then what it last saw.
fn poll<R: Ready>(limit: Duration, every: Duration, mut check: impl FnMut() -> R) -> Result<R::Value, Option<String>> {
    let deadline = Instant::now() + limit;
    loop {
        let seen = match check().ready() {
            Ok(value) => return Ok(value),
            Err(seen) => seen,
        };
        if Instant::now() >= deadline {
            return Err(seen);
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_ready() {
        let mut n = 0;
        let got = until_every("n reaches 3", Duration::from_secs(5), Duration::ZERO, || {
            n += 1;
            (n >= 3).then_some(n)
        });
        assert_eq!(got, 3);
        until("true", Duration::ZERO, || true);
        assert_eq!(until("ok", Duration::ZERO, || Ok::<_, String>(7)), 7);
    }

    #[test]
    #[should_panic(expected = "the answer: not within 0ns; last seen: 41")]
    fn names_what_was_awaited_and_what_was_seen() {
        until("the answer", Duration::ZERO, || Err::<(), _>(41));
    }

    #[test]
    #[should_panic(expected = "always: broken after")]
    fn holds_fails_at_the_first_poll_that_does_not() {
        holds("always", Duration::from_secs(5), Duration::ZERO, || false);
    }

    #[test]
    fn within_gives_up_quietly() {
        assert_eq!(within(Duration::ZERO, EVERY, || false), None);
        assert_eq!(within(Duration::ZERO, EVERY, || Some(1)), Some(1));
    }
}
