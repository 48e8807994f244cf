//! `dsrlb decap`, run on a broker host: attach, show and detach the program that unwraps the
//! tunnel frames balancers send to the VIPs this host holds (`lb_userspace::decap`).

use std::{collections::BTreeSet, net::IpAddr, path::PathBuf};

use aya::programs::XdpMode;
use clap::{Subcommand, ValueEnum};
use lb_userspace::decap::{self, PIN_ROOT, Settings};

#[derive(Subcommand)]
pub enum Command {
    /// Attach the decap program to IFACE (or update the one there): tunnel frames (IPIP, IPv6 in
    /// IPv6, GUE) from the balancers for these VIPs are unwrapped and go to the kernel as the
    /// clients' own packets.
    Attach {
        /// The interface tunnel frames arrive on.
        interface: String,
        /// A VIP this host holds on lo (repeat for more; IPv4 or IPv6).
        #[arg(long = "vip", value_name = "VIP", required = true)]
        vips: Vec<IpAddr>,
        /// A balancer's tunnel source address, the only outer sources accepted (repeat for more).
        #[arg(long = "source", value_name = "ADDR", required_unless_present = "any_source")]
        sources: Vec<IpAddr>,
        /// Accept tunnel frames for the VIPs from any outer source: anyone who can reach this
        /// host can then deliver packets from any client address to the broker.
        #[arg(long, conflicts_with = "sources")]
        any_source: bool,
        /// The UDP port GUE arrives on.
        #[arg(long, default_value_t = lb_common::DECAP_GUE_PORT)]
        gue_port: u16,
        /// auto (native if the driver has it, else generic), native or generic.
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: Mode,
        /// bpffs directory with a directory of pins per interface.
        #[arg(long, value_name = "DIR", default_value = PIN_ROOT)]
        pin_root: PathBuf,
    },
    /// What each attached decap program holds and has done (or IFACE's only).
    Status {
        /// Only this interface's.
        interface: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "DIR", default_value = PIN_ROOT)]
        pin_root: PathBuf,
    },
    /// Detach IFACE's decap program and remove its pins.
    Detach {
        /// The interface to detach it from.
        interface: String,
        #[arg(long, value_name = "DIR", default_value = PIN_ROOT)]
        pin_root: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Mode {
    Auto,
    Native,
    Generic,
}

impl From<Mode> for XdpMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Auto => Self::Default,
            Mode::Native => Self::Driver,
            Mode::Generic => Self::Skb,
        }
    }
}

/// Runs one `dsrlb decap` command.
///
/// # Errors
/// As `lb_userspace::decap`'s, naming the option or interface.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Attach { interface, vips, sources, any_source, gue_port, xdp_mode, pin_root } => {
            let settings = Settings {
                vips: vips.into_iter().collect(),
                sources: (!any_source).then(|| sources.into_iter().collect::<BTreeSet<_>>()),
                gue_port,
            };
            println!("{}", decap::attach(&pin_root, &interface, &settings, xdp_mode.into())?);
        }
        Command::Status { interface, json, pin_root } => {
            let all = decap::status(&pin_root, interface.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no decap program is attached (nothing in {})", pin_root.display());
            } else {
                for s in &all {
                    print!("{}", text(s));
                }
            }
        }
        Command::Detach { interface, pin_root } => println!("{}", decap::detach(&pin_root, &interface)?),
    }
    Ok(())
}

fn list(a: &BTreeSet<IpAddr>) -> String {
    a.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")
}

fn text(s: &decap::Status) -> String {
    let state = match s.program {
        Some(id) if s.attached => format!("attached, program {id}"),
        _ => "NOT attached (pins left: dsrlb decap detach, then attach again)".to_owned(),
    };
    let sources = s.settings.sources.as_ref().map_or_else(|| "any (--any-source)".to_owned(), list);
    let frames: Vec<String> = s.frames.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!(
        "{}: {state}\n  VIPs     {}\n  sources  {sources}\n  GUE port {}\n  frames   {}\n",
        s.interface,
        list(&s.settings.vips),
        s.settings.gue_port,
        frames.join(", ")
    )
}
