//! Upstream choice and connect failures, on both drivers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use ringside_core::config::DriverKind;
use ringside_core::Reason;
use ringside_tests::*;

/// A server that answers each connection with its own tag and closes.
fn tagged_server(tag: u8) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.write_all(&[tag]);
        }
    });
    addr
}

fn ask(proxy: SocketAddr) -> Option<u8> {
    let mut c = connect_retry(proxy, Duration::from_secs(5));
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    match c.read(&mut b) {
        Ok(1) => Some(b[0]),
        _ => None,
    }
}

#[test]
fn refused_endpoint_is_skipped_and_ejected() {
    for d in DRIVERS {
        let dead = refusing_addr();
        let live = tagged_server(7);
        let proxy = forward(d, vec![dead, live], |_| {});
        for _ in 0..10 {
            assert_eq!(
                ask(proxy.local_addrs()[0]),
                Some(7),
                "every connection reaches the live endpoint"
            );
        }
        let s = proxy.stats();
        // The dead endpoint is tried once, then ejected for the back-off period.
        assert_eq!(s.upstream_cx_connect_fail, 1, "{s:?}");
        assert_eq!(s.upstream_cx_total, 11, "{s:?}");
        assert!(s.failures.is_empty(), "no connection failed: {s:?}");
        proxy.shutdown(Duration::from_secs(1));
    }
}

#[test]
fn all_endpoints_refusing_closes_promptly_with_reason() {
    for d in DRIVERS {
        let proxy = forward(d, vec![refusing_addr(), refusing_addr()], |_| {});
        for i in 0..5 {
            let start = Instant::now();
            let mut c = connect_retry(proxy.local_addrs()[0], Duration::from_secs(5));
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 1];
            let r = c.read(&mut b);
            assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
            if let Err(e) = &r {
                assert_ne!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock,
                    "the proxy did not close the connection"
                );
            }
            assert!(
                start.elapsed() < Duration::from_millis(500),
                "close took {:?}",
                start.elapsed()
            );
            // Counted by the worker as it closes; seen here within moments (two CI runs saw the
            // close a moment before the count: an open question, see the note).
            wait_for("the refusal counted", Duration::from_secs(1), || {
                proxy.stats().failures_for(Reason::UpstreamConnectRefused) == i + 1
            });
        }
        let s = proxy.stats();
        assert_eq!(s.failures.len(), 1, "exactly one reason: {s:?}");
        proxy.shutdown(Duration::from_secs(1));
    }
}

#[test]
fn connect_timeout_is_reported() {
    // 192.0.2.0/24 (TEST-NET-1) is never routed here... but no packet may leave this machine, so
    // use a listener whose backlog is full instead: SYNs to it are dropped, the connect times out.
    for d in DRIVERS {
        let full =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        full.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        full.listen(0).unwrap();
        let addr = full.local_addr().unwrap().as_socket().unwrap();
        // Fill the backlog (it holds backlog+1 connections).
        let mut fillers = Vec::new();
        for _ in 0..4 {
            if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                fillers.push(s);
            }
        }
        let config = {
            let mut doc = ringside_core::config::ProxyDoc {
                workers: 1,
                driver: d,
                ..Default::default()
            };
            doc.pin_workers = false;
            let mut c =
                ringside_core::Config::forward("127.0.0.1:0".parse().unwrap(), vec![addr], doc)
                    .unwrap();
            c.services[0].connect_timeout = Duration::from_millis(300);
            c
        };
        let proxy = ringside_core::Proxy::start(config).unwrap();
        let start = Instant::now();
        let mut c = connect_retry(proxy.local_addrs()[0], Duration::from_secs(5));
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        let r = c.read(&mut b);
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "took {took:?}"
        );
        let s = proxy.stats();
        assert_eq!(s.failures_for(Reason::UpstreamConnectTimeout), 1, "{s:?}");
        assert_eq!(s.upstream_cx_connect_timeout, 1, "{s:?}");
        proxy.shutdown(Duration::from_secs(1));
        drop(fillers);
    }
}

#[test]
fn round_robin_spreads_evenly() {
    for d in DRIVERS {
        let eps = vec![tagged_server(1), tagged_server(2), tagged_server(3)];
        let proxy = forward(d, eps, |_| {});
        let mut counts = [0usize; 4];
        for _ in 0..30 {
            counts[ask(proxy.local_addrs()[0]).unwrap() as usize] += 1;
        }
        assert_eq!(&counts[1..], &[10, 10, 10]);
        proxy.shutdown(Duration::from_secs(1));
    }
}

#[test]
fn least_connections_avoids_the_busy_endpoint() {
    for d in [DriverKind::Uring, DriverKind::Epoll] {
        let a = echo_server();
        let b = echo_server();
        let config = {
            let doc = ringside_core::config::ProxyDoc {
                workers: 2,
                driver: d,
                ..Default::default()
            };
            let mut c =
                ringside_core::Config::forward("127.0.0.1:0".parse().unwrap(), vec![a, b], doc)
                    .unwrap();
            c.services[0].lb = ringside_core::config::LbPolicy::LeastConnections;
            c
        };
        let proxy = ringside_core::Proxy::start(config).unwrap();
        let paddr = proxy.local_addrs()[0];
        // Hold 5 connections open; least-connections must spread them 3/2 or 2/3, and new short
        // connections then go to the less loaded endpoint.
        let mut held = Vec::new();
        for i in 0..5u8 {
            let mut c = connect_retry(paddr, Duration::from_secs(5));
            c.write_all(&[i]).unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap();
            held.push(c);
        }
        let active = |p: &ringside_core::Proxy| -> Vec<u32> {
            p.clusters()[0].endpoints.iter().map(|e| e.active).collect()
        };
        let mut split = active(&proxy);
        split.sort();
        assert_eq!(split, vec![2, 3], "5 held connections spread 2/3");
        // Close two on the busier endpoint's side by closing all and re-opening a skewed load:
        // hold 3 more; each must go to whichever endpoint has fewer at that moment.
        for i in 0..3u8 {
            let before = active(&proxy);
            let mut c = connect_retry(paddr, Duration::from_secs(5));
            c.write_all(&[i]).unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap();
            let after = active(&proxy);
            let chosen = (0..2)
                .find(|&k| after[k] == before[k] + 1)
                .expect("one endpoint gained");
            assert!(
                before[chosen] <= before[1 - chosen],
                "picked the busier endpoint: {before:?} -> {after:?}"
            );
            held.push(c);
        }
        drop(held);
        wait_for("all closed", Duration::from_secs(5), || {
            active(&proxy) == vec![0, 0]
        });
        proxy.shutdown(Duration::from_millis(200));
    }
}
