//! What this node is (`NODE`): whether a frame is addressed to it (its destination MAC is one
//! of the node's), and the clock its flows are timed by.

use aya_ebpf::{helpers::bpf_jiffies64, programs::XdpContext};
use lb_common::{MAX_NODE_MACS, NodeInfo, clock_ns};

use crate::{Verdict, maps::NODE};

/// What a frame for this node learns from `NODE`.
pub struct Node {
    /// Now, on the clock flows are timed by (`lb_common::clock_ns`).
    pub now_ns: u64,
    /// Idle age units from which a flow is expired (`NodeInfo::idle_expire`).
    pub idle_expire: u32,
}

/// The frame's destination MAC as a [`lb_common::mac_word`].
#[inline(always)]
fn dst_mac(ctx: &XdpContext) -> Result<u64, Verdict> {
    let start = ctx.data();
    if start + 6 > ctx.data_end() {
        return Err(Verdict::PassMalformed);
    }
    // SAFETY: the first 6 bytes are in the frame (checked above); packet data is 2-aligned and
    // the kernel allows this program's loads only where the CPU handles them (see `parse`).
    let (lo, hi) = unsafe { (core::ptr::read(start as *const u32), core::ptr::read((start + 4) as *const u16)) };
    Ok(u64::from(u32::from_le(lo)) | u64::from(u16::from_le(hi)) << 32)
}

/// The node, when the frame is addressed to it; else `PassNotOurMac`. The interface's own MAC
/// is checked first (the usual case, one compare), then the others.
#[inline(always)]
pub fn check(ctx: &XdpContext) -> Result<Node, Verdict> {
    let mac = dst_mac(ctx)?;
    let node: &NodeInfo = NODE.get(0).ok_or(Verdict::DropInternal)?;
    // SAFETY: a map value; each word is written whole by the controller (8-aligned stores).
    let word = |i: usize| unsafe { core::ptr::read_volatile(&raw const node.macs[i]) };
    if word(0) != mac {
        // Unused entries (all ones) never equal a 48-bit MAC.
        let mut hit = false;
        for i in 1..MAX_NODE_MACS {
            hit |= word(i) == mac;
        }
        if !hit {
            return Err(Verdict::PassNotOurMac);
        }
    }
    // SAFETY: as above; the head word holds both fields, read in one load.
    let head = unsafe { core::ptr::read_volatile((&raw const *node).cast::<u64>()) };
    #[expect(clippy::cast_possible_truncation, reason = "the two halves of a word")]
    let [ns_per_jiffy, idle_expire] = [head as u32, (head >> 32) as u32];
    // SAFETY: a helper without arguments (the kernel inlines it as a load of `jiffies`).
    let now_ns = clock_ns(unsafe { bpf_jiffies64() }, ns_per_jiffy);
    Ok(Node { now_ns, idle_expire })
}
