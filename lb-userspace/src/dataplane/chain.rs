//! `next_program`: a program that runs after the balancer on every frame it passes (Katran's
//! chaining), and the interface's XDP attachment as netlink reports it, so that the balancer can
//! take over an interface whose next program was attached there first (xdp-filter, say).

use std::path::Path;

use anyhow::{Context as _, bail, ensure};
use aya::{
    maps::{MapData, ProgramArray},
    programs::ProgramInfo,
};
use aya_obj::generated::{XDP_FLAGS_DRV_MODE, XDP_FLAGS_REPLACE, XDP_FLAGS_SKB_MODE, XDP_FLAGS_UPDATE_IF_NOEXIST, bpf_prog_type};
use rtnetlink::packet_route::link::{LinkAttribute, LinkXdp, XdpAttached};

use super::Dataplane;
use crate::netlink;

/// The next program as the controller found it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Next {
    pub path: std::path::PathBuf,
    pub id: u32,
    pub name: String,
}

/// An XDP program attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    pub prog_id: u32,
    /// `XDP_FLAGS_DRV_MODE` or `XDP_FLAGS_SKB_MODE`, as it was attached.
    pub mode_flag: u32,
}

impl Dataplane {
    /// Points `NEXT` at the XDP program pinned at `path`, or empties it.
    ///
    /// # Errors
    /// When the pin is missing or not an XDP program, or the map refuses it (a program loaded
    /// for another attach type or with another frags setting).
    pub fn set_next(&mut self, path: Option<&Path>) -> anyhow::Result<Option<Next>> {
        let map = self.ebpf.map_mut("NEXT").context("map NEXT missing from the object")?;
        let mut next: ProgramArray<&mut MapData> = ProgramArray::try_from(map).context("map NEXT")?;
        let Some(path) = path else {
            match next.clear_index(&0) {
                Ok(()) => {}
                // An empty slot is already clear.
                Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e).context("emptying NEXT"),
            }
            return Ok(None);
        };
        let info = ProgramInfo::from_pin(path).with_context(|| format!("next_program: no BPF program pinned at {}", path.display()))?;
        let ty = info.program_type();
        ensure!(
            ty != bpf_prog_type::BPF_PROG_TYPE_EXT,
            "next_program: {} is an extension of libxdp's dispatcher (freplace), which cannot be tail-called: load \
             that program without the dispatcher (LIBXDP_SKIP_DISPATCHER=1 xdp-filter load ...) and name its pin",
            path.display()
        );
        ensure!(ty == bpf_prog_type::BPF_PROG_TYPE_XDP, "next_program: {} is a BPF program of type {ty:?}, not XDP", path.display());
        let fd = info.fd().with_context(|| format!("next_program: opening program {}", info.id()))?;
        next.set(0, &fd, 0).with_context(|| {
            format!(
                "next_program: the kernel refused {} (id {}) as the balancer's next program (a program loaded for another \
                 attach type, or with multi-buffer frags support, cannot follow it)",
                path.display(),
                info.id()
            )
        })?;
        Ok(Some(Next { path: path.to_owned(), id: info.id(), name: info.name_as_str().unwrap_or("").to_owned() }))
    }
}

/// The XDP program attached to `interface` (through netlink or a link), if any.
///
/// # Errors
/// When there is no such interface or netlink fails.
pub fn attached(interface: &str) -> anyhow::Result<Option<Attached>> {
    let link = netlink::blocking(|h| async move { netlink::link(&h, interface).await })?;
    let xdp = link.attributes.iter().find_map(|a| if let LinkAttribute::Xdp(x) = a { Some(x) } else { None });
    let Some(xdp) = xdp else { return Ok(None) };
    let mode_flag = match xdp.iter().find_map(|x| if let LinkXdp::Attached(a) = x { Some(a) } else { None }) {
        Some(XdpAttached::Driver) => XDP_FLAGS_DRV_MODE,
        Some(XdpAttached::SocketBuffer) => XDP_FLAGS_SKB_MODE,
        Some(XdpAttached::None) | None => return Ok(None),
        Some(other) => bail!("{interface} has XDP attached as {other:?}, which dsrlb does not share"),
    };
    let prog_id = xdp.iter().find_map(|x| if let LinkXdp::ProgId(id) = x { Some(*id) } else { None });
    Ok(prog_id.map(|prog_id| Attached { prog_id, mode_flag }))
}

/// Attaches loaded program `prog_id` to `interface` through netlink in mode `mode_flag`
/// (`XDP_FLAGS_DRV_MODE` or `XDP_FLAGS_SKB_MODE`), if nothing is attached there: gives the
/// interface back to the next program after the balancer leaves it.
///
/// # Errors
/// When the program is gone, something else is attached, or netlink fails.
pub fn attach_id(interface: &str, prog_id: u32, mode_flag: u32) -> anyhow::Result<()> {
    attach_fd(interface, &program_fd(prog_id)?, prog_id, mode_flag)
}

/// An fd of loaded program `prog_id` (which keeps it loaded).
///
/// # Errors
/// When it is gone.
pub fn program_fd(prog_id: u32) -> anyhow::Result<aya::programs::ProgramFd> {
    program_info(prog_id)?.fd().with_context(|| format!("opening program {prog_id}"))
}

/// Loaded program `prog_id`.
///
/// # Errors
/// When it is gone.
pub fn program_info(prog_id: u32) -> anyhow::Result<ProgramInfo> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == prog_id)
        .with_context(|| format!("program {prog_id} is gone"))
}

/// As [`attach_id`], with the program's fd.
///
/// # Errors
/// As [`attach_id`].
pub fn attach_fd(interface: &str, prog: &aya::programs::ProgramFd, prog_id: u32, mode_flag: u32) -> anyhow::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let xdp = vec![LinkXdp::Fd(prog.as_fd().as_raw_fd()), LinkXdp::Flags(XDP_FLAGS_UPDATE_IF_NOEXIST | mode_flag)];
    let what = format!("attaching program {prog_id} to {interface}");
    netlink::blocking(|h| async move { netlink::set_xdp(&h, interface, xdp, what).await })
}

/// The mode flag of the XDP program on `interface` now (the balancer's, before it leaves).
#[must_use]
pub fn mode_flag_of(interface: &str) -> Option<u32> {
    attached(interface).ok().flatten().map(|a| a.mode_flag)
}

/// Whether `e` is the kernel's `EBUSY`.
#[must_use]
pub fn is_busy(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.raw_os_error() == Some(libc::EBUSY)))
}

/// Detaches the netlink attachment `was` from `interface`, only if it is still that program
/// (`XDP_FLAGS_REPLACE` with the expected program).
///
/// # Errors
/// When it changed, is a link (which netlink cannot detach), or netlink fails.
pub fn detach(interface: &str, was: Attached) -> anyhow::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let prog = program_fd(was.prog_id)?;
    let expected = u32::try_from(prog.as_fd().as_raw_fd()).context("an fd")?;
    let xdp = vec![LinkXdp::Fd(-1), LinkXdp::ExpectedFd(expected), LinkXdp::Flags(XDP_FLAGS_REPLACE | was.mode_flag)];
    let what = format!("detaching program {} from {interface}", was.prog_id);
    netlink::blocking(|h| async move { netlink::set_xdp(&h, interface, xdp, what).await })
}
