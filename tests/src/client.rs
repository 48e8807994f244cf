//! Test-side clients: plain MQTT connections that can be held, pinged and made to publish.
//! (The balancer process is in [`crate::balancer`]; it is re-exported here, where it was.)

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use lb_userspace::mqtt;

pub use crate::balancer::{Balancer, xdp_attached};
use crate::lab::Lab;

/// A connected MQTT 3.1.1 session over plain TCP.
pub struct MqttConn {
    pub stream: TcpStream,
    pub local: SocketAddr,
}

impl MqttConn {
    /// Connects from `from` (any local address when `None`) to `to`, sends CONNECT with
    /// `client_id` and waits for an accepting CONNACK. Call inside the client's namespace.
    ///
    /// # Errors
    /// When the TCP connect, the CONNECT exchange, or the acceptance fails.
    pub fn connect(from: Option<Ipv4Addr>, to: SocketAddrV4, client_id: &str, timeout: Duration) -> std::io::Result<Self> {
        Self::connect_ip(from.map(IpAddr::V4), SocketAddr::V4(to), client_id, timeout)
    }

    /// As [`Self::connect`], either family.
    ///
    /// # Errors
    /// As [`Self::connect`].
    pub fn connect_ip(from: Option<IpAddr>, to: SocketAddr, client_id: &str, timeout: Duration) -> std::io::Result<Self> {
        let sock = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None)?;
        if let Some(addr) = from {
            sock.bind(&SocketAddr::new(addr, 0).into())?;
        }
        sock.connect_timeout(&to.into(), timeout)?;
        let stream: TcpStream = sock.into();
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?;
        let mut conn = Self { stream, local };
        conn.stream.write_all(&mqtt::connect(client_id, 600, None, None).map_err(std::io::Error::other)?)?;
        let mut ack = [0u8; 4];
        conn.stream.read_exact(&mut ack)?;
        match mqtt::connack_code(ack) {
            Ok(0) => Ok(conn),
            Ok(code) => Err(std::io::Error::other(format!("CONNACK refused with code {code}"))),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// PINGREQ, and wait for PINGRESP: proves the session is alive end to end.
    ///
    /// # Errors
    /// When the broker does not answer with PINGRESP.
    pub fn ping(&mut self) -> std::io::Result<()> {
        self.stream.write_all(&mqtt::PINGREQ)?;
        let mut resp = [0u8; 2];
        self.stream.read_exact(&mut resp)?;
        if resp == mqtt::PINGRESP { Ok(()) } else { Err(std::io::Error::other(format!("expected PINGRESP, got {resp:02x?}"))) }
    }

    /// Sends DISCONNECT and closes.
    pub fn disconnect(mut self) {
        let _ = self.stream.write_all(&mqtt::DISCONNECT);
    }
}

/// Opens `n` sessions to VIP:1883 from the lab's client namespace, spread over its extra
/// addresses (so thousands do not exhaust one address's ports), ids `{prefix}-{i}`.
///
/// # Panics
/// When a session cannot be opened.
#[must_use]
pub fn hold_sessions(lab: &Lab, prefix: &str, n: usize) -> Vec<(String, MqttConn)> {
    use crate::lab::VIP;
    let sources = lab.client_extra_addrs();
    crate::netns::in_netns(&lab.ns("client"), || {
        (0..n)
            .map(|i| {
                let from = sources[i % sources.len()];
                let id = format!("{prefix}-{i}");
                let c = MqttConn::connect(Some(from), SocketAddrV4::new(VIP, 1883), &id, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("{id}: {e}"));
                (id, c)
            })
            .collect()
    })
    .expect("client namespace")
}

impl MqttConn {
    /// PUBLISH at QoS 1 and wait for its PUBACK: an application message end to end.
    ///
    /// # Errors
    /// When the broker does not acknowledge.
    pub fn publish_qos1(&mut self, topic: &str, packet_id: u16, payload: &[u8]) -> std::io::Result<()> {
        let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
        body.extend_from_slice(&u16::try_from(topic.len()).expect("short topic").to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&packet_id.to_be_bytes());
        body.extend_from_slice(payload);
        let len =
            u8::try_from(body.len()).ok().filter(|l| *l < 128).ok_or_else(|| std::io::Error::other("publish too long for this helper"))?;
        let mut packet = vec![0x32, len];
        packet.extend_from_slice(&body);
        self.stream.write_all(&packet)?;
        let mut ack = [0u8; 4];
        self.stream.read_exact(&mut ack)?;
        if ack[0] == 0x40 && ack[1] == 2 && ack[2..4] == packet_id.to_be_bytes() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("expected PUBACK {packet_id}, got {ack:02x?}")))
        }
    }
}
