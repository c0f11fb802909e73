//! The mesh certificate authority: a root generated once (or loaded), leaf certificates signed from
//! proxies' CSRs. The identity in a leaf is decided here, from the service the proxy's token belongs
//! to: only the CSR's public key is used (a CSR that asks for another SPIFFE identity is refused),
//! and the private key never leaves the proxy. Files are written whole (temporary name, sync,
//! rename), a new root's key and certificate put in place so that the certificate's rename makes
//! the pair (see [`Ca::load_or_create`]).
//!
//! With the embedded store the roots are files in `DATA/ca` (keys created with mode 0600). With
//! etcd every daemon of the mesh signs with the same roots: they are one record in the store
//! ([`SharedCa`]), their private keys sealed with a secret the daemons share out of band
//! ([`SealKey`]).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
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
    /// A CSR asks for an identity other than the one its token may have.
    #[error("{0}")]
    Identity(String),
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
    ///
    /// A root exists once its certificate is in place. A new one is written whole (key and
    /// certificate, synced) into a private directory `.<name>.new` beside them, then its key is
    /// renamed into place and then its certificate: that last rename is the one step that makes
    /// the pair. A crash before the key's rename leaves nothing (the next start begins again); a
    /// crash between the two renames is finished by the next start, which finds the staged
    /// certificate of that key. A key without its certificate that is not ours is never
    /// overwritten.
    fn load_or_create_named(dir: &Path, name: &str, trust_domain: &str) -> Result<Ca, CaError> {
        let (cert_path, key_path) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        let staged = dir.join(format!(".{name}.new"));
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| CaError::Io { path: p, source }
        };
        let read = |p: &Path| std::fs::read_to_string(p).map_err(io(p));
        let load = |cert: &Path| -> Result<Ca, CaError> {
            let ca = Ca::from_pem(trust_domain, read(cert)?, &read(&key_path)?)?;
            ca.check_pair().map_err(|e| {
                CaError::Cert(format!(
                    "{} and {}: {e}",
                    cert.display(),
                    key_path.display()
                ))
            })?;
            Ok(ca)
        };
        if !cert_path.exists() && key_path.exists() {
            // Interrupted between the two renames: finish with the staged certificate.
            let staged_cert = staged.join("cert.pem");
            if staged_cert.exists() && load(&staged_cert).is_ok() {
                std::fs::rename(&staged_cert, &cert_path).map_err(io(&cert_path))?;
                sync_dir(dir)?;
            } else {
                return Err(CaError::Cert(format!(
                    "{} has no certificate beside it ({}): put the root's certificate there, or remove the key to make a new root",
                    key_path.display(),
                    cert_path.display()
                )));
            }
        }
        if cert_path.exists() {
            if !key_path.exists() {
                return Err(CaError::Cert(format!(
                    "{} has no key beside it ({})",
                    cert_path.display(),
                    key_path.display()
                )));
            }
            let _ = std::fs::remove_dir_all(&staged);
            return load(&cert_path);
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let _ = std::fs::remove_dir_all(&staged);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staged)
            .map_err(io(&staged))?;
        let (ca, key_pem) = Ca::generate(trust_domain, name)?;
        write_synced(&staged.join("key.pem"), key_pem.as_bytes(), 0o600)?;
        write_synced(&staged.join("cert.pem"), ca.cert_pem.as_bytes(), 0o644)?;
        sync_dir(&staged)?;
        std::fs::rename(staged.join("key.pem"), &key_path).map_err(io(&key_path))?;
        failpoint("ca-after-key");
        std::fs::rename(staged.join("cert.pem"), &cert_path).map_err(io(&cert_path))?;
        sync_dir(dir)?;
        let _ = std::fs::remove_dir_all(&staged);
        Ok(ca)
    }

    /// Whether the certificate is the key's (the same public key).
    fn check_pair(&self) -> Result<(), String> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(self.cert_pem.as_bytes())
            .map_err(|e| format!("not a PEM certificate: {e}"))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| format!("not a certificate: {e}"))?;
        if cert.public_key().subject_public_key.data.as_ref() != self.key.public_key_raw() {
            return Err("the certificate is not the key's (they are from different roots)".into());
        }
        Ok(())
    }

    /// A CA from its certificate and private key (PEM).
    pub fn from_pem(trust_domain: &str, cert_pem: String, key_pem: &str) -> Result<Ca, CaError> {
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            cert_pem,
            key: KeyPair::from_pem(key_pem).map_err(cert_err)?,
        })
    }

    /// A new self-signed root named `name` (in its common name); returns it and its private key
    /// (PEM).
    pub fn generate(trust_domain: &str, name: &str) -> Result<(Ca, String), CaError> {
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
        let key_pem = key.serialize_pem();
        Ok((
            Ca {
                trust_domain: trust_domain.to_string(),
                cert_pem: cert.pem(),
                key,
            },
            key_pem,
        ))
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
        // As Consul's CA refuses a CSR whose SPIFFE id names a service the token may not write:
        // a CSR may leave its identity out (the leaf gets the token's), never ask for another.
        for san in &csr.params.subject_alt_names {
            if let SanType::URI(uri) = san {
                let uri: &str = uri.as_ref();
                if uri != id {
                    return Err(CaError::Identity(format!(
                        "the CSR asks for identity {uri}, but its token is for service '{service}' ({id})"
                    )));
                }
            }
        }
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

impl Ca {
    /// The daemon's TLS server certificate for its operator port (`ringctl daemon --listen`),
    /// for a new key: the names clients reach it by (DNS names or IP addresses) and the daemon's
    /// identity [`daemon_id`], server use only. Returns the certificate and the key (PEM).
    pub fn sign_daemon(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(String, String), CaError> {
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        p.distinguished_name
            .push(DnType::CommonName, "ringside control daemon");
        let id = daemon_id(&self.trust_domain);
        p.subject_alt_names = vec![SanType::URI(id.as_str().try_into().map_err(cert_err)?)];
        for n in names {
            p.subject_alt_names
                .push(match n.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => {
                        rustls::pki_types::DnsName::try_from(n.as_str()).map_err(|_| {
                            CaError::Cert(format!("'{n}' is neither a DNS name nor an IP address"))
                        })?;
                        SanType::DnsName(n.as_str().try_into().map_err(cert_err)?)
                    }
                });
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time_now();
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + time::Duration::seconds(lifetime.as_secs() as i64);
        let key = KeyPair::generate().map_err(cert_err)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(cert_err)?;
        let cert = p.signed_by(&key, &issuer).map_err(cert_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The identity in the daemon's server certificate: `spiffe://<trust domain>/ringside/daemon`.
/// Workload identities are `/ns/<namespace>/sa/<service>`, so no proxy's certificate (signed by
/// the same CA) can pass for the daemon's, nor the daemon's for a service's.
pub fn daemon_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}{DAEMON_ID_PATH}")
}

/// The path of [`daemon_id`].
pub const DAEMON_ID_PATH: &str = "/ringside/daemon";

/// Which roots exist and which one signs (kept in `state.json` beside them, replaced atomically),
/// and where a rollover stands: the same types the daemon's API sends.
pub use ringside_core::control::api::{RootsState, RotationPhase};

/// Where a rollover stands, from which roots are trusted and which signs.
pub fn phase_of(state: &RootsState) -> RotationPhase {
    match state.trusted.as_slice() {
        [_] => RotationPhase::Idle,
        [first, ..] if *first == state.signer => RotationPhase::NewTrusted,
        _ => RotationPhase::NewSigning,
    }
}

/// The rollover step after `state`: Idle -> NewTrusted (a new root, trusted, not signing) ->
/// NewSigning (the new root signs) -> Idle (the old root retired). Returns the next state and,
/// for the first step, the id of the root to create.
fn next_state(state: &RootsState) -> (RootsState, Option<String>) {
    match phase_of(state) {
        RotationPhase::Idle => {
            let id = format!(
                "root-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0)
            );
            (
                RootsState {
                    signer: state.signer.clone(),
                    trusted: vec![state.signer.clone(), id.clone()],
                },
                Some(id),
            )
        }
        RotationPhase::NewTrusted => (
            RootsState {
                signer: state.trusted[1].clone(),
                trusted: state.trusted.clone(),
            },
            None,
        ),
        RotationPhase::NewSigning => (
            RootsState {
                signer: state.signer.clone(),
                trusted: vec![state.signer.clone()],
            },
            None,
        ),
    }
}

/// The mesh CA with its roots: one signs, one or two are trusted (two during a rollover).
///
/// Either on files (`DATA/ca`, one daemon: [`Authority::open`], [`Authority::advance`]) or built
/// from the record the daemons sharing an etcd keep there ([`SharedCa::authority`]); the second
/// is never written by itself: a step is a new [`SharedCa`] stored with a transaction.
#[derive(Debug)]
pub struct Authority {
    dir: Option<PathBuf>,
    trust_domain: String,
    state: RootsState,
    signer: Ca,
    trusted_pem: Vec<String>,
}

impl Authority {
    /// Load the roots in `dir` (creating the first one when there is none).
    pub fn open(dir: &Path, trust_domain: &str) -> Result<Authority, CaError> {
        let state = Authority::read_state(dir)?.unwrap_or_else(|| RootsState {
            signer: "ca".into(),
            trusted: vec!["ca".into()],
        });
        Authority::with_state(dir, trust_domain, state)
    }

    /// `state.json` of `dir`, if there is one.
    fn read_state(dir: &Path) -> Result<Option<RootsState>, CaError> {
        let state_path = dir.join("state.json");
        match std::fs::read_to_string(&state_path) {
            Ok(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|e| CaError::Cert(format!("{}: {e}", state_path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CaError::Io {
                path: state_path,
                source,
            }),
        }
    }

    fn with_state(dir: &Path, trust_domain: &str, state: RootsState) -> Result<Authority, CaError> {
        let signer = Ca::load_or_create_named(dir, &state.signer, trust_domain)?;
        let mut trusted_pem = Vec::new();
        for id in &state.trusted {
            trusted_pem.push(Ca::load_or_create_named(dir, id, trust_domain)?.cert_pem);
        }
        Ok(Authority {
            dir: Some(dir.to_path_buf()),
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
        phase_of(&self.state)
    }

    /// Take the next rollover step on files (see [`next_state`]). Returns the new phase.
    pub fn advance(&mut self) -> Result<RotationPhase, CaError> {
        let Some(dir) = self.dir.clone() else {
            return Err(CaError::Cert(
                "the mesh's shared CA moves through its store, not on files".into(),
            ));
        };
        let (next, _) = next_state(&self.state);
        // Create the files first, then switch the state file in one rename: a crash in between
        // leaves the old state (and a root nobody names, never used).
        let loaded = Authority::with_state(&dir, &self.trust_domain, next.clone())?;
        failpoint("ca-before-state");
        let text = serde_json::to_string(&next).map_err(cert_err)?;
        write_atomic(&dir.join("state.json"), text.as_bytes(), 0o644)?;
        *self = loaded;
        Ok(self.phase())
    }
}

/// The key that seals the roots' private keys in a shared store (`--ca-secret FILE`): AES-256-GCM
/// with a key derived (SHA-256) from a secret every daemon of the mesh is given out of band.
/// Whoever reads etcd without it gets certificates and ciphertext; the sealed key of a root is
/// bound to its id and certificate (the AEAD's associated data), so a root cannot be swapped or
/// added in etcd without the secret either.
pub struct SealKey(ring::aead::LessSafeKey);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

/// The fewest bytes a CA secret may have.
pub const MIN_SECRET_LEN: usize = 32;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl SealKey {
    /// The key from a secret file: readable by its owner only, at least [`MIN_SECRET_LEN`] bytes
    /// (surrounding whitespace ignored, so a trailing newline does not matter).
    pub fn from_file(path: &Path) -> Result<SealKey, CaError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |source| CaError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(CaError::Cert(format!(
                "{}: the CA secret is readable by others (mode {:o}): chmod 600 it",
                path.display(),
                mode & 0o777
            )));
        }
        let raw = std::fs::read(path).map_err(io)?;
        SealKey::from_secret(raw.trim_ascii())
            .map_err(|e| CaError::Cert(format!("{}: {e}", path.display())))
    }

    /// The key from the secret's bytes.
    pub fn from_secret(secret: &[u8]) -> Result<SealKey, CaError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(CaError::Cert(format!(
                "the CA secret has {} bytes, fewer than {MIN_SECRET_LEN} (make one: ringctl ca secret --out FILE)",
                secret.len()
            )));
        }
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"ringside ca seal v1\0");
        ctx.update(secret);
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, ctx.finish().as_ref())
            .map_err(|_| CaError::Cert("cannot make the sealing key".into()))?;
        Ok(SealKey(ring::aead::LessSafeKey::new(key)))
    }

    /// Write a new random secret (64 hex digits) to `path`, mode 0600; an existing file is kept.
    pub fn generate_file(path: &Path) -> Result<(), CaError> {
        let mut raw = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| CaError::Cert("no randomness".into()))?;
        write_private(path, format!("{}\n", hex(&raw)).as_bytes())
    }

    /// What the sealed key of root `id` with certificate `cert_pem` is bound to.
    fn aad(id: &str, cert_pem: &str) -> ring::aead::Aad<Vec<u8>> {
        let mut a = b"ringside ca root\0".to_vec();
        a.extend_from_slice(id.as_bytes());
        a.push(0);
        a.extend_from_slice(
            ring::digest::digest(&ring::digest::SHA256, cert_pem.as_bytes()).as_ref(),
        );
        ring::aead::Aad::from(a)
    }

    fn seal(&self, id: &str, cert_pem: &str, key_pem: &str) -> Result<SharedRoot, CaError> {
        let mut nonce = [0u8; ring::aead::NONCE_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| CaError::Cert("no randomness".into()))?;
        let mut data = key_pem.as_bytes().to_vec();
        self.0
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                SealKey::aad(id, cert_pem),
                &mut data,
            )
            .map_err(|_| CaError::Cert("cannot seal the root key".into()))?;
        Ok(SharedRoot {
            cert_pem: cert_pem.to_string(),
            key_nonce: hex(&nonce),
            key_sealed: hex(&data),
        })
    }

    fn open(&self, id: &str, root: &SharedRoot) -> Result<String, CaError> {
        let refused = || {
            CaError::Cert(format!(
                "the key of root {id} in the store cannot be opened with this CA secret: every daemon of the mesh needs the same --ca-secret (or the record was changed without it)"
            ))
        };
        let nonce = unhex(&root.key_nonce)
            .and_then(|n| ring::aead::Nonce::try_assume_unique_for_key(&n).ok())
            .ok_or_else(refused)?;
        let mut data = unhex(&root.key_sealed).ok_or_else(refused)?;
        let plain = self
            .0
            .open_in_place(nonce, SealKey::aad(id, &root.cert_pem), &mut data)
            .map_err(|_| refused())?;
        String::from_utf8(plain.to_vec()).map_err(|_| refused())
    }
}

