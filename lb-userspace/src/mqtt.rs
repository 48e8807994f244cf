//! The few MQTT 3.1.1 packets a health check or a held test connection needs: CONNECT, CONNACK,
//! PINGREQ/PINGRESP, DISCONNECT.

/// PINGREQ (fixed header only).
pub const PINGREQ: [u8; 2] = [0xc0, 0x00];
/// PINGRESP (fixed header only).
pub const PINGRESP: [u8; 2] = [0xd0, 0x00];
/// DISCONNECT (fixed header only).
pub const DISCONNECT: [u8; 2] = [0xe0, 0x00];

/// What went wrong with a CONNACK.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnackError {
    #[error("expected CONNACK (0x20 0x02), got {0:02x?}")]
    NotConnack([u8; 4]),
}

/// The longest string (client id, user name) or binary field (password) MQTT 3.1.1 carries:
/// its length is a 16-bit prefix.
pub const MAX_STRING: usize = 65_535;

/// A CONNECT field longer than MQTT can carry.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the CONNECT's {field} is {len} bytes; MQTT carries at most {MAX_STRING}")]
pub struct TooLong {
    pub field: &'static str,
    pub len: usize,
}

fn put_str(out: &mut Vec<u8>, field: &'static str, s: &[u8]) -> Result<(), TooLong> {
    let len = u16::try_from(s.len()).map_err(|_| TooLong { field, len: s.len() })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s);
    Ok(())
}

/// An MQTT 3.1.1 CONNECT with a clean session.
///
/// # Errors
/// When a field is longer than [`MAX_STRING`] bytes.
pub fn connect(client_id: &str, keepalive_secs: u16, username: Option<&str>, password: Option<&str>) -> Result<Vec<u8>, TooLong> {
    let mut body = Vec::with_capacity(32 + client_id.len());
    put_str(&mut body, "protocol name", b"MQTT")?;
    body.push(4); // protocol level 3.1.1
    let mut flags = 0x02; // clean session
    if username.is_some() {
        flags |= 0x80;
    }
    if password.is_some() {
        flags |= 0x40;
    }
    body.push(flags);
    body.extend_from_slice(&keepalive_secs.to_be_bytes());
    put_str(&mut body, "client id", client_id.as_bytes())?;
    if let Some(u) = username {
        put_str(&mut body, "username", u.as_bytes())?;
    }
    if let Some(p) = password {
        put_str(&mut body, "password", p.as_bytes())?;
    }
    let mut packet = vec![0x10];
    // Remaining length, variable-length encoded (at most 3 strings of 65537 bytes: 3 bytes).
    let mut len = body.len();
    loop {
        let mut byte = u8::try_from(len % 128).expect("< 128");
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    Ok(packet)
}

/// The return code of a CONNACK: 0 is accepted; 1..=5 are refusals by a live broker.
///
/// # Errors
/// When the bytes are not a CONNACK.
pub fn connack_code(buf: [u8; 4]) -> Result<u8, ConnackError> {
    if buf[0] != 0x20 || buf[1] != 0x02 {
        return Err(ConnackError::NotConnack(buf));
    }
    Ok(buf[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_encodes_as_the_spec_says() {
        let p = connect("hc", 30, None, None).expect("short");
        assert_eq!(p, [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 2, b'h', b'c']);
        let p = connect("x", 5, Some("u"), Some("pw")).expect("short");
        assert_eq!(p[9], 0xc2);
        assert_eq!(&p[p.len() - 7..], [0, 1, b'u', 0, 2, b'p', b'w']);
        let long = "c".repeat(200);
        let p = connect(&long, 5, None, None).expect("short");
        assert_eq!(&p[1..3], [0xd4, 0x01], "remaining length 212 takes two bytes");
    }

    #[test]
    fn a_field_longer_than_mqtt_carries_is_an_error_not_a_panic() {
        let max = "p".repeat(MAX_STRING);
        let p = connect("x", 5, Some(&max), Some(&max)).expect("65535 bytes fit");
        assert_eq!(&p[1..4], [0x8f, 0x80, 0x08], "remaining length 131087 takes three bytes");
        let over = "p".repeat(MAX_STRING + 1);
        assert_eq!(connect("x", 5, Some(&over), None), Err(TooLong { field: "username", len: 65_536 }));
        assert_eq!(connect("x", 5, Some("u"), Some(&over)), Err(TooLong { field: "password", len: 65_536 }));
        assert_eq!(connect(&over, 5, None, None), Err(TooLong { field: "client id", len: 65_536 }));
        assert_eq!(
            TooLong { field: "password", len: 70_000 }.to_string(),
            "the CONNECT's password is 70000 bytes; MQTT carries at most 65535"
        );
    }

    #[test]
    fn connack() {
        assert_eq!(connack_code([0x20, 2, 0, 0]), Ok(0));
        assert_eq!(connack_code([0x20, 2, 0, 5]), Ok(5));
        assert!(connack_code([0x30, 2, 0, 0]).is_err());
    }
}
