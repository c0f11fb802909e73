//! The control daemon for tests: `ringctl daemon` in a directory of its own, the CLI against it,
//! proxy tokens in files the proxy uid can read. Killed (by PID) and its directory removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{wait_for, workspace_bin, ChildGuard};

/// A running `ringctl daemon`.
#[derive(Debug)]
pub struct Daemon {
    /// The process.
    pub child: Option<ChildGuard>,
    /// Its directory (store, CA, sockets, log).
    pub dir: PathBuf,
    /// Operator socket.
    pub socket: PathBuf,
    /// Proxy socket.
    pub proxy_socket: PathBuf,
    args: Vec<String>,
}

impl Daemon {
    /// Start a daemon in a new directory named after `tag`, with extra daemon arguments.
    pub fn start(tag: &str, extra: &[&str]) -> Daemon {
        let dir = std::env::temp_dir().join(format!("{tag}-ctl"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut d = Daemon {
            child: None,
            socket: dir.join("ctl.sock"),
            proxy_socket: dir.join("proxy.sock"),
            dir,
            args: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.restart();
        d
    }

    /// Start (again) on the same directory; waits until both sockets accept.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let mut cmd = Command::new(workspace_bin("ringctl"));
        cmd.arg("daemon")
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--proxy-socket")
            .arg(&self.proxy_socket)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(ChildGuard::spawn(&mut cmd));
        let (a, b) = (self.socket.clone(), self.proxy_socket.clone());
        wait_for("the daemon's sockets", Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&a).is_ok()
                && std::os::unix::net::UnixStream::connect(&b).is_ok()
        });
    }

    /// Cut the proxies off while operators still reach the daemon: it is restarted with its
    /// proxy socket at another path, so the streams the proxies hold end and the path they use
    /// refuses them (nothing accepts on it).
    pub fn cut_proxies(&mut self) {
        self.kill9();
        let kept = std::mem::replace(&mut self.proxy_socket, self.dir.join("proxy-cut.sock"));
        self.restart();
        self.proxy_socket = kept;
        // The path the proxies use is the dead daemon's socket file: connections are refused.
        assert!(std::os::unix::net::UnixStream::connect(&self.proxy_socket).is_err());
    }

    /// Kill with SIGKILL (no chance to clean up) and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.signal(libc::SIGKILL);
            c.wait_timeout(Duration::from_secs(10));
        }
    }

    /// Run `ringctl ARGS --socket S`; returns (success, stdout, stderr).
    pub fn ringctl(&self, args: &[&str]) -> (bool, String, String) {
        let (code, out, err) = self.ringctl_status(args);
        (code == Some(0), out, err)
    }

    /// Run `ringctl ARGS --socket S`; returns (exit code, stdout, stderr).
    pub fn ringctl_status(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = Command::new(workspace_bin("ringctl"))
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `ringctl ARGS`, which must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.ringctl(args);
        assert!(ok, "ringctl {args:?} failed: {out}{err}\n{}", self.log());
        out
    }

    /// Apply YAML text.
    pub fn apply(&self, yaml: &str) -> String {
        let f = self.dir.join(format!("apply-{}.yaml", yaml.len()));
        std::fs::write(&f, yaml).unwrap();
        self.ok(&["apply", "-f", f.to_str().unwrap()])
    }

    /// A token for `service` in a file owned by `uid` (mode 0600).
    pub fn token_file(&self, service: &str, uid: u32) -> PathBuf {
        let out = self.ok(&["token", "create", "--service", service]);
        let token = out
            .split_whitespace()
            .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
            .unwrap_or_else(|| panic!("no token in: {out}"))
            .to_string();
        let f = self.dir.join(format!("{service}.token"));
        std::fs::write(&f, token).unwrap();
        std::os::unix::fs::chown(&f, Some(uid), Some(uid)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        f
    }

    /// The daemon's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// `get WHAT -o json` as JSON.
    pub fn get_json(&self, what: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["get", what, "-o", "json"])).unwrap()
    }

    /// The virtual IP the daemon gave `service`.
    pub fn virtual_ip(&self, service: &str) -> std::net::IpAddr {
        self.get_json("services")
            .as_array()
            .expect("a list of services")
            .iter()
            .find(|s| s["name"] == service)
            .and_then(|s| s["virtual_ip"].as_str())
            .unwrap_or_else(|| panic!("no virtual IP for {service}"))
            .parse()
            .expect("an IP address")
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// A state directory for a proxy, owned by `uid`, removed with the daemon's directory.
    pub fn state_dir(&self, name: &str, uid: u32) -> PathBuf {
        let d = self.dir.join(format!("state-{name}"));
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(uid), Some(uid)).unwrap();
        d
    }

    /// `ringside run` arguments for a sidecar of `service` in a pod with address `address`.
    pub fn sidecar_args(&self, service: &str, address: std::net::IpAddr, uid: u32) -> Vec<String> {
        self.sidecar_args_tagged(service, address, uid, service)
    }

    /// The same, for another sidecar of the same service (`tag` names its state directory).
    pub fn sidecar_args_tagged(
        &self,
        service: &str,
        address: std::net::IpAddr,
        uid: u32,
        tag: &str,
    ) -> Vec<String> {
        vec![
            "--ctl".into(),
            self.proxy_socket.display().to_string(),
            "--token-file".into(),
            self.token_file(service, uid).display().to_string(),
            "--state-dir".into(),
            self.state_dir(tag, uid).display().to_string(),
            "--proxy-id".into(),
            format!("{service}-{address}"),
            "--address".into(),
            address.to_string(),
        ]
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.child.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
