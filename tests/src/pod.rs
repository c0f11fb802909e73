//! Pods for end-to-end tests: network namespaces joined by veth pairs to a bridge that lives in a
//! namespace of its own, with IPv4 and IPv6 addresses from ranges reserved for tests
//! (198.18.0.0/15, RFC 2544; fd00::/8) that never leave the namespaces. Everything is removed on
//! drop, also when the test panics.
//!
//! Processes run inside a pod through `ip netns exec` (which also bind-mounts the pod's
//! `/etc/netns/<pod>/hosts` over `/etc/hosts`, so names resolve), optionally as another uid via
//! `setpriv`. Threads of the test process can enter a pod with [`Pod::enter`] to run small servers
//! and clients in-process.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::ChildGuard;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Run a command, panicking with its output when it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether pod tests can run here (root, and `ip` present). Under CI they must.
pub fn pods_available(test: &str) -> bool {
    let has_ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .iter()
        .any(|p| std::path::Path::new(p).exists());
    let ok = crate::is_root() && has_ip;
    if !ok {
        assert!(
            !crate::under_ci(),
            "{test} needs root and iproute2 under CI"
        );
        eprintln!("SKIPPED: {test} needs root and iproute2 (network namespaces)");
    }
    ok
}

/// A small network of pods.
#[derive(Debug)]
pub struct Net {
    /// Name prefix of everything this net creates.
    pub id: String,
    /// Third octet of the pods' 198.18.X.0/24 and the X of fd00:X::/64.
    pub subnet: u8,
    switch: String,
    pods: Vec<String>,
    host_link: Option<String>,
}

/// One pod.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Network namespace name.
    pub name: String,
    /// Short name (used in /etc/hosts).
    pub short: String,
    /// IPv4 address.
    pub ip4: Ipv4Addr,
    /// IPv6 address.
    pub ip6: Ipv6Addr,
}

impl Net {
    /// A new, empty network with a bridge.
    pub fn new() -> Net {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("rs{}x{n}", std::process::id() % 100_000);
        let subnet = ((std::process::id() * 7 + n * 13) % 250 + 1) as u8;
        Net::named(&id, subnet)
    }

    /// A new network with a chosen name prefix (at least 3 characters) and subnet (tests use
    /// 1..=250).
    pub fn named(id: &str, subnet: u8) -> Net {
        let id = id.to_string();
        let switch = format!("{id}-sw");
        sh(&["ip", "netns", "add", &switch]);
        let net = Net {
            id,
            subnet,
            switch,
            pods: Vec::new(),
            host_link: None,
        };
        net.exec_ok(&net.switch, &["ip", "link", "add", "br0", "type", "bridge"]);
        net.exec_ok(&net.switch, &["ip", "link", "set", "br0", "up"]);
        net.exec_ok(&net.switch, &["ip", "link", "set", "lo", "up"]);
        net
    }

    fn exec_ok(&self, ns: &str, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(args);
        sh(&full);
    }

    /// Add a pod with the next addresses; `short` is its host name inside every pod.
    pub fn pod(&mut self, short: &str) -> Pod {
        let k = self.pods.len() as u8 + 2;
        let name = format!("{}-{short}", self.id);
        sh(&["ip", "netns", "add", &name]);
        self.pods.push(name.clone());
        let (inside, outside) = (
            format!("v{}{k}a", &self.id[2..]),
            format!("v{}{k}b", &self.id[2..]),
        );
        assert!(outside.len() <= 15, "interface name too long: {outside}");
        sh(&[
            "ip", "link", "add", &inside, "type", "veth", "peer", "name", &outside,
        ]);
        sh(&["ip", "link", "set", &inside, "netns", &name]);
        sh(&["ip", "link", "set", &outside, "netns", &self.switch]);
        self.exec_ok(
            &self.switch,
            &["ip", "link", "set", &outside, "master", "br0"],
        );
        self.exec_ok(&self.switch, &["ip", "link", "set", &outside, "up"]);
        let ip4 = Ipv4Addr::new(198, 18, self.subnet, k);
        let ip6: Ipv6Addr = format!("fd00:{:x}::{:x}", self.subnet, k).parse().unwrap();
        self.exec_ok(&name, &["ip", "link", "set", "lo", "up"]);
        self.exec_ok(&name, &["ip", "link", "set", &inside, "name", "eth0"]);
        self.exec_ok(
            &name,
            &["ip", "addr", "add", &format!("{ip4}/24"), "dev", "eth0"],
        );
        self.exec_ok(
            &name,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        );
        self.exec_ok(&name, &["ip", "link", "set", "eth0", "up"]);
        Pod {
            name,
            short: short.to_string(),
            ip4,
            ip6,
        }
    }