/// A root as the shared store keeps it: its certificate, and its private key sealed with the
/// mesh's [`SealKey`] (nonce and ciphertext with its tag, in hex).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedRoot {
    /// The root certificate (PEM).
    pub cert_pem: String,
    /// The AES-GCM nonce (hex).
    pub key_nonce: String,
    /// The private key (PEM), sealed (hex).
    pub key_sealed: String,
}

/// The mesh CA as the daemons sharing an etcd keep it (one key, written by transactions): the
/// trust domain, which roots are trusted and which signs, and every root still in use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedCa {
    /// Trust domain of the identities it signs.
    pub trust_domain: String,
    /// Which roots are trusted and which signs.
    pub state: RootsState,
    /// The roots, by id (exactly those of `state.trusted`).
    pub roots: std::collections::BTreeMap<String, SharedRoot>,
}

impl SharedCa {
    /// A first record: the roots of `import` when that directory holds a CA (a daemon's
    /// `DATA/ca`, to carry a single node's CA, or one brought by the operator, into the mesh),
    /// else a new root.
    pub fn create(trust_domain: &str, key: &SealKey, import: &Path) -> Result<SharedCa, CaError> {
        let state = match Authority::read_state(import)? {
            Some(s) => Some(s),
            None if import.join("ca.pem").exists() && import.join("ca.key").exists() => {
                Some(RootsState {
                    signer: "ca".into(),
                    trusted: vec!["ca".into()],
                })
            }
            None => None,
        };
        let mut roots = std::collections::BTreeMap::new();
        let state = match state {
            Some(state) => {
                for id in &state.trusted {
                    let read = |ext: &str| {
                        let p = import.join(format!("{id}.{ext}"));
                        std::fs::read_to_string(&p)
                            .map_err(|source| CaError::Io { path: p, source })
                    };
                    let (cert, k) = (read("pem")?, read("key")?);
                    // Both must load as a CA before they are sealed.
                    Ca::from_pem(trust_domain, cert.clone(), &k)?;
                    roots.insert(id.clone(), key.seal(id, &cert, &k)?);
                }
                state
            }
            None => {
                let (ca, k) = Ca::generate(trust_domain, "ca")?;
                roots.insert("ca".to_string(), key.seal("ca", &ca.cert_pem, &k)?);
                RootsState {
                    signer: "ca".into(),
                    trusted: vec!["ca".into()],
                }
            }
        };
        Ok(SharedCa {
            trust_domain: trust_domain.to_string(),
            state,
            roots,
        })
    }

