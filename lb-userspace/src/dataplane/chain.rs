//! `next_program`: a program that runs after the balancer on every frame it passes (Katran's
//! chaining), and the interface's XDP attachment as netlink reports it, so that the balancer can
//! take over an interface whose next program was attached there first (xdp-filter, say).

use std::path::Path;

use anyhow::{Context as _, bail, ensure};
use aya::{
    maps::{MapData, ProgramArray},
    programs::ProgramInfo,
};
use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
};

use super::Dataplane;

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

const XDP_FLAGS_UPDATE_IF_NOEXIST: u32 = 1;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const XDP_FLAGS_REPLACE: u32 = 1 << 4;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_PROG_TYPE_EXT: u32 = 28;

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
            ty as u32 != BPF_PROG_TYPE_EXT,
            "next_program: {} is an extension of libxdp's dispatcher (freplace), which cannot be tail-called: load \
             that program without the dispatcher (LIBXDP_SKIP_DISPATCHER=1 xdp-filter load ...) and name its pin",
            path.display()
        );
        ensure!(ty as u32 == BPF_PROG_TYPE_XDP, "next_program: {} is a BPF program of type {ty:?}, not XDP", path.display());
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

/// One request and its answers on a fresh routing netlink socket.
fn request(msg: RouteNetlinkMessage, flags: u16) -> anyhow::Result<Vec<NetlinkPayload<RouteNetlinkMessage>>> {
    let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE).context("opening a netlink socket")?;
    socket.bind_auto().context("binding the netlink socket")?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0)).context("connecting the netlink socket")?;
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = flags;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    socket.send(&buf, 0).context("sending a netlink request")?;
    let (bytes, _) = socket.recv_from_full().context("reading the netlink answer")?;
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[at..]).context("a netlink answer that does not parse")?;
        let len = msg.header.length as usize;
        out.push(msg.payload);
        if len == 0 {
            break;
        }
        at += len.next_multiple_of(4);
    }
    Ok(out)
}

fn ifindex(interface: &str) -> anyhow::Result<u32> {
    let name = std::ffi::CString::new(interface).context("an interface name with a NUL")?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(index != 0, "no interface {interface}");
    Ok(index)
}

/// The XDP program attached to `interface` (through netlink or a link), if any.
///
/// # Errors
/// When there is no such interface or netlink fails.
pub fn attached(interface: &str) -> anyhow::Result<Option<Attached>> {
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex(interface)?;
    for payload in request(RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST)? {
        match payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                let xdp = link.attributes.iter().find_map(|a| if let LinkAttribute::Xdp(x) = a { Some(x) } else { None });
                let Some(xdp) = xdp else { return Ok(None) };
                let mode_flag = match xdp.iter().find_map(|x| if let LinkXdp::Attached(a) = x { Some(a) } else { None }) {
                    Some(XdpAttached::Driver) => XDP_FLAGS_DRV_MODE,
                    Some(XdpAttached::SocketBuffer) => XDP_FLAGS_SKB_MODE,
                    Some(XdpAttached::None) | None => return Ok(None),
                    Some(other) => bail!("{interface} has XDP attached as {other:?}, which dsrlb does not share"),
                };
                let prog_id = xdp.iter().find_map(|x| if let LinkXdp::ProgId(id) = x { Some(*id) } else { None });
                return Ok(prog_id.map(|prog_id| Attached { prog_id, mode_flag }));
            }
            NetlinkPayload::Error(e) if e.code.is_some() => bail!("reading {interface}: {e}"),
            _ => {}
        }
    }
    bail!("netlink said nothing about {interface}")
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
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex(interface)?;
    msg.attributes
        .push(LinkAttribute::Xdp(vec![LinkXdp::Fd(prog.as_fd().as_raw_fd()), LinkXdp::Flags(XDP_FLAGS_UPDATE_IF_NOEXIST | mode_flag)]));
    acked(request(RouteNetlinkMessage::SetLink(msg), NLM_F_REQUEST | NLM_F_ACK)?, &format!("attaching program {prog_id} to {interface}"))
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

fn acked(answers: Vec<NetlinkPayload<RouteNetlinkMessage>>, what: &str) -> anyhow::Result<()> {
    for payload in answers {
        if let NetlinkPayload::Error(e) = payload {
            return match e.code {
                None => Ok(()),
                Some(code) => Err(anyhow::Error::new(std::io::Error::from_raw_os_error(-code.get())).context(what.to_owned())),
            };
        }
    }
    bail!("netlink did not acknowledge {what}")
}

/// Detaches the netlink attachment `was` from `interface`, only if it is still that program
/// (`XDP_FLAGS_REPLACE` with the expected program).
///
/// # Errors
/// When it changed, is a link (which netlink cannot detach), or netlink fails.
pub fn detach(interface: &str, was: Attached) -> anyhow::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let prog = program_fd(was.prog_id)?;
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex(interface)?;
    let expected = u32::try_from(prog.as_fd().as_raw_fd()).context("an fd")?;
    msg.attributes.push(LinkAttribute::Xdp(vec![
        LinkXdp::Fd(-1),
        LinkXdp::ExpectedFd(expected),
        LinkXdp::Flags(XDP_FLAGS_REPLACE | was.mode_flag),
    ]));
    acked(
        request(RouteNetlinkMessage::SetLink(msg), NLM_F_REQUEST | NLM_F_ACK)?,
        &format!("detaching program {} from {interface}", was.prog_id),
    )
}
