//! A throw-away PostgreSQL: `initdb` in a temporary directory, started on a free loopback port,
//! stopped (by PID) and removed on drop. As root it runs as the `postgres` system user, since the
//! server refuses to run as root.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::ChildGuard;

/// A running PostgreSQL cluster.
#[derive(Debug)]
pub struct Postgres {
    /// Directory holding the data directory and the socket.
    pub dir: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
    bin: PathBuf,
    ids: Option<(u32, u32)>,
    netns: Option<String>,
    server: Option<ChildGuard>,
}

/// The directory of the newest installed PostgreSQL server binaries.
pub fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

fn postgres_ids() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres"))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

impl Postgres {
    /// Create and start a cluster on a free loopback port. Panics with a clear message when
    /// PostgreSQL is not installed.
    pub fn start() -> Postgres {
        Postgres::start_in(None, crate::free_port())
    }

    /// Create and start a cluster listening on 127.0.0.1:`port`, inside network namespace `netns`
    /// when given (then the server runs there; `addr` is its address inside the pod).
    pub fn start_in(netns: Option<&str>, port: u16) -> Postgres {
        let bin = bin_dir().expect(
            "PostgreSQL server binaries not found under /usr/lib/postgresql: the README's test command installs them (apt-get install postgresql)",
        );
        let ids = if crate::is_root() {
            Some(
                postgres_ids()
                    .expect("running as root but there is no 'postgres' user to run the server as"),
            )
        } else {
            None
        };
        let dir = std::env::temp_dir().join(format!(
            "ringside-pg-{}-{}",
            std::process::id(),
            crate::free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let mut pg = Postgres {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            bin,
            ids,
            netns: None,
            server: None,
        };
        let data = pg.dir.join("data");
        let out = pg
            .cmd("initdb")
            .args([
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // initdb runs outside; the server and its readiness probe run in the pod.
        pg.netns = netns.map(str::to_string);
        let log = std::fs::File::create(pg.dir.join("server.log")).unwrap();
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(pg.dir.join("server.log"), Some(uid), Some(gid)).unwrap();
        }
        let mut cmd = pg.cmd("postgres");
        cmd.args([
            "-D",
            data.to_str().unwrap(),
            "-p",
            &port.to_string(),
            "-k",
            pg.dir.to_str().unwrap(),
        ])
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ])
        .stdout(Stdio::null())
        .stderr(log);
        pg.server = Some(ChildGuard::spawn(&mut cmd));
        let start = Instant::now();
        loop {
            let ok = pg
                .cmd("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "PostgreSQL did not become ready; log:\n{}",
                std::fs::read_to_string(pg.dir.join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        pg
    }

    /// A command for one of the server's binaries, as the right user.
    pub fn cmd(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        let mut c = match (&self.netns, self.ids) {
            (Some(ns), Some((uid, gid))) => {
                // `ip netns exec` execs setpriv, which execs the program: the PID stays the server's.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "setpriv"])
                    .arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .args(["--clear-groups", "--"])
                    .arg(&program);
                c
            }
            (Some(ns), None) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&program);
                c
            }
            (None, ids) => {
                let mut c = Command::new(&program);
                if let Some((uid, gid)) = ids {
                    c.uid(uid).gid(gid);
                }
                c
            }
        };
        c.current_dir(&self.dir);
        c
    }

    /// Path of a server binary (pgbench, psql).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            // Fast shutdown, then wait; SIGKILL (by the guard) only if it hangs.
            server.signal(libc::SIGINT);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = server.0.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = remove_dir(&self.dir);
    }
}

fn remove_dir(p: &Path) -> std::io::Result<()> {
    std::fs::remove_dir_all(p)
}
