//! Loom models of the upstream state shared by the workers (`Cluster`): every interleaving of two
//! workers is explored. Run with `RUSTFLAGS="--cfg ringside_loom" cargo test -p ringside-core --test
//! loom_cluster` (scripts/test.sh does).
#![cfg(ringside_loom)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use loom::thread;
use ringside_core::config::Service;
use ringside_core::upstream::Cluster;

fn cluster(now: Instant) -> std::sync::Arc<Cluster> {
    let eps: Vec<SocketAddr> = vec![
        "127.0.0.1:1001".parse().unwrap(),
        "127.0.0.1:1002".parse().unwrap(),
    ];
    let mut s = Service::new("s", eps);
    s.base_ejection = Duration::from_secs(1);
    Cluster::new(s, now)
}

/// After an ejection ends, the endpoint is half-open: of two workers picking at the same moment
/// (another endpoint healthy), at most one gets the half-open one for its trial.
#[test]
fn half_open_lets_one_trial_through() {
    loom::model(|| {
        let now = Instant::now();
        let c = cluster(now);
        c.report_failure(0, now);
        let later = now + Duration::from_secs(5);
        assert!(c.is_half_open(0, later));
        let picks: Vec<_> = (0..2)
            .map(|_| {
                let c = c.clone();
                thread::spawn(move || c.pick(0, later))
            })
            .collect();
        let got: Vec<Option<usize>> = picks.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(got.iter().all(Option::is_some), "{got:?}");
        assert!(
            got.iter().filter(|p| **p == Some(0)).count() <= 1,
            "two trials given: {got:?}"
        );
    });
}

/// Two workers failing to connect at the same moment: both failures count, the endpoint ends
/// ejected, and the ejection counter moved twice.
#[test]
fn concurrent_failures_all_count() {
    loom::model(|| {
        let now = Instant::now();
        let c = cluster(now);
        let ts: Vec<_> = (0..2)
            .map(|_| {
                let c = c.clone();
                thread::spawn(move || {
                    c.report_failure(1, now);
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        assert_eq!(c.endpoints[1].consecutive_failures(), 2);
        assert!(c.is_ejected(1, now));
        assert_eq!(c.ejections.load(Relaxed), 2);
    });
}

/// A success and a failure racing: whichever lands last decides, and the state is never half of
/// each (ejected with no failure counted, or failures counted while not ejected).
#[test]
fn success_and_failure_race_to_a_consistent_state() {
    loom::model(|| {
        let now = Instant::now();
        let c = cluster(now);
        let (a, b) = (c.clone(), c.clone());
        let t1 = thread::spawn(move || a.report_success(0));
        let t2 = thread::spawn(move || {
            b.report_failure(0, now);
        });
        t1.join().unwrap();
        t2.join().unwrap();
        let failures = c.endpoints[0].consecutive_failures();
        let ejected = c.is_ejected(0, now);
        assert!(
            (failures == 0 && !ejected) || (failures >= 1 && ejected),
            "failures {failures}, ejected {ejected}"
        );
    });
}
