use std::time::Duration;

use lb_common::DEFAULT_FLOW_TABLE_SIZE;

use super::*;

const GOOD: &str = r#"
interface = "eth0"
ring_size = 65537

[health]
check = "tcp"
inter = "2s"

[[listener]]
name = "mqtt"
vip = "192.0.2.100"
port = 1883
backends = ["b2", "b1"]

[[backend]]
name = "b2"
address = "192.0.2.12"

[[backend]]
name = "b1"
address = "192.0.2.11"
mac = "02:00:00:00:00:11"
weight = 50
"#;

#[test]
fn good_config_parses_with_defaults() {
    let c = parse(GOOD, "t.toml").expect("valid");
    assert_eq!(c.flow_table_size, DEFAULT_FLOW_TABLE_SIZE);
    assert_eq!(c.xdp_mode, XdpModeCfg::Auto);
    assert_eq!(c.health.check, CheckKind::Tcp);
    assert_eq!(c.health.fall, 3);
    assert_eq!(c.listeners[0].backends, vec!["b1", "b2"]);
    assert_eq!(c.backends[0].name, "b1");
    assert_eq!(c.backends[0].mac, Some([2, 0, 0, 0, 0, 0x11]));
    assert_eq!(c.backends[1].weight, 100);
    assert_eq!(c.listeners[0].health["b1"].check, CheckKind::Tcp);
}

#[test]
fn health_overrides_merge_defaults_listener_backend() {
    let text = GOOD.replace(
        "backends = [\"b2\", \"b1\"]",
        "backends = [\"b2\", \"b1\"]\nhealth = { inter = \"500ms\", fall = 2, timeout = \"200ms\" }",
    ) + "health = { rise = 5, check = \"mqtt\" }\n";
    let c = parse(&text, "t.toml").expect("valid");
    let h1 = &c.listeners[0].health["b1"];
    assert_eq!((h1.check, h1.inter, h1.fall, h1.rise), (CheckKind::Mqtt, Duration::from_millis(500), 2, 5));
    let h2 = &c.listeners[0].health["b2"];
    assert_eq!((h2.check, h2.fall, h2.rise), (CheckKind::Tcp, 2, 2));
    let e = error_of(&GOOD.replace("check = \"tcp\"", "check = \"mqtt-tls\""));
    assert!(e.contains("health.tls_ca"), "{e}");
    let e = error_of(&GOOD.replace("check = \"tcp\"", "check = \"mqtt5-tls\""));
    assert!(e.contains("health.tls_ca") && e.contains("check = \"mqtt5-tls\" needs tls_ca"), "{e}");
    let c = parse(&GOOD.replace("check = \"tcp\"", "check = \"mqtt5\""), "t.toml").expect("mqtt5 is a check");
    assert_eq!(c.health.check, CheckKind::Mqtt5);
}

#[test]
fn probe_credentials_and_the_tls_name_must_fit_the_probe() {
    let with = |extra: &str| GOOD.replacen("inter = \"2s\"\n", &format!("inter = \"2s\"\n{extra}\n"), 1);
    let max = "u".repeat(crate::mqtt::MAX_STRING);
    let c = parse(&with(&format!("username = \"{max}\"\npassword = \"{max}\"")), "t.toml").expect("65535 bytes fit");
    let h = &c.listeners[0].health["b1"];
    assert_eq!((h.username.as_ref().map(String::len), h.password.as_ref().map(String::len)), (Some(65_535), Some(65_535)));
    let over = "p".repeat(crate::mqtt::MAX_STRING + 1);
    let e = error_of(&with(&format!("password = \"{over}\"")));
    assert_eq!(e, "t.toml:8:12: health.password: 65536 bytes; an MQTT CONNECT carries at most 65535");
    let e = error_of(&with(&format!("username = \"u{max}\"")));
    assert_eq!(e, "t.toml:8:12: health.username: 65536 bytes; an MQTT CONNECT carries at most 65535");
    let e = error_of(&format!("{GOOD}health = {{ password = \"{over}\" }}\n"));
    assert_eq!(e, "t.toml:24:23: backend[1].health (for listener mqtt).password: 65536 bytes; an MQTT CONNECT carries at most 65535");
    let e = error_of(&with("username = \"hc\\u0000\""));
    assert_eq!(e, "t.toml:8:12: health.username: holds U+0000, which MQTT 3.1.1 refuses in a string");
    assert!(parse(&with("password = \"p\\u0000\""), "t.toml").is_ok(), "a password is binary data");
    let e = error_of(&with("tls_server_name = \"not a name!\""));
    assert!(e.starts_with("t.toml:8:19: health.tls_server_name: \"not a name!\": "), "{e}");
    let c = parse(&with("tls_server_name = \"mqtt.example\""), "t.toml").expect("a DNS name");
    assert_eq!(c.health.tls_server_name.as_deref(), Some("mqtt.example"));
}

