//! Mesh TLS: rustls (TLS 1.3 only; ring or AWS-LC underneath, see [`provider`]) with SPIFFE
//! identities.
//!
//! - [`MeshTls`] holds the current certificate, key and trust bundle (several roots allowed, for CA
//!   rollover), loaded from files and reloaded when they change: new handshakes use the new
//!   material, established connections keep theirs (each rustls connection owns an `Arc` of the
//!   config it started with).
//! - The client side (origination) verifies the server's chain against the bundle and checks that
//!   its SPIFFE ID is the expected one (`tls_identity_mismatch` otherwise). The expected service
//!   travels as the TLS server name, which also keys the session cache, so reconnects to the same
//!   service resume.
//! - The server side (termination) requires a client certificate, verifies its chain, takes the
//!   peer's SPIFFE ID and asks the [`Authorizer`]; a refusal fails the handshake with the TLS
//!   `access_denied` alert, which the source reports as `denied_by_destination`.
//!
//! ALPN names the inner protocol (`ringside/tcp`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName,
    RootCertStore, ServerConfig, SignatureScheme,
};

use crate::decide::authz::{authorize_peer, Denied, Scope, Served};
use crate::policy::identity::SpiffeId;
use crate::reason::Reason;

pub mod provider;
pub mod record;
pub mod session;
pub mod sidecar;

pub use crate::decide::detect::{ALPN_HTTP, ALPN_TCP};

pub use crate::config::TlsFiles;

/// Why loading certificate material failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// What one certificate says, for operators (`ringside cert inspect`) and for checks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertInfo {
    /// Subject distinguished name.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// URI SANs (SPIFFE IDs).
    pub uris: Vec<String>,
    /// Start of validity (seconds since the epoch).
    pub not_before: i64,
    /// End of validity (seconds since the epoch).
    pub not_after: i64,
    /// Whether it is a CA certificate.
    pub is_ca: bool,
}

impl CertInfo {
    /// Parse a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<CertInfo, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let uris = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Ok(CertInfo {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            uris,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            is_ca: cert.is_ca(),
        })
    }

    /// The SPIFFE ID: the certificate must carry exactly one URI SAN and it must be a mesh
    /// SPIFFE ID (an X.509-SVID has exactly one; a second URI could smuggle another identity).
    pub fn spiffe_id(&self) -> Option<SpiffeId> {
        match self.uris.as_slice() {
            [one] => one.parse().ok(),
            _ => None,
        }
    }
}

/// Every certificate in a PEM file, parsed for display.
pub fn inspect_file(path: &Path) -> Result<Vec<CertInfo>, TlsError> {
    let certs = read_certs(path)?;
    certs
        .iter()
        .map(|c| CertInfo::from_der(c).map_err(|m| file_err(path, m)))
        .collect()
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// Loaded material, ready to build configs from.
#[derive(Debug)]
pub struct Material {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    /// The leaf's identity.
    pub id: Option<SpiffeId>,
    /// The leaf's expiry.
    pub not_after: SystemTime,
}

impl Material {
    /// Read certificate, key and trust bundle.
    pub fn load(files: &TlsFiles) -> Result<Material, TlsError> {
        let chain = read_certs(&files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_err(&files.key, e))?;
        let mut roots = RootCertStore::empty();
        for c in read_certs(&files.ca)? {
            roots.add(c).map_err(|e| file_err(&files.ca, e))?;
        }
        let info = CertInfo::from_der(&chain[0]).map_err(|m| file_err(&files.cert, m))?;
        // A key and certificate caught in the middle of a replacement do not belong together.
        let signing = provider::mesh()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| file_err(&files.key, e))?;
        if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
            rustls::sign::CertifiedKey::new(chain.clone(), signing).keys_match()
        {
            return Err(file_err(
                &files.key,
                format!("this key does not belong to {}", files.cert.display()),
            ));
        }
        Ok(Material {
            id: info.spiffe_id(),
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(info.not_after.max(0) as u64),
            chain,
            key,
            roots: Arc::new(roots),
        })
    }
}

/// Decides whether a verified peer identity may connect (the intentions, or a tunnel's allow list).
pub trait Authorizer: std::fmt::Debug + Send + Sync {
    /// `Ok(rule)` to allow (the rule is logged), `Err` to refuse: `intention_denied` is answered
    /// with the `access_denied` alert, `tls_identity_mismatch` with `bad_certificate`.
    fn authorize(&self, peer: &SpiffeId) -> Result<String, Denied>;
}

/// Allow any verified identity, or only the listed ones.
#[derive(Debug, Clone, Default)]
pub struct AllowList(pub Vec<SpiffeId>);

