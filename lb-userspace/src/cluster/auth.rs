//! The sync's handshake and frame MACs: both ends of a connection prove they hold the
//! cluster key, each for this connection only, and every frame after the handshake carries a
//! MAC under a key derived from it, over its implied sequence number.
//!
//! The connector C (which sends its exceptions) and the acceptor A (which takes them in):
//! - C → A `HELLO`: `"DSRLBSYN"`, `u8 version`, `u8 mode` (1: `key_file`, 0: `insecure =
//!   true`), `u64 config fingerprint`, `u32 C's address`, `u32 A's address`, `nonce_c` (32
//!   random bytes).
//! - A → C `REPLY`: `"DSRLBSYN"`, `u8 version`, `u8 mode`, `u32 A's address`, `nonce_a`, then
//!   `HMAC-SHA256(key, "acceptor" label ‖ HELLO ‖ REPLY so far)`.
//! - C → A `PROOF`: `HMAC-SHA256(key, "connector" label ‖ HELLO ‖ REPLY so far)`.
//!
//! C sends nothing more until A's MAC holds, so a node that does not hold the key (one that
//! took A's address, or a local process that bound A's port first) learns no exception; A takes
//! nothing but the `PROOF` until C's MAC holds. Each MAC covers both nonces: a recorded
//! handshake proves nothing on a new connection. Then every frame C sends ends with
//! `HMAC-SHA256(frame key, u64 sequence ‖ u32 length ‖ u8 kind ‖ body)`, the sequence counting
//! the frames from 0 on both ends (never sent), and the frame key derived by HKDF-SHA256 from
//! the cluster key, salted with both nonces, over the whole handshake: a frame written into the
//! stream by someone else, replayed, reordered or dropped fails its MAC (or the next one's),
//! and the connection closes. Nothing is encrypted: the flows are client addresses and ports.
//!
//! With `insecure = true` the same runs with a key everyone knows: it proves nothing, and keeps
//! one code path (and a check against corruption).

use std::net::Ipv4Addr;

use anyhow::bail;
use ring::{hkdf, hmac, rand::SecureRandom as _};

use crate::config::SyncKey;

pub const MAGIC: &[u8; 8] = b"DSRLBSYN";
/// 2: the mutual handshake with nonces and a MAC on every frame (1 proved a key in `HELLO`
/// alone, with a timestamp).
pub const VERSION: u8 = 2;
pub const HELLO: u8 = 1;
/// The acceptor's answer to `HELLO`.
pub const REPLY: u8 = 5;
/// The connector's answer to `REPLY`.
pub const PROOF: u8 = 6;
pub const TAG_BYTES: usize = 32;
const NONCE_BYTES: usize = 32;
pub const HELLO_BYTES: usize = 8 + 1 + 1 + 8 + 4 + 4 + NONCE_BYTES;
const REPLY_SIGNED_BYTES: usize = 8 + 1 + 1 + 4 + NONCE_BYTES;
pub const REPLY_BYTES: usize = REPLY_SIGNED_BYTES + TAG_BYTES;
pub const PROOF_BYTES: usize = TAG_BYTES;
/// The largest first frame read: a `HELLO` of this version or of version 1 (62 bytes with its
/// key's MAC), so that an older node is told to upgrade rather than that its frame is too long.
pub const HELLO_READ_MAX: usize = 64;
/// A HELLO (its kind byte too) fits.
const _: () = assert!(HELLO_BYTES < HELLO_READ_MAX);

const MODE_INSECURE: u8 = 0;
const MODE_KEY: u8 = 1;
/// The key of `insecure = true`: known to all, so it proves nothing.
const INSECURE_KEY: &[u8] = b"dsrlb cluster sync without a key (cluster.insecure = true)";

const ACCEPTOR_LABEL: &[u8] = b"dsrlb sync v2: the acceptor proves the key";
const CONNECTOR_LABEL: &[u8] = b"dsrlb sync v2: the connector proves the key";
const FRAMES_LABEL: &[u8] = b"dsrlb sync v2: frames from the connector to the acceptor";

