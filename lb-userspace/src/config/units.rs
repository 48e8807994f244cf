//! The config's units: durations (`"2s"`, `"500ms"`), MAC addresses, and the primes a ring
//! size must be.

use std::time::Duration;

/// `"2s"`, `"500ms"`, `"1m"`; a bare number is milliseconds, as in HAProxy. Between 1 ms and
/// an hour (health check intervals and timeouts).
///
/// # Errors
/// A message saying what is wrong with `s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_duration_within(s, Duration::from_millis(1), Duration::from_hours(1))
}

/// A duration as [`parse_duration`] reads it (also `"2h"`), between `min` and `max`.
///
/// # Errors
/// A message saying what is wrong with `s`.
pub fn parse_duration_within(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like \"2s\" or \"500ms\""))?;
    let scale: u64 = match unit {
        "" | "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("{s:?}: unit must be ms, s, m or h")),
    };
    let bounds = || format!("{s:?} must be between {} and {}", show_duration(min), show_duration(max));
    let d = n.checked_mul(scale).map(Duration::from_millis).ok_or_else(bounds)?;
    if d < min || d > max {
        return Err(bounds());
    }
    Ok(d)
}

/// A duration as the config writes it: the largest unit that shows it whole.
#[must_use]
pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms >= 3_600_000 && ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms >= 60_000 && ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms >= 1000 && ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

/// `"02:00:00:00:00:11"`.
///
/// # Errors
/// A message saying what is wrong with `s`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next().ok_or_else(|| format!("{s:?} is not a MAC address like 02:00:00:00:00:11"))?;
        if p.len() != 2 {
            return Err(format!("{s:?} is not a MAC address like 02:00:00:00:00:11"));
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address like 02:00:00:00:00:11"))?;
    }
    if parts.next().is_some() {
        return Err(format!("{s:?} is not a MAC address like 02:00:00:00:00:11"));
    }
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return Err(format!("{s:?} is a multicast or zero address, not a host's"));
    }
    Ok(mac)
}

#[must_use]
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

#[must_use]
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    let mut d = 2u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}
