//! `dsrlb decap`: the brokers' side of tunnelled forwarding. Loads the decapsulation program
//! (lb-ebpf's `dsrlb-decap`, see `lb_common::decap_reason` for what it does with each frame),
//! fills its maps with the VIPs this host holds and the balancers allowed to send to them,
//! attaches it through a pinned link so it outlives the command, and reads it back.
//!
//! Pins: `PIN_ROOT/IFACE/` holds `link` and the five maps. Attaching again to an interface that
//! has the program updates its settings in place; `detach` removes the pins, and with the link's
//! pin the attachment.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};
use lb_common::{DECAP_GUE_PORT, DECAP_MAX_ADDRS, DECAP_RULE_ADDRS, DecapConf, DecapRule, Ip6, decap_reason};
use serde::{Deserialize, Serialize};

use crate::dataplane;

/// The decapsulation object built from `lb-ebpf` by `build.rs`.
pub static DECAP_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dsrlb-decap"));

/// Where the pins of each interface's program live, one directory per interface.
pub const PIN_ROOT: &str = "/sys/fs/bpf/dsrlb-decap";

const PROGRAM: &str = "dsrlb_decap";
const VIPS: &str = "DECAP_VIPS";
const SOURCES: &str = "DECAP_SOURCES";
const CONF: &str = "DECAP_CONF";
const STATS: &str = "DECAP_STATS";
const RULES: &str = "DECAP_RULES";
const MAPS: [&str; 5] = [VIPS, SOURCES, CONF, STATS, RULES];
const LINK: &str = "link";

/// What a decap program is told.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// The VIPs this host holds (on `lo`): tunnel frames for them are unwrapped.
    pub vips: BTreeSet<IpAddr>,
    /// The outer sources allowed to send them (the balancers' tunnel sources); `None`: any.
    pub sources: Option<BTreeSet<IpAddr>>,
    /// The UDP port GUE arrives on.
    pub gue_port: u16,
}

impl Settings {
    /// # Errors
    /// Naming the option that is wrong: no VIP, too many addresses, no source (without
    /// `--any-source`), GUE port 0.
    pub fn check(&self) -> anyhow::Result<()> {
        let max = DECAP_MAX_ADDRS as usize;
        ensure!(!self.vips.is_empty(), "--vip: at least one VIP is needed (the VIPs this host holds on lo)");
        ensure!(self.vips.len() <= max, "--vip: {} VIPs, at most {max}", self.vips.len());
        for v in &self.vips {
            unicast("--vip", *v)?;
        }
        match &self.sources {
            Some(s) if s.is_empty() => {
                bail!("--source: name the balancers allowed to send tunnel frames (their tunnel_source), or give --any-source")
            }
            Some(s) => {
                ensure!(s.len() <= max, "--source: {} sources, at most {max}", s.len());
                for a in s {
                    unicast("--source", *a)?;
                }
            }
            None => {}
        }
        ensure!(self.gue_port != 0, "--gue-port: 0 is no port");
        Ok(())
    }
}

/// A host's unicast address: not unspecified, loopback, multicast, broadcast or link-local,
/// and not IPv4-mapped IPv6 (which would stand for the IPv4 address in the maps' one key space).
fn unicast(option: &str, a: IpAddr) -> anyhow::Result<()> {
    let bad = match a {
        IpAddr::V4(v) => v.is_unspecified() || v.is_loopback() || v.is_multicast() || v.is_broadcast() || v.is_link_local(),
        IpAddr::V6(v) => {
            v.is_unspecified() || v.is_loopback() || v.is_multicast() || v.is_unicast_link_local() || v.to_ipv4_mapped().is_some()
        }
    };
    ensure!(!bad, "{option} {a}: not a host's unicast address");
    Ok(())
}

impl Default for Settings {
    fn default() -> Self {
        Self { vips: BTreeSet::new(), sources: Some(BTreeSet::new()), gue_port: DECAP_GUE_PORT }
    }
}