    /// Names of the network namespaces created so far (the switch first).
    pub fn namespaces(&self) -> Vec<String> {
        std::iter::once(self.switch.clone())
            .chain(self.pods.iter().cloned())
            .collect()
    }

    /// Join the host to the bridge: a veth pair `NAME` (host side, given 198.18.S.1/24) whose
    /// peer is a bridge port, so the host reaches the pods' IPv4 addresses. Removed on drop.
    pub fn link_host(&mut self, name: &str) -> Ipv4Addr {
        let peer = format!("{name}p");
        assert!(peer.len() <= 15, "interface name too long: {peer}");
        sh(&[
            "ip", "link", "add", name, "type", "veth", "peer", "name", &peer,
        ]);
        self.host_link = Some(name.to_string());
        sh(&["ip", "link", "set", &peer, "netns", &self.switch]);
        self.exec_ok(&self.switch, &["ip", "link", "set", &peer, "master", "br0"]);
        self.exec_ok(&self.switch, &["ip", "link", "set", &peer, "up"]);
        let ip = Ipv4Addr::new(198, 18, self.subnet, 1);
        sh(&["ip", "addr", "add", &format!("{ip}/24"), "dev", name]);
        sh(&["ip", "link", "set", name, "up"]);
        ip
    }

    /// An address in the pods' IPv4 subnet that no pod has (for virtual IPs).
    pub fn virtual_ip(&self, k: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, 200 + k)
    }

    /// Write `/etc/netns/<pod>/hosts` for every pod: the pods' short names plus `extra` entries.
    pub fn write_hosts(&self, pods: &[&Pod], extra: &[(IpAddr, &str)]) {
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost\n");
        for p in pods {
            text.push_str(&format!("{} {}\n", p.ip4, p.short));
        }
        for (ip, name) in extra {
            text.push_str(&format!("{ip} {name}\n"));
        }
        for p in pods {
            let dir = format!("/etc/netns/{}", p.name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(format!("{dir}/hosts"), &text).unwrap();
        }
    }
}

impl Default for Net {
    fn default() -> Self {
        Net::new()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(link) = &self.host_link {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
        for p in self.pods.iter().chain(std::iter::once(&self.switch)) {
            let _ = Command::new("ip").args(["netns", "del", p]).output();
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{p}"));
        }
    }
}

/// A router joining several nets (each on its own bridge): a namespace of its own with IPv4
/// forwarding on (in that namespace only), a leg on each bridge at 198.18.S.1, and a route in
/// every pod of each net to 198.18.0.0/15 through it. Two nets joined this way are two "nodes"
/// whose pods reach each other's addresses, routed rather than bridged. Removed on drop.
#[derive(Debug)]
pub struct Router {
    /// Its network namespace.
    pub name: String,
    legs: usize,
}

impl Router {
    /// A router namespace `ID-rt` with nothing joined yet.
    pub fn new(id: &str) -> Router {
        let name = format!("{id}-rt");
        sh(&["ip", "netns", "add", &name]);
        let r = Router { name, legs: 0 };
        sh(&[
            "ip", "netns", "exec", &r.name, "ip", "link", "set", "lo", "up",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &r.name,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ]);
        r
    }