    /// Where its rollover stands.
    pub fn phase(&self) -> RotationPhase {
        phase_of(&self.state)
    }

    /// The authority it describes: every root's key opened (which checks each is bound to its
    /// certificate). Refused when the mesh has another trust domain than `trust_domain`.
    pub fn authority(&self, key: &SealKey, trust_domain: &str) -> Result<Authority, CaError> {
        if self.trust_domain != trust_domain {
            return Err(CaError::Cert(format!(
                "the mesh's CA in the store is for trust domain '{}', this daemon's is '{trust_domain}' (--trust-domain)",
                self.trust_domain
            )));
        }
        let load = |id: &String| -> Result<Ca, CaError> {
            let root = self.roots.get(id).ok_or_else(|| {
                CaError::Cert(format!(
                    "the shared CA names root {id} but does not hold it"
                ))
            })?;
            Ca::from_pem(trust_domain, root.cert_pem.clone(), &key.open(id, root)?)
        };
        let signer = load(&self.state.signer)?;
        let mut trusted_pem = Vec::new();
        for id in &self.state.trusted {
            trusted_pem.push(load(id)?.cert_pem);
        }
        Ok(Authority {
            dir: None,
            trust_domain: trust_domain.to_string(),
            state: self.state.clone(),
            signer,
            trusted_pem,
        })
    }

