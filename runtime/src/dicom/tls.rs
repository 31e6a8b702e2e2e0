//! DICOM TLS (PS3.15 Annex B, the BCP 195 profiles): the listener's rustls configuration from
//! `--dicom-tls-cert`, `--dicom-tls-key` and, to require client certificates,
//! `--dicom-tls-client-ca`. TLS 1.2 and 1.3 with rustls's safe defaults (ECDHE, AES-GCM and
//! ChaCha20-Poly1305), which the BCP 195 profiles of dcmtk and other nodes negotiate.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The certificates of a PEM file, at least one.
fn certificates(path: &Path, flag: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{flag} {}: no PEM certificate in it", path.display());
    }
    Ok(certs)
}

/// The listener's TLS configuration: its certificate chain and key and, with `client_ca`,
/// client certificates required and checked against those CA certificates (a caller without
/// one, or with one they did not issue, fails the handshake).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = certificates(cert, "--dicom-tls-cert")?;
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("--dicom-tls-key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates(ca, "--dicom-tls-client-ca")? {
                roots
                    .add(c)
                    .with_context(|| format!("--dicom-tls-client-ca {}", ca.display()))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .with_context(|| format!("--dicom-tls-client-ca {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let cfg = builder
        .with_single_cert(chain, key_der)
        .with_context(|| format!("--dicom-tls-cert {} and its key", cert.display()))?;
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_missing_or_empty_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = server_config(&empty, &empty, None).unwrap_err().to_string();
        assert!(
            e.contains("--dicom-tls-cert") && e.contains("no PEM certificate"),
            "{e}"
        );
        let gone = dir.path().join("gone.pem");
        let e = server_config(&gone, &gone, None).unwrap_err().to_string();
        assert!(
            e.contains("--dicom-tls-cert") && e.contains("gone.pem"),
            "{e}"
        );
    }
}
