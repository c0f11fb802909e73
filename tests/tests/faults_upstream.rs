//! The upstream dies mid-stream (SIGKILL of its process while a large byte-checked transfer is in
//! flight), through the plain L4 forwarder (both drivers) and through a pair of sidecars with mesh
//! mTLS in pods. The client must see a reset, never a clean end that would make the truncated
//! stream look complete; every byte it got before is the right one; the proxy counts the reason;
//! its descriptors return to the baseline; and it serves the next connection once the upstream
//! is back. The pod test needs root.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringside_tests::ctl::Daemon;
use ringside_tests::open_fds;
use ringside_tests::pod::{pods_available, Net, Pod, Sidecar, PROXY_UID};
use ringside_tests::*;

/// The transfer is planned for this many bytes each way; the upstream dies long before.
const PLANNED: u64 = 1 << 30;
/// Bytes the client has back (checked) when the upstream is killed.
const KILL_AFTER: u64 = 16 << 20;

/// The byte at each offset of the transfer (a multiplicative hash of the offset), so the reader
/// checks every byte without keeping what was sent.
fn pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = ((offset + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8;
    }
}

/// An echo server in a process of its own (`ringside-echo`), started with `cmd` (which may enter
/// a pod); returns it with the address it listens on.
fn echo_process(mut cmd: Command) -> (ChildGuard, SocketAddr) {
    let mut child = ChildGuard::spawn(cmd.stdout(Stdio::piped()));
    let mut out = child.0.stdout.take().unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while out.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    let line = String::from_utf8(line).unwrap();
    let addr = line
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("ringside-echo said {line:?}"))
        .parse()
        .unwrap();
    (child, addr)
}

/// What the client saw of a transfer whose upstream was killed.
struct Seen {
    /// Bytes echoed back before the end, all checked.
    echoed: u64,
    /// How reading ended: `Ok` is a clean end of stream.
    end: io::Result<()>,
    /// How writing ended.
    write_end: io::Result<()>,
    /// The client socket's TCP state when reading ended (`TCP_CLOSE` once a reset arrived,
    /// `TCP_CLOSE_WAIT` after a FIN).
    state: u8,
}

/// The TCP state of `s` (`tcpi_state`).
fn tcp_state(s: &TcpStream) -> u8 {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero tcp_info is valid (plain integers).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "TCP_INFO: {}", io::Error::last_os_error());
    info.tcpi_state
}

/// `tcpi_state` values (include/net/tcp_states.h).
const TCP_CLOSE: u8 = 7;

