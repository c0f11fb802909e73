//! The mesh certificate authority: a root generated once (or loaded), leaf certificates signed from
//! proxies' CSRs. The identity in a leaf is decided here, from the service the proxy's token belongs
//! to: whatever names the CSR asks for are ignored, only its public key is used, and the private key
//! never leaves the proxy. The CA key file is created with mode 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Default leaf lifetime (72 h), as in Consul.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(72 * 3600);

/// Why a CA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Certificate generation or parsing failed.
    #[error("{0}")]
    Cert(String),
}

fn cert_err(e: impl std::fmt::Display) -> CaError {
    CaError::Cert(e.to_string())
}

/// A loaded CA.
#[derive(Debug)]
pub struct Ca {
    /// Trust domain of the identities it signs.
    pub trust_domain: String,
    /// Root certificate (PEM).
    pub cert_pem: String,
    key: KeyPair,
}

impl Ca {
    /// Load `ca.pem` and `ca.key` from `dir`, or create them (key mode 0600) when absent.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Ca, CaError> {
        Ca::load_or_create_named(dir, "ca", trust_domain)
    }

    /// Load `<name>.pem` and `<name>.key` from `dir`, or create them.
    fn load_or_create_named(dir: &Path, name: &str, trust_domain: &str) -> Result<Ca, CaError> {
        let (cert_path, key_path) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        if cert_path.exists() && key_path.exists() {
            let read = |p: &Path| {
                std::fs::read_to_string(p).map_err(|source| CaError::Io {
                    path: p.to_path_buf(),
                    source,
                })
            };
            let key = KeyPair::from_pem(&read(&key_path)?).map_err(cert_err)?;
            return Ok(Ca {
                trust_domain: trust_domain.to_string(),
                cert_pem: read(&cert_path)?,
                key,
            });
        }
        std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            DnType::CommonName,
            format!("ringside CA {trust_domain} ({name})"),
        );
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}")
                .as_str()
                .try_into()
                .map_err(cert_err)?,
        )];
        let now = time_now();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = params.self_signed(&key).map_err(cert_err)?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        std::fs::write(&cert_path, cert.pem()).map_err(|source| CaError::Io {
            path: cert_path.clone(),
            source,
        })?;
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            cert_pem: cert.pem(),
            key,
        })
    }

    /// Sign a proxy's CSR for `service` (namespace `namespace`), valid for `lifetime` from now
    /// (backdated a minute for clock skew).
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        namespace: &str,
        service: &str,
        lifetime: Duration,
    ) -> Result<String, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(cert_err)?;
        let id = format!("spiffe://{}/ns/{namespace}/sa/{service}", self.trust_domain);
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        p.distinguished_name.push(DnType::CommonName, service);
        p.subject_alt_names = vec![SanType::URI(id.as_str().try_into().map_err(cert_err)?)];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let now = time_now();
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + time::Duration::seconds(lifetime.as_secs() as i64);
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(cert_err)?;
        let cert = p.signed_by(&csr.public_key, &issuer).map_err(cert_err)?;
        Ok(cert.pem())
    }
}

/// Which roots exist and which one signs (kept in `state.json` beside them, replaced atomically),
/// and where a rollover stands: the same types the daemon's API sends.
pub use ringside_core::control::api::{RootsState, RotationPhase};

/// The mesh CA with its roots: one signs, one or two are trusted (two during a rollover).
#[derive(Debug)]
pub struct Authority {
    dir: PathBuf,
    trust_domain: String,
    state: RootsState,
    signer: Ca,
    trusted_pem: Vec<String>,
}

