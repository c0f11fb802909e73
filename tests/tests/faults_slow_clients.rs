//! 2,000 half-open slow clients against the L7 path and against a sidecar's mesh inbound (15006)
//! while a legitimate caller keeps calling: its every call succeeds in under a second, the slow
//! clients are closed at their deadline (the L7 header-read timeout, 30 s; the strict-mTLS
//! detection deadline, 5 s) and the proxy's descriptors come back to the baseline. (The admin and
//! health ports have their own test in admin.rs.) The inbound test needs root (pods).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringside_tests::ctl::Daemon;
use ringside_tests::http::{serve, Client};
use ringside_tests::open_fds;
use ringside_tests::pod::{pods_available, Net, Sidecar, PROXY_UID};
use ringside_tests::*;

const SLOW: usize = 2000;

/// Wait until `pid` holds `base` descriptors again.
fn fds_back(pid: u32, base: usize, what: &str) {
    let t = Instant::now();
    let mut now = open_fds(pid);
    while now != base {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what}: the proxy holds {now} descriptors, {base} before the slow clients came"
        );
        std::thread::sleep(Duration::from_millis(50));
        now = open_fds(pid);
    }
}

/// Whether the proxy has closed `s` (EOF or reset; nothing to read and still open otherwise).
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    }
}

/// A slow client: it dribbles `dribble` one byte per tick (over and over when `repeat`).
struct Slow {
    s: TcpStream,
    dribble: &'static [u8],
    repeat: bool,
    at: usize,
    closed_after: Option<Duration>,
}