/// What both ends must hold: the cluster key, or with `insecure = true` a well-known one.
struct Secret {
    key: hmac::Key,
    bytes: std::sync::Arc<[u8]>,
    mode: u8,
}

impl Secret {
    fn of(key: Option<&SyncKey>) -> Self {
        let (bytes, mode) = key.map_or_else(|| (std::sync::Arc::from(INSECURE_KEY), MODE_INSECURE), |k| (k.0.clone(), MODE_KEY));
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, &bytes), bytes, mode }
    }

    fn transcript_tag(&self, label: &[u8], hello: &[u8], reply_signed: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        for part in [label, hello, reply_signed] {
            ctx.update(part);
        }
        ctx.sign()
    }

    fn verify_transcript(&self, label: &[u8], hello: &[u8], reply_signed: &[u8], tag: &[u8]) -> bool {
        hmac::verify(&self.key, &[label, hello, reply_signed].concat(), tag).is_ok()
    }

    /// The key of the frames that follow this handshake: from the cluster key, both nonces
    /// (the salt) and the whole handshake.
    fn frames(&self, hello: &[u8], reply_signed: &[u8]) -> Frames {
        let salt = [&hello[HELLO_BYTES - NONCE_BYTES..], &reply_signed[REPLY_SIGNED_BYTES - NONCE_BYTES..]].concat();
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(&self.bytes);
        let info = [FRAMES_LABEL, hello, reply_signed];
        let okm = prk.expand(&info, hmac::HMAC_SHA256).expect("one HMAC-SHA256 key is well within HKDF's output limit");
        Frames { key: hmac::Key::from(okm), seq: 0 }
    }

    /// Why a peer whose mode is `theirs` cannot talk to this node.
    fn check_mode(&self, theirs: u8) -> anyhow::Result<()> {
        match (theirs, self.mode) {
            (a, b) if a == b => Ok(()),
            (MODE_INSECURE, _) => bail!(
                "the peer runs without a cluster key (cluster.insecure = true) and this node has one (cluster.key_file): give every \
                 node the same key_file"
            ),
            (MODE_KEY, _) => bail!(
                "the peer proves a cluster key (cluster.key_file) and this node has none (cluster.insecure = true): give every node \
                 the same key_file"
            ),
            (m, _) => bail!("the peer names an unknown authentication mode {m}"),
        }
    }
}

/// 32 random bytes from the system's generator.
fn nonce() -> anyhow::Result<[u8; NONCE_BYTES]> {
    let mut n = [0u8; NONCE_BYTES];
    ring::rand::SystemRandom::new().fill(&mut n).map_err(|_| anyhow::anyhow!("the system's random generator failed"))?;
    Ok(n)
}

/// A bounds-checked reader of a frame body.
pub struct Body<'a>(pub &'a [u8]);

impl Body<'_> {
    /// The next `N` bytes.
    ///
    /// # Errors
    /// When fewer are left.
    pub fn take<const N: usize>(&mut self, what: &str) -> anyhow::Result<[u8; N]> {
        if self.0.len() < N {
            bail!("a frame cut short in {what}");
        }
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        Ok(head.try_into().expect("N bytes"))
    }
}

/// The magic and the version that open `HELLO` and `REPLY`.
fn check_opening(b: &mut Body, what: &str) -> anyhow::Result<()> {
    if b.take::<8>("the magic")? != *MAGIC {
        bail!("not a dsrlb cluster peer (bad {what})");
    }
    let version = b.take::<1>("the version")?[0];
    if version != VERSION {
        bail!("cluster protocol version {version}, this node speaks {VERSION}: upgrade every node to the same dsrlb");
    }
    Ok(())
}

/// The connector's side of a handshake: its `HELLO`, then the acceptor's `REPLY` to check.
pub struct Outgoing {
    secret: Secret,
    hello: [u8; HELLO_BYTES],
    to: Ipv4Addr,
}

impl Outgoing {
    /// A `HELLO` from `me` (with this config's `fingerprint`) to the node at `to`.
    ///
    /// # Errors
    /// When the system has no random bytes to give.
    pub fn new(key: Option<&SyncKey>, fingerprint: u64, me: Ipv4Addr, to: Ipv4Addr) -> anyhow::Result<Self> {
        Ok(Self::with_nonce(key, fingerprint, me, to, nonce()?))
    }

