//! The few MQTT packets a health check or a held test connection needs: CONNECT, CONNACK,
//! PINGREQ/PINGRESP, DISCONNECT, in MQTT 3.1.1 and (CONNECT and CONNACK) MQTT 5.

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
    connect_packet(4, None, client_id, keepalive_secs, username, password)
}

/// A CONNECT of protocol `level` (4: 3.1.1, 5: MQTT 5, with `properties`) and a clean
/// session (clean start).
fn connect_packet(
    level: u8,
    properties: Option<&[u8]>,
    client_id: &str,
    keepalive_secs: u16,
    username: Option<&str>,
    password: Option<&str>,
) -> Result<Vec<u8>, TooLong> {
    let mut body = Vec::with_capacity(40 + client_id.len());
    put_str(&mut body, "protocol name", b"MQTT")?;
    body.push(level);
    let mut flags = 0x02; // clean session, clean start
    if username.is_some() {
        flags |= 0x80;
    }
    if password.is_some() {
        flags |= 0x40;
    }
    body.push(flags);
    body.extend_from_slice(&keepalive_secs.to_be_bytes());
    if let Some(p) = properties {
        put_varint(&mut body, p.len());
        body.extend_from_slice(p);
    }
    put_str(&mut body, "client id", client_id.as_bytes())?;
    if let Some(u) = username {
        put_str(&mut body, "username", u.as_bytes())?;
    }
    if let Some(p) = password {
        put_str(&mut body, "password", p.as_bytes())?;
    }
    let mut packet = vec![0x10];
    // Remaining length (at most 3 strings of 65537 bytes and the properties: 3 bytes).
    put_varint(&mut packet, body.len());
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

/// Remaining length, variable-length encoded, appended to `out`.
fn put_varint(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = u8::try_from(len % 128).expect("< 128");
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

/// An MQTT 5 CONNECT with a clean start, a Session Expiry Interval of 0 (the session ends with
/// the connection) and a Receive Maximum of 1: what a health check needs and no more.
///
/// # Errors
/// When a field is longer than [`MAX_STRING`] bytes.
pub fn connect5(client_id: &str, keepalive_secs: u16, username: Option<&str>, password: Option<&str>) -> Result<Vec<u8>, TooLong> {
    // Session Expiry Interval 0 (0x11, four bytes), Receive Maximum 1 (0x21, two).
    connect_packet(5, Some(&[0x11, 0, 0, 0, 0, 0x21, 0, 1]), client_id, keepalive_secs, username, password)
}

/// The most a CONNACK may be for a health check to read it (the fixed header's remaining
/// length): reason string and server reference included, a broker has no need for more.
pub const MAX_CONNACK: usize = 4096;

/// An MQTT 5 CONNACK as a health check reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Connack5 {
    pub reason: u8,
    /// The Server Reference property: where the broker sends its clients instead.
    pub server_reference: Option<String>,
    /// The Reason String property.
    pub reason_string: Option<String>,
    /// A two-byte CONNACK: an MQTT 3.1.1 broker's answer (its return code in `reason`).
    pub v311: bool,
}

/// What is wrong with an MQTT 5 CONNACK.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Connack5Error {
    #[error("expected CONNACK (0x20), got packet type 0x{0:02x}")]
    NotConnack(u8),
    #[error("the CONNACK's remaining length is malformed or over {MAX_CONNACK} bytes")]
    Length,
    #[error("the CONNACK is cut short")]
    Short,
    #[error("the CONNACK's property 0x{0:02x} is unknown or malformed")]
    Property(u8),
}

