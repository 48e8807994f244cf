//! What this node announces to the routers (`[announce]`, see `crate::announce`): the usable
//! VIPs once the program is attached, none while it does not forward, and on `dsrlb stop`,
//! none before the program is detached.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    announce::{self, Announcer},
    config,
    control::status::{AnnounceStatus, VipStatus},
};

/// How often the announced routes are put back if someone removed them.
const REPAIR_EVERY: Duration = Duration::from_secs(30);

/// After `dsrlb stop` withdraws the VIPs: the listeners must see no packet this long before
/// the program is detached (the routers have moved the traffic elsewhere).
const QUIET: Duration = Duration::from_secs(1);

/// The announcer, while `[announce]` asks for one, and what it may announce.
pub struct Announcing {
    announcer: Option<Announcer>,
    /// The program is attached (announcing starts only then).
    attached: bool,
    /// Why this node does not forward although it runs (the link is gone, the interface down):
    /// nothing is announced and `dsrlb ping` fails.
    unannounced: Option<String>,
    next_repair: Instant,
}

impl Announcing {
    pub fn new() -> Self {
        Self { announcer: None, attached: false, unannounced: None, next_repair: Instant::now() + REPAIR_EVERY }
    }

    /// Starts the announcer when the config has an `[announce]`.
    pub fn start(&mut self, wanted: Option<config::Announce>) -> anyhow::Result<()> {
        if wanted.is_some() {
            self.announcer = Some(Announcer::start()?);
        }
        Ok(())
    }

    /// The program is attached: from now on, what is usable is announced.
    pub fn attach(&mut self) {
        self.attached = true;
    }

    /// Announces what `cfg` asks for: nothing while not forwarding (even while joining), what
    /// it has while `joining` (a restarting node stays announced), else the `usable` VIPs.
    pub fn update(&self, cfg: Option<config::Announce>, joining: bool, usable: impl FnOnce() -> BTreeSet<IpAddr>) {
        let (Some(a), Some(cfg)) = (&self.announcer, cfg) else { return };
        if !self.attached {
            return;
        }
        let vips = if self.unannounced.is_some() {
            BTreeSet::new()
        } else if joining {
            return;
        } else {
            usable()
        };
        a.set(announce::Wanted { table: cfg.table, vips });
    }

    /// Whether the node forwards (`why` not, when it does not); returns whether that changed
    /// (then the announcement must follow). Only once attached.
    pub fn forwarding(&mut self, why: impl FnOnce() -> Option<String>) -> bool {
        if !self.attached {
            return false;
        }
        let why = why();
        match (&why, &self.unannounced) {
            (Some(w), None) => {
                tracing::error!(why = %w, "this node no longer forwards: every VIP withdrawn, dsrlb ping fails");
                self.unannounced = why;
                true
            }
            (None, Some(_)) => {
                tracing::info!("forwarding again: VIPs announced as usable, dsrlb ping answers");
                self.unannounced = None;
                true
            }
            _ => false,
        }
    }

    /// Puts back routes someone removed, every [`REPAIR_EVERY`] (not while joining).
    pub fn repair(&mut self, joining: bool) {
        let Some(a) = &self.announcer else { return };
        if Instant::now() >= self.next_repair {
            self.next_repair = Instant::now() + REPAIR_EVERY;
            if !joining {
                a.repair();
            }
        }
    }

    /// Why the node does not forward, while it does not.
    pub fn not_forwarding(&self) -> Option<&str> {
        self.unannounced.as_deref()
    }

    /// `announce` for `dsrlb status`: each of `vips`, announced or not, and why.
    pub fn status(
        &self,
        cfg: Option<config::Announce>,
        vips: BTreeSet<IpAddr>,
        joining: bool,
        usable: &BTreeSet<IpAddr>,
    ) -> Option<AnnounceStatus> {
        let cfg = cfg?;
        let held = self.announcer.as_ref().map(Announcer::held).unwrap_or_default();
        let vips = vips
            .into_iter()
            .map(|vip| {
                let why = if let Some(u) = &self.unannounced {
                    u.clone()
                } else if joining {
                    "joining the cluster: left as it was".to_owned()
                } else if usable.contains(&vip) {
                    "a listener has a usable backend".to_owned()
                } else {
                    "no listener on it has a usable backend".to_owned()
                };
                VipStatus { vip, announced: held.vips.contains(&vip), why }
            })
            .collect();
        Some(AnnounceStatus { table: cfg.table, vips, error: held.error })
    }

    /// A reload's `[announce]`: an announcer starts when the section comes; when it goes, the
    /// same reconciler withdraws everything (and would announce again in order if a later
    /// reload put the section back).
    pub fn reconfigure(&mut self, wanted: Option<config::Announce>) -> anyhow::Result<()> {
        match (wanted, &self.announcer) {
            (Some(_), None) => self.announcer = Some(Announcer::start()?),
            (None, Some(a)) => a.set(announce::Wanted { table: config::DEFAULT_ANNOUNCE_TABLE, vips: BTreeSet::new() }),
            _ => {}
        }
        Ok(())
    }

    /// On the way out. `dsrlb stop` (`stopping`): withdraw every VIP, then wait until the
    /// listeners see no packet (`packets` counts them) for [`QUIET`], at most `withdraw_wait`,
    /// so that detaching drops nothing the routers still send here. Otherwise the routes stay:
    /// forwarding continues from the pins.
    pub async fn leave(&mut self, stopping: bool, cfg: Option<config::Announce>, packets: impl Fn() -> u64) {
        let Some(a) = self.announcer.take() else { return };
        if !stopping {
            a.leave();
            return;
        }
        let Some(cfg) = cfg else {
            // [announce] was removed by a reload: its routes are withdrawn already, and no
            // router steers traffic here by them, so there is nothing to wait for.
            if let Err(e) = a.withdraw_all().await {
                tracing::error!(error = %format!("{e:#}"), "dsrlb stop: withdrawing the VIPs failed");
            }
            return;
        };
        match a.withdraw_all().await {
            Ok(n) => tracing::info!(withdrawn = n, "dsrlb stop: VIPs withdrawn; waiting for the traffic to stop before detaching"),
            Err(e) => tracing::error!(error = %format!("{e:#}"), "dsrlb stop: withdrawing the VIPs failed"),
        }
        let started = Instant::now();
        let (mut last, mut since) = (packets(), Instant::now());
        while started.elapsed() < cfg.withdraw_wait && since.elapsed() < QUIET {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = packets();
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        tracing::info!(after = ?started.elapsed(), quiet = since.elapsed() >= QUIET, "dsrlb stop: detaching");
    }
}

/// Withdraws every route dsrlb announced (any table), for `dsrlb stop` with no controller
/// running; returns how many there were.
///
/// # Errors
/// When netlink fails.
pub async fn withdraw_without_controller() -> anyhow::Result<usize> {
    let handle = crate::netlink::connect()?;
    announce::withdraw_all(&handle).await.context("withdrawing the VIPs")
}