/// Removes the keys of `map` that are not in `keep`.
fn remove_others(map: &mut HashMap<MapData, Ip6, u8>, keep: &BTreeSet<Ip6>, what: &str) -> anyhow::Result<()> {
    let old: Vec<Ip6> = map.keys().filter_map(Result::ok).filter(|k| !keep.contains(k)).collect();
    for k in old {
        map.remove(&k).with_context(|| format!("removing {what} {}", addr(k)))?;
    }
    Ok(())
}

/// Inserts every key of `want` into `map`.
fn insert_all(map: &mut HashMap<MapData, Ip6, u8>, want: &BTreeSet<Ip6>, what: &str) -> anyhow::Result<()> {
    for k in want {
        map.insert(k, 1, 0).with_context(|| format!("writing {what} {}", addr(*k)))?;
    }
    Ok(())
}

/// An address as the program's maps hold it.
fn key(a: IpAddr) -> Ip6 {
    let v6 = match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    Ip6 { octets: v6.octets() }
}

fn addr(k: Ip6) -> IpAddr {
    let v6 = Ipv6Addr::from(k.octets);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// The program's maps, from a loaded object or from pins.
pub struct Maps {
    vips: HashMap<MapData, Ip6, u8>,
    sources: HashMap<MapData, Ip6, u8>,
    conf: Array<MapData, DecapConf>,
    stats: PerCpuArray<MapData, u64>,
    /// `None` in the pins of an older dsrlb's program, which has no small rules: it is then
    /// set through the hash maps, as that dsrlb did.
    rules: Option<Array<MapData, DecapRule>>,
}

impl Maps {
    fn from(mut take: impl FnMut(&str) -> anyhow::Result<Option<Map>>) -> anyhow::Result<Self> {
        let kind = |name: &str| format!("{name} is not the map this dsrlb expects");
        let mut need = |name: &str| take(name)?.with_context(|| format!("no map {name}"));
        Ok(Self {
            vips: HashMap::try_from(need(VIPS)?).with_context(|| kind(VIPS))?,
            sources: HashMap::try_from(need(SOURCES)?).with_context(|| kind(SOURCES))?,
            conf: Array::try_from(need(CONF)?).with_context(|| kind(CONF))?,
            stats: PerCpuArray::try_from(need(STATS)?).with_context(|| kind(STATS))?,
            rules: take(RULES)?.map(Array::try_from).transpose().with_context(|| kind(RULES))?,
        })
    }

    /// The maps pinned in `dir` (an older dsrlb's program has no `DECAP_RULES`).
    ///
    /// # Errors
    /// When a pin is missing or of another kind.
    pub fn pinned(dir: &Path) -> anyhow::Result<Self> {
        Self::from(|name| {
            let path = dir.join(name);
            if name == RULES && !path.exists() {
                return Ok(None);
            }
            let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            Ok(Some(match name {
                VIPS | SOURCES => Map::HashMap(data),
                CONF | RULES => Map::Array(data),
                _ => Map::PerCpuArray(data),
            }))
        })
        .with_context(|| format!("the decap program pinned in {} is not one this dsrlb can read", dir.display()))
    }

    /// Writes `s`, in an order that never admits more than the old or the new settings do.
    ///
    /// Sets small enough for a rule (each at most `DECAP_RULE_ADDRS`): the new rule goes into
    /// the `DECAP_RULES` entry not in use, then `DECAP_CONF` names it, a single byte changing, so
    /// the program goes from the old rule to the new one whole; the hash maps then follow, unread.
    ///
    /// Larger sets, from a rule: the hash maps take them while unread, then `DECAP_CONF` stops
    /// naming the rule. From the hash maps: VIPs that go are removed first and new ones added
    /// last; the sources that go are removed, the rule and port change, then new sources are
    /// added (from any source, before the rule changes); no balancer of both is refused
    /// meanwhile. Old and new each fit the maps, so removing first also keeps an update from
    /// filling them half-way.
    ///
    /// # Errors
    /// When a map write fails.
    pub fn write(&mut self, s: &Settings) -> anyhow::Result<()> {
        let vips: BTreeSet<Ip6> = s.vips.iter().copied().map(key).collect();
        let sources: BTreeSet<Ip6> = s.sources.iter().flatten().copied().map(key).collect();
        let now = self.conf.get(&0, 0).context("reading DECAP_CONF")?;
        let new = DecapConf { gue_port_be: s.gue_port.to_be(), any_source: u8::from(s.sources.is_none()), ..now };
        let small = vips.len() <= DECAP_RULE_ADDRS && sources.len() <= DECAP_RULE_ADDRS;
        if let (true, Some(rules)) = (small, self.rules.as_mut()) {
            let next = if now.rule == 1 { 2 } else { 1 };
            let mut rule = DecapRule { gue_port_be: new.gue_port_be, any_source: new.any_source, ..DecapRule::default() };
            for (slot, k) in rule.vips.iter_mut().zip(&vips) {
                *slot = *k;
            }
            for (slot, k) in rule.sources.iter_mut().zip(&sources) {
                *slot = *k;
            }
            (rule.vip_count, rule.source_count) = (u8::try_from(vips.len())?, u8::try_from(sources.len())?);
            rules.set(u32::from(next) - 1, rule, 0).context("writing DECAP_RULES")?;
            self.conf.set(0, DecapConf { rule: next, ..now }, 0).context("writing DECAP_CONF")?;
            self.follow(&vips, &sources)?;
            return self.conf.set(0, DecapConf { rule: next, ..new }, 0).context("writing DECAP_CONF");
        }
        if now.rule != 0 {
            self.follow(&vips, &sources)?;
            self.conf.set(0, DecapConf { rule: now.rule, ..new }, 0).context("writing DECAP_CONF")?;
            return self.conf.set(0, DecapConf { rule: 0, ..new }, 0).context("writing DECAP_CONF");
        }
        remove_others(&mut self.vips, &vips, "VIP")?;
        // DECAP_CONF changes one field per write (the program reads them one by one): the GUE
        // port and the any-source rule, in the order that keeps what is admitted within the
        // old or the new settings.
        let (port, any) = (DecapConf { gue_port_be: new.gue_port_be, ..now }, DecapConf { any_source: new.any_source, ..now });
        if s.sources.is_none() {
            // To any source: the port, then the rule (while it still says "a list", clearing the
            // list would drop every balancer's frames), then the list goes.
            self.conf.set(0, port, 0).context("writing DECAP_CONF")?;
            self.conf.set(0, new, 0).context("writing DECAP_CONF")?;
            remove_others(&mut self.sources, &sources, "source")?;
        } else {
            // To a list: the sources that go first, then the rule (to a list first, then the
            // port). From any source, the list is filled before the rule says "a list" (any
            // source admits its balancers already; an empty list would refuse them all); from a
            // list, the new sources come last (one with the old port is in neither setting).
            remove_others(&mut self.sources, &sources, "source")?;
            if now.any_source != 0 {
                insert_all(&mut self.sources, &sources, "source")?;
            }
            self.conf.set(0, any, 0).context("writing DECAP_CONF")?;
            self.conf.set(0, new, 0).context("writing DECAP_CONF")?;
            if now.any_source == 0 {
                insert_all(&mut self.sources, &sources, "source")?;
            }
        }
        insert_all(&mut self.vips, &vips, "VIP")
    }

    /// Makes the hash maps hold `vips` and `sources` (while the program reads a rule instead).
    fn follow(&mut self, vips: &BTreeSet<Ip6>, sources: &BTreeSet<Ip6>) -> anyhow::Result<()> {
        remove_others(&mut self.vips, vips, "VIP")?;
        insert_all(&mut self.vips, vips, "VIP")?;
        remove_others(&mut self.sources, sources, "source")?;
        insert_all(&mut self.sources, sources, "source")
    }

    /// What the maps say.
    ///
    /// # Errors
    /// When a map read fails.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let conf = self.conf.get(&0, 0).context("reading DECAP_CONF")?;
        if conf.rule != 0 {
            // The rule named is what the program enforces.
            let rules = self.rules.as_ref().context("DECAP_CONF names a rule, and there is no DECAP_RULES")?;
            let r = rules.get(&(u32::from(conf.rule) - 1), 0).with_context(|| format!("reading DECAP_RULES[{}]", conf.rule - 1))?;
            let vips = r.vips.iter().take(usize::from(r.vip_count)).map(|k| addr(*k)).collect();
            let sources = r.sources.iter().take(usize::from(r.source_count)).map(|k| addr(*k)).collect();
            return Ok(Settings { vips, sources: (r.any_source == 0).then_some(sources), gue_port: u16::from_be(r.gue_port_be) });
        }
        let vips = self.vips.keys().map(|k| k.map(addr)).collect::<Result<_, _>>().context("reading DECAP_VIPS")?;
        let sources = self.sources.keys().map(|k| k.map(addr)).collect::<Result<_, _>>().context("reading DECAP_SOURCES")?;
        Ok(Settings { vips, sources: (conf.any_source == 0).then_some(sources), gue_port: u16::from_be(conf.gue_port_be) })
    }

    /// Frames by reason (`decap_reason::NAMES`), summed over CPUs.
    ///
    /// # Errors
    /// When a map read fails.
    pub fn counters(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for (i, name) in (0u32..).zip(decap_reason::NAMES) {
            let n: u64 = self.stats.get(&i, 0).context("reading DECAP_STATS")?.iter().sum();
            out.insert(name.to_owned(), n);
        }
        Ok(out)
    }
}