impl Authorizer for AllowList {
    fn authorize(&self, peer: &SpiffeId) -> Result<String, Denied> {
        if self.0.is_empty() {
            Ok("any identity from the trust bundle".into())
        } else if self.0.contains(peer) {
            Ok(format!("allow-id {peer}"))
        } else {
            Err(Denied {
                reason: Reason::IntentionDenied,
                detail: format!("{peer} is not in the allowed identities"),
            })
        }
    }
}

/// Which server identity the client side requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Any identity the trust bundle vouches for.
    Any,
    /// Exactly this one.
    Exact(SpiffeId),
    /// The service named by the TLS server name, in this trust domain and namespace (the
    /// sidecar's outbound side: one config for every destination).
    ByServerName {
        /// Trust domain.
        trust_domain: String,
        /// Namespace.
        namespace: String,
    },
}

/// Intentions as the authorizer of one local service, for connections served as `served`.
#[derive(Debug)]
pub struct IntentionAuthorizer {
    /// The rules.
    pub intentions: Arc<crate::policy::intentions::Intentions>,
    /// The local service being called.
    pub destination: String,
    /// This sidecar's trust domain and namespace.
    pub scope: Scope,
    /// L4 connections refuse allows that carry L7 permissions.
    pub served: Served,
}

impl Authorizer for IntentionAuthorizer {
    fn authorize(&self, peer: &SpiffeId) -> Result<String, Denied> {
        authorize_peer(
            &self.intentions,
            &self.scope,
            Some(peer),
            &self.destination,
            self.served,
        )
    }
}

/// Build the client (origination) config.
pub fn client_config(
    m: &Material,
    expect: Expect,
    resumption: bool,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: m.roots.clone(),
        expect,
        provider: provider::mesh(),
    });
    let mut c = ClientConfig::builder_with_provider(provider::mesh())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())?;
    c.alpn_protocols = vec![ALPN_TCP.to_vec()];
    // The fast path protects records itself once the handshake is done (`tls::record`).
    c.enable_secret_extraction = true;
    c.resumption = if resumption {
        rustls::client::Resumption::in_memory_sessions(1024)
    } else {
        rustls::client::Resumption::disabled()
    };
    Ok(Arc::new(c))
}

/// Build the server (termination) config with an authorizer consulted for every client identity.
pub fn server_config(
    m: &Material,
    authorizer: Arc<dyn Authorizer>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let inner = WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider::mesh())
        .build()
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let verifier = Arc::new(SpiffeClientVerifier { inner, authorizer });
    let mut s = ServerConfig::builder_with_provider(provider::mesh())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())?;
    s.alpn_protocols = vec![ALPN_TCP.to_vec(), ALPN_HTTP.to_vec()];
    s.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    s.ticketer = provider::ticketer()?;
    // The fast path protects records itself once the handshake is done (`tls::record`).
    s.enable_secret_extraction = true;
    Ok(Arc::new(s))
}

/// The SPIFFE ID in a DER certificate.
pub fn spiffe_of(der: &[u8]) -> Option<SpiffeId> {
    CertInfo::from_der(der).ok()?.spiffe_id()
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expect: Expect,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let id = spiffe_of(end_entity).ok_or(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName,
        ))?;
        let ok = match &self.expect {
            Expect::Any => true,
            Expect::Exact(e) => &id == e,
            Expect::ByServerName {
                trust_domain,
                namespace,
            } => match server_name {
                ServerName::DnsName(n) => {
                    id.service == n.as_ref()
                        && &id.trust_domain == trust_domain
                        && &id.namespace == namespace
                }
                _ => false,
            },
        };
        if !ok {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
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
        rustls::crypto::verify_tls13_signature(
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

#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    authorizer: Arc<dyn Authorizer>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let Some(id) = spiffe_of(end_entity) else {
            tracing::warn!(
                reason = Reason::TlsIdentityMismatch.as_str(),
                "connection denied: the client certificate does not carry exactly one SPIFFE ID"
            );
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ));
        };
        match self.authorizer.authorize(&id) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(d) => {
                tracing::warn!(
                    reason = d.reason.as_str(),
                    peer = %id,
                    rule = %d.detail,
                    "connection denied"
                );
                Err(rustls::Error::InvalidCertificate(match d.reason {
                    Reason::TlsIdentityMismatch => CertificateError::NotValidForName,
                    // rustls answers this error with the `access_denied` alert.
                    _ => CertificateError::ApplicationVerificationFailure,
                }))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The failure reason for a TLS error: `local` errors are what this side found wrong with the
/// peer's certificate; alerts received say what the peer found wrong with ours.
pub fn reason_for(e: &rustls::Error) -> Reason {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                Reason::TlsCertExpired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Reason::TlsCertNotYetValid
            }
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                Reason::TlsUnknownCa
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                Reason::TlsIdentityMismatch
            }
            CertificateError::ApplicationVerificationFailure => Reason::IntentionDenied,
            _ => Reason::TlsHandshakeFailed,
        },
        rustls::Error::AlertReceived(a) => match a {
            AlertDescription::AccessDenied => Reason::DeniedByDestination,
            AlertDescription::CertificateExpired => Reason::TlsCertExpired,
            AlertDescription::UnknownCA => Reason::TlsUnknownCa,
            AlertDescription::BadCertificate | AlertDescription::CertificateUnknown => {
                Reason::TlsIdentityMismatch
            }
            _ => Reason::TlsHandshakeFailed,
        },
        _ => Reason::TlsHandshakeFailed,
    }
}

