//! The brokers: mosquitto in each broker namespace (listeners on 1883, 8883 with the lab's TLS
//! certificate, and the internal port; bridged into one cluster), started, stopped and
//! misconfigured on purpose.

use std::{
    fmt::Write as _,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::{INTERNAL_PORT, Lab, TLS_NAME, VIP, VIP_GUE, VIP_INTERNAL, VIP_IPIP, VIP6, VIP6_GUE, VIP6_IPIP, kill_and_wait};
use crate::wait;

impl Lab {
    pub(super) fn write_certs(&self) -> anyhow::Result<()> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().context("CA key")?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
        ca.distinguished_name.push(DnType::CommonName, "dsrlb lab CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;
        let key = KeyPair::generate().context("server key")?;
        let mut params = CertificateParams::new(vec![TLS_NAME.to_owned()]).context("server params")?;
        params.distinguished_name.push(DnType::CommonName, TLS_NAME);
        for vip in [VIP, VIP_INTERNAL, VIP_IPIP, VIP_GUE] {
            params.subject_alt_names.push(SanType::IpAddress(vip.into()));
        }
        for vip in [VIP6, VIP6_IPIP, VIP6_GUE] {
            params.subject_alt_names.push(SanType::IpAddress(vip.into()));
        }
        let cert = params.signed_by(&key, &ca_cert, &ca_key).context("signing the server certificate")?;
        std::fs::write(self.ca_pem(), ca_cert.pem())?;
        std::fs::write(self.state.join("server.pem"), cert.pem())?;
        std::fs::write(self.state.join("server.key"), key.serialize_pem())?;
        Ok(())
    }

    fn broker_dir(&self, i: usize) -> PathBuf {
        self.state.join(format!("b{}", i + 1))
    }

    #[must_use]
    pub fn broker_log(&self, i: usize) -> PathBuf {
        self.broker_dir(i).join("mosquitto.log")
    }

    /// Starts (or restarts) mosquitto in broker `i`, with listeners on 1883, 8883 (TLS) and
    /// the internal port, and waits until it accepts connections on its real address.
    ///
    /// # Errors
    /// When it does not come up within 10 s.
    pub fn start_broker(&self, i: usize) -> anyhow::Result<()> {
        self.start_broker_with(i, true)
    }

    /// As [`Self::start_broker`], optionally without the TLS listener (a "broken" 8883).
    ///
    /// # Errors
    /// When it does not come up within 10 s.
    pub fn start_broker_with(&self, i: usize, tls: bool) -> anyhow::Result<()> {
        self.stop_broker(i)?;
        let dir = self.broker_dir(i);
        std::fs::create_dir_all(&dir)?;
        let pid = dir.join("mosquitto.pid");
        let _ = std::fs::remove_file(&pid);
        let mut conf = String::new();
        let _ = writeln!(conf, "pid_file {}\nuser root\npersistence false", pid.display());
        let _ = writeln!(conf, "log_dest file {}\nlog_type all\nconnection_messages true", self.broker_log(i).display());
        let _ = writeln!(conf, "allow_anonymous true\nmax_keepalive 3600");
        let _ = writeln!(conf, "listener 1883\nlistener {INTERNAL_PORT}");
        if tls {
            let _ = writeln!(
                conf,
                "listener 8883\ncertfile {}\nkeyfile {}",
                self.state.join("server.pem").display(),
                self.state.join("server.key").display()
            );
        }
        if i > 0 {
            // The brokers form one cluster, as EMQX nodes would: each bridges every topic to b1
            // (a star; mosquitto does not echo a message back over the bridge it came from), so
            // a subscriber and a publisher that land on different brokers still meet.
            let _ = writeln!(conf, "connection cluster-b{}\naddress {}:1883\ntopic # both 0", i + 1, self.broker_ip(0));
            let _ = writeln!(conf, "try_private true\nnotifications false\ncleansession true\nrestart_timeout 1 5");
        }
        let conf_path = dir.join("mosquitto.conf");
        std::fs::write(&conf_path, conf)?;
        let ns = self.broker_ns(i);
        self.exec(&ns, "mosquitto", &["-d", "-c", &conf_path.display().to_string()])
            .with_context(|| format!("starting mosquitto in {ns}"))?;
        let up = || {
            pid.exists()
                && crate::netns::in_netns(&self.ns("client"), || {
                    TcpStream::connect_timeout(&SocketAddr::from((self.broker_ip(i), 1883)), Duration::from_millis(200)).is_ok()
                })
                .unwrap_or(false)
        };
        if wait::within(Duration::from_secs(10), Duration::from_millis(50), up).is_none() {
            bail!("mosquitto in {ns} did not come up within 10 s; see {}", self.broker_log(i).display());
        }
        Ok(())
    }

    pub(super) fn broker_pid(&self, i: usize) -> Option<i32> {
        std::fs::read_to_string(self.broker_dir(i).join("mosquitto.pid")).ok()?.trim().parse().ok()
    }

    /// Stops mosquitto in broker `i` (SIGTERM, then SIGKILL), by the PID it recorded.
    ///
    /// # Errors
    /// Never in practice; kept fallible for symmetry with start.
    pub fn stop_broker(&self, i: usize) -> anyhow::Result<()> {
        if let Some(pid) = self.broker_pid(i) {
            kill_and_wait(pid);
            let _ = std::fs::remove_file(self.broker_dir(i).join("mosquitto.pid"));
        }
        Ok(())
    }

    /// Removes the VIP from broker `i`'s `lo` (a misconfigured broker), or puts it back.
    ///
    /// # Errors
    /// When `ip addr` fails.
    pub fn set_broker_vip(&self, i: usize, present: bool) -> anyhow::Result<()> {
        let verb = if present { "add" } else { "del" };
        Self::ip(&self.broker_ns(i), &["addr", verb, &format!("{VIP}/32"), "dev", "lo"]).map(drop)
    }
}