/// Dribble one byte on every slow client each `tick` until all are closed or `stop` is set;
/// returns when each was closed (from `t0`).
fn dribble(
    mut slow: Vec<Slow>,
    tick: Duration,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Option<Duration>> {
    for c in &mut slow {
        c.s.set_nonblocking(true).unwrap();
    }
    while !stop.load(Ordering::SeqCst) && slow.iter().any(|c| c.closed_after.is_none()) {
        for c in slow.iter_mut().filter(|c| c.closed_after.is_none()) {
            if closed(&mut c.s) {
                c.closed_after = Some(t0.elapsed());
                continue;
            }
            if !c.dribble.is_empty() && (c.repeat || c.at < c.dribble.len()) {
                // (A write to a socket the proxy has closed fails or draws a reset: the next
                // round sees it closed.)
                let _ = c.s.write(&c.dribble[c.at % c.dribble.len()..][..1]);
                c.at += 1;
            }
        }
        std::thread::sleep(tick);
    }
    slow.into_iter().map(|c| c.closed_after).collect()
}

/// Check the slow clients' fate: all closed, none before `min` nor after `max` (from their start).
/// `kinds`: how many kinds of slow clients there are (client `i` is of kind `i % kinds`).
fn assert_closed_within(
    closed: &[Option<Duration>],
    kinds: usize,
    min: Duration,
    max: Duration,
    what: &str,
) {
    let open: Vec<usize> = (0..kinds)
        .map(|k| {
            closed
                .iter()
                .skip(k)
                .step_by(kinds)
                .filter(|c| c.is_none())
                .count()
        })
        .collect();
    assert!(
        open.iter().all(|&n| n == 0),
        "{what}: slow clients still held, by kind: {open:?}"
    );
    let first = closed.iter().flatten().min().unwrap();
    let last = closed.iter().flatten().max().unwrap();
    assert!(
        *first >= min,
        "{what}: a slow client was closed after {first:?}, before its deadline"
    );
    assert!(
        *last <= max,
        "{what}: a slow client was held {last:?}, past its deadline"
    );
}

/// The L7 path (`ringside forward --protocol http`): 2,000 clients that never finish a request
/// head (silent ones, ones dribbling an HTTP/1.1 head a byte at a time, ones dribbling the HTTP/2
/// preface) do not slow a legitimate caller, and are closed at the 30 s header-read timeout.
#[test]
fn slow_clients_cannot_starve_the_l7_path() {
    let app = serve("app", "127.0.0.1:0".parse().unwrap());
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut proxy = spawn_forward(listen, &[app.addr], &["--protocol", "http"]);
    let url = format!("http://{listen}/x");
    wait_for("the L7 listener", Duration::from_secs(10), || {
        Client::new().get(&url).is_ok_and(|r| r.status == 200)
    });
    // The baseline once each worker has an upstream connection in its pool (sequential calls
    // keep at most one each).
    for _ in 0..20 {
        assert_eq!(Client::new().get(&url).unwrap().status, 200);
    }
    std::thread::sleep(Duration::from_millis(200));
    let base = open_fds(proxy.pid());

    // Silent; an HTTP/1.1 head that never ends; the HTTP/2 preface, then nothing.
    let kinds: [(&[u8], &[u8], bool); 3] = [
        (b"", b"", false),
        (b"GET /x HTTP/1.1\r\nhost: x\r\nx-slow: ", b"a", true),
        (b"", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", false),
    ];
    let t0 = Instant::now();
    let slow: Vec<Slow> = (0..SLOW)
        .map(|i| {
            let (first, dribble, repeat) = kinds[i % kinds.len()];
            let mut s = TcpStream::connect(listen).unwrap();
            s.write_all(first).unwrap();
            Slow {
                s,
                dribble,
                repeat,
                at: 0,
                closed_after: None,
            }
        })
        .collect();
    let opened = t0.elapsed();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let dribbler = std::thread::spawn(move || dribble(slow, Duration::from_millis(500), t0, stop2));

    // The legitimate caller, a new connection each time, until the slow clients are gone.
    let mut worst = Duration::ZERO;
    let mut calls = 0;
    while !dribbler.is_finished() && t0.elapsed() < Duration::from_secs(50) {
        let t = Instant::now();
        let r = Client::new().get(&url);
        let took = t.elapsed();
        assert!(
            r.as_ref().is_ok_and(|r| r.status == 200),
            "a legitimate call failed while slow clients sat on the L7 path: {r:?}"
        );
        assert!(
            took < Duration::from_secs(1),
            "a legitimate call took {took:?}"
        );
        worst = worst.max(took);
        calls += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::SeqCst);
    let closed = dribbler.join().unwrap();
    // The header-read timeout is 30 s, from each client's connect (all opened within `opened`).
    assert_closed_within(
        &closed,
        kinds.len(),
        Duration::from_secs(29),
        Duration::from_secs(36) + opened,
        "L7",
    );
    fds_back(proxy.pid(), base, "L7");
    eprintln!(
        "L7: {SLOW} slow clients (opened in {opened:?}) closed after {:?}..{:?}; {calls} legitimate calls, worst {worst:?}",
        closed.iter().flatten().min().unwrap(),
        closed.iter().flatten().max().unwrap()
    );
    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait_timeout(Duration::from_secs(20)).success());
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

/// The start of a TLS ClientHello (record header, handshake header, version, random): a strict
/// mTLS inbound waits for the rest.
const PARTIAL_CLIENT_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\
\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff\x00\
\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff\x00";

/// A sidecar's mesh inbound (15006, strict mTLS): 2,000 clients from another pod that connect to
/// the service port and send nothing, or dribble a ClientHello a byte at a time, are closed at
/// the 5 s detection deadline (`detect_timeout`); meanwhile a caller through its own sidecar
/// keeps being served in under a second per connection.
#[test]
fn slow_clients_cannot_starve_the_mesh_inbound() {
    if !pods_available("slow_clients_cannot_starve_the_mesh_inbound") {
        return;
    }
    let mut net = Net::new();
    let client = net.pod("client");
    let store = net.pod("store");
    let attacker = net.pod("attacker");
    let range = format!("{}/29", net.virtual_ip(0));
    let daemon = Daemon::start(&net.id, &["--vip-range", &range]);
    daemon.ok(&["register", "service", "store", "--port", "7000:7000"]);
    daemon.ok(&["register", "service", "client"]);
    daemon.apply(ALLOW);
    for p in [&client, &store] {
        p.install_redirect(&[]);
    }
    store.echo_app("127.0.0.1:7000".parse().unwrap());
    let start = |pod: &ringside_tests::pod::Pod, service: &str| {
        let args = daemon.sidecar_args(service, IpAddr::V4(pod.ip4), PROXY_UID);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Sidecar::start_with(pod, "sidecar: {}\n", &args)
    };
    let sc_store = start(&store, "store");
    let sc_client = start(&client, "client");
    let vip: IpAddr = daemon.virtual_ip("store");
    let to = SocketAddr::new(vip, 7000);
    // One call through the pair: what the caller measures.
    let call = move || -> Result<Duration, String> {
        let t = Instant::now();
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"legitimate call").map_err(|e| e.to_string())?;
        let mut b = [0u8; 15];
        s.read_exact(&mut b).map_err(|e| format!("read: {e}"))?;
        Ok(t.elapsed())
    };
    client.enter(call).join().unwrap().expect("the pair serves");
    std::thread::sleep(Duration::from_secs(1));
    let pid = sc_store.child.pid();
    let base = open_fds(pid);

    // The slow clients, from a pod without a sidecar, to the service port (redirected to 15006).
    let at = store.addr4(7000);
    let t0 = Instant::now();
    let slow: Vec<Slow> = attacker
        .enter(move || {
            (0..SLOW)
                .map(|i| Slow {
                    s: TcpStream::connect_timeout(&at, Duration::from_secs(5)).unwrap(),
                    dribble: if i % 2 == 0 {
                        b""
                    } else {
                        PARTIAL_CLIENT_HELLO
                    },
                    repeat: false,
                    at: 0,
                    closed_after: None,
                })
                .collect()
        })
        .join()
        .unwrap();
    let opened = t0.elapsed();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let dribbler = std::thread::spawn(move || dribble(slow, Duration::from_millis(200), t0, stop2));
    let caller = client.enter(move || {
        let mut worst = Duration::ZERO;
        let mut calls = 0;
        while !dribbler.is_finished() && t0.elapsed() < Duration::from_secs(30) {
            let took = call()?;
            if took >= Duration::from_secs(1) {
                return Err(format!("a legitimate call took {took:?}"));
            }
            worst = worst.max(took);
            calls += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::SeqCst);
        Ok((worst, calls, dribbler.join().unwrap()))
    });
    let (worst, calls, closed) = caller.join().unwrap().unwrap_or_else(|e| {
        panic!(
            "while slow clients sat on 15006: {e}\n{}",
            sc_store.log_text()
        )
    });
    assert_closed_within(
        &closed,
        2,
        Duration::from_millis(4900),
        Duration::from_secs(9) + opened,
        "15006",
    );
    fds_back(pid, base, "15006");
    eprintln!(
        "15006: {SLOW} slow clients (opened in {opened:?}) closed after {:?}..{:?}; {calls} legitimate calls, worst {worst:?}",
        closed.iter().flatten().min().unwrap(),
        closed.iter().flatten().max().unwrap()
    );
    let counters = sc_store.stop();
    assert!(
        counters.get("fail.detect_timeout").copied().unwrap_or(0) >= SLOW as u64,
        "the slow clients were not counted detect_timeout: {counters:?}"
    );
    drop(sc_client);
}