impl Authority {
    /// Load the roots in `dir` (creating the first one when there is none).
    pub fn open(dir: &Path, trust_domain: &str) -> Result<Authority, CaError> {
        let state_path = dir.join("state.json");
        let state = match std::fs::read_to_string(&state_path) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| CaError::Cert(format!("{}: {e}", state_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RootsState {
                signer: "ca".into(),
                trusted: vec!["ca".into()],
            },
            Err(source) => {
                return Err(CaError::Io {
                    path: state_path,
                    source,
                })
            }
        };
        Authority::with_state(dir, trust_domain, state)
    }

    fn with_state(dir: &Path, trust_domain: &str, state: RootsState) -> Result<Authority, CaError> {
        let signer = Ca::load_or_create_named(dir, &state.signer, trust_domain)?;
        let mut trusted_pem = Vec::new();
        for id in &state.trusted {
            trusted_pem.push(Ca::load_or_create_named(dir, id, trust_domain)?.cert_pem);
        }
        Ok(Authority {
            dir: dir.to_path_buf(),
            trust_domain: trust_domain.to_string(),
            state,
            signer,
            trusted_pem,
        })
    }

    /// The trust bundle (PEM, every trusted root).
    pub fn bundle(&self) -> String {
        self.trusted_pem.concat()
    }

    /// The signing root.
    pub fn signer(&self) -> &Ca {
        &self.signer
    }

    /// Which roots exist and which signs.
    pub fn state(&self) -> &RootsState {
        &self.state
    }

    /// Where a rollover stands.
    pub fn phase(&self) -> RotationPhase {
        match self.state.trusted.as_slice() {
            [_] => RotationPhase::Idle,
            [first, ..] if *first == self.state.signer => RotationPhase::NewTrusted,
            _ => RotationPhase::NewSigning,
        }
    }

    /// Take the next rollover step: Idle -> NewTrusted (a new root, trusted, not signing) ->
    /// NewSigning (the new root signs) -> Idle (the old root retired). Returns the new phase.
    pub fn advance(&mut self) -> Result<RotationPhase, CaError> {
        let next = match self.phase() {
            RotationPhase::Idle => {
                let id = format!(
                    "root-{}",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis())
                        .unwrap_or(0)
                );
                RootsState {
                    signer: self.state.signer.clone(),
                    trusted: vec![self.state.signer.clone(), id],
                }
            }
            RotationPhase::NewTrusted => RootsState {
                signer: self.state.trusted[1].clone(),
                trusted: self.state.trusted.clone(),
            },
            RotationPhase::NewSigning => RootsState {
                signer: self.state.signer.clone(),
                trusted: vec![self.state.signer.clone()],
            },
        };
        // Create the files first, then switch the state file in one rename.
        let loaded = Authority::with_state(&self.dir, &self.trust_domain, next.clone())?;
        let tmp = self.dir.join("state.json.tmp");
        let io = |source| CaError::Io {
            path: tmp.clone(),
            source,
        };
        let text = serde_json::to_string(&next).map_err(cert_err)?;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, self.dir.join("state.json")).map_err(io)?;
        *self = loaded;
        Ok(self.phase())
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// Write a private key file readable by its owner only.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(data).map_err(io)
}

/// A CSR and its private key, as a proxy makes them (the key stays with the proxy).
pub fn make_csr() -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(cert_err)?;
    let params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    let csr = params.serialize_request(&key).map_err(cert_err)?;
    Ok((csr.pem().map_err(cert_err)?, key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ringctl-ca-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn rollover_trusts_both_roots_then_retires_the_old_one() {
        let d = dir("rollover");
        let mut a = Authority::open(&d, "dc1").unwrap();
        let first = a.signer().cert_pem.clone();
        assert_eq!(a.phase(), RotationPhase::Idle);
        assert_eq!(a.advance().unwrap(), RotationPhase::NewTrusted);
        assert_eq!(a.signer().cert_pem, first, "the old root still signs");
        assert_eq!(a.bundle().matches("BEGIN CERTIFICATE").count(), 2);
        // The state survives a restart.
        let mut a = Authority::open(&d, "dc1").unwrap();
        assert_eq!(a.phase(), RotationPhase::NewTrusted);
        assert_eq!(a.advance().unwrap(), RotationPhase::NewSigning);
        assert_ne!(a.signer().cert_pem, first, "the new root signs");
        assert!(a.bundle().contains(&first), "the old root is still trusted");
        assert_eq!(a.advance().unwrap(), RotationPhase::Idle);
        assert!(!a.bundle().contains(&first), "the old root is retired");
        assert_eq!(a.bundle(), a.signer().cert_pem);
        let a = Authority::open(&d, "dc1").unwrap();
        assert_eq!(a.phase(), RotationPhase::Idle);
        assert_ne!(a.signer().cert_pem, first);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn creates_once_with_a_private_key_file_then_loads() {
        let d = dir("create");
        let ca = Ca::load_or_create(&d, "dc1").unwrap();
        let mode = std::fs::metadata(d.join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let again = Ca::load_or_create(&d, "dc1").unwrap();
        assert_eq!(ca.cert_pem, again.cert_pem, "the root is generated once");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn signs_the_token_identity_not_what_the_csr_asks() {
        let d = dir("sign");
        let ca = Ca::load_or_create(&d, "dc1").unwrap();
        // A CSR that asks for another identity: ignored.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://dc1/ns/default/sa/admin".try_into().unwrap(),
        )];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let leaf = ca
            .sign_csr(&csr, "default", "products-api", DEFAULT_LEAF_LIFETIME)
            .unwrap();
        let der = rustls_pem_cert(&leaf);
        let info = ringside_core::tls::CertInfo::from_der(&der).unwrap();
        assert_eq!(
            info.uris,
            vec!["spiffe://dc1/ns/default/sa/products-api".to_string()]
        );
        assert!(info.issuer.contains("ringside CA dc1"), "{}", info.issuer);
        let life = info.not_after - info.not_before;
        assert!(
            (72 * 3600..=72 * 3600 + 120).contains(&life),
            "lifetime {life} s"
        );
        assert!(!info.is_ca);
        // The proxy-side helper makes a usable CSR too.
        let (csr, _key) = make_csr().unwrap();
        assert!(ca
            .sign_csr(&csr, "default", "web", Duration::from_secs(3600))
            .is_ok());
        assert!(ca
            .sign_csr("not a csr", "default", "web", Duration::from_secs(3600))
            .is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    fn rustls_pem_cert(pem: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        pem.contents
    }
}
