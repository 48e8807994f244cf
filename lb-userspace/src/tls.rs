//! TLS client settings for `mqtt-tls` checks, from a CA file: read when the config is
//! validated (so a file that holds no certificate is refused with its field and line) and when
//! probes start.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use tokio_rustls::rustls;

/// The TLS client config for `mqtt-tls` from the PEM file `ca` (the CA or CAs that sign the
/// brokers' certificates).
///
/// # Errors
/// When the file cannot be read or holds no usable certificate.
pub fn client_config(ca: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
        let cert = cert.with_context(|| format!("{} is not PEM", ca.display()))?;
        roots.add(cert).with_context(|| format!("{} holds a certificate that does not parse", ca.display()))?;
    }
    anyhow::ensure!(!roots.is_empty(), "{} holds no certificate", ca.display());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
