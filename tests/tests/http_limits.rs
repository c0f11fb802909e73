//! Every HTTP server of the product bounds what a client can hold: a request head over the
//! server's limit is refused (431, or the connection closed) while one under it is served, and a
//! kept-alive connection left idle is closed after the server's timeout. The servers: the L7 path
//! (64 KiB, 30 s), the proxy's admin port (16 KiB, 10 s) and the control daemon's operator socket
//! (64 KiB, 10 s).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ringside_tests::ctl::Daemon;
use ringside_tests::http::serve;
use ringside_tests::*;

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Where a server is reached.
#[derive(Clone)]
enum At {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl At {
    fn connect(&self) -> Box<dyn Stream> {
        let t = Some(Duration::from_secs(60));
        match self {
            At::Tcp(a) => {
                let s = TcpStream::connect(a).unwrap();
                s.set_read_timeout(t).unwrap();
                Box::new(s)
            }
            At::Unix(p) => {
                let s = UnixStream::connect(p).unwrap();
                s.set_read_timeout(t).unwrap();
                Box::new(s)
            }
        }
    }
}

/// One server under test: where, a path it answers 200 on, its head limit and idle timeout.
struct Server {
    what: &'static str,
    at: At,
    path: &'static str,
    max_head: usize,
    idle: Duration,
}

/// A GET request head of about `size` bytes (one large header fills it).
fn head(path: &str, size: usize, close: bool) -> Vec<u8> {
    let start = format!("GET {path} HTTP/1.1\r\nhost: limits\r\n");
    let end = if close {
        "connection: close\r\n\r\n"
    } else {
        "\r\n"
    };
    let pad = size.saturating_sub(start.len() + end.len() + "x-pad: \r\n".len());
    format!("{start}x-pad: {}\r\n{end}", "a".repeat(pad)).into_bytes()
}

/// Read one response (head and a content-length body); its status, or `None` when the
/// connection ended (or was reset) first.
fn read_response(s: &mut dyn Stream) -> Option<u16> {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut b) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    };
    let text = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < end + len {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
    Some(status)
}

/// Send `request` on a new connection (a write refused halfway is the server closing it).
fn send(at: &At, request: &[u8]) -> Option<u16> {
    let mut s = at.connect();
    if let Err(e) = s.write_all(request) {
        assert!(
            matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
            "{e}"
        );
    }
    read_response(&mut *s)
}

/// An L7 forwarder with an admin port, a daemon; and the upstream's request counter.
fn servers() -> (
    Vec<Server>,
    (ChildGuard, Daemon),
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let up = serve("up", "127.0.0.1:0".parse().unwrap());
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let proxy = spawn_forward(
        listen,
        &[up.addr],
        &["--protocol", "http", "--admin", &admin.to_string()],
    );
    wait_for("the admin port", Duration::from_secs(10), || {
        listening_on(admin.port())
    });
    // One directory per call: the tests of this file run at once, and a daemon started on another
    // test's directory would remove it (and that test's daemon with it).
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, Ordering::SeqCst);
    let daemon = Daemon::start(
        &format!("ringside-http-limits-{}-{n}", std::process::id()),
        &[],
    );
    let list = vec![
        Server {
            what: "the L7 path",
            at: At::Tcp(listen),
            path: "/x",
            max_head: ringside_core::l7::MAX_HEADER_BYTES,
            idle: ringside_core::l7::HEADER_READ_TIMEOUT,
        },
        Server {
            what: "the admin port",
            at: At::Tcp(admin),
            path: "/ready",
            max_head: ringside_core::admin::MAX_HEADER_BYTES,
            idle: ringside_core::admin::HEADER_READ_TIMEOUT,
        },
        Server {
            what: "the daemon's operator socket",
            at: At::Unix(daemon.socket.clone()),
            path: "/v1/services",
            max_head: 64 * 1024,
            idle: Duration::from_secs(10),
        },
    ];
    (list, (proxy, daemon), up.hits)
}

#[test]
fn request_heads_over_the_limit_are_refused() {
    let (list, _keep, upstream_hits) = servers();
    for s in &list {
        let under = head(s.path, s.max_head - 2048, true);
        assert_eq!(
            send(&s.at, &under),
            Some(200),
            "{}: a head under the limit",
            s.what
        );
        let before = upstream_hits.load(Ordering::SeqCst);
        let over = head(s.path, s.max_head + 2048, true);
        let got = send(&s.at, &over);
        assert!(
            matches!(got, None | Some(431)),
            "{}: a head of {} bytes (limit {}) got {got:?}",
            s.what,
            over.len(),
            s.max_head
        );
        assert_eq!(
            upstream_hits.load(Ordering::SeqCst),
            before,
            "{}: the oversized request went on",
            s.what
        );
    }
}

#[test]
fn idle_keep_alive_connections_are_closed_after_the_timeout() {
    let (list, _keep, _) = servers();
    let threads: Vec<_> = list
        .into_iter()
        .map(|s| {
            std::thread::spawn(move || {
                let mut c = s.at.connect();
                // Kept alive: a second request on the same connection is served.
                for i in 0..2 {
                    c.write_all(&head(s.path, 200, false)).unwrap();
                    assert_eq!(read_response(&mut *c), Some(200), "{}: request {i}", s.what);
                    if i == 0 {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
                let idle_since = Instant::now();
                let mut b = [0u8; 64];
                let r = c.read(&mut b);
                let after = idle_since.elapsed();
                assert!(
                    matches!(r, Ok(0))
                        || r.as_ref()
                            .is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
                    "{}: {r:?} after {after:?}",
                    s.what
                );
                assert!(
                    after + Duration::from_secs(1) >= s.idle
                        && after <= s.idle + Duration::from_secs(5),
                    "{}: an idle connection was closed after {after:?} (its timeout is {:?})",
                    s.what,
                    s.idle
                );
                (s.what, after)
            })
        })
        .collect();
    for t in threads {
        let (what, after) = t.join().unwrap();
        println!("{what}: idle keep-alive connection closed after {after:?}");
    }
}