/// The program loaded, not attached: for attaching, and for tests (`BPF_PROG_TEST_RUN`).
pub struct Loaded {
    ebpf: Ebpf,
    pub maps: Maps,
}

impl Loaded {
    /// Loads the object and its program into the kernel.
    ///
    /// # Errors
    /// When the kernel refuses the object or the program.
    pub fn load() -> anyhow::Result<Self> {
        Self::load_pinned(None)
    }

    /// As [`Self::load`], its maps pinned in `pin_dir` if given.
    fn load_pinned(pin_dir: Option<&Path>) -> anyhow::Result<Self> {
        let mut ebpf = Ebpf::load(DECAP_OBJ).context("loading the decap object")?;
        let prog: &mut Xdp = ebpf.program_mut(PROGRAM).context("no decap program in the object")?.try_into()?;
        prog.load().context("the kernel refused the decap program")?;
        if let Some(dir) = pin_dir {
            for name in MAPS {
                let map = ebpf.map(name).with_context(|| format!("no map {name} in the decap object"))?;
                map.pin(dir.join(name)).with_context(|| format!("pinning {name} in {}", dir.display()))?;
            }
        }
        let maps = Maps::from(|name| ebpf.take_map(name).map(Some).with_context(|| format!("no map {name} in the decap object")))?;
        Ok(Self { ebpf, maps })
    }