    /// Join `net`'s bridge (the router takes 198.18.S.1) and route `pods` (of that net) through
    /// it to the other nets. Returns the router's address on that net.
    pub fn join(&mut self, net: &Net, pods: &[&Pod]) -> Ipv4Addr {
        self.legs += 1;
        let (inside, outside) = (
            format!("r{}{}a", &net.id[2..], self.legs),
            format!("r{}{}b", &net.id[2..], self.legs),
        );
        assert!(outside.len() <= 15, "interface name too long: {outside}");
        sh(&[
            "ip", "link", "add", &inside, "type", "veth", "peer", "name", &outside,
        ]);
        sh(&["ip", "link", "set", &inside, "netns", &self.name]);
        sh(&["ip", "link", "set", &outside, "netns", &net.switch]);
        net.exec_ok(
            &net.switch,
            &["ip", "link", "set", &outside, "master", "br0"],
        );
        net.exec_ok(&net.switch, &["ip", "link", "set", &outside, "up"]);
        let ip = Ipv4Addr::new(198, 18, net.subnet, 1);
        net.exec_ok(
            &self.name,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", &inside],
        );
        net.exec_ok(&self.name, &["ip", "link", "set", &inside, "up"]);
        for p in pods {
            net.exec_ok(
                &p.name,
                &[
                    "ip",
                    "route",
                    "add",
                    "198.18.0.0/15",
                    "via",
                    &ip.to_string(),
                ],
            );
        }
        ip
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        // Its veth legs go with the namespace.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

impl Pod {
    /// A command run inside the pod (as root).
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// A command run inside the pod as `uid`/`gid`.
    pub fn cmd_as(&self, uid: u32, gid: u32, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .args(["--clear-groups", "--", program]);
        c
    }

    /// Run a closure on a thread that has entered this pod's network namespace (sockets it opens
    /// belong to the pod).
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on a namespace descriptor we opened; it changes this thread's network
            // namespace only (the thread is ours and ends with the closure).
            let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// An echo app bound at `addr` inside this pod (a thread of the test process in the pod's
    /// netns), counting the connections it accepted.
    pub fn echo_app(&self, addr: SocketAddr) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n2 = n.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        self.enter(move || {
            let l = std::net::TcpListener::bind(addr).expect("bind app in pod");
            tx.send(()).unwrap();
            crate::serve_echo(l, n2);
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("app listening");
        n
    }

    /// Socket address on this pod's IPv4 address.
    pub fn addr4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip4), port)
    }

    /// Socket address on this pod's IPv6 address.
    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ip6), port)
    }

    /// Install ringside's redirect rules in this pod.
    pub fn install_redirect(&self, extra: &[&str]) {
        let init = crate::workspace_bin("ringside-init");
        let mut args = vec![init.to_str().unwrap(), "install", "--netns", &self.name];
        args.extend_from_slice(extra);
        sh(&args);
    }
}

/// A sidecar started in a pod as uid 1337 from a config text; stderr goes to a log file.
#[derive(Debug)]
pub struct Sidecar {
    /// The process (`ip netns exec` execs into setpriv, which execs ringside: same PID).
    pub child: ChildGuard,
    /// Its log.
    pub log: std::path::PathBuf,
    dir: std::path::PathBuf,
}

/// The proxy uid used by the tests (and ringside-init's default).
pub const PROXY_UID: u32 = 1337;

impl Sidecar {
    /// Start `ringside run` in `pod` with the given YAML config; waits until it is ready.
    pub fn start(pod: &Pod, yaml: &str) -> Sidecar {
        Sidecar::start_with(pod, yaml, &[])
    }

    /// Start `ringside run` with extra arguments (e.g. `--ctl`); waits until it is ready.
    pub fn start_with(pod: &Pod, yaml: &str, extra: &[&str]) -> Sidecar {
        let dir = std::env::temp_dir().join(format!("{}-sidecar", pod.name));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("ringside.yaml");
        let ready = dir.join("ready");
        let _ = std::fs::remove_file(&ready);
        std::fs::write(&conf, yaml).unwrap();
        std::os::unix::fs::chown(&dir, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
        std::os::unix::fs::chown(&conf, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
        let log = dir.join("ringside.log");
        let bin = crate::workspace_bin("ringside");
        let mut cmd = pod.cmd_as(PROXY_UID, PROXY_UID, bin.to_str().unwrap());
        cmd.args([
            "run",
            "--config",
            conf.to_str().unwrap(),
            "--ready-file",
            ready.to_str().unwrap(),
            "--workers",
            "2",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
        let child = ChildGuard::spawn(&mut cmd);
        let mut sc = Sidecar { child, log, dir };
        let start = std::time::Instant::now();
        while !ready.exists() {
            if let Ok(Some(st)) = sc.child.0.try_wait() {
                panic!("sidecar in {} exited ({st}): {}", pod.name, sc.log_text());
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "sidecar in {} not ready: {}",
                pod.name,
                sc.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        sc
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stop with SIGTERM and return the final counters line's `name=value` pairs.
    pub fn stop(mut self) -> std::collections::HashMap<String, u64> {
        self.child.signal(libc::SIGTERM);
        let st = self.child.wait_timeout(std::time::Duration::from_secs(20));
        assert!(st.success(), "sidecar exit: {st}: {}", self.log_text());
        let log = self.log_text();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("final counters"))
            .unwrap_or_else(|| panic!("no final counters in the log: {log}"));
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