fn error_of(text: &str) -> String {
    parse(text, "t.toml").expect_err("must be rejected").to_string()
}

#[test]
fn next_program_is_an_absolute_pin_path() {
    assert_eq!(parse(GOOD, "t.toml").expect("valid").next_program, None);
    let with = |v: &str| GOOD.replacen("interface = \"eth0\"\n", &format!("interface = \"eth0\"\nnext_program = {v}\n"), 1);
    let c = parse(&with("\"/sys/fs/bpf/xdp-filter/programs/eth0/xdpfilt_alw_all\""), "t.toml").expect("valid");
    assert_eq!(c.next_program, Some(std::path::PathBuf::from("/sys/fs/bpf/xdp-filter/programs/eth0/xdpfilt_alw_all")));
    let e = error_of(&with("\"xdpfilt_alw_all\""));
    assert!(e.starts_with("t.toml:3:16: next_program: must be the absolute path of a pinned XDP program"), "{e}");
}

#[test]
fn announce_and_cluster_sections() {
    let c = parse(GOOD, "t.toml").expect("valid");
    assert_eq!((c.announce, c.cluster), (None, None), "neither without its section");
    let text = format!("{GOOD}\n[announce]\n\n[cluster]\nnodes = [\"192.0.2.2:9878\", \"192.0.2.3:9878\"]\ninsecure = true\n");
    let c = parse(&text, "t.toml").expect("valid");
    assert_eq!(c.announce, Some(Announce { table: DEFAULT_ANNOUNCE_TABLE, withdraw_wait: DEFAULT_WITHDRAW_WAIT }));
    let cluster = c.cluster.expect("cluster");
    assert_eq!(cluster.nodes, vec!["192.0.2.2:9878".parse().expect("addr"), "192.0.2.3:9878".parse().expect("addr")]);
    assert_eq!((cluster.sync_interval, cluster.join_wait, cluster.key), (DEFAULT_SYNC_INTERVAL, DEFAULT_JOIN_WAIT, None));
    let e = error_of(&format!("{GOOD}\n[announce]\ntable = 254\n"));
    assert!(e.starts_with("t.toml:26:9: announce.table: 254 is not a table of its own"), "{e}");
    let e = error_of(&format!("{GOOD}\n[announce]\nwithdraw_wait = \"1h\"\n"));
    assert!(e.starts_with("t.toml:26:17: announce.withdraw_wait: "), "{e}");
    let e = error_of(&format!("{GOOD}\n[cluster]\nnodes = [\"192.0.2.2:9878\"]\n"));
    assert!(e.starts_with("t.toml:26:9: cluster.nodes: list every node's sync address, this one's included: 2 to 16, not 1"), "{e}");
    let e = error_of(&format!("{GOOD}\n[cluster]\nnodes = [\"192.0.2.2:9878\", \"192.0.2.2:9879\"]\n"));
    assert!(e.starts_with("t.toml:26:28: cluster.nodes[1]: 192.0.2.2 is listed twice"), "{e}");
    let e = error_of(&format!("{GOOD}\n[cluster]\nnodes = [\"192.0.2.2\", \"192.0.2.3:9878\"]\n"));
    assert!(e.starts_with("t.toml:26:10: cluster.nodes[0]: \"192.0.2.2\" is not IPv4:PORT"), "{e}");
    let e = error_of(&format!("{GOOD}\n[cluster]\nnodes = [\"127.0.0.1:9878\", \"192.0.2.3:9878\"]\n"));
    assert!(e.contains("cluster.nodes[0]: 127.0.0.1:9878: a node's address"), "{e}");
    let e = error_of(&format!("{GOOD}\n[cluster]\nnodes = [\"192.0.2.2:1\", \"192.0.2.3:1\"]\nsync_interval = \"0s\"\n"));
    assert!(e.starts_with("t.toml:27:17: cluster.sync_interval: "), "{e}");
    let e = error_of(&format!("{GOOD}\n[cluster]\nnodes = [\"192.0.2.2:1\", \"192.0.2.3:1\"]\nsync_interval = \"20m\"\n"));
    assert!(e.starts_with("t.toml:27:17: cluster.sync_interval: "), "{e}");
    let short = GOOD.replacen("port = 1883", "port = 1883\nflow_idle_timeout = \"10s\"", 1);
    let e = error_of(&format!("{short}\n[cluster]\nnodes = [\"192.0.2.2:1\", \"192.0.2.3:1\"]\nsync_interval = \"6s\"\n"));
    assert!(e.contains("cluster.sync_interval: 6s is more than half the shortest flow_idle_timeout (10s)"), "{e}");
    assert!(e.contains("use at most 5s"), "{e}");
    let e = error_of(&format!("{short}\n[cluster]\nnodes = [\"192.0.2.2:1\", \"192.0.2.3:1\"]\n"));
    assert!(e.contains("cluster.sync_interval: 10s is more than half"), "the default too: {e}");
    let ok = parse(
        &format!("{short}\n[cluster]\nnodes = [\"192.0.2.2:1\", \"192.0.2.3:1\"]\nsync_interval = \"5s\"\ninsecure = true\n"),
        "t.toml",
    );
    assert!(ok.is_ok(), "{ok:?}");
    let e = error_of(&format!("{GOOD}\n[cluster]\nnodes = [\"192.0.2.2:1\", \"192.0.2.3:1\"]\npeers = []\n"));
    assert!(e.contains("unknown field `peers`"), "{e}");
}

