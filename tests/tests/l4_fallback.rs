//! With io_uring disabled by the kernel (`kernel.io_uring_disabled=2`), `--driver auto` falls back
//! to epoll, says so once, and proxies; `--driver uring` refuses to start with a clear error.
//!
//! Needs root (it flips a global sysctl, restored on exit). It is the only test in this binary, so
//! no other test runs while io_uring is off. Outside CI, without root, it skips loudly.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use ringside_kernel_setup::sysctl;
use ringside_tests::*;

struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        sysctl::write("kernel.io_uring_disabled", &self.0)
            .expect("restore kernel.io_uring_disabled");
    }
}

#[test]
fn auto_driver_falls_back_to_epoll_when_io_uring_is_disabled() {
    if !is_root() {
        assert!(!under_ci(), "this test must run as root under CI");
        eprintln!("SKIPPED: auto_driver_falls_back_to_epoll_when_io_uring_is_disabled needs root (it sets kernel.io_uring_disabled)");
        return;
    }
    let Some(before) = sysctl::read("kernel.io_uring_disabled").unwrap() else {
        assert!(
            !under_ci(),
            "kernel.io_uring_disabled is missing on this kernel"
        );
        eprintln!("SKIPPED: this kernel has no kernel.io_uring_disabled");
        return;
    };
    let _restore = Restore(before);
    sysctl::write("kernel.io_uring_disabled", "2").unwrap();

    let echo = echo_server();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = Command::new(workspace_bin("ringside"))
        .args(["forward", &listen.to_string(), &echo.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let guard = ChildGuard(child);
    wait_for("ringside to listen", Duration::from_secs(10), || {
        listening_on(listen.port())
    });
    let mut c = connect_retry(listen, Duration::from_secs(5));
    c.write_all(b"hello").unwrap();
    let mut b = [0u8; 5];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");
    drop(c);
    guard.signal(libc::SIGTERM);
    let mut guard = guard;
    assert!(guard.wait_timeout(Duration::from_secs(10)).success());
    let mut log = String::new();
    std::io::BufReader::new(stderr)
        .read_to_string(&mut log)
        .unwrap();
    assert_eq!(
        log.matches("io_uring is not available").count(),
        1,
        "the fallback is logged once:\n{log}"
    );
    assert!(log.contains("Epoll"), "workers run on epoll:\n{log}");

    // Forcing io_uring fails clearly.
    let out = Command::new(workspace_bin("ringside"))
        .args([
            "forward",
            "127.0.0.1:0",
            &echo.to_string(),
            "--driver",
            "uring",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("io_uring was requested"), "{err}");
}
