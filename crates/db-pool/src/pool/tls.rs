//! TLS through rustls, as `sslmode` and the `ssl*` parameters ask.
//!
//! Hand-written because tokio-postgres only knows disable/prefer/require and
//! tokio-postgres-rustls takes a ready `ClientConfig`: mapping libpq's
//! verify-ca (chain checked, host name not) and Prisma's
//! `sslaccept=accept_invalid_certs` onto rustls verifiers is ours to do.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{PoolConfig, SslAccept, SslMode};
use crate::error::Error;

/// Where Debian keeps the system's trusted roots; used for verify-ca and
/// verify-full when neither `sslrootcert` nor `sslcert` is given.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The sslmode tokio-postgres should negotiate with.
pub(crate) fn negotiation(mode: SslMode) -> tokio_postgres::config::SslMode {
    use tokio_postgres::config::SslMode as Pg;
    match mode {
        SslMode::Disable => Pg::Disable,
        SslMode::Prefer => Pg::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
    }
}

/// Builds the TLS connector for a configuration.
pub(crate) fn connector(cfg: &PoolConfig) -> Result<MakeRustlsConnect, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?;

    let check_certificates = matches!(cfg.sslmode, SslMode::VerifyCa | SslMode::VerifyFull)
        && cfg.sslaccept != Some(SslAccept::AcceptInvalidCerts);
    let builder = if check_certificates {
        let roots = Arc::new(root_store(cfg)?);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| Error::Tls(format!("the root certificates are not usable: {e}")))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier {
                webpki: Some(webpki),
                check_host_name: cfg.sslmode == SslMode::VerifyFull,
                provider,
            }))
    } else {
        // prefer / require: encrypt, but (like libpq) do not check the
        // certificate. Handshake signatures are still verified.
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier {
                webpki: None,
                check_host_name: false,
                provider,
            }))
    };

    let config = match &cfg.sslidentity {
        Some(path) => {
            let (certs, key) = client_identity(path)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| Error::Tls(format!("sslidentity {}: {e}", path.display())))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

fn root_store(cfg: &PoolConfig) -> Result<RootCertStore, Error> {
    let files: Vec<&Path> = [cfg.sslrootcert.as_deref(), cfg.sslcert.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    let files = if files.is_empty() {
        if Path::new(SYSTEM_ROOTS).exists() {
            vec![Path::new(SYSTEM_ROOTS)]
        } else {
            return Err(Error::Tls(format!(
                "sslmode={} needs a root certificate: set sslrootcert=<path to the CA's PEM file>",
                cfg.sslmode.as_str()
            )));
        }
    } else {
        files
    };
    let mut store = RootCertStore::empty();
    for file in files {
        let certs = CertificateDer::pem_file_iter(file)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                Error::Tls(format!(
                    "cannot read certificates from {}: {e}",
                    file.display()
                ))
            })?;
        if certs.is_empty() {
            return Err(Error::Tls(format!(
                "{} holds no PEM certificate",
                file.display()
            )));
        }
        for cert in certs {
            store
                .add(cert)
                .map_err(|e| Error::Tls(format!("{}: {e}", file.display())))?;
        }
    }
    Ok(store)
}

/// The client identity: a PEM file holding the certificate chain and the
/// private key (PKCS#12 files: convert with `openssl pkcs12 -nodes`).
fn client_identity(
    path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::Tls(format!("sslidentity {}: {e}", path.display())))?;
    let key = PrivateKeyDer::from_pem_file(path).map_err(|e| {
        Error::Tls(format!(
            "sslidentity {} must be a PEM file with the certificate and its private key: {e}",
            path.display()
        ))
    })?;
    Ok((certs, key))
}

/// The certificate policy: the WebPKI chain check (when asked for), with the
/// host-name check optional for verify-ca.
#[derive(Debug)]
struct Verifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    check_host_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_host_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
