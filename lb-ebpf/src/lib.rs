//! What the XDP objects share (the balancer, `dsrlb`; the brokers' decap program, `dsrlb-decap`;
//! the test object, `dsrlb-test`): the IP headers they read, and the end every object needs.
//! It is also a host-side stub: it lets `lb-userspace` name this crate as a build-dependency,
//! so cargo rebuilds the objects whenever a program changes.
#![no_std]

/// IP headers as they sit in a frame: `#[repr(C)]`, multi-byte fields in wire order.
pub mod hdr {
    use lb_common::Addr6;

    /// The fixed part of an IPv4 header.
    #[repr(C)]
    pub struct Ipv4Hdr {
        pub ver_ihl: u8,
        pub tos: u8,
        pub tot_len: u16,
        pub id: u16,
        pub frag_off: u16,
        pub ttl: u8,
        pub protocol: u8,
        pub check: u16,
        pub saddr: u32,
        pub daddr: u32,
    }

    /// The fixed IPv6 header; the addresses as [`Addr6`].
    #[repr(C)]
    pub struct Ipv6Hdr {
        pub ver_tc_flow: u32,
        pub payload_len: u16,
        pub next_header: u8,
        pub hop_limit: u8,
        pub saddr: Addr6,
        pub daddr: Addr6,
    }

    /// IPv4 `frag_off` bits, in wire order: "more fragments" and the 13-bit offset.
    pub const IP_MF_OFFSET_MASK: u16 = 0x3fff_u16.to_be();
    /// IPv4 "don't fragment", in wire order.
    pub const IP_DF: u16 = 0x4000_u16.to_be();

    /// An untagged Ethernet header's length.
    pub const ETH_HLEN: usize = 14;

    /// The protocols a tunnel carries (IPv4 `protocol`, IPv6 `next_header`).
    pub const IPPROTO_IPIP: u8 = 4;
    pub const IPPROTO_UDP: u8 = 17;
    pub const IPPROTO_IPV6: u8 = 41;

    /// IPv6 extension headers (RFC 8200 4): hop-by-hop options, routing, fragment, destination
    /// options.
    pub const IPV6_HOPOPTS: u8 = 0;
    pub const IPV6_ROUTING: u8 = 43;
    pub const IPV6_FRAGMENT: u8 = 44;
    pub const IPV6_DSTOPTS: u8 = 60;
    /// Extension headers the balancer follows before TCP (`PassNotTcp` past them), besides one
    /// fragment header: hop-by-hop, routing and two destination-options headers is the longest
    /// chain RFC 8200's order recommends.
    pub const IPV6_MAX_EXT: usize = 4;

    /// A UDP header (GUE's outer transport), fields in wire order.
    #[repr(C)]
    pub struct UdpHdr {
        pub source: u16,
        pub dest: u16,
        pub len: u16,
        pub check: u16,
    }

    /// The IPv4 address an `Ip6` holds IPv4-mapped (in its last four bytes), as the wire-order
    /// word a header holds.
    #[inline(always)]
    #[expect(clippy::inline_always, reason = "the XDP and TC programs need it inlined into their paths")]
    #[must_use]
    pub fn mapped_v4(a: &lb_common::Ip6) -> u32 {
        let o = &a.octets;
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]])
    }

    const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == 20 && core::mem::size_of::<Ipv6Hdr>() == 40);
}

/// The loads and stores that order what one CPU writes for another to read (the flow table's
/// slot protocol, `lb_common::FLOW_WAYS`, and the controller's published words, `LISTENERS`
/// and `LISTEN_PORTS`). In the default build they are plain (volatile) loads and stores: x86-64
/// orders every load as an acquire and every store as a release (total store order), and the
/// object loads on any kernel the balancer supports. With the `ordered` feature (the
/// `dsrlb-ordered` object, built for BPF ISA v4) they are BPF load-acquire and store-release
/// instructions (Linux 6.15; LDAR and STLR on arm64, plain moves on x86-64): the object for
/// weakly ordered CPUs.
pub mod order {
    /// Loads `p`; nothing after it in program order is performed before it.
    ///
    /// # Safety
    /// `p` is valid and 8-aligned (a map value's word).
    #[inline(always)]
    #[expect(clippy::inline_always, reason = "on every packet's path")]
    #[must_use]
    pub unsafe fn load_acquire(p: *const u64) -> u64 {
        #[cfg(feature = "ordered")]
        // SAFETY: valid and aligned (the caller's promise); other CPUs change it only atomically.
        return unsafe { core::sync::atomic::AtomicU64::from_ptr(p.cast_mut()) }.load(core::sync::atomic::Ordering::Acquire);
        #[cfg(not(feature = "ordered"))]
        // SAFETY: as above.
        return unsafe { core::ptr::read_volatile(p) };
    }

    /// Stores `v` at `p`; everything before it in program order is visible before it.
    ///
    /// # Safety
    /// As [`load_acquire`].
    #[inline(always)]
    #[expect(clippy::inline_always, reason = "on every new flow's path")]
    pub unsafe fn store_release(p: *mut u64, v: u64) {
        #[cfg(feature = "ordered")]
        // SAFETY: valid and aligned (the caller's promise).
        unsafe { core::sync::atomic::AtomicU64::from_ptr(p) }.store(v, core::sync::atomic::Ordering::Release);
        #[cfg(not(feature = "ordered"))]
        // SAFETY: as above.
        unsafe {
            core::ptr::write_volatile(p, v);
        }
    }
}

/// The end of every object: its panic handler (the verifier proves no panic is reachable) and
/// its licence (GPL: the helpers the programs call require it).
#[macro_export]
macro_rules! object_end {
    () => {
        #[cfg(not(test))]
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            loop {}
        }

        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 4] = *b"GPL\0";
    };
}
