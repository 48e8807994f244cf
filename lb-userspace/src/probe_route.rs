//! Policy routing that sends health probes for VIP:port along the DSR path to one backend.
//!
//! A probe socket carries the mark [`mark`]`(backend)`; a rule sends marked packets to that
//! backend's table, whose routes say "each VIP via this backend's address". The kernel then
//! resolves the backend's MAC and sends a frame with destination IP = VIP to that MAC: exactly
//! what the XDP program does with client traffic. The broker accepts it only if it holds the
//! VIP, and answers the balancer directly from the VIP.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    process::Command,
};

use anyhow::{Context as _, bail};

/// Marks and tables live in a block of their own: `0x0d5b_0000 | backend id`.
const MARK_BASE: u32 = 0x0d5b_0000;
const MARK_MASK: u32 = 0xffff_0000;
const TABLE_BASE: u32 = 0x000d_5b00;
/// Rule preference: before the main table (32766), after local (0).
const RULE_PREF: &str = "9130";

#[must_use]
pub const fn mark(backend: u32) -> u32 {
    MARK_BASE | backend
}

const fn table(backend: u32) -> u32 {
    TABLE_BASE + backend
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes rules (and their tables) in our mark range that a previous run left.
fn clear_leftovers() {
    let Ok(rules) = ip(&["-4", "rule", "show"]) else { return };
    for line in rules.lines() {
        // "9130:	from all fwmark 0xd5b0003 lookup 875267"
        let Some(mark) = line.split_whitespace().skip_while(|w| *w != "fwmark").nth(1) else { continue };
        let Ok(m) = u32::from_str_radix(mark.trim_start_matches("0x"), 16) else { continue };
        if m & MARK_MASK == MARK_BASE {
            let backend = m & !MARK_MASK;
            let _ = ip(&["-4", "rule", "del", "pref", RULE_PREF, "fwmark", &m.to_string(), "lookup", &table(backend).to_string()]);
            let _ = ip(&["-4", "route", "flush", "table", &table(backend).to_string()]);
        }
    }
}

/// The rules and routes this controller installed, by backend id: (address, VIPs).
#[derive(Default)]
pub struct ProbeRoutes {
    interface: String,
    installed: BTreeMap<u32, (Ipv4Addr, BTreeSet<Ipv4Addr>)>,
}

impl ProbeRoutes {
    /// Starts from a clean slate: removes rules and tables a previous run may have left.
    #[must_use]
    pub fn new(interface: &str) -> Self {
        clear_leftovers();
        Self { interface: interface.to_owned(), installed: BTreeMap::new() }
    }

    /// Makes the installed rules and routes match `wanted` (backend id to address and VIPs).
    ///
    /// # Errors
    /// When `ip` refuses a rule or route (e.g. the backend is not on-link).
    pub fn sync(&mut self, wanted: &BTreeMap<u32, (Ipv4Addr, BTreeSet<Ipv4Addr>)>) -> anyhow::Result<()> {
        let gone: Vec<u32> = self.installed.keys().copied().filter(|b| !wanted.contains_key(b)).collect();
        for b in gone {
            self.remove(b);
        }
        for (&b, (addr, vips)) in wanted {
            if self.installed.get(&b) == Some(&(*addr, vips.clone())) {
                continue;
            }
            self.remove(b);
            let t = table(b).to_string();
            ip(&["-4", "rule", "add", "pref", RULE_PREF, "fwmark", &mark(b).to_string(), "lookup", &t])?;
            self.installed.insert(b, (*addr, BTreeSet::new()));
            for vip in vips {
                ip(&["-4", "route", "replace", &format!("{vip}/32"), "via", &addr.to_string(), "dev", &self.interface, "table", &t])
                    .with_context(|| format!("routing DSR probes for {vip} via backend {addr}"))?;
            }
            self.installed.insert(b, (*addr, vips.clone()));
        }
        Ok(())
    }

    fn remove(&mut self, backend: u32) {
        if self.installed.remove(&backend).is_some() {
            let t = table(backend).to_string();
            let _ = ip(&["-4", "rule", "del", "pref", RULE_PREF, "fwmark", &mark(backend).to_string(), "lookup", &t]);
            let _ = ip(&["-4", "route", "flush", "table", &t]);
        }
    }

    /// Removes everything installed, so the next [`Self::sync`] installs every rule and route
    /// again (whatever happened to them meanwhile).
    pub fn forget(&mut self) {
        self.clear();
    }

    /// Removes everything installed.
    pub fn clear(&mut self) {
        let all: Vec<u32> = self.installed.keys().copied().collect();
        for b in all {
            self.remove(b);
        }
    }
}

impl Drop for ProbeRoutes {
    fn drop(&mut self) {
        self.clear();
    }
}
