//! A throw-away etcd member for the store's tests: `etcd` (Debian's `etcd-server`, installed by
//! `scripts/deps.sh`) in a temporary data directory on free loopback ports, waited for until it
//! answers `/health`, stopped by its PID (and its directory removed) on drop.
//!
//! The end-to-end tests have their own in `tests/src/etcd.rs` (this crate is a binary: its test
//! helpers cannot be shared).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a member may take to answer `/health`.
const START_WITHIN: Duration = Duration::from_secs(30);

/// A running single-member etcd.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl EtcdServer {
    /// Start a member on free ports (new ones if the first are taken meanwhile).
    pub fn start() -> EtcdServer {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ringctl-etcd-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd test directory");
        let mut last = String::new();
        for _ in 0..3 {
            let mut s = EtcdServer {
                child: None,
                dir: dir.clone(),
                client_port: free_port(),
                peer_port: free_port(),
            };
            match s.run() {
                Ok(()) => return s,
                Err(e) => last = e,
            }
        }
        panic!("etcd did not start: {last}");
    }

    /// The client endpoint, `127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Stop the member (SIGKILL, by PID) and start it again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.run().expect("etcd restarts");
    }

    /// Stop the member by its PID and reap it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn run(&mut self) -> Result<(), String> {
        let which = Command::new("etcd").arg("--version").output();
        if !which.is_ok_and(|o| o.status.success()) {
            panic!("`etcd` is not installed: scripts/deps.sh installs it (Debian's etcd-server)");
        }
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .map_err(|e| e.to_string())?;
        let child = Command::new("etcd")
            .args(["--name", "t0", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t0={peer}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run etcd: {e}"))?;
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if self.healthy() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
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
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut answer = String::new();
        s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_ok()
            && s.read_to_string(&mut answer).is_ok()
            && answer.contains("\"health\":\"true\"")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
