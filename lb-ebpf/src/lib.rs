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

    const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == 20 && core::mem::size_of::<Ipv6Hdr>() == 40);
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
