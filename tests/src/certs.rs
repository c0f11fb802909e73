//! Test certificates made with rcgen: a CA and SPIFFE leaf certificates, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A test certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM).
    pub pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("pem", &self.pem).finish()
    }
}

/// Validity of a leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// 2020 to 2099.
    Valid,
    /// Ended in 2021.
    Expired,
    /// Starts in 2098.
    NotYetValid,
}

impl Ca {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2099, 1, 1);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// An existing CA from its certificate and key (PEM), e.g. a control daemon's root.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Ca {
        let key = KeyPair::from_pem(key_pem).unwrap();
        Ca {
            issuer: Issuer::from_ca_cert_pem(cert_pem, key).unwrap(),
            pem: cert_pem.to_string(),
        }
    }

    /// A leaf for `spiffe_id`; returns (certificate PEM, key PEM).
    pub fn leaf(&self, spiffe_id: &str, validity: Validity) -> (String, String) {
        self.leaf_with_uris(&[spiffe_id], validity)
    }

    /// A leaf whose URI SANs are `uris` (a valid X.509-SVID has exactly one).
    pub fn leaf_with_uris(&self, uris: &[&str], validity: Validity) -> (String, String) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, uris[0].rsplit('/').next().unwrap());
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let (nb, na) = match validity {
            Validity::Valid => (date_time_ymd(2020, 1, 1), date_time_ymd(2099, 1, 1)),
            Validity::Expired => (date_time_ymd(2020, 1, 1), date_time_ymd(2021, 1, 1)),
            Validity::NotYetValid => (date_time_ymd(2098, 1, 1), date_time_ymd(2099, 1, 1)),
        };
        p.not_before = nb;
        p.not_after = na;
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A server leaf for the host names or IP addresses `hosts`, with the URI SANs `uris`;
    /// returns (certificate PEM, key PEM).
    pub fn leaf_for_hosts(&self, uris: &[&str], hosts: &[&str]) -> (String, String) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, hosts[0]);
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        for h in hosts {
            p.subject_alt_names
                .push(match h.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName((*h).try_into().unwrap()),
                });
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.not_before = date_time_ymd(2020, 1, 1);
        p.not_after = date_time_ymd(2099, 1, 1);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Certificate, key and bundle files of one workload.
#[derive(Debug, Clone)]
pub struct Files {
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Key (PEM).
    pub key: PathBuf,
    /// Trust bundle (PEM).
    pub ca: PathBuf,
}

impl Files {
    /// Write a workload's files under `dir` with prefix `name`.
    pub fn write(dir: &Path, name: &str, leaf: &(String, String), bundle: &[&Ca]) -> Files {
        std::fs::create_dir_all(dir).unwrap();
        let f = Files {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join(format!("{name}-ca.pem")),
        };
        std::fs::write(&f.cert, &leaf.0).unwrap();
        std::fs::write(&f.key, &leaf.1).unwrap();
        std::fs::write(
            &f.ca,
            bundle.iter().map(|c| c.pem.as_str()).collect::<String>(),
        )
        .unwrap();
        f
    }

    /// Replace the certificate and key (atomically, by rename, as a certificate agent would).
    pub fn replace(&self, leaf: &(String, String)) {
        let tmp_c = self.cert.with_extension("crt.tmp");
        let tmp_k = self.key.with_extension("key.tmp");
        std::fs::write(&tmp_c, &leaf.0).unwrap();
        std::fs::write(&tmp_k, &leaf.1).unwrap();
        std::fs::rename(&tmp_k, &self.key).unwrap();
        std::fs::rename(&tmp_c, &self.cert).unwrap();
    }

    /// As the proxy's TLS file set.
    pub fn tls_files(&self) -> ringside_core::tls::TlsFiles {
        ringside_core::tls::TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
        }
    }
}

/// A fresh temporary directory for a test's certificates.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ringside-certs-{}-{tag}-{}",
        std::process::id(),
        crate::free_port()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Write a strict-mTLS leaf for `service` (with the CA's bundle) into `dir`, owned by the proxy
/// user, and return the sidecar section that uses it.
pub fn sidecar_mtls(ca: &Ca, dir: &Path, service: &str) -> String {
    let (cert, key) = ca.leaf(
        &format!("spiffe://dc1/ns/default/sa/{service}"),
        Validity::Valid,
    );
    let (c, k, b) = (
        dir.join(format!("{service}.crt")),
        dir.join(format!("{service}.key")),
        dir.join("bundle.pem"),
    );
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    std::fs::write(&b, &ca.pem).unwrap();
    for p in [dir, &c, &k, &b] {
        std::os::unix::fs::chown(p, Some(crate::pod::PROXY_UID), Some(crate::pod::PROXY_UID))
            .unwrap();
    }
    format!(
        "sidecar:\n  mtls:\n    mode: strict\n    cert: {}\n    key: {}\n    ca: {}\n",
        c.display(),
        k.display(),
        b.display()
    )
}
