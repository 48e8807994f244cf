//! `[health]`, and the `health` tables of listeners and backends that override it.

use std::path::PathBuf;

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
        if h.check.tls() && h.tls_ca.is_none() {
            let name = if h.check == CheckKind::MqttTls { "mqtt-tls" } else { "mqtt5-tls" };
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
}