/// Stream `PLANNED` bytes through `s` while reading the echo and checking every byte; once
/// `KILL_AFTER` bytes are back, stop reading for a moment and call `kill`. (With the client not
/// reading, the echo's writes block, so the client's bytes pile up unread in the upstream's
/// receive buffer: the kernel then answers the process's death with a reset, not a FIN. A FIN
/// from a dead upstream is a clean close at the TCP level, which no proxy can tell apart.)
fn transfer_and_kill(s: TcpStream, kill: impl FnOnce()) -> Seen {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0;
        while off < PLANNED {
            pattern(off, &mut buf);
            w.write_all(&buf)?;
            off += buf.len() as u64;
        }
        Ok(())
    });
    let mut r = s;
    let (mut buf, mut want) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut echoed = 0u64;
    let mut kill = Some(kill);
    let end = loop {
        if echoed >= KILL_AFTER {
            if let Some(k) = kill.take() {
                std::thread::sleep(Duration::from_millis(300));
                k();
            }
        }
        match r.read(&mut buf) {
            Ok(0) => break Ok(tcp_state(&r)),
            Ok(n) => {
                pattern(echoed, &mut want[..n]);
                if let Some(i) = (0..n).find(|&i| buf[i] != want[i]) {
                    panic!("byte {} of the echo differs", echoed + i as u64);
                }
                echoed += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    let state = match &end {
        Ok(state) => *state,
        Err(_) => tcp_state(&r),
    };
    let end = end.map(|_| ());
    assert!(
        kill.is_none(),
        "the stream ended before the upstream was killed: {end:?}"
    );
    let write_end = writer.join().unwrap();
    Seen {
        echoed,
        end,
        write_end,
        state,
    }
}

/// The client must have seen a reset: an error, not a stall, and never a FIN. (The writer and
/// the reader share the socket: the one that calls first gets `ECONNRESET`, the other then sees
/// the socket shut, so a reader's end of stream counts as a reset only if the socket was already
/// closed by one, not half-closed by a FIN.)
fn assert_reset(seen: &Seen, what: &str) {
    let reset = |r: &io::Result<()>| matches!(r, Err(e) if e.kind() == ErrorKind::ConnectionReset);
    match &seen.end {
        Ok(()) => assert!(
            seen.state == TCP_CLOSE && reset(&seen.write_end),
            "{what}: a clean end of stream after {} of {PLANNED} bytes (TCP state {}, the writer got {:?}): the truncated stream looks complete",
            seen.echoed,
            seen.state,
            seen.write_end
        ),
        Err(e) => assert_eq!(
            e.kind(),
            ErrorKind::ConnectionReset,
            "{what}: the read ended with {e} after {} bytes, not with a reset",
            seen.echoed
        ),
    }
    assert!(
        seen.write_end.is_err(),
        "{what}: the client wrote all {PLANNED} bytes into a dead connection"
    );
}

/// Wait until `pid` holds `base` descriptors again; returns how long that took.
fn fds_back(pid: u32, base: usize, what: &str) -> Duration {
    let t = Instant::now();
    let mut now = open_fds(pid);
    while now != base {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what}: {now} descriptors open 10 s after the upstream died, {base} before"
        );
        std::thread::sleep(Duration::from_millis(50));
        now = open_fds(pid);
    }
    t.elapsed()
}

