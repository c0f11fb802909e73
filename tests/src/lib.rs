//! Helpers for ringside's end-to-end tests: proxies started in-process or as the real binary,
//! real servers on loopback, deterministic random byte streams with checksums, and a PostgreSQL
//! started from scratch in a temporary directory.
//!
//! # Layout
//!
//! - this file: proxy start-up, stream generators, small servers, process helpers.
//! - [`postgres`]: a throw-away PostgreSQL cluster (initdb, a free port, stopped on drop).
//! - [`pod`]: pods as network namespaces on a bridge, sidecars started inside them.
//! - [`etcd`]: a throw-away etcd member or 3-member cluster (free ports, stopped on drop) for
//!   daemons sharing it.

pub mod certs;
pub mod ctl;
pub mod etcd;
pub mod http;
pub mod pod;
pub mod postgres;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use ringside_core::config::{DriverKind, ProxyDoc};
use ringside_core::{Config, Proxy};
use xxhash_rust::xxh3::Xxh3;

/// Both drivers, for tests that must pass on each.
pub const DRIVERS: [DriverKind; 2] = [DriverKind::Uring, DriverKind::Epoll];

/// Start an in-process forwarder from an ephemeral loopback port to `upstreams`.
pub fn forward(
    driver: DriverKind,
    upstreams: Vec<SocketAddr>,
    tweak: impl FnOnce(&mut ProxyDoc),
) -> Proxy {
    let mut doc = ProxyDoc {
        workers: 2,
        driver,
        ..ProxyDoc::default()
    };
    tweak(&mut doc);
    let config =
        Config::forward("127.0.0.1:0".parse().unwrap(), upstreams, doc).expect("valid config");
    Proxy::start(config).expect("proxy starts")
}

/// An address on loopback where nothing listens (connects are refused). Its port stays bound,
/// without listening, for the rest of the test process: a port merely released could be taken by
/// a listener of a test running beside it, or picked as the source port of a connect to it (a
/// connection to itself), and a connect there would then succeed.
pub fn refusing_addr() -> SocketAddr {
    static HELD: std::sync::Mutex<Vec<socket2::Socket>> = std::sync::Mutex::new(Vec::new());
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    HELD.lock().unwrap_or_else(|e| e.into_inner()).push(s);
    addr
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A deterministic pseudo-random byte stream of a given length.
#[derive(Debug)]
pub struct Stream {
    rng: rand::rngs::SmallRng,
    left: u64,
}

impl Stream {
    /// `len` bytes generated from `seed`.
    pub fn new(seed: u64, len: u64) -> Self {
        Stream {
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
            left: len,
        }
    }

    /// Write the whole stream to `w` in chunks; returns the checksum of what was written.
    pub fn write_to(mut self, w: &mut impl Write) -> io::Result<u64> {
        let mut h = Xxh3::new();
        let mut buf = vec![0u8; 256 * 1024];
        while self.left > 0 {
            let n = (self.left as usize).min(buf.len());
            self.rng.fill_bytes(&mut buf[..n]);
            w.write_all(&buf[..n])?;
            h.update(&buf[..n]);
            self.left -= n as u64;
        }
        Ok(h.digest())
    }

    /// Checksum of the stream without writing it.
    pub fn checksum(mut self) -> u64 {
        let mut h = Xxh3::new();
        let mut buf = vec![0u8; 256 * 1024];
        while self.left > 0 {
            let n = (self.left as usize).min(buf.len());
            self.rng.fill_bytes(&mut buf[..n]);
            h.update(&buf[..n]);
            self.left -= n as u64;
        }
        h.digest()
    }
}

/// Read `r` to EOF; returns (bytes, checksum).
pub fn read_to_end_hashed(r: &mut impl Read) -> io::Result<(u64, u64)> {
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok((total, h.digest())),
            Ok(n) => {
                h.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Echo every connection `l` accepts (a thread each; EOF answered with EOF), counting accepted
/// connections. Runs until the test process ends.
pub fn serve_echo(l: TcpListener, accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        let _ = s.shutdown(std::net::Shutdown::Write);
                        return;
                    }
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
    }
}

/// An echo server on loopback counting its connections; it runs until the test process ends.
pub fn counting_echo() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n2 = n.clone();
    std::thread::spawn(move || serve_echo(l, n2));
    (addr, n)
}

/// A thread-per-connection echo server on loopback; it runs until the test process ends.
pub fn echo_server() -> SocketAddr {
    counting_echo().0
}

/// Connect with a deadline, retrying while the listener is not up yet.
pub fn connect_retry(addr: SocketAddr, within: Duration) -> TcpStream {
    let start = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return s,
            Err(e) if start.elapsed() < within => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("cannot connect to {addr} within {within:?}: {e}"),
        }
    }
}

/// Wait until `cond` holds, polling, or panic with `what` after `within`.
pub fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Path of a binary built from this workspace, next to the test executable's profile directory.
/// The test command builds the binaries first (see README.md).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>; a binary of this crate lives in
    // target/<profile> itself.
    let mut dir = exe.parent().expect("profile directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("profile directory");
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (cargo build --profile ci --bins)",
        p.display()
    );
    p
}

/// A child process killed (by PID) when dropped.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Spawn `cmd` with stdout/stderr inherited.
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        ChildGuard(cmd.stdin(Stdio::null()).spawn().expect("spawn child"))
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Send a signal.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill() with the PID of a child we own and have not reaped.
        unsafe { libc::kill(self.0.id() as libc::pid_t, sig) };
    }

    /// Wait for exit with a deadline; returns the exit status or panics.
    pub fn wait_timeout(&mut self, within: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.0.try_wait().expect("try_wait") {
                return st;
            }
            assert!(
                start.elapsed() < within,
                "child {} did not exit within {within:?}",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("proc stat");
        // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
        let f: Vec<u64> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Start the real `ringside forward` binary and wait until it accepts connections.
pub fn spawn_forward(listen: SocketAddr, upstreams: &[SocketAddr], extra: &[&str]) -> ChildGuard {
    let mut cmd = Command::new(workspace_bin("ringside"));
    cmd.arg("forward").arg(listen.to_string());
    for u in upstreams {
        cmd.arg(u.to_string());
    }
    cmd.args(extra);
    let child = ChildGuard::spawn(&mut cmd);
    wait_for("ringside to listen", Duration::from_secs(10), || {
        // A listen check that does not connect through the proxy: look for the socket in /proc.
        listening_on(listen.port())
    });
    child
}

/// Whether some socket listens on this TCP port (IPv4 or IPv6), from /proc/net/tcp{,6}.
pub fn listening_on(port: u16) -> bool {
    let needle = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f)
            .map(|t| {
                t.lines().skip(1).any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.len() > 3
                        && format!("{} ", &cols[1][cols[1].len() - 5..]) == needle
                        && cols[3] == "0A"
                })
            })
            .unwrap_or(false)
    })
}

/// How many descriptors process `pid` holds open (0 when it is gone).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Whether the tests run under CI, where skipping a root-only test is a failure.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Times the process's threads whose name `counts` went to sleep and were woken (voluntary
/// context switches, from /proc/PID/task/TID/status), summed.
pub fn thread_wakeups(pid: u32, counts: impl Fn(&str) -> bool) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !counts(comm.trim_end()) {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}
