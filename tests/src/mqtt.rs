//! MQTT 3.1.1 publish/subscribe through a VIP with rumqttc: what the end-to-end tests of both
//! families check.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};

const T: Duration = Duration::from_secs(5);

/// Subscribes to `topic` as `{id}-sub` through `host:port` (TLS when `ca` is given, verified
/// against it), publishes `n` QoS 1 messages as `{id}-pub`, and returns how many arrived. Runs
/// on the caller's thread (call it inside the client's namespace).
///
/// # Panics
/// When a client cannot connect, subscribe or publish in time.
#[must_use]
pub fn pubsub(host: &str, port: u16, ca: Option<&[u8]>, id: &str, topic: &str, n: usize) -> usize {
    pubsub_sized(host, port, ca, id, topic, n, 0)
}

/// As [`pubsub`], each message `size` bytes long (at least its own short text).
///
/// # Panics
/// As [`pubsub`].
#[must_use]
pub fn pubsub_sized(host: &str, port: u16, ca: Option<&[u8]>, id: &str, topic: &str, n: usize, size: usize) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(pubsub_async(host, port, ca, id, topic, n, size))
}

async fn pubsub_async(host: &str, port: u16, ca: Option<&[u8]>, id: &str, topic: &str, n: usize, size: usize) -> usize {
    let opts = |client: &str| {
        let mut o = MqttOptions::new(client, host, port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(size + 1024 * 16, size + 1024 * 16);
        if let Some(ca) = ca {
            o.set_transport(Transport::Tls(TlsConfiguration::Simple { ca: ca.to_vec(), alpn: None, client_auth: None }));
        }
        o
    };
    let (sub, mut sub_loop) = AsyncClient::new(opts(&format!("{id}-sub")), 64);
    sub.subscribe(topic, QoS::AtLeastOnce).await.expect("subscribe");
    // Wait for SUBACK before publishing.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) =
            tokio::time::timeout_at(deadline, sub_loop.poll()).await.expect("SUBACK in time").expect("subscriber connection")
        {
            break;
        }
    }
    // The brokers' bridge to b1 needs a moment to learn the subscription.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (publ, mut pub_loop) = AsyncClient::new(opts(&format!("{id}-pub")), 64);
    let base = topic.trim_end_matches("/#").to_owned();
    let publisher = tokio::spawn(async move {
        for i in 0..n {
            let mut payload = format!("m{i}").into_bytes();
            payload.resize(payload.len().max(size), b'.');
            publ.publish(format!("{base}/{i}"), QoS::AtLeastOnce, false, payload).await.expect("publish");
        }
        let mut acked = 0;
        while acked < n {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = pub_loop.poll().await {
                acked += 1;
            }
        }
    });
    let mut got = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got < n {
        match tokio::time::timeout_at(deadline, sub_loop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => got += usize::from(p.payload.len() >= size),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("subscriber: {e}"),
            Err(_) => break,
        }
    }
    tokio::time::timeout(T, publisher).await.expect("publisher finished").expect("publisher task");
    got
}