/// Reads a variable byte integer at `b[*at..]` (at most four bytes).
fn varint(b: &[u8], at: &mut usize) -> Option<usize> {
    let mut value = 0usize;
    for shift in 0..4 {
        let byte = *b.get(*at)?;
        *at += 1;
        value |= usize::from(byte & 0x7f) << (7 * shift);
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The remaining length of a packet whose fixed header opens `head` (the type byte, then up
/// to four length bytes): the length, and how many bytes of `head` the header took.
///
/// # Errors
/// When the header is not a CONNACK's, or its length is malformed or over [`MAX_CONNACK`].
pub fn connack5_length(head: &[u8]) -> Result<Option<(usize, usize)>, Connack5Error> {
    let Some(&kind) = head.first() else { return Ok(None) };
    if kind != 0x20 {
        return Err(Connack5Error::NotConnack(kind));
    }
    let mut at = 1;
    match varint(head, &mut at) {
        Some(len) if len <= MAX_CONNACK => Ok(Some((len, at))),
        Some(_) => Err(Connack5Error::Length),
        None if head.len() >= 5 => Err(Connack5Error::Length),
        None => Ok(None),
    }
}

/// Parses a CONNACK's variable header and properties (`body`: the remaining length's bytes). A
/// body of two bytes (no properties) is read too: what a 3.1.1 broker answers an MQTT 5
/// CONNECT with.
///
/// # Errors
/// When the body is cut short or a property is malformed.
pub fn connack5(body: &[u8]) -> Result<Connack5, Connack5Error> {
    if body.len() < 2 {
        return Err(Connack5Error::Short);
    }
    let mut ack = Connack5 { reason: body[1], ..Connack5::default() };
    if body.len() == 2 {
        ack.v311 = true;
        return Ok(ack);
    }
    let mut at = 2;
    let len = varint(body, &mut at).ok_or(Connack5Error::Short)?;
    let end = at.checked_add(len).filter(|&e| e <= body.len()).ok_or(Connack5Error::Short)?;
    while at < end {
        let id = body[at];
        at += 1;
        let fixed = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => Some(1),
            0x13 | 0x21 | 0x22 | 0x23 => Some(2),
            0x02 | 0x11 | 0x18 | 0x27 => Some(4),
            _ => None,
        };
        if let Some(n) = fixed {
            at += n;
        } else {
            let string = |at: &mut usize| -> Result<String, Connack5Error> {
                let n = usize::from(u16::from_be_bytes([
                    *body.get(*at).ok_or(Connack5Error::Property(id))?,
                    *body.get(*at + 1).ok_or(Connack5Error::Property(id))?,
                ]));
                let s = body.get(*at + 2..*at + 2 + n).ok_or(Connack5Error::Property(id))?;
                *at += 2 + n;
                Ok(String::from_utf8_lossy(s).into_owned())
            };
            match id {
                0x0b => {
                    varint(body, &mut at).ok_or(Connack5Error::Property(id))?;
                }
                0x1c => ack.server_reference = Some(string(&mut at)?),
                0x1f => ack.reason_string = Some(string(&mut at)?),
                0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1a => drop(string(&mut at)?),
                0x26 => {
                    string(&mut at)?;
                    string(&mut at)?;
                }
                _ => return Err(Connack5Error::Property(id)),
            }
        }
        if at > end {
            return Err(Connack5Error::Property(id));
        }
    }
    Ok(ack)
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

    #[test]
    fn connect5_carries_level_5_and_the_two_properties() {
        let p = connect5("hc", 10, Some("u"), None).expect("encodes");
        let want: Vec<u8> = [
            &[0x10, 26][..],
            &[0, 4, b'M', b'Q', b'T', b'T', 5, 0x82, 0, 10],
            &[8, 0x11, 0, 0, 0, 0, 0x21, 0, 1],
            &[0, 2, b'h', b'c', 0, 1, b'u'],
        ]
        .concat();
        assert_eq!(p, want);
    }

    #[test]
    fn connack5_reads_reason_and_references_and_refuses_what_it_cannot_read() {
        // Reason 0x9c with a server reference, a reason string and a receive maximum.
        let mut props = vec![0x21, 0, 10, 0x1c, 0, 9];
        props.extend_from_slice(b"b2.lan:18");
        props.extend_from_slice(&[0x1f, 0, 4]);
        props.extend_from_slice(b"full");
        let mut body = vec![0, 0x9c, u8::try_from(props.len()).expect("small")];
        body.extend_from_slice(&props);
        let a = connack5(&body).expect("reads");
        assert_eq!((a.reason, a.server_reference.as_deref(), a.reason_string.as_deref()), (0x9c, Some("b2.lan:18"), Some("full")));
        // A 3.1.1 broker's answer to an MQTT 5 CONNECT: two bytes, no properties.
        assert_eq!(connack5(&[0, 1]).expect("reads").reason, 1);
        // Cut short, a property past the end, an unknown property.
        assert_eq!(connack5(&[0]), Err(Connack5Error::Short));
        assert_eq!(connack5(&[0, 0, 5, 0x21]), Err(Connack5Error::Short));
        assert_eq!(connack5(&[0, 0, 3, 0x1c, 0, 9]), Err(Connack5Error::Property(0x1c)));
        assert_eq!(connack5(&[0, 0, 1, 0x7f]), Err(Connack5Error::Property(0x7f)));
        // The fixed header: another packet, an endless or too long length, not yet whole.
        assert_eq!(connack5_length(&[0x30, 2]), Err(Connack5Error::NotConnack(0x30)));
        assert_eq!(connack5_length(&[0x20, 0xff, 0xff, 0xff, 0xff]), Err(Connack5Error::Length));
        assert_eq!(connack5_length(&[0x20, 0x81, 0x40]), Err(Connack5Error::Length));
        assert_eq!(connack5_length(&[0x20, 0x80]), Ok(None));
        assert_eq!(connack5_length(&[0x20, 0x03]), Ok(Some((3, 2))));
    }
}
