//! Byte exactness and close semantics of the L4 fast path, on both drivers, with real sockets.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ringside_core::config::{CopyMode, DriverKind};
use ringside_core::Reason;
use ringside_tests::*;

const GIB: u64 = 1 << 30;

/// ≥ 1 GiB of random bytes each way at the same time; checksums equal at both ends.
fn bulk_both_ways(driver: DriverKind, mode: CopyMode, len: u64) {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = forward(driver, vec![server.local_addr().unwrap()], |p| {
        p.copy_mode = mode
    });
    let paddr = proxy.local_addrs()[0];

    let srv = std::thread::spawn(move || {
        let (s, _) = server.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let sum = Stream::new(2, len).write_to(&mut w).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
            sum
        });
        let mut r = s;
        let got = read_to_end_hashed(&mut r).unwrap();
        (writer.join().unwrap(), got)
    });

    let c = connect_retry(paddr, Duration::from_secs(5));
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let sum = Stream::new(1, len).write_to(&mut w).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
        sum
    });
    let mut r = c;
    let (client_got_len, client_got_sum) = read_to_end_hashed(&mut r).unwrap();
    let client_sent = writer.join().unwrap();
    let (server_sent, (server_got_len, server_got_sum)) = srv.join().unwrap();

    assert_eq!(server_got_len, len, "bytes client->server");
    assert_eq!(client_got_len, len, "bytes server->client");
    assert_eq!(server_got_sum, client_sent, "checksum client->server");
    assert_eq!(client_got_sum, server_sent, "checksum server->client");
    let stats = proxy.stats();
    assert_eq!(stats.downstream_cx_rx_bytes_total, len);
    assert_eq!(stats.downstream_cx_tx_bytes_total, len);
    if mode != CopyMode::Copy {
        assert!(
            stats.splice_transfers > 0,
            "bulk data must be spliced: {stats:?}"
        );
        assert!(
            stats.pipes_created <= 8,
            "pipes are pooled, not made per transfer: {}",
            stats.pipes_created
        );
    }
    wait_for("connection closed", Duration::from_secs(5), || {
        proxy.stats().downstream_cx_active == 0
    });
    assert!(
        proxy.stats().failures.is_empty(),
        "{:?}",
        proxy.stats().failures
    );
    proxy.shutdown(Duration::from_secs(1));
}

#[test]
fn one_gib_each_way_adaptive() {
    for d in DRIVERS {
        bulk_both_ways(d, CopyMode::Adaptive, GIB);
    }
}

#[test]
fn splice_and_copy_modes_are_exact() {
    for d in DRIVERS {
        bulk_both_ways(d, CopyMode::Splice, 64 << 20);
        bulk_both_ways(d, CopyMode::Copy, 64 << 20);
    }
}

/// The client writes a request and shuts its write side; the server reads to EOF, then replies;
/// the reply arrives whole and the connection then closes cleanly.
#[test]
fn half_close_request_then_reply() {
    for d in DRIVERS {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = forward(d, vec![server.local_addr().unwrap()], |_| {});
        let srv = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let (n, sum) = read_to_end_hashed(&mut s).unwrap();
            // Only after EOF: reply with what was seen, then a 3 MiB body.
            s.write_all(&n.to_le_bytes()).unwrap();
            s.write_all(&sum.to_le_bytes()).unwrap();
            let body = Stream::new(9, 3 << 20).write_to(&mut s).unwrap();
            drop(s);
            body
        });
        let mut c = connect_retry(proxy.local_addrs()[0], Duration::from_secs(5));
        let sent = Stream::new(8, 100_000).write_to(&mut c).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut head = [0u8; 16];
        c.read_exact(&mut head).unwrap();
        assert_eq!(u64::from_le_bytes(head[..8].try_into().unwrap()), 100_000);
        assert_eq!(u64::from_le_bytes(head[8..].try_into().unwrap()), sent);
        let (n, sum) = read_to_end_hashed(&mut c).expect("clean EOF, not a reset");
        assert_eq!(n, 3 << 20);
        assert_eq!(sum, srv.join().unwrap());
        wait_for("connection closed", Duration::from_secs(5), || {
            proxy.stats().downstream_cx_active == 0
        });
        assert!(
            proxy.stats().failures.is_empty(),
            "{:?}",
            proxy.stats().failures
        );
        proxy.shutdown(Duration::from_secs(1));
    }
}