    /// The record after the next rollover step (see [`next_state`]): a new root sealed when the
    /// step trusts one, retired roots dropped.
    pub fn next(&self, key: &SealKey) -> Result<SharedCa, CaError> {
        let (state, new_root) = next_state(&self.state);
        let mut roots = self.roots.clone();
        if let Some(id) = new_root {
            let (ca, k) = Ca::generate(&self.trust_domain, &id)?;
            roots.insert(id.clone(), key.seal(&id, &ca.cert_pem, &k)?);
        }
        roots.retain(|id, _| state.trusted.contains(id));
        Ok(SharedCa {
            trust_domain: self.trust_domain.clone(),
            state,
            roots,
        })
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// A test-only crash point: when `RINGSIDE_FAILPOINT` is `point` (or `point:N`, the N-th time it
/// is reached), the process aborts there, as a kill would (the proxy has the same, for its
/// certificate files).
fn failpoint(point: &str) {
    static REACHED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let Ok(v) = std::env::var("RINGSIDE_FAILPOINT") else {
        return;
    };
    let (name, nth) = v
        .split_once(':')
        .map_or((v.as_str(), 1), |(n, k)| (n, k.parse().unwrap_or(1)));
    if name == point && REACHED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == nth {
        eprintln!("ringctl: failpoint {point} reached: aborting");
        std::process::abort();
    }
}

/// Write a new file (mode `mode` from its creation) and sync it.
fn write_synced(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Sync a directory, so the renames in it survive a power cut.
fn sync_dir(dir: &Path) -> Result<(), CaError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| CaError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Write `path` whole or not at all: a temporary file beside it, synced, renamed over it.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    write_synced(&tmp, data, mode)?;
    std::fs::rename(&tmp, path).map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
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

    /// A crash between the key's rename and the certificate's is finished at the next load
    /// (the staged certificate is the key's); a key alone that is not ours is kept and refused;
    /// a certificate with another root's key is refused.
    #[test]
    fn a_root_is_finished_or_refused_never_mismatched() {
        let d = dir("pair");
        let ca = Ca::load_or_create(&d, "dc1").unwrap();
        // As left by a crash between the two renames.
        std::fs::create_dir_all(d.join(".ca.new")).unwrap();
        std::fs::rename(d.join("ca.pem"), d.join(".ca.new/cert.pem")).unwrap();
        let again = Ca::load_or_create(&d, "dc1").unwrap();
        assert_eq!(again.cert_pem, ca.cert_pem, "the staged pair is finished");
        assert!(!d.join(".ca.new").exists());
        // A key alone: kept, refused.
        let key = std::fs::read(d.join("ca.key")).unwrap();
        std::fs::remove_file(d.join("ca.pem")).unwrap();
        let err = Ca::load_or_create(&d, "dc1").unwrap_err().to_string();
        assert!(err.contains("no certificate beside it"), "{err}");
        assert_eq!(
            std::fs::read(d.join("ca.key")).unwrap(),
            key,
            "the key is kept"
        );
        // Another root's certificate beside the key: refused.
        let (other, _) = Ca::generate("dc1", "ca").unwrap();
        std::fs::write(d.join("ca.pem"), &other.cert_pem).unwrap();
        let err = Ca::load_or_create(&d, "dc1").unwrap_err().to_string();
        assert!(err.contains("not the key's"), "{err}");
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

    fn csr_for(uri: &str) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn signs_the_token_identity_and_refuses_another() {
        let d = dir("sign");
        let ca = Ca::load_or_create(&d, "dc1").unwrap();
        // A CSR that asks for another service's identity, or another trust domain's: refused.
        for other in [
            "spiffe://dc1/ns/default/sa/admin",
            "spiffe://dc2/ns/default/sa/products-api",
            "spiffe://dc1/ns/prod/sa/products-api",
        ] {
            let err = ca
                .sign_csr(
                    &csr_for(other),
                    "default",
                    "products-api",
                    DEFAULT_LEAF_LIFETIME,
                )
                .unwrap_err();
            assert!(matches!(err, CaError::Identity(_)), "{other}: {err}");
            assert!(err.to_string().contains(other), "{err}");
        }
        // One that asks for its own identity is signed.
        ca.sign_csr(
            &csr_for("spiffe://dc1/ns/default/sa/products-api"),
            "default",
            "products-api",
            DEFAULT_LEAF_LIFETIME,
        )
        .unwrap();
        // One that asks for none gets the token's.
        let (csr, _) = make_csr().unwrap();
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

    /// The shared CA: the keys in the record are sealed (no PEM key in it), open only with the
    /// same secret, bound to their certificates; a rollover step by step, the old root dropped
    /// from the record when retired.
    #[test]
    fn shared_ca_seals_its_keys_and_rolls_over() {
        let seal = SealKey::from_secret(&[1u8; 32]).unwrap();
        let ca = SharedCa::create("dc1", &seal, Path::new("/nonexistent")).unwrap();
        let text = serde_json::to_string(&ca).unwrap();
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        let a = ca.authority(&seal, "dc1").unwrap();
        assert_eq!(a.phase(), RotationPhase::Idle);
        let (csr, _) = make_csr().unwrap();
        a.signer()
            .sign_csr(&csr, "default", "web", Duration::from_secs(60))
            .unwrap();
        // Another secret, another trust domain, a swapped certificate: refused.
        let other = SealKey::from_secret(&[2u8; 32]).unwrap();
        let err = ca.authority(&other, "dc1").unwrap_err().to_string();
        assert!(err.contains("same --ca-secret"), "{err}");
        assert!(ca
            .authority(&seal, "dc2")
            .unwrap_err()
            .to_string()
            .contains("trust domain"));
        let mut swapped = ca.clone();
        let (foreign, _) = Ca::generate("dc1", "ca").unwrap();
        swapped.roots.get_mut("ca").unwrap().cert_pem = foreign.cert_pem;
        assert!(swapped.authority(&seal, "dc1").is_err());
        assert!(SealKey::from_secret(b"short").is_err());
        // Rollover.
        let first = a.signer().cert_pem.clone();
        let t = ca.next(&seal).unwrap();
        assert_eq!(t.phase(), RotationPhase::NewTrusted);
        assert_eq!(t.roots.len(), 2);
        let at = t.authority(&seal, "dc1").unwrap();
        assert_eq!(at.signer().cert_pem, first);
        assert_eq!(at.bundle().matches("BEGIN CERTIFICATE").count(), 2);
        let s2 = t.next(&seal).unwrap();
        assert_eq!(s2.phase(), RotationPhase::NewSigning);
        assert_ne!(s2.authority(&seal, "dc1").unwrap().signer().cert_pem, first);
        let done = s2.next(&seal).unwrap();
        assert_eq!(done.phase(), RotationPhase::Idle);
        assert_eq!(done.roots.len(), 1, "the retired root is dropped");
        assert!(!done
            .authority(&seal, "dc1")
            .unwrap()
            .bundle()
            .contains(&first));
    }

    /// A daemon's CA on files seeds the shared one (same roots, same phase).
    #[test]
    fn shared_ca_imports_a_ca_on_files() {
        let d = dir("import");
        let mut files = Authority::open(&d, "dc1").unwrap();
        files.advance().unwrap();
        let seal = SealKey::from_secret(&[3u8; 32]).unwrap();
        let shared = SharedCa::create("dc1", &seal, &d).unwrap();
        let a = shared.authority(&seal, "dc1").unwrap();
        assert_eq!(a.phase(), RotationPhase::NewTrusted);
        assert_eq!(a.bundle(), files.bundle());
        assert_eq!(a.signer().cert_pem, files.signer().cert_pem);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// `ringctl ca secret`: 0600, long enough, not replaced; a secret others can read is refused.
    #[test]
    fn secret_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("secret");
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("ca.secret");
        SealKey::generate_file(&f).unwrap();
        assert!(
            SealKey::generate_file(&f).is_err(),
            "an existing file is kept"
        );
        SealKey::from_file(&f).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = SealKey::from_file(&f).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        let _ = std::fs::remove_dir_all(&d);
    }

    fn rustls_pem_cert(pem: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        pem.contents
    }
}