    /// Attaches the program to `interface` through a link pinned in `dir`.
    fn attach_pinned(&mut self, dir: &Path, interface: &str, mode: XdpMode) -> anyhow::Result<()> {
        let prog: &mut Xdp = self.ebpf.program_mut(PROGRAM).context("no decap program")?.try_into()?;
        let id = prog.attach(interface, mode).with_context(|| format!("attaching the decap program to {interface} in {mode:?} mode"))?;
        let link = FdLink::try_from(prog.take_link(id)?).context("the kernel gave a netlink attachment, which cannot be pinned")?;
        drop(link.pin(dir.join(LINK)).with_context(|| format!("pinning the link in {}", dir.display()))?);
        Ok(())
    }

    /// The program and the maps, apart: to run frames while the maps change.
    ///
    /// # Panics
    /// Never: `load` found the program.
    pub fn parts(&mut self) -> (&Xdp, &mut Maps) {
        (program(&self.ebpf), &mut self.maps)
    }

    /// The program, for `BPF_PROG_TEST_RUN`.
    ///
    /// # Panics
    /// Never: `load` found it.
    #[must_use]
    pub fn program(&self) -> &Xdp {
        program(&self.ebpf)
    }
}

/// The decap program of a loaded object.
fn program(ebpf: &Ebpf) -> &Xdp {
    ebpf.program(PROGRAM).and_then(|p| p.try_into().ok()).expect("loaded")
}

