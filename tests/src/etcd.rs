//! A throw-away etcd for the tests of daemons sharing a store: one member ([`Etcd`]) or a
//! cluster of three ([`EtcdCluster`]) (`etcd`, Debian's `etcd-server`, installed by
//! `scripts/deps.sh`) in temporary data directories on free loopback ports, waited for until
//! they answer `/health` (on a plain-HTTP metrics port, so also when clients must use TLS),
//! stopped by their PIDs and their directories removed on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::ChildGuard;

/// How long a member may take to answer `/health`.
const START_WITHIN: Duration = Duration::from_secs(30);

/// A running single-member etcd.
#[derive(Debug)]
pub struct Etcd {
    /// Its directory (data and log).
    pub dir: PathBuf,
    /// Client port on 127.0.0.1.
    pub client_port: u16,
    /// Peer port on 127.0.0.1.
    pub peer_port: u16,
    /// Where `/health` answers over plain HTTP.
    pub metrics_port: u16,
    /// With TLS: the files of the CA and of a client certificate it accepts.
    pub tls: Option<EtcdTls>,
    server: Option<ChildGuard>,
}

/// The certificates of an etcd that takes clients over TLS only, with client certificates.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// The CA of the server's and the client's certificates (PEM).
    pub ca: PathBuf,
    /// A client certificate etcd accepts (PEM).
    pub client_cert: PathBuf,
    /// Its key (PEM).
    pub client_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl EtcdTls {
    /// A CA, a server certificate for 127.0.0.1 and a client certificate, written under `dir`.
    fn make(dir: &std::path::Path) -> EtcdTls {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "etcd test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |name: &str, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            p.subject_alt_names = sans;
            p.extended_key_usages = vec![usage];
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let server = leaf(
            "etcd",
            vec![
                SanType::IpAddress([127, 0, 0, 1].into()),
                SanType::DnsName("localhost".try_into().unwrap()),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = leaf("ringctl", vec![], ExtendedKeyUsagePurpose::ClientAuth);
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        EtcdTls {
            ca: write("ca.pem", &ca_pem),
            server_cert: write("server.pem", &server.0),
            server_key: write("server.key", &server.1),
            client_cert: write("client.pem", &client.0),
            client_key: write("client.key", &client.1),
        }
    }
}

impl Etcd {
    /// Start a member on free ports (new ones if the first are taken meanwhile). Panics with a
    /// clear message when etcd is not installed or does not come up.
    pub fn start() -> Etcd {
        Etcd::start_with(false)
    }

    /// Start a member that takes clients over TLS only, each with a client certificate from
    /// its CA (see [`Etcd::tls`]).
    pub fn start_tls() -> Etcd {
        Etcd::start_with(true)
    }

    fn start_with(tls: bool) -> Etcd {
        assert_installed();
        let dir = std::env::temp_dir().join(format!(
            "ringside-etcd-{}-{}",
            std::process::id(),
            crate::free_port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let tls = tls.then(|| EtcdTls::make(&dir));
        let mut last = String::new();
        for _ in 0..3 {
            let mut e = Etcd {
                dir: dir.clone(),
                client_port: crate::free_port(),
                peer_port: crate::free_port(),
                metrics_port: crate::free_port(),
                tls: tls.clone(),
                server: None,
            };
            match e.run() {
                Ok(()) => return e,
                Err(err) => last = err,
            }
        }
        panic!("etcd did not start: {last}");
    }

    /// `etcd://127.0.0.1:PORT`, as `ringctl daemon --store` takes it.
    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    /// Stop the member (SIGKILL, by PID) and reap it; `restart` brings it back.
    pub fn stop(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.signal(libc::SIGKILL);
            s.wait_timeout(Duration::from_secs(10));
        }
    }

    /// Freeze the member (SIGSTOP): it keeps its connections but answers nothing, as a hung or
    /// partitioned etcd. [`Etcd::resume`] thaws it (and stopping it kills it either way).
    pub fn pause(&self) {
        if let Some(s) = &self.server {
            s.signal(libc::SIGSTOP);
        }
    }

    /// Thaw a paused member (SIGCONT).
    pub fn resume(&self) {
        if let Some(s) = &self.server {
            s.signal(libc::SIGCONT);
        }
    }

    /// A CA secret file for the daemons of this etcd's mesh (`ringctl daemon --ca-secret`),
    /// made once, mode 0600, in the member's directory.
    pub fn ca_secret(&self) -> PathBuf {
        ca_secret_in(&self.dir)
    }

    /// Start it again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.run()
            .unwrap_or_else(|e| panic!("etcd did not restart: {e}"));
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    fn run(&mut self) -> Result<(), String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .map_err(|e| e.to_string())?;
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "m0", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("m0={peer}")])
            .args(["--initial-cluster-state", "new"])
            .args([
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{}", self.metrics_port),
            ])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        self.server = Some(ChildGuard::spawn(&mut cmd));
        let start = Instant::now();
        loop {
            if self.healthy() {
                return Ok(());
            }
            let exited = self
                .server
                .as_mut()
                .and_then(|s| s.0.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.server = None;
                return Err(format!("etcd exited ({status}): {}", self.log()));
            }
            if start.elapsed() > START_WITHIN {
                self.stop();
                return Err(format!(
                    "etcd not healthy after {START_WITHIN:?}: {}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn healthy(&self) -> bool {
        healthy(self.metrics_port)
    }
}

/// Whether the member whose metrics port is `port` answers `/health` with true (it has a leader,
/// so a quorum).
fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut answer = String::new();
    s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_ok()
        && s.read_to_string(&mut answer).is_ok()
        && answer.contains("\"health\":\"true\"")
}

/// A member's Prometheus metrics (empty when it does not answer).
fn metrics(port: u16) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut answer = String::new();
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
    let _ = s.read_to_string(&mut answer);
    answer
}

/// A key as etcd holds it.
#[derive(Debug, Clone)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// Its value.
    pub value: Vec<u8>,
    /// How many times it was written since it was created (1: once).
    pub version: i64,
    /// The revision that created it.
    pub create_revision: i64,
    /// The revision that wrote it last.
    pub mod_revision: i64,
}

fn assert_installed() {
    assert!(
        Command::new("etcd")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "`etcd` is not installed: scripts/deps.sh installs it (Debian's etcd-server)"
    );
}

/// A CA secret file (`ringctl daemon --ca-secret`) in `dir`, made once, mode 0600.
fn ca_secret_in(dir: &std::path::Path) -> PathBuf {
    let p = dir.join("ca.secret");
    if !p.exists() {
        let secret: String = (0..64)
            .map(|_| char::from(b"0123456789abcdef"[rand::random::<usize>() % 16]))
            .collect();
        std::fs::write(&p, secret).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    p
}

/// One member of an [`EtcdCluster`].
#[derive(Debug)]
pub struct Member {
    /// Its name (`m0`, `m1`, ...).
    pub name: String,
    /// Client port on 127.0.0.1.
    pub client_port: u16,
    /// Peer port on 127.0.0.1.
    pub peer_port: u16,
    /// Where `/health` answers over plain HTTP.
    pub metrics_port: u16,
    server: Option<ChildGuard>,
}

/// A running etcd cluster of three members on loopback (plain HTTP), each with its own data
/// directory under [`EtcdCluster::dir`]. Members are killed (SIGKILL, by PID) and started again
/// one by one or all together; everything is stopped and removed on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    /// The cluster's directory: a data directory and a log per member, the CA secret.
    pub dir: PathBuf,
    /// The members, in `--initial-cluster` order.
    pub members: Vec<Member>,
    token: String,
}

impl EtcdCluster {
    /// Start three members on free ports and wait until the cluster has a leader and every
    /// member answers. Panics with a clear message when etcd is not installed or does not come
    /// up (after trying new ports twice, in case a port was taken meanwhile).
    pub fn start() -> EtcdCluster {
        assert_installed();
        let mut last = String::new();
        for attempt in 0..3 {
            let token = format!(
                "ringside-{}-{}-{attempt}",
                std::process::id(),
                crate::free_port()
            );
            let dir = std::env::temp_dir().join(format!("{token}-etcd"));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let members = (0..3)
                .map(|i| Member {
                    name: format!("m{i}"),
                    client_port: crate::free_port(),
                    peer_port: crate::free_port(),
                    metrics_port: crate::free_port(),
                    server: None,
                })
                .collect();
            let mut c = EtcdCluster {
                dir,
                members,
                token,
            };
            for i in 0..3 {
                c.spawn(i);
            }
            match c.wait_healthy(&[0, 1, 2]) {
                Ok(()) => return c,
                Err(e) => last = e,
            }
            // Drop stops the members and removes the directory; the next try takes new ports.
        }
        panic!("the etcd cluster did not start: {last}");
    }

    /// `etcd://127.0.0.1:P0,127.0.0.1:P1,127.0.0.1:P2`, as `ringctl daemon --store` takes it.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect();
        format!("etcd://{}", hosts.join(","))
    }

    /// A CA secret file for the daemons of this cluster's mesh, made once, mode 0600.
    pub fn ca_secret(&self) -> PathBuf {
        ca_secret_in(&self.dir)
    }

    /// The PID of member `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].server.as_ref().map(ChildGuard::pid)
    }

    /// Whether member `i` runs and answers `/health` (true only while the cluster has a
    /// leader).
    pub fn healthy(&self, i: usize) -> bool {
        self.members[i].server.is_some() && healthy(self.members[i].metrics_port)
    }

    /// Kill member `i` with SIGKILL (by PID) and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut s) = self.members[i].server.take() {
            s.signal(libc::SIGKILL);
            s.wait_timeout(Duration::from_secs(10));
        }
    }

    /// Kill every member (SIGKILL).
    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Start member `i` again on its ports and data (it rejoins the cluster), and wait until it
    /// answers healthy (which needs a quorum: restart enough members with
    /// [`EtcdCluster::restart_all`]).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_healthy(&[i])
            .unwrap_or_else(|e| panic!("etcd member m{i} did not come back: {e}"));
    }

    /// Start every member that is not running, and wait until all answer healthy.
    pub fn restart_all(&mut self) {
        let stopped: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].server.is_none())
            .collect();
        for &i in &stopped {
            self.spawn(i);
        }
        self.wait_healthy(&[0, 1, 2])
            .unwrap_or_else(|e| panic!("the etcd cluster did not come back: {e}"));
    }

    /// The index of the member that is the leader now, from its metrics (`etcd_server_is_leader`).
    pub fn leader(&self) -> Option<usize> {
        (0..self.members.len()).find(|&i| {
            self.members[i].server.is_some()
                && metrics(self.members[i].metrics_port)
                    .lines()
                    .any(|l| l.trim() == "etcd_server_is_leader 1")
        })
    }

    /// Every key under `prefix`, read straight from etcd (not through a daemon), in key order.
    pub fn read_prefix(&self, prefix: &str) -> Vec<Kv> {
        let hosts: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.server.is_some())
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = etcd_client::Client::connect(&hosts, None)
                .await
                .expect("connect to etcd");
            let r = c
                .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
                .await
                .expect("read etcd");
            r.kvs()
                .iter()
                .map(|kv| Kv {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    value: kv.value().to_vec(),
                    version: kv.version(),
                    create_revision: kv.create_revision(),
                    mod_revision: kv.mod_revision(),
                })
                .collect()
        })
    }

    /// Member `i`'s log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("m{i}.log"))).unwrap_or_default()
    }

    fn spawn(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", m.name)))
            .unwrap();
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &m.name, "--data-dir"])
            .arg(self.dir.join(format!("{}.data", m.name)))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-token", &self.token])
            // Ignored once the data directory exists (a restart rejoins).
            .args(["--initial-cluster-state", "new"])
            .args([
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{}", m.metrics_port),
            ])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log);
        self.members[i].server = Some(ChildGuard::spawn(&mut cmd));
    }

    /// Wait until each of `which` answers healthy; a member that exited, or the deadline,
    /// is an error with the logs.
    fn wait_healthy(&mut self, which: &[usize]) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if which.iter().all(|&i| healthy(self.members[i].metrics_port)) {
                return Ok(());
            }
            for &i in which {
                let exited = self.members[i]
                    .server
                    .as_mut()
                    .and_then(|s| s.0.try_wait().ok().flatten());
                if let Some(status) = exited {
                    self.members[i].server = None;
                    return Err(format!("etcd m{i} exited ({status}): {}", self.log(i)));
                }
            }
            if start.elapsed() > START_WITHIN {
                let logs: Vec<String> = which.iter().map(|&i| self.log(i)).collect();
                return Err(format!(
                    "etcd members {which:?} not healthy after {START_WITHIN:?}: {}",
                    logs.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