/// A short exact echo through `addr`, retried while the restarted upstream (and the proxy's view
/// of it) comes back.
fn serves_again(mut connect: impl FnMut() -> io::Result<TcpStream>, what: &str) {
    let t = Instant::now();
    loop {
        let r = connect().and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let msg = b"still serving";
            s.write_all(msg)?;
            let mut b = [0u8; 13];
            s.read_exact(&mut b)?;
            if &b != msg {
                return Err(io::Error::other("wrong echo"));
            }
            Ok(())
        });
        match r {
            Ok(()) => return,
            Err(e) if t.elapsed() > Duration::from_secs(15) => {
                panic!("{what}: no new connection is served 15 s after the upstream came back: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[test]
fn plain_upstream_killed_mid_stream_resets_the_client() {
    for driver in ["uring", "epoll"] {
        let t0 = Instant::now();
        let (mut echo, up) = echo_process({
            let mut c = Command::new(workspace_bin("ringside-echo"));
            c.arg("127.0.0.1:0");
            c
        });
        let dir =
            std::env::temp_dir().join(format!("ringside-killed-{driver}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("access.log");
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut proxy = spawn_forward(
            listen,
            &[up],
            &["--driver", driver, "--access-log", log.to_str().unwrap()],
        );
        serves_again(|| TcpStream::connect(listen), driver);
        std::thread::sleep(Duration::from_millis(200));
        let base = open_fds(proxy.pid());

        let seen = transfer_and_kill(TcpStream::connect(listen).unwrap(), || {
            echo.signal(libc::SIGKILL);
            echo.wait_timeout(Duration::from_secs(5));
        });
        assert_reset(&seen, driver);
        let back = fds_back(proxy.pid(), base, driver);
        // The reason, in the access log (written by a thread of its own: wait for the line).
        wait_for("the access log line", Duration::from_secs(5), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .any(|l| l["reason"] == "upstream_reset" && l["bytes_up"].as_u64() > Some(0))
        });
        let (_echo2, _) = echo_process({
            let mut c = Command::new(workspace_bin("ringside-echo"));
            c.arg(up.to_string());
            c
        });
        serves_again(|| TcpStream::connect(listen), driver);
        eprintln!(
            "{driver}: reset after {} MiB echoed; descriptors back to {base} in {back:?}; {:?} in all",
            seen.echoed >> 20,
            t0.elapsed()
        );
        proxy.signal(libc::SIGTERM);
        assert!(proxy.wait_timeout(Duration::from_secs(20)).success());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

const ALLOW: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: store
spec:
  destination:
    name: store
  sources:
    - name: client
      action: allow
";

/// Connect from inside `pod` (through its sidecar, by the redirect rules).
fn connect_in(pod: &Pod, to: SocketAddr) -> io::Result<TcpStream> {
    pod.enter(move || TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .join()
        .unwrap()
}

#[test]
fn mtls_upstream_killed_mid_stream_resets_the_client() {
    if !pods_available("mtls_upstream_killed_mid_stream_resets_the_client") {
        return;
    }
    let t0 = Instant::now();
    let mut net = Net::new();
    let client = net.pod("client");
    let store = net.pod("store");
    let range = format!("{}/29", net.virtual_ip(0));
    let daemon = Daemon::start(&net.id, &["--vip-range", &range]);
    daemon.ok(&["register", "service", "store", "--port", "7000:7000"]);
    daemon.ok(&["register", "service", "client"]);
    daemon.apply(ALLOW);
    for p in [&client, &store] {
        p.install_redirect(&[]);
    }
    let app_cmd = |addr: &str| {
        let mut c = store.cmd(workspace_bin("ringside-echo").to_str().unwrap());
        c.arg(addr);
        c
    };
    // (`ip netns exec` execs the echo: the PID is the app's.)
    let (mut app, _) = echo_process(app_cmd("127.0.0.1:7000"));
    let start = |pod: &Pod, service: &str| {
        let args = daemon.sidecar_args(service, IpAddr::V4(pod.ip4), PROXY_UID);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Sidecar::start_with(pod, "sidecar: {}\n", &args)
    };
    let sc_store = start(&store, "store");
    let sc_client = start(&client, "client");
    let vip: IpAddr = daemon.virtual_ip("store");
    let to = SocketAddr::new(vip, 7000);
    serves_again(|| connect_in(&client, to), "mtls");
    std::thread::sleep(Duration::from_secs(1));
    let pids = [sc_client.child.pid(), sc_store.child.pid()];
    let base = pids.map(open_fds);

    let seen = transfer_and_kill(connect_in(&client, to).unwrap(), || {
        app.signal(libc::SIGKILL);
        app.wait_timeout(Duration::from_secs(5));
    });
    assert_reset(&seen, "mtls");
    let back = [
        fds_back(pids[0], base[0], "the client's sidecar"),
        fds_back(pids[1], base[1], "the store's sidecar"),
    ];
    let (_app2, _) = echo_process(app_cmd("127.0.0.1:7000"));
    serves_again(|| connect_in(&client, to), "mtls");
    eprintln!(
        "mtls: reset after {} MiB echoed; descriptors back to {base:?} in {back:?}; {:?} in all",
        seen.echoed >> 20,
        t0.elapsed()
    );
    // Each sidecar counted the reset on its side.
    let c_store = sc_store.stop();
    assert!(
        c_store.get("fail.upstream_reset").copied().unwrap_or(0) >= 1,
        "the store's sidecar did not count upstream_reset: {c_store:?}"
    );
    let log = sc_client.log_text();
    let c_client = sc_client.stop();
    assert!(
        c_client.get("fail.upstream_reset").copied().unwrap_or(0) >= 1,
        "the client's sidecar did not count upstream_reset: {c_client:?}\n{log}"
    );
}