/// Which side of mesh TLS a listener plays.
#[derive(Debug, Clone)]
pub enum TlsRole {
    /// Originate: plaintext in, mTLS out; the server must present the `expect`ed identity.
    Origin {
        /// Required server identity.
        expect: Expect,
        /// Resume sessions (false: every connection is a full handshake).
        resumption: bool,
    },
    /// Terminate: mTLS in (client certificate required), plaintext out.
    Terminate {
        /// Who may connect.
        authorizer: Arc<dyn Authorizer>,
    },
}

/// Configs built from one set of material.
#[derive(Debug)]
pub struct Built {
    /// The material.
    pub material: Material,
    /// Client config (origination).
    pub client: Option<Arc<ClientConfig>>,
    /// The same, offering ALPN `ringside/http` (the L7 path's mesh connections).
    pub client_http: Option<Arc<ClientConfig>>,
    /// Server config (termination).
    pub server: Option<Arc<ServerConfig>>,
}

impl Built {
    fn new(material: Material, role: &TlsRole) -> Result<Built, TlsError> {
        let (client, server) = match role {
            TlsRole::Origin { expect, resumption } => (
                Some(client_config(&material, expect.clone(), *resumption)?),
                None,
            ),
            TlsRole::Terminate { authorizer } => {
                (None, Some(server_config(&material, authorizer.clone())?))
            }
        };
        let client_http = client.as_ref().map(|c| {
            let mut h = (**c).clone();
            h.alpn_protocols = vec![ALPN_HTTP.to_vec()];
            Arc::new(h)
        });
        Ok(Built {
            material,
            client,
            client_http,
            server,
        })
    }
}

/// Certificate material from files, with the configs built from it; watched and reloaded.
#[derive(Debug)]
pub struct MeshTls {
    files: TlsFiles,
    role: TlsRole,
    current: arc_swap::ArcSwap<Built>,
    stamp: std::sync::Mutex<Option<Vec<SystemTime>>>,
}

impl MeshTls {
    /// Load the files (errors name the file) and build the configs for `role`.
    pub fn load(files: TlsFiles, role: TlsRole) -> Result<Arc<MeshTls>, TlsError> {
        let built = Built::new(Material::load(&files)?, &role)?;
        let stamp = file_stamps(&files);
        Ok(Arc::new(MeshTls {
            files,
            role,
            current: arc_swap::ArcSwap::from_pointee(built),
            stamp: std::sync::Mutex::new(stamp),
        }))
    }

    /// The files this material is loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The current configs (one atomic load; a connection keeps what it got).
    pub fn current(&self) -> Arc<Built> {
        self.current.load_full()
    }

    /// Reload if a file changed since the last load. Returns true when new material is in use.
    /// A half-written or invalid set is not taken; the old material stays until a valid one.
    pub fn reload_if_changed(&self) -> bool {
        let now = file_stamps(&self.files);
        let mut stamp = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if now == *stamp {
            return false;
        }
        let loaded = Material::load(&self.files).and_then(|m| Built::new(m, &self.role));
        if file_stamps(&self.files) != now {
            // Replaced while being read: take it on the next look, once it is complete.
            return false;
        }
        match loaded {
            Ok(b) => {
                tracing::info!(
                    cert = %self.files.cert.display(),
                    identity = b.material.id.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                    "certificate reloaded"
                );
                self.current.store(Arc::new(b));
                *stamp = now;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "certificate files changed but cannot be loaded; keeping the current ones");
                false
            }
        }
    }

    /// Seconds until the current certificate expires (negative when expired).
    pub fn expires_in_secs(&self) -> i64 {
        let na = self.current().material.not_after;
        match na.duration_since(SystemTime::now()) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        }
    }
}

fn file_stamps(f: &TlsFiles) -> Option<Vec<SystemTime>> {
    [&f.cert, &f.key, &f.ca]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

#[cfg(test)]
mod tests;