    fn with_nonce(key: Option<&SyncKey>, fingerprint: u64, me: Ipv4Addr, to: Ipv4Addr, nonce: [u8; NONCE_BYTES]) -> Self {
        let secret = Secret::of(key);
        let mut hello = Vec::with_capacity(HELLO_BYTES);
        hello.extend_from_slice(MAGIC);
        hello.push(VERSION);
        hello.push(secret.mode);
        hello.extend_from_slice(&fingerprint.to_be_bytes());
        hello.extend_from_slice(&me.octets());
        hello.extend_from_slice(&to.octets());
        hello.extend_from_slice(&nonce);
        Self { secret, hello: hello.try_into().expect("HELLO_BYTES"), to }
    }

    /// The body of the `HELLO` to send.
    #[must_use]
    pub const fn hello(&self) -> &[u8] {
        &self.hello
    }

    /// Checks the acceptor's `REPLY`: it comes from the node this `HELLO` was for, which proved
    /// the key over this very `HELLO`. Returns the body of the `PROOF` to send, and the key of
    /// the frames after it.
    ///
    /// # Errors
    /// When the reply is malformed, from another node, or does not prove the key: nothing may
    /// be sent to that peer.
    pub fn finish(&self, reply: &[u8]) -> anyhow::Result<([u8; PROOF_BYTES], Frames)> {
        let mut b = Body(reply);
        check_opening(&mut b, "REPLY")?;
        if reply.len() != REPLY_BYTES {
            bail!("a REPLY of {} bytes, not {REPLY_BYTES}", reply.len());
        }
        self.secret.check_mode(b.take::<1>("the mode")?[0])?;
        let from = Ipv4Addr::from(b.take::<4>("the node address")?);
        if from != self.to {
            bail!("the node at {} answers as node {from}", self.to);
        }
        let (signed, tag) = reply.split_at(REPLY_SIGNED_BYTES);
        if !self.secret.verify_transcript(ACCEPTOR_LABEL, &self.hello, signed, tag) {
            bail!(
                "the node at {} does not prove the cluster key (an impostor on its address or port, a replayed answer, or a node with \
                 another key_file): nothing sent to it",
                self.to
            );
        }
        let proof = self.secret.transcript_tag(CONNECTOR_LABEL, &self.hello, signed);
        Ok((proof.as_ref().try_into().expect("HMAC-SHA256"), self.secret.frames(&self.hello, signed)))
    }
}

/// The acceptor's side of a handshake: a checked `HELLO`, its `REPLY`, then the connector's
/// `PROOF` to check.
pub struct Incoming {
    secret: Secret,
    hello: [u8; HELLO_BYTES],
    reply: [u8; REPLY_BYTES],
    /// The connector's config fingerprint.
    pub fingerprint: u64,
}

impl Incoming {
    /// Checks a `HELLO` that came on a connection from `from` to this node (`me`), and makes the
    /// `REPLY` to it.
    ///
    /// # Errors
    /// When the `HELLO` is malformed, of another version or mode, names another node than the
    /// connection's source, or is meant for another node.
    pub fn new(hello: &[u8], key: Option<&SyncKey>, from: Ipv4Addr, me: Ipv4Addr) -> anyhow::Result<Self> {
        Self::with_nonce(hello, key, from, me, nonce()?)
    }