/// The pin directory of `interface`'s program.
#[must_use]
pub fn pin_dir(root: &Path, interface: &str) -> PathBuf {
    root.join(interface)
}

fn check_interface_name(interface: &str) -> anyhow::Result<()> {
    ensure!(
        !interface.is_empty()
            && interface.len() < 16
            && !interface.starts_with('.')
            && interface.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)),
        "interface {interface:?}: not an interface name"
    );
    Ok(())
}

/// Attaches the program to `interface` with `settings`, or updates the settings of the one
/// attached there. Every option is checked before anything changes; a failed first attach
/// leaves no pin behind. What it did, in words.
///
/// # Errors
/// When an option is wrong, the interface is missing or runs another XDP program, or the
/// kernel refuses.
pub fn attach(root: &Path, interface: &str, settings: &Settings, mode: XdpMode) -> anyhow::Result<String> {
    settings.check()?;
    check_interface_name(interface)?;
    let _lock = Lock::take(root, true)?;
    let dir = pin_dir(root, interface);
    if dir.join(LINK).exists() {
        ensure!(
            dataplane::link_live(&dir, interface),
            "{} is pinned but no longer attached to {interface}: dsrlb decap detach {interface} first",
            dir.join(LINK).display()
        );
        Maps::pinned(&dir)?.write(settings)?;
        return Ok(format!(
            "updated the decap program on {interface} (its settings only: the program and its XDP mode stay; detach and \
             attach to load another dsrlb's)"
        ));
    }
    if let Some(there) = dataplane::chain::attached(interface)? {
        let name = dataplane::chain::program_info(there.prog_id).ok().and_then(|p| p.name_as_str().map(str::to_owned));
        bail!("{interface} already runs XDP program {} ({}): detach it first", there.prog_id, name.as_deref().unwrap_or("name unknown"));
    }
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!("{} holds pins of a decap program no longer attached: dsrlb decap detach {interface} first", dir.display())
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    // The directory is this run's (made above, under the lock): on failure, all of it goes.
    let attached = Loaded::load_pinned(Some(&dir)).and_then(|mut loaded| {
        loaded.maps.write(settings)?;
        loaded.attach_pinned(&dir, interface, mode)
    });
    if attached.is_err() {
        let _ = unpin(&dir);
    }
    attached?;
    Ok(format!("attached the decap program to {interface} ({} VIPs)", settings.vips.len()))
}

/// A lock on the pin root for one command, so that two `dsrlb decap` commands never
/// interleave (`flock` on the directory; shared for `status`).
struct Lock {
    _dir: std::fs::File,
}

impl Lock {
    fn take(root: &Path, exclusive: bool) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let dir = std::fs::File::open(root).with_context(|| format!("opening {}", root.display()))?;
        let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
        // SAFETY: flock on a descriptor this function owns; it is released when the file closes.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&dir), op) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("locking {}", root.display()));
        }
        Ok(Self { _dir: dir })
    }
}

/// Removes `dir`'s pins, the link's first (which detaches the program), then the directory.
fn unpin(dir: &Path) -> anyhow::Result<()> {
    for name in std::iter::once(LINK).chain(MAPS) {
        let p = dir.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| format!("removing {}", dir.display())),
        _ => Ok(()),
    }
}

/// Detaches `interface`'s program and removes its pins.
///
/// # Errors
/// When nothing is pinned for it, or a pin cannot be removed.
pub fn detach(root: &Path, interface: &str) -> anyhow::Result<String> {
    check_interface_name(interface)?;
    let _lock = Lock::take(root, true)?;
    let dir = pin_dir(root, interface);
    ensure!(dir.join(LINK).exists() || dir.exists(), "no decap program is attached to {interface} (nothing in {})", dir.display());
    unpin(&dir)?;
    Ok(format!("detached the decap program from {interface}"))
}

