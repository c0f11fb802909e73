//! How `ringctl` reaches the daemon: its local operator socket (authorized by the socket's file
//! permissions), or its TCP operator port (`--server https://HOST:PORT`), where the daemon's
//! certificate is checked against the mesh CA bundle (`--ca-file`) and the operator shows an
//! operator token (`--token`, `--token-file`, `RINGCTL_TOKEN`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::ca::DAEMON_ID_PATH;

/// Where the daemon is.
#[derive(Debug)]
pub enum Target {
    /// Its operator socket on this host.
    Socket(PathBuf),
    /// Its TCP operator port.
    Remote(Remote),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Socket(p) => write!(f, "{}", p.display()),
            Target::Remote(r) => write!(f, "{}", r.url),
        }
    }
}

/// A daemon's TCP operator port.
#[derive(Debug)]
pub struct Remote {
    url: String,
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    token: Option<String>,
}

impl Remote {
    /// The daemon at `server` (`https://HOST:PORT`), its certificate checked against the CA
    /// certificates in `ca_file`; `token` is the operator token sent with every request.
    pub fn new(
        server: &str,
        ca_file: Option<&Path>,
        token: Option<String>,
    ) -> anyhow::Result<Remote> {
        let uri: hyper::Uri = server
            .parse()
            .map_err(|e| anyhow!("--server '{server}': {e} (expected https://HOST:PORT)"))?;
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") => bail!(
                "--server '{server}': the daemon's operator port speaks TLS only: use https://"
            ),
            _ => bail!("--server '{server}': expected https://HOST:PORT"),
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            bail!("--server '{server}': give no path, only https://HOST:PORT");
        }
        let host = uri
            .host()
            .ok_or_else(|| anyhow!("--server '{server}': no host (expected https://HOST:PORT)"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().ok_or_else(|| {
            anyhow!("--server '{server}': no port (expected https://HOST:PORT, as given to `ringctl daemon --listen`)")
        })?;
        let ca_file = ca_file.ok_or_else(|| {
            anyhow!("--server needs the mesh CA bundle to check the daemon's certificate: --ca-file FILE or RINGCTL_CA_FILE (on a node: ringctl ca bundle --out FILE)")
        })?;
        Ok(Remote {
            url: format!("https://{}", uri.authority().map_or("", |a| a.as_str())),
            host,
            port,
            tls: client_config(ca_file)?,
            token,
        })
    }

    /// One request: (status, body). `proxy_token` is for `POST /v1/sign` (`ringctl issue`).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        proxy_token: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<(u16, Bytes)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let call = async {
                let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                    .await
                    .map_err(|e| {
                        anyhow!(
                            "cannot reach the daemon at {}: {e} (is it started with --listen?)",
                            self.url
                        )
                    })?;
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| anyhow!("--server: '{}': {e}", self.host))?;
                let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| {
                        anyhow!(
                            "TLS with the daemon at {} failed: {e} (is --ca-file the mesh's current CA bundle? `ringctl ca bundle` on a node)",
                            self.url
                        )
                    })?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                        .await?;
                tokio::spawn(conn);
                let mut req = hyper::Request::builder()
                    .method(method)
                    .uri(path)
                    .header(hyper::header::HOST, &self.host);
                if let Some(t) = &self.token {
                    req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
                }
                if let Some(t) = proxy_token {
                    req = req.header(crate::daemon::PROXY_TOKEN_HEADER, format!("Bearer {t}"));
                }
                let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
                let resp = sender.send_request(req).await?;
                let status = resp.status().as_u16();
                let bytes = resp.into_body().collect().await?.to_bytes();
                Ok::<_, anyhow::Error>((status, bytes))
            };
            match tokio::time::timeout(timeout, call).await {
                Ok(r) => r,
                Err(_) => bail!(
                    "the daemon at {} did not answer within {timeout:?}",
                    self.url
                ),
            }
        })
    }
}

