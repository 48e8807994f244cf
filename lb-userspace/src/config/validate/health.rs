//! `[health]`, and the `health` tables of listeners and backends that override it.

use std::path::{Path, PathBuf};

use toml::Spanned;

use super::Validator;
use crate::config::{CheckKind, ConfigError, Health, parse_duration, raw::RawHealth};

impl Validator<'_> {
    pub(super) fn health(&self, base: &Health, raw: &Spanned<RawHealth>, field: &str) -> Result<Health, ConfigError> {
        let span = raw.span();
        let raw = raw.get_ref();
        let mut h = base.clone();
        if let Some(c) = raw.check {
            h.check = c;
        }
        if let Some(a) = raw.alpha {
            h.alpha = a;
        }
        if let Some(v) = raw.vip_check {
            h.vip_check = v;
        }
        // The probe's CONNECT carries them as MQTT strings: a 16-bit length, and no U+0000 in
        // a user name (MQTT 3.1.1, 1.5.3: a broker closes the connection), else every probe
        // would fail on the balancer's own config.
        for (value, name, target) in [(&raw.username, "username", &mut h.username), (&raw.password, "password", &mut h.password)] {
            if let Some(s) = value {
                let len = s.get_ref().len();
                if len > crate::mqtt::MAX_STRING {
                    let message = format!("{len} bytes; an MQTT CONNECT carries at most {}", crate::mqtt::MAX_STRING);
                    return Err(self.err(&s.span(), format!("{field}.{name}"), message));
                }
                if name == "username" && s.get_ref().contains('\0') {
                    return Err(self.err(&s.span(), format!("{field}.{name}"), "holds U+0000, which MQTT 3.1.1 refuses in a string"));
                }
                *target = Some(s.get_ref().clone());
            }
        }
        if let Some(s) = &raw.tls_server_name {
            if let Err(e) = rustls_pki_types::ServerName::try_from(s.get_ref().as_str()) {
                return Err(self.err(&s.span(), format!("{field}.tls_server_name"), format!("{:?}: {e}", s.get_ref())));
            }
            h.tls_server_name = Some(s.get_ref().clone());
        }
        if let Some(ca) = &raw.tls_ca {
            let path = PathBuf::from(ca.get_ref());
            if let Err(e) = crate::tls::client_config(&path) {
                return Err(self.err(&ca.span(), format!("{field}.tls_ca"), format!("{e:#}")));
            }
            h.tls_ca = Some(path);
        }
        self.http(&mut h, raw, field)?;
        if h.check == CheckKind::Http && h.http_auth.is_some() {
            // Inherited from a table that checks over https: refused here too.
            let message = "check = \"http\" with http_auth_file (here or inherited): the credentials would cross the network in \
                           cleartext; use check = \"https\"";
            return Err(self.err(&span, format!("{field}.check"), message));
        }
        if h.check.http() && h.http_port.is_none() {
            return Err(self.err(&span, format!("{field}.http_port"), "an HTTP check needs http_port, the broker's API port"));
        }
        if h.check.tls() && h.tls_ca.is_none() {
            let name = match h.check {
                CheckKind::MqttTls => "mqtt-tls",
                CheckKind::Https => "https",
                _ => "mqtt5-tls",
            };
            return Err(self.err(
                &span,
                format!("{field}.tls_ca"),
                format!("check = \"{name}\" needs tls_ca, the CA that signs the brokers' certificates"),
            ));
        }
        if let Some(s) = &raw.inter {
            h.inter = parse_duration(s.get_ref()).map_err(|m| self.err(&s.span(), format!("{field}.inter"), m))?;
        }
        if let Some(s) = &raw.timeout {
            h.timeout = parse_duration(s.get_ref()).map_err(|m| self.err(&s.span(), format!("{field}.timeout"), m))?;
        }
        for (value, name, target) in [(&raw.fall, "fall", &mut h.fall), (&raw.rise, "rise", &mut h.rise)] {
            if let Some(s) = value {
                if !(1..=1000).contains(s.get_ref()) {
                    return Err(self.err(&s.span(), format!("{field}.{name}"), "must be between 1 and 1000"));
                }
                *target = *s.get_ref();
            }
        }
        if h.timeout > h.inter {
            let span = raw.timeout.as_ref().map_or(span, Spanned::span);
            return Err(self.err(&span, format!("{field}.timeout"), format!("{:?} is longer than inter ({:?})", h.timeout, h.inter)));
        }
        Ok(h)
    }

    /// The `http_*` settings: a path and Host that cannot break the request's lines, statuses
    /// that are HTTP's and mean one thing each, credentials from a file only its owner reads.
    fn http(&self, h: &mut Health, raw: &RawHealth, field: &str) -> Result<(), ConfigError> {
        if let Some(p) = &raw.http_port {
            if *p.get_ref() == 0 {
                return Err(self.err(&p.span(), format!("{field}.http_port"), "0 is no port"));
            }
            h.http_port = Some(*p.get_ref());
        }
        let plain = |s: &str| !s.is_empty() && s.len() <= 1024 && s.chars().all(|c| c.is_ascii_graphic());
        if let Some(p) = &raw.http_path {
            if !p.get_ref().starts_with('/') || !plain(p.get_ref()) {
                let message = "must start with / and hold printable ASCII only, no spaces (at most 1,024 bytes)";
                return Err(self.err(&p.span(), format!("{field}.http_path"), message));
            }
            h.http_path.clone_from(p.get_ref());
        }
        if let Some(v) = &raw.http_host {
            if !plain(v.get_ref()) {
                return Err(self.err(&v.span(), format!("{field}.http_host"), "must hold printable ASCII only, no spaces"));
            }
            h.http_host = Some(v.get_ref().clone());
        }
        for (value, name, target) in
            [(&raw.http_expect, "http_expect", &mut h.http_expect), (&raw.http_refusing, "http_refusing", &mut h.http_refusing)]
        {
            if let Some(v) = value {
                if v.get_ref().iter().any(|c| !(100..=599).contains(c)) {
                    return Err(self.err(&v.span(), format!("{field}.{name}"), "HTTP statuses are 100 to 599"));
                }
                target.clone_from(v.get_ref());
            }
        }
        if h.http_expect.is_empty() {
            let span = raw.http_expect.as_ref().map_or(0..0, Spanned::span);
            return Err(self.err(&span, format!("{field}.http_expect"), "at least one status must mean ready"));
        }
        if let Some(c) = h.http_expect.iter().find(|c| h.http_refusing.contains(c)) {
            let span = raw.http_refusing.as_ref().or(raw.http_expect.as_ref()).map_or(0..0, Spanned::span);
            return Err(self.err(&span, format!("{field}.http_refusing"), format!("{c} is in http_expect too: a status means one thing")));
        }
        if let Some(f) = &raw.http_auth_file {
            if h.check == CheckKind::Http {
                let message = "with check = \"http\" the credentials would cross the network in cleartext: use check = \"https\" \
                               (EMQX's availability check needs none)";
                return Err(self.err(&f.span(), format!("{field}.http_auth_file"), message));
            }
            let auth = crate::config::key::read_http_auth(Path::new(f.get_ref()));
            h.http_auth = Some(auth.map_err(|e| self.err(&f.span(), format!("{field}.http_auth_file"), format!("{e:#}")))?);
        }
        Ok(())
    }
}