/// The server half-closes first and keeps reading: the client still gets to send everything.
#[test]
fn half_close_from_the_server_side() {
    for d in DRIVERS {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = forward(d, vec![server.local_addr().unwrap()], |_| {});
        let srv = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            s.write_all(b"greeting").unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            read_to_end_hashed(&mut s).unwrap()
        });
        let mut c = connect_retry(proxy.local_addrs()[0], Duration::from_secs(5));
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"greeting");
        let sent = Stream::new(5, 2 << 20).write_to(&mut c).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(srv.join().unwrap(), (2 << 20, sent));
        proxy.shutdown(Duration::from_secs(1));
    }
}

/// A reset on one side resets the other.
#[test]
fn reset_crosses_the_proxy() {
    for d in DRIVERS {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = forward(d, vec![server.local_addr().unwrap()], |_| {});
        let mut c = connect_retry(proxy.local_addrs()[0], Duration::from_secs(5));
        let (s, _) = server.accept().unwrap();
        c.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        (&s).read_exact(&mut one).unwrap();
        // Server aborts: SO_LINGER 0 then close sends RST.
        socket_linger_zero(&s);
        drop(s);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let e = c
            .read(&mut one)
            .expect_err("the client must see a reset, not EOF");
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        wait_for("upstream_reset counted", Duration::from_secs(5), || {
            proxy.stats().failures_for(Reason::UpstreamReset) == 1
        });

        // And the other way: the client aborts, the server sees the reset.
        let mut c = connect_retry(proxy.local_addrs()[0], Duration::from_secs(5));
        let (mut s, _) = server.accept().unwrap();
        c.write_all(b"y").unwrap();
        s.read_exact(&mut one).unwrap();
        socket_linger_zero(&c);
        drop(c);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let e = s.read(&mut one).expect_err("the server must see a reset");
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        wait_for("downstream_reset counted", Duration::from_secs(5), || {
            proxy.stats().failures_for(Reason::DownstreamReset) == 1
        });
        proxy.shutdown(Duration::from_secs(1));
    }
}

fn socket_linger_zero(s: &TcpStream) {
    ringside_core::sys::set_linger_zero(std::os::fd::AsRawFd::as_raw_fd(s));
}

/// Idle connections are closed after the idle timeout; busy ones are not.
#[test]
fn idle_timeout_closes_quiet_connections() {
    for d in DRIVERS {
        let echo = echo_server();
        let proxy = forward(d, vec![echo], |p| {
            p.idle_timeout = Some(Duration::from_millis(400))
        });
        let mut busy = connect_retry(proxy.local_addrs()[0], Duration::from_secs(5));
        let mut quiet = connect_retry(proxy.local_addrs()[0], Duration::from_secs(5));
        quiet
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let start = Instant::now();
        let mut b = [0u8; 1];
        // Keep `busy` talking every 100 ms for 1 s.
        while start.elapsed() < Duration::from_millis(1000) {
            busy.write_all(b"p").unwrap();
            busy.read_exact(&mut b).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        let r = quiet.read(&mut b);
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "quiet connection still open: {r:?}"
        );
        busy.write_all(b"q").unwrap();
        busy.read_exact(&mut b).unwrap();
        assert_eq!(proxy.stats().failures_for(Reason::IdleTimeout), 1);
        proxy.shutdown(Duration::from_secs(1));
    }
}

/// Over max_connections: accepted, closed at once, counted `overloaded`.
#[test]
fn overload_closes_extra_connections() {
    for d in DRIVERS {
        let echo = echo_server();
        let proxy = forward(d, vec![echo], |p| p.max_connections = 2);
        let mut a = connect_retry(proxy.local_addrs()[0], Duration::from_secs(5));
        let mut b = connect_retry(proxy.local_addrs()[0], Duration::from_secs(5));
        let mut one = [0u8; 1];
        for s in [&mut a, &mut b] {
            s.write_all(b"1").unwrap();
            s.read_exact(&mut one).unwrap();
        }
        let mut c = connect_retry(proxy.local_addrs()[0], Duration::from_secs(5));
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.write_all(b"1");
        let r = c.read(&mut one);
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "third connection was served: {r:?}"
        );
        assert_eq!(proxy.stats().failures_for(Reason::Overloaded), 1);
        // Once one closes, a new connection is served again.
        drop(a);
        wait_for("slot freed", Duration::from_secs(5), || {
            proxy.stats().downstream_cx_active == 1
        });
        let mut d2 = connect_retry(proxy.local_addrs()[0], Duration::from_secs(5));
        d2.write_all(b"2").unwrap();
        d2.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"2");
        proxy.shutdown(Duration::from_secs(1));
    }
}