/// A cluster whose sync anyone on the network could feed is not started by accident: no
/// key_file is an error that says why, unless the config says `insecure = true`.
#[test]
fn a_cluster_without_a_key_is_refused_unless_it_says_insecure() {
    let cluster = |extra: &str| format!("{GOOD}\n[cluster]\nnodes = [\"192.0.2.2:1\", \"192.0.2.3:1\"]\n{extra}");
    for extra in ["", "insecure = false\n"] {
        let e = error_of(&cluster(extra));
        assert!(e.starts_with("t.toml:25:1: cluster.key_file: missing: without a key"), "{e}");
        assert!(e.contains("move live sessions to other brokers") && e.contains("cluster.insecure = true"), "{e}");
    }
    let c = parse(&cluster("insecure = true\n"), "t.toml").expect("insecure, as said");
    assert_eq!(c.cluster.expect("cluster").key, None);
    let e = error_of(&cluster("insecure = true\nkey_file = \"/etc/dsrlb/cluster.key\"\n"));
    assert!(e.starts_with("t.toml:27:12: cluster.insecure: true beside a key_file"), "{e}");
    let e = error_of(&cluster("insecure = \"yes\"\n"));
    assert!(e.contains("insecure"), "{e}");
}

/// key_file: read at load (and reload) through one descriptor: a regular file, not a link,
/// at most 4 KiB, owner-only, long enough; never shown.
#[test]
fn the_key_file_is_one_small_regular_file_of_its_owner() {
    let dir = std::env::temp_dir().join(format!("dsrlb-key-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let keyed = |path: &std::path::Path| format!("{GOOD}\n[cluster]\nnodes = [\"192.0.2.2:1\", \"192.0.2.3:1\"]\nkey_file = {path:?}\n");
    let write = |name: &str, content: &[u8], mode: u32| {
        use std::os::unix::fs::PermissionsExt as _;
        let p = dir.join(name);
        std::fs::write(&p, content).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    };
    let good = write("good", b"  0123456789abcdef0123456789abcdef\n", 0o600);
    let c = parse(&keyed(&good), "t.toml").expect("valid");
    let key = c.cluster.expect("cluster").key.expect("key");
    assert_eq!(&*key.0, b"0123456789abcdef0123456789abcdef");
    assert_eq!(format!("{key:?}"), "SyncKey(32 bytes)", "the key itself is never shown");
    let e = error_of(&keyed(&write("open", b"0123456789abcdef", 0o644)));
    assert!(e.contains("cluster.key_file: ") && e.contains("may be read by others (mode 644)"), "{e}");
    let e = error_of(&keyed(&write("short", b"0123456789", 0o600)));
    assert!(e.contains("cluster.key_file: ") && e.contains("holds 10 bytes"), "{e}");
    let e = error_of(&keyed(&dir.join("missing")));
    assert!(e.contains("cluster.key_file: reading "), "{e}");
    // A link to a good key is not followed (it could be swapped for one to any file).
    let link = dir.join("link");
    std::os::unix::fs::symlink(&good, &link).expect("symlink");
    let e = error_of(&keyed(&link));
    assert!(e.contains("cluster.key_file: ") && e.contains("is a symbolic link, which is not followed"), "{e}");
    // Only a regular file: a directory, and a FIFO (refused at once, not waited on).
    let sub = dir.join("sub");
    std::fs::create_dir(&sub).expect("dir");
    std::fs::set_permissions(&sub, std::os::unix::fs::PermissionsExt::from_mode(0o700)).expect("chmod");
    let e = error_of(&keyed(&sub));
    assert!(e.contains("cluster.key_file: ") && e.contains("is a directory: a key file must be a regular file"), "{e}");
    let fifo = dir.join("fifo");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    let e = error_of(&keyed(&fifo));
    assert!(e.contains("cluster.key_file: ") && e.contains("is a FIFO: a key file must be a regular file"), "{e}");
    // At most 4 KiB, checked before anything is read.
    let big = write("big", &[b'k'; 4097], 0o600);
    let e = error_of(&keyed(&big));
    assert!(e.contains("cluster.key_file: ") && e.contains("holds 4097 bytes: a key file holds at most 4096"), "{e}");
    assert!(parse(&keyed(&write("max", &[b'k'; 4096], 0o600)), "t.toml").is_ok(), "4096 bytes are taken");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ring_seed_file`: read at load (and reload) with the cluster key's rules, never shown;
/// absent, the rings are unseeded.
#[test]
fn ring_seed_file_is_a_secret_read_at_load() {
    assert_eq!(parse(GOOD, "t.toml").expect("valid").ring_seed, None);
    let dir = std::env::temp_dir().join(format!("dsrlb-ring-seed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let seeded =
        |path: &std::path::Path| GOOD.replacen("ring_size = 65537\n", &format!("ring_size = 65537\nring_seed_file = {path:?}\n"), 1);
    let write = |name: &str, content: &[u8], mode: u32| {
        use std::os::unix::fs::PermissionsExt as _;
        let p = dir.join(name);
        std::fs::write(&p, content).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    };
    let good = write("good", b"0123456789abcdef0123456789abcdef\n", 0o600);
    let seed = parse(&seeded(&good), "t.toml").expect("valid").ring_seed.expect("a seed");
    assert_eq!(seed, crate::maglev::RingSeed::new(b"0123456789abcdef0123456789abcdef"), "surrounding whitespace ignored");
    assert_eq!(format!("{seed:?}"), "RingSeed(32 bytes)", "the seed itself is never shown");
    let e = error_of(&seeded(&write("open", b"0123456789abcdef", 0o640)));
    assert!(e.starts_with("t.toml:4:18: ring_seed_file: ") && e.contains("may be read by others (mode 640)"), "{e}");
    let e = error_of(&seeded(&write("short", b"0123456789", 0o600)));
    assert!(e.contains("ring_seed_file: ") && e.contains("holds 10 bytes"), "{e}");
    let e = error_of(&seeded(&dir.join("missing")));
    assert!(e.contains("ring_seed_file: reading "), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn read_only_group_is_a_group_of_this_host() {
    assert_eq!(parse(GOOD, "t.toml").expect("valid").read_only_group, None);
    let with = |g: &str| GOOD.replacen("ring_size = 65537\n", &format!("ring_size = 65537\nread_only_group = {g:?}\n"), 1);
    let c = parse(&with("root"), "t.toml").expect("valid");
    assert_eq!(c.read_only_group, Some(Group { name: "root".to_owned(), gid: 0 }));
    assert_eq!(parse(&with("60123"), "t.toml").expect("valid").read_only_group.map(|g| g.gid), Some(60123), "a gid");
    let e = error_of(&with("no-such-group-here"));
    assert!(e.starts_with("t.toml:4:19: read_only_group: no group is named \"no-such-group-here\""), "{e}");
}

#[test]
fn errors_name_line_and_field() {
    let e = error_of(&GOOD.replace("192.0.2.100", "192.0.2.300"));
    assert!(e.starts_with("t.toml:11:7: listener[0].vip:"), "{e}");
    let e = error_of(&GOOD.replace("ring_size = 65537", "ring_size = 65536"));
    assert!(e.starts_with("t.toml:3:13: ring_size:"), "{e}");
    let e = error_of(&GOOD.replace("[\"b2\", \"b1\"]", "[\"b2\", \"b9\"]"));
    assert!(e.contains("t.toml:13:19: listener[0].backends[1]: no [[backend]] is named \"b9\""), "{e}");
    let e = error_of(&GOOD.replace("02:00:00:00:00:11", "02:00:00:00:11"));
    assert!(e.contains(":22:7: backend[1].mac:"), "{e}");
    let e = error_of(&GOOD.replace("weight = 50", "weight = 50\nwieght = 3"));
    assert!(e.contains("line 24") && e.contains("wieght"), "{e}");
    let e = error_of(&GOOD.replace("\"2s\"", "\"2 parsecs\""));
    assert!(e.contains("health.inter"), "{e}");
    let e = error_of(&GOOD.replace("name = \"b1\"", "name = \"b2\""));
    assert!(e.contains("backend[1].name: duplicate"), "{e}");
    let e = error_of(&GOOD.replace("port = 1883", "port = 70000"));
    assert!(e.contains("line 12") && e.contains("port"), "{e}");
}

#[test]
fn edge_settings_parse_and_are_checked() {
    let c = parse(GOOD, "t.toml").expect("valid");
    assert_eq!(c.flow_idle_timeout, DEFAULT_FLOW_IDLE_TIMEOUT);
    assert_eq!((c.listeners[0].flow_idle_timeout, c.listeners[0].conn_rate), (DEFAULT_FLOW_IDLE_TIMEOUT, None));
    let text = GOOD
        .replace("ring_size = 65537", "ring_size = 65537\naccept_macs = [\"00:00:5e:00:01:33\"]\nflow_idle_timeout = \"2h\"")
        .replace("port = 1883", "port = 1883\nflow_idle_timeout = \"90s\"\nmax_conn_rate = 500\nmax_conn_burst = 50");
    let c = parse(&text, "t.toml").expect("valid");
    assert_eq!(c.accept_macs, vec![[0, 0, 0x5e, 0, 1, 0x33]]);
    assert_eq!(c.flow_idle_timeout, Duration::from_hours(2));
    assert_eq!(c.listeners[0].flow_idle_timeout, Duration::from_secs(90));
    assert_eq!(c.listeners[0].conn_rate, Some(ConnRateLimit { rate: 500, burst: 50 }));
    let defaulted = parse(&GOOD.replace("port = 1883", "port = 1883\nmax_conn_rate = 500"), "t.toml").expect("valid");
    assert_eq!(defaulted.listeners[0].conn_rate, Some(ConnRateLimit { rate: 500, burst: 50 }));
    for (bad, field) in [
        ("accept_macs = [\"ff:ff:ff:ff:ff:ff\"]", "accept_macs[0]"),
        ("accept_macs = [\"02:00:00:00:00:01\", \"02:00:00:00:00:01\"]", "accept_macs[1]"),
        ("flow_idle_timeout = \"1s\"", "flow_idle_timeout"),
        ("flow_idle_timeout = \"13h\"", "flow_idle_timeout"),
        ("flow_idle_timeout = \"307445734561825861m\"", "flow_idle_timeout"),
    ] {
        let e = error_of(&GOOD.replace("ring_size = 65537", &format!("ring_size = 65537\n{bad}")));
        assert!(e.starts_with("t.toml:4:") && e.contains(&format!(" {field}: ")), "{bad}: {e}");
    }
    for (bad, field) in [
        ("max_conn_rate = 0", "listener[0].max_conn_rate"),
        ("max_conn_rate = 10\nmax_conn_burst = 11", "listener[0].max_conn_burst"),
        ("max_conn_burst = 5", "listener[0].max_conn_burst"),
        ("flow_idle_timeout = \"soon\"", "listener[0].flow_idle_timeout"),
    ] {
        let e = error_of(&GOOD.replace("port = 1883", &format!("port = 1883\n{bad}")));
        assert!(e.contains(&format!(" {field}: ")), "{bad}: {e}");
    }
}

#[test]
fn listeners_and_rings_that_cannot_work_are_refused() {
    let e = error_of(&GOOD.replace("backends = [\"b2\", \"b1\"]", "backends = []"));
    assert!(e.starts_with("t.toml:13:12: listener[0].backends: a listener needs at least one backend"), "{e}");
    let e = error_of(&GOOD.replace("vip = \"192.0.2.100\"", "vip = \"192.0.2.12\""));
    assert!(e.starts_with("t.toml:11:7: listener[0].vip: 192.0.2.12 is backend \"b2\"'s own address"), "{e}");
    let e = error_of(&GOOD.replace("ring_size = 65537", "ring_size = 101"));
    assert!(e.starts_with("t.toml:3:13: ring_size: 101 is too small for listener \"mqtt\"'s 2 backends"), "{e}");
    assert!(e.contains("at least 200, e.g. 211"), "{e}");
    assert!(parse(&GOOD.replace("ring_size = 65537", "ring_size = 211"), "t.toml").is_ok());
    let dir = std::env::temp_dir().join(format!("dsrlb-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let not_a_cert = dir.join("ca.pem");
    std::fs::write(&not_a_cert, "this is not a certificate\n").expect("write");
    let text = GOOD.replace("check = \"tcp\"", &format!("check = \"mqtt-tls\"\ntls_ca = \"{}\"", not_a_cert.display()));
    let e = error_of(&text);
    assert!(e.starts_with("t.toml:7:10: health.tls_ca: ") && e.contains("holds no certificate"), "{e}");
    let garbled = dir.join("garbled.pem");
    std::fs::write(&garbled, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").expect("write");
    let e = error_of(&text.replace("ca.pem", "garbled.pem"));
    assert!(e.contains("health.tls_ca") && e.contains("does not parse"), "{e}");
    let e = error_of(&text.replace("ca.pem", "missing.pem"));
    assert!(e.contains("health.tls_ca") && e.contains("reading"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    /// Lines a config is made of, valid or nearly so: fields the parser knows with values of
    /// every kind, and some it does not.
    fn line() -> impl Strategy<Value = String> {
        let key = prop::sample::select(vec![
            "interface",
            "xdp_mode",
            "ring_size",
            "flow_table_size",
            "flow_idle_timeout",
            "accept_macs",
            "on_down",
            "on_down_grace",
            "all_down",
            "name",
            "vip",
            "port",
            "hash",
            "backends",
            "address",
            "mac",
            "weight",
            "check",
            "inter",
            "timeout",
            "fall",
            "rise",
            "tls_ca",
            "max_conn_rate",
            "max_conn_burst",
            "table",
            "withdraw_wait",
            "nodes",
            "sync_interval",
            "join_wait",
            "key_file",
            "nonsense",
        ]);
        let value = prop::sample::select(vec![
            "\"eth0\"",
            "\"\"",
            "0",
            "1",
            "-1",
            "65537",
            "4294967296",
            "\"192.0.2.100\"",
            "\"192.0.2.300\"",
            "\"2s\"",
            "\"307445734561825861m\"",
            "\"0s\"",
            "[]",
            "[\"b1\"]",
            "[\"02:00:00:00:00:11\"]",
            "[\"192.0.2.2:9878\", \"192.0.2.3:9878\"]",
            "[\"192.0.2.2:9878\", \"192.0.2.2:9878\"]",
            "\"reset\"",
            "\"forward\"",
            "true",
            "{}",
            "{ check = \"tcp\" }",
            "\"mqtt-tls\"",
            "\"/nonexistent\"",
            "1e9",
            "\"ä\"",
        ]);
        let header =
            prop::sample::select(vec!["[health]", "[[listener]]", "[[backend]]", "[listener]", "[announce]", "[cluster]", "[[nonsense]]"]);
        prop_oneof![
            3 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
            1 => header.prop_map(str::to_owned),
            1 => "[ -~]{0,40}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Any text: parsed or refused with the file named, never a panic.
        #[test]
        fn any_config_text_is_parsed_or_refused_by_name(lines in prop::collection::vec(line(), 0..30)) {
            let text = lines.join("\n");
            if let Err(e) = parse(&text, "fuzz.toml") {
                prop_assert!(e.to_string().starts_with("fuzz.toml"), "{e}");
            }
        }

        /// A valid config with one line replaced: parsed, or refused naming the file.
        #[test]
        fn a_valid_config_with_one_line_changed_is_parsed_or_refused_by_name(at in 0usize..22, new in line()) {
            let mut lines: Vec<String> = GOOD.lines().map(str::to_owned).collect();
            let at = at % lines.len();
            lines[at] = new;
            if let Err(e) = parse(&lines.join("\n"), "fuzz.toml") {
                prop_assert!(e.to_string().starts_with("fuzz.toml"), "{e}");
            }
        }
    }
}

#[test]
fn durations_and_macs() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
    assert!(parse_duration("0s").is_err());
    assert!(parse_duration("2h").is_err(), "health durations stay within an hour");
    let overflow = parse_duration("307445734561825861m").expect_err("an overflowing duration is refused");
    assert!(overflow.contains("between 1ms and 1h"), "{overflow}");
    assert!(parse_mac("01:00:5e:00:00:01").is_err());
    assert_eq!(format_mac([2, 0, 0, 0, 0, 0x11]), "02:00:00:00:00:11");
}

/// `check = "http"`: the API port is required; path, Host and statuses cannot break the request
/// or mean two things; credentials come from a file only its owner reads.
#[test]
fn http_checks_are_checked_before_they_probe() {
    let http = |extra: &str| GOOD.replace("check = \"tcp\"", &format!("check = \"http\"\n{extra}"));
    let e = error_of(&http(""));
    assert!(e.contains("health.http_port") && e.contains("needs http_port"), "{e}");
    let c = parse(&http("http_port = 18083\nhttp_path = \"/api/v5/load_rebalance/availability_check\""), "t.toml").expect("valid");
    assert_eq!(
        (c.health.check, c.health.http_port, c.health.http_path.as_str(), &c.health.http_expect[..], &c.health.http_refusing[..]),
        (CheckKind::Http, Some(18083), "/api/v5/load_rebalance/availability_check", &[200][..], &[503][..])
    );
    for (extra, field, want) in [
        ("http_port = 0", "http_port", "0 is no port"),
        ("http_port = 1\nhttp_path = \"status\"", "http_path", "must start with /"),
        ("http_port = 1\nhttp_path = \"/a b\"", "http_path", "no spaces"),
        ("http_port = 1\nhttp_path = \"/a\\r\\nX-Evil: 1\"", "http_path", "printable ASCII"),
        ("http_port = 1\nhttp_host = \"a\\nb\"", "http_host", "printable ASCII"),
        ("http_port = 1\nhttp_expect = [200, 700]", "http_expect", "100 to 599"),
        ("http_port = 1\nhttp_expect = []", "http_expect", "at least one status"),
        ("http_port = 1\nhttp_expect = [200, 503]", "http_refusing", "503 is in http_expect too"),
    ] {
        let e = error_of(&http(extra));
        assert!(e.contains(&format!("health.{field}")) && e.contains(want), "{extra}: {e}");
    }
    let e = error_of(&GOOD.replace("check = \"tcp\"", "check = \"https\"\nhttp_port = 8443"));
    assert!(e.contains("check = \"https\" needs tls_ca"), "{e}");
    // Credentials: owner-only, one user:password line.
    let dir = std::env::temp_dir().join(format!("dsrlb-http-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = |name: &str, text: &str, mode: u32| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).expect("chmod");
        p
    };
    let good = file("good", "dsrlb:s3cret\n", 0o600);
    assert_eq!(key::read_http_auth(&good).expect("valid"), "dsrlb:s3cret");
    let e = format!("{:#}", key::read_http_auth(&file("open", "dsrlb:s3cret\n", 0o644)).expect_err("mode 644"));
    assert!(e.contains("may be read by others"), "{e}");
    let e = format!("{:#}", key::read_http_auth(&file("nocolon", "dsrlb\n", 0o600)).expect_err("no colon"));
    assert!(e.contains("user:password"), "{e}");
    // Over plain HTTP the credentials would cross the network in cleartext: refused.
    let e = error_of(&http(&format!("http_port = 18083\nhttp_auth_file = \"{}\"", good.display())));
    assert!(e.contains("health.http_auth_file") && e.contains("cleartext"), "{e}");
    // Nor inherited from an https [health] by a listener that checks over http.
    let inherited = GOOD
        .replace("check = \"tcp\"", &format!("check = \"tcp\"\nhttp_port = 18083\nhttp_auth_file = \"{}\"", good.display()))
        .replace("port = 1883\n", "port = 1883\nhealth = { check = \"http\" }\n");
    let e = error_of(&inherited);
    assert!(e.contains(".health.check"), "{e}");
    assert!(e.contains("here or inherited") && e.contains("cleartext"), "{e}");
    // Never shown by Debug.
    let h = Health { password: Some("mqtt-s3cret".into()), http_auth: Some("dsrlb:s3cret".into()), ..Health::default() };
    let shown = format!("{h:?}");
    assert!(!shown.contains("s3cret") && shown.contains("(hidden)"), "{shown}");
    let _ = std::fs::remove_dir_all(&dir);
}