    fn with_nonce(hello: &[u8], key: Option<&SyncKey>, from: Ipv4Addr, me: Ipv4Addr, nonce: [u8; NONCE_BYTES]) -> anyhow::Result<Self> {
        let secret = Secret::of(key);
        let mut b = Body(hello);
        check_opening(&mut b, "HELLO")?;
        let hello: [u8; HELLO_BYTES] =
            hello.try_into().map_err(|_| anyhow::anyhow!("a HELLO of {} bytes, not {HELLO_BYTES}", hello.len()))?;
        secret.check_mode(b.take::<1>("the mode")?[0])?;
        let fingerprint = u64::from_be_bytes(b.take("the fingerprint")?);
        let node = Ipv4Addr::from(b.take::<4>("the node address")?);
        let to = Ipv4Addr::from(b.take::<4>("the receiver's address")?);
        if node != from {
            bail!("HELLO names node {node}, but the connection comes from {from}");
        }
        if to != me {
            bail!("HELLO is meant for node {to}, and this is {me}");
        }
        let mut reply = Vec::with_capacity(REPLY_BYTES);
        reply.extend_from_slice(MAGIC);
        reply.push(VERSION);
        reply.push(secret.mode);
        reply.extend_from_slice(&me.octets());
        reply.extend_from_slice(&nonce);
        let tag = secret.transcript_tag(ACCEPTOR_LABEL, &hello, &reply);
        reply.extend_from_slice(tag.as_ref());
        Ok(Self { secret, hello, reply: reply.try_into().expect("REPLY_BYTES"), fingerprint })
    }

    /// The body of the `REPLY` to send.
    #[must_use]
    pub const fn reply(&self) -> &[u8] {
        &self.reply
    }

    /// Checks the connector's `PROOF`; returns the key of the frames that follow.
    ///
    /// # Errors
    /// When it does not prove the key for this handshake (another key, or one recorded from
    /// another connection).
    pub fn finish(&self, proof: &[u8]) -> anyhow::Result<Frames> {
        let signed = &self.reply[..REPLY_SIGNED_BYTES];
        if !self.secret.verify_transcript(CONNECTOR_LABEL, &self.hello, signed, proof) {
            bail!(
                "the peer does not prove the cluster key for this connection (a replayed handshake, or a node with another \
                 key_file)"
            );
        }
        Ok(self.secret.frames(&self.hello, signed))
    }
}

/// The frames of one connection after its handshake, as one end counts them: each carries
/// the MAC of its sequence number, length, kind and body under the handshake's frame key.
pub struct Frames {
    key: hmac::Key,
    seq: u64,
}

impl Frames {
    /// The next frame as sent: length, kind, body, MAC.
    ///
    /// # Errors
    /// When the body is too long for a frame.
    pub fn seal(&mut self, kind: u8, body: &[u8]) -> anyhow::Result<Vec<u8>> {
        let len = u32::try_from(1 + body.len() + TAG_BYTES).map_err(|_| anyhow::anyhow!("frame too long"))?;
        let mut ctx = hmac::Context::with_key(&self.key);
        for part in [&self.seq.to_be_bytes()[..], &len.to_be_bytes(), &[kind], body] {
            ctx.update(part);
        }
        let tag = ctx.sign();
        self.seq += 1;
        let mut frame = Vec::with_capacity(4 + len as usize);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.push(kind);
        frame.extend_from_slice(body);
        frame.extend_from_slice(tag.as_ref());
        Ok(frame)
    }