/// TLS to the daemon: TLS 1.3, the server's chain checked against the CA certificates in
/// `ca_file`, its name against the host, and its identity must be the daemon's.
fn client_config(ca_file: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("--ca-file {}", ca_file.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("--ca-file {}", ca_file.display()))?;
    if certs.is_empty() {
        bail!("--ca-file {}: no certificate in it", ca_file.display());
    }
    for c in certs {
        roots
            .add(c)
            .with_context(|| format!("--ca-file {}", ca_file.display()))?;
    }
    let provider = Arc::new(ringside_core::tls::provider::base());
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(DaemonVerifier { webpki }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The usual checks (chain to the bundle, validity, the host name), and the daemon's identity:
/// the mesh CA also signs every workload, and a workload's certificate must not pass for the
/// daemon's.
#[derive(Debug)]
struct DaemonVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
}

impl ServerCertVerifier for DaemonVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let daemon = ringside_core::tls::CertInfo::from_der(end_entity)
            .map(|c| {
                c.uris.iter().any(|u| {
                    u.strip_prefix("spiffe://")
                        .and_then(|rest| rest.split_once('/'))
                        .is_some_and(|(_, path)| format!("/{path}") == DAEMON_ID_PATH)
                })
            })
            .unwrap_or(false);
        if daemon {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate is from the mesh CA but not the daemon's (no spiffe://<trust domain>{DAEMON_ID_PATH} identity)"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The verifier `--ca-file` would build for `ca_pem`.
    fn verifier(ca_pem: &str) -> DaemonVerifier {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(ringside_core::tls::provider::base());
        DaemonVerifier {
            webpki: rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap(),
        }
    }

    fn check(v: &DaemonVerifier, cert_pem: &str, host: &str) -> Result<(), String> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        let name = ServerName::try_from(host.to_string()).unwrap();
        v.verify_server_cert(&der, &[], &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn only_the_daemon_passes_for_its_names() {
        let (ca, _) = crate::ca::Ca::generate("shop", "t").unwrap();
        let names = ["node-a".to_string(), "127.0.0.1".to_string()];
        let (daemon, _) = ca.sign_daemon(&names, Duration::from_secs(3600)).unwrap();
        let v = verifier(&ca.cert_pem);
        check(&v, &daemon, "node-a").unwrap();
        check(&v, &daemon, "127.0.0.1").unwrap();
        assert!(check(&v, &daemon, "node-b").is_err(), "another host");
        // Another mesh's CA does not vouch for it.
        let (other, _) = crate::ca::Ca::generate("shop", "other").unwrap();
        assert!(check(&verifier(&other.cert_pem), &daemon, "node-a").is_err());
        // A workload's certificate from the same CA is not the daemon's.
        let (csr, _) = crate::ca::make_csr().unwrap();
        let leaf = ca
            .sign_csr(&csr, "default", "node-a", Duration::from_secs(3600))
            .unwrap();
        assert!(check(&v, &leaf, "node-a").is_err());
        // A name that cannot be in a certificate is refused by name.
        let e = ca
            .sign_daemon(&["bad name!".to_string()], Duration::from_secs(60))
            .unwrap_err();
        assert!(e.to_string().contains("'bad name!'"), "{e}");
    }

    #[test]
    fn server_urls_are_checked() {
        let dir = std::env::temp_dir().join(format!("ringctl-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, _) = crate::ca::Ca::generate("shop", "t").unwrap();
        let bundle = dir.join("ca.pem");
        std::fs::write(&bundle, &ca.cert_pem).unwrap();
        let err =
            |url: &str, ca: Option<&Path>| Remote::new(url, ca, None).unwrap_err().to_string();
        assert!(err("http://h:1", Some(&bundle)).contains("TLS only"));
        assert!(err("https://h", Some(&bundle)).contains("no port"));
        assert!(err("https://h:1/v1", Some(&bundle)).contains("no path"));
        assert!(err("https://h:1", None).contains("--ca-file"));
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(err("https://h:1", Some(&empty)).contains("no certificate"));
        let r = Remote::new("https://[::1]:8501", Some(&bundle), None).unwrap();
        assert_eq!((r.host.as_str(), r.port), ("::1", 8501));
        assert_eq!(r.url, "https://[::1]:8501");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