/// One interface's program, as `dsrlb decap status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub interface: String,
    /// Whether the pinned link still holds the program on the interface.
    pub attached: bool,
    /// The program's id, when attached.
    pub program: Option<u32>,
    pub settings: Settings,
    /// Frames by reason, since it was attached.
    pub frames: BTreeMap<String, u64>,
}

/// The status of every interface with a pinned program (or of `only`).
///
/// # Errors
/// When `only` has no program, or pins cannot be read.
pub fn status(root: &Path, only: Option<&str>) -> anyhow::Result<Vec<Status>> {
    let _lock = if root.exists() { Some(Lock::take(root, false)?) } else { None };
    let names: Vec<String> = match only {
        Some(i) => {
            check_interface_name(i)?;
            ensure!(pin_dir(root, i).exists(), "no decap program is attached to {i} (nothing in {})", pin_dir(root, i).display());
            vec![i.to_owned()]
        }
        None => match std::fs::read_dir(root) {
            Ok(d) => {
                let mut v: Vec<String> = d.filter_map(Result::ok).filter_map(|e| e.file_name().into_string().ok()).collect();
                v.sort();
                v
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", root.display())),
        },
    };
    names
        .into_iter()
        .map(|interface| {
            let dir = pin_dir(root, &interface);
            let maps = Maps::pinned(&dir)?;
            let attached = dataplane::link_live(&dir, &interface);
            let program = if attached {
                PinnedLink::from_pin(dir.join(LINK)).map(FdLink::from).and_then(|l| l.info()).ok().map(|i| i.program_id())
            } else {
                None
            };
            Ok(Status { attached, program, settings: maps.settings()?, frames: maps.counters()?, interface })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vips: &[&str], sources: Option<&[&str]>) -> Settings {
        Settings {
            vips: vips.iter().map(|v| v.parse().expect("address")).collect(),
            sources: sources.map(|s| s.iter().map(|v| v.parse().expect("address")).collect()),
            gue_port: DECAP_GUE_PORT,
        }
    }

    #[test]
    fn bad_options_are_named() {
        let cases = [
            (settings(&[], None), "--vip: at least one VIP"),
            (settings(&["192.0.2.100"], Some(&[])), "--source: name the balancers"),
            (settings(&["0.0.0.0"], None), "--vip 0.0.0.0: not a host's unicast address"),
            (settings(&["ff02::1"], None), "--vip ff02::1: not a host's unicast address"),
            (settings(&["127.0.0.1"], None), "--vip 127.0.0.1: not a host's unicast address"),
            (settings(&["::ffff:192.0.2.100"], None), "--vip ::ffff:192.0.2.100: not a host's unicast address"),
            (settings(&["192.0.2.100"], Some(&["255.255.255.255"])), "--source 255.255.255.255: not a host's unicast address"),
            (settings(&["192.0.2.100"], Some(&["fe80::1"])), "--source fe80::1: not a host's unicast address"),
            (Settings { gue_port: 0, ..settings(&["192.0.2.100"], None) }, "--gue-port: 0 is no port"),
        ];
        for (s, want) in cases {
            let e = s.check().expect_err(want).to_string();
            assert!(e.contains(want), "{e}");
        }
        assert!(settings(&["192.0.2.100", "2001:db8::100"], Some(&["192.0.2.2"])).check().is_ok());
        assert!(check_interface_name("eth0").is_ok());
        for bad in ["", ".", "..", "../etc", "a/b", "a b", "averyveryverylongname"] {
            assert!(check_interface_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn addresses_keep_their_family_through_the_maps() {
        for a in ["192.0.2.100", "2001:db8::100", "::1"] {
            let a: IpAddr = a.parse().expect("address");
            assert_eq!(addr(key(a)), a);
        }
    }
}
