//! The daemon survives its clients: running out of descriptors does not stop it (it backs off and
//! serves again once connections close), a request body beyond the limit is refused with 413, and
//! a client that sends half a request head is closed.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use ringside_tests::*;

fn request(sock: &std::path::Path, head: &str, body: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn the_daemon_survives_descriptor_exhaustion_and_large_bodies() {
    let dir = std::env::temp_dir().join(format!("ringctl-limits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (sock, proxy_sock) = (dir.join("ctl.sock"), dir.join("proxy.sock"));
    // 64 descriptors: a few dozen client connections exhaust them.
    let mut daemon = ChildGuard::spawn(
        Command::new("prlimit")
            .arg("--nofile=64:64")
            .arg(workspace_bin("ringctl"))
            .arg("daemon")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--socket")
            .arg(&sock)
            .arg("--proxy-socket")
            .arg(&proxy_sock)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap()),
    );
    wait_for("the daemon's sockets", Duration::from_secs(10), || {
        UnixStream::connect(&sock).is_ok() && UnixStream::connect(&proxy_sock).is_ok()
    });
    let ringctl = |args: &[&str]| {
        Command::new(workspace_bin("ringctl"))
            .args(args)
            .arg("--socket")
            .arg(&sock)
            .output()
            .unwrap()
    };
    // Hold 100 connections on the proxy socket: the daemon runs out of descriptors.
    let held: Vec<UnixStream> = (0..100)
        .filter_map(|_| UnixStream::connect(&proxy_sock).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon exited when it ran out of descriptors: {}",
        std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
    );
    drop(held);
    let t0 = std::time::Instant::now();
    loop {
        let out = ringctl(&["get", "services"]);
        if out.status.success() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the daemon does not serve again: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    assert!(log.contains("accept failed"), "{log}");

    // A body beyond the limit: 413, and nothing applied.
    let big = vec![b'a'; 5 * 1024 * 1024];
    let head = format!(
        "POST /v1/apply HTTP/1.1\r\nhost: ringctl\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        big.len()
    );
    let r = request(&sock, &head, &big);
    assert!(r.starts_with("HTTP/1.1 413"), "{}", &r[..r.len().min(200)]);

    // Half a request head: closed at the header timeout (10 s).
    let mut half = UnixStream::connect(&sock).unwrap();
    half.write_all(b"GET /v1/services HTTP/1.1\r\n").unwrap();
    half.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let t1 = std::time::Instant::now();
    let mut b = [0u8; 64];
    let _ = half.read(&mut b);
    assert!(
        t1.elapsed() < Duration::from_secs(15),
        "a half request held a daemon connection for {:?}",
        t1.elapsed()
    );
    daemon.signal(libc::SIGTERM);
    daemon.wait_timeout(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}
