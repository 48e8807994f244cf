//! `dsrlb trace --pcap`: a pcapng file of the traced frames (their first bytes), each with its
//! decision as the packet comment.

use std::{borrow::Cow, time::Duration};

use anyhow::Context as _;

use super::{
    event::Event,
    print::{Names, decision, interface_name, masked_note},
};

/// A pcapng file of traced frames (their first bytes), each with its decision as the comment.
pub struct Pcap<W: std::io::Write> {
    writer: pcap_file::pcapng::PcapNgWriter<W>,
    interfaces: Vec<u32>,
}

impl<W: std::io::Write> Pcap<W> {
    /// # Errors
    /// When the section header cannot be written.
    pub fn new(out: W) -> anyhow::Result<Self> {
        Ok(Self { writer: pcap_file::pcapng::PcapNgWriter::new(out).context("writing the pcapng header")?, interfaces: Vec::new() })
    }

    /// # Errors
    /// When writing fails.
    pub fn write(&mut self, ev: &Event, names: &Names) -> anyhow::Result<()> {
        use pcap_file::pcapng::blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
        };
        let id = if let Some(id) = self.interfaces.iter().position(|&i| i == ev.ifindex) {
            id
        } else {
            self.writer
                .write_pcapng_block(InterfaceDescriptionBlock {
                    linktype: pcap_file::DataLink::ETHERNET,
                    snaplen: u32::try_from(lb_common::TRACE_SNAP).unwrap_or(u32::MAX),
                    options: vec![
                        InterfaceDescriptionOption::IfName(Cow::Owned(interface_name(ev.ifindex))),
                        InterfaceDescriptionOption::IfTsResol(9),
                    ],
                })
                .context("writing a pcapng interface block")?;
            self.interfaces.push(ev.ifindex);
            self.interfaces.len() - 1
        };
        let data = ev.bytes();
        self.writer
            .write_pcapng_block(EnhancedPacketBlock {
                interface_id: u32::try_from(id).unwrap_or(0),
                timestamp: Duration::from_nanos(ev.ts_ns),
                original_len: ev.len.max(u32::try_from(data.len()).unwrap_or(0)),
                data: Cow::Owned(data),
                options: vec![EnhancedPacketOption::Comment(Cow::Owned(format!(
                    "dsrlb: cpu{} {}{}",
                    ev.cpu,
                    decision(ev, names),
                    masked_note(ev)
                )))],
            })
            .context("writing a pcapng packet block")?;
        Ok(())
    }

    /// # Errors
    /// When flushing fails.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.writer.get_mut().flush().context("flushing the pcap file")
    }
}