    /// The body of the next frame received (`rest`: what followed its kind), once its MAC
    /// holds for this place in the stream.
    ///
    /// # Errors
    /// When it does not: the frame was not sent by the peer of this handshake as the next one.
    pub fn open<'a>(&mut self, kind: u8, rest: &'a [u8]) -> anyhow::Result<&'a [u8]> {
        if rest.len() < TAG_BYTES {
            bail!("frame {} (kind {kind}) of {} bytes is too short for its MAC", self.seq, 1 + rest.len());
        }
        let (body, tag) = rest.split_at(rest.len() - TAG_BYTES);
        let len = u32::try_from(1 + rest.len()).map_err(|_| anyhow::anyhow!("frame too long"))?;
        // ring compares tags in constant time in `verify` only, which takes one slice: the
        // body is copied once behind its header (cheap beside the MAC over it).
        let message = [&self.seq.to_be_bytes()[..], &len.to_be_bytes(), &[kind], body].concat();
        hmac::verify(&self.key, &message, tag).map_err(|_| {
            anyhow::anyhow!(
                "frame {} (kind {kind}) fails its MAC: not sent by the peer that shook hands, or replayed, reordered or altered on \
                 the way",
                self.seq
            )
        })?;
        self.seq += 1;
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123";
    const C: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
    const A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
    const OTHER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 4);

    fn key(k: &[u8]) -> SyncKey {
        SyncKey(std::sync::Arc::from(k))
    }

    fn err<T>(r: anyhow::Result<T>) -> String {
        match r {
            Ok(_) => panic!("must be refused"),
            Err(e) => e.to_string(),
        }
    }

    /// A whole handshake in memory: connector `c_key` from C to A, acceptor `a_key` at A.
    fn handshake(c_key: Option<&SyncKey>, a_key: Option<&SyncKey>) -> anyhow::Result<(Frames, Frames)> {
        let out = Outgoing::new(c_key, 7, C, A)?;
        let incoming = Incoming::new(out.hello(), a_key, C, A)?;
        let (proof, sending) = out.finish(incoming.reply())?;
        let receiving = incoming.finish(&proof)?;
        Ok((sending, receiving))
    }

    /// Both ends prove the key, each over both nonces, and the frame keys they derive agree;
    /// a node without the key fails on whichever end it is, and each check says why.
    #[test]
    fn the_cluster_handshake_proves_the_key_both_ways_for_this_connection_only() {
        let (secret, wrong) = (Some(key(KEY)), Some(key(b"another key of 16+ bytes")));
        for k in [secret.as_ref(), None] {
            let (mut sending, mut receiving) = handshake(k, k).expect("the same key (or both insecure)");
            let frame = sending.seal(3, b"").expect("seal");
            assert_eq!(receiving.open(frame[4], &frame[5..]).expect("the frame key agrees"), b"");
        }
        assert!(err(handshake(secret.as_ref(), wrong.as_ref())).contains("the node at 192.0.2.3 does not prove the cluster key"));
        assert!(err(handshake(wrong.as_ref(), secret.as_ref())).contains("does not prove the cluster key"), "nor one with another");
        // A connector without the key cannot make the PROOF, even if it ignores the REPLY.
        let out = Outgoing::new(wrong.as_ref(), 7, C, A).expect("hello");
        let incoming = Incoming::new(out.hello(), secret.as_ref(), C, A).expect("a HELLO as such");
        let forged = Secret::of(wrong.as_ref()).transcript_tag(CONNECTOR_LABEL, out.hello(), &incoming.reply()[..REPLY_SIGNED_BYTES]);
        assert!(err(incoming.finish(forged.as_ref())).contains("the peer does not prove the cluster key"), "a connector's PROOF");
        assert!(err(handshake(None, secret.as_ref())).contains("the peer runs without a cluster key"));
        assert!(err(handshake(secret.as_ref(), None)).contains("and this node has none"));

        let out = Outgoing::with_nonce(secret.as_ref(), 7, C, A, [1; NONCE_BYTES]);
        assert_eq!(out.hello().len(), HELLO_BYTES);
        let incoming = Incoming::with_nonce(out.hello(), secret.as_ref(), C, A, [2; NONCE_BYTES]).expect("a good HELLO");
        assert_eq!(incoming.fingerprint, 7);
        // The acceptor's nonce makes each answer new: the same HELLO, another REPLY and PROOF.
        let again = Incoming::with_nonce(out.hello(), secret.as_ref(), C, A, [3; NONCE_BYTES]).expect("a good HELLO");
        let (proof, _) = out.finish(incoming.reply()).expect("a good REPLY");
        let (proof_again, _) = out.finish(again.reply()).expect("a good REPLY");
        assert_ne!(proof, proof_again);
        assert!(err(again.finish(&proof)).contains("does not prove the cluster key for this connection"), "a PROOF replayed");
        // The connector's nonce: a REPLY to another HELLO proves nothing to this one.
        let other = Outgoing::with_nonce(secret.as_ref(), 7, C, A, [4; NONCE_BYTES]);
        assert!(err(other.finish(incoming.reply())).contains("does not prove"), "a REPLY replayed");
        // A HELLO changed on the way: the acceptor's MAC covers what it received.
        let mut changed = out.hello().to_vec();
        changed[12] ^= 1;
        let incoming = Incoming::new(&changed, secret.as_ref(), C, A).expect("a HELLO as such");
        assert_eq!(incoming.fingerprint, 7 ^ (1 << 40), "byte 12: the fingerprint's third");
        assert!(err(out.finish(incoming.reply())).contains("does not prove"), "a changed fingerprint went unnoticed");

        // Who is who: the HELLO names its source and its receiver, the REPLY its sender.
        assert!(err(Incoming::new(out.hello(), secret.as_ref(), OTHER, A)).contains("but the connection comes from 192.0.2.4"));
        assert!(err(Incoming::new(out.hello(), secret.as_ref(), C, OTHER)).contains("HELLO is meant for node 192.0.2.3"));
        let to_other = Outgoing::new(secret.as_ref(), 7, C, OTHER).expect("hello");
        let from_other = Incoming::new(to_other.hello(), secret.as_ref(), C, OTHER).expect("hello");
        assert!(err(out.finish(from_other.reply())).contains("the node at 192.0.2.3 answers as node 192.0.2.4"));

        // Malformed, cut, of another version.
        let hello = out.hello();
        for cut in 0..hello.len() {
            assert!(Incoming::new(&hello[..cut], secret.as_ref(), C, A).is_err(), "a HELLO cut at {cut} was taken");
        }
        assert!(Incoming::new(&[hello, &[0]].concat(), secret.as_ref(), C, A).is_err(), "a HELLO with a byte more");
        let reply = Incoming::new(hello, secret.as_ref(), C, A).expect("hello");
        for cut in 0..REPLY_BYTES {
            assert!(out.finish(&reply.reply()[..cut]).is_err(), "a REPLY cut at {cut} was taken");
        }
        let mut v3 = hello.to_vec();
        v3[8] = VERSION + 1;
        assert!(err(Incoming::new(&v3, secret.as_ref(), C, A)).contains("upgrade every node"));
        // Version 1's HELLO (magic, version, fingerprint, address, time, MAC): told to upgrade.
        let v1 = [&MAGIC[..], &[1], &7u64.to_be_bytes(), &C.octets(), &[0; 8], &[0; 32]].concat();
        assert!(v1.len() < HELLO_READ_MAX);
        assert!(err(Incoming::new(&v1, secret.as_ref(), C, A)).contains("version 1, this node speaks 2: upgrade every node"));
        assert!(Incoming::new(b"HTTP/1.1 200 OK\r\n\r\n", secret.as_ref(), C, A).is_err());
    }

    /// After the handshake each frame holds at its own place in the stream only, and only
    /// unchanged.
    #[test]
    fn a_cluster_frame_is_taken_once_in_its_place_and_unchanged() {
        let secret = Some(key(KEY));
        let (mut sending, mut receiving) = handshake(secret.as_ref(), secret.as_ref()).expect("handshake");
        let first = sending.seal(2, b"flows").expect("seal");
        let second = sending.seal(3, b"").expect("seal");
        assert!(err(receiving.open(second[4], &second[5..])).contains("frame 0 (kind 3) fails its MAC"), "out of order");
        let (_, mut receiving) = handshake(secret.as_ref(), secret.as_ref()).expect("handshake");
        assert!(err(receiving.open(first[4], &first[5..])).contains("fails its MAC"), "another connection's frame");
        let (mut sending, mut receiving) = handshake(secret.as_ref(), secret.as_ref()).expect("handshake");
        let first = sending.seal(2, b"flows").expect("seal");
        for at in 4..first.len() {
            let mut changed = first.clone();
            changed[at] ^= 0x80;
            assert!(receiving.open(changed[4], &changed[5..]).is_err(), "a frame changed at byte {at} was taken");
        }
        assert!(receiving.open(3, &first[5..]).is_err(), "a frame read as another kind was taken");
        assert!(receiving.open(first[4], &first[5..first.len() - 1]).is_err(), "a frame cut short was taken");
        assert_eq!(receiving.open(first[4], &first[5..]).expect("the frame itself"), b"flows");
        assert!(err(receiving.open(first[4], &first[5..])).contains("frame 1 (kind 2) fails its MAC"), "a frame taken twice");
    }
}
