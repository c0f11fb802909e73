//! Daemons on a 3-member etcd cluster (real members on loopback, killed by PID): losing one
//! member, even the leader, in the middle of a stream of `apply`s interrupts nothing (every apply
//! succeeds, each stored once and whole); two daemons applying conflicting documents and
//! registering services that need virtual IPs at the same moment, round after round, never hand
//! out an IP twice and never leave half of an apply. (The whole cluster down, with sidecars
//! carrying traffic meanwhile, is in `pods_nodes.rs`.)

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ringside_tests::ctl::Daemon;
use ringside_tests::etcd::EtcdCluster;

/// A daemon on `etcd` with the mesh's CA secret and `extra` arguments.
fn daemon(tag: &str, etcd: &EtcdCluster, extra: &[&str]) -> Daemon {
    let url = etcd.url();
    let secret = etcd.ca_secret();
    let mut args = vec!["--store", &url, "--ca-secret", secret.to_str().unwrap()];
    args.extend_from_slice(extra);
    Daemon::start(
        &format!("ringside-cluster-{tag}-{}", std::process::id()),
        &args,
    )
}

/// Two `ServiceDefaults` of one apply, named after it; `protocol` tells which apply wrote them.
fn pair(a: &str, b: &str, protocol: &str) -> String {
    [a, b]
        .iter()
        .map(|name| {
            format!(
                "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: {name}
spec:
  protocol: {protocol}
"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// `ringctl apply` of `yaml` through `d` from a file named `tag`: (ok, stderr).
fn try_apply(d: &Daemon, tag: &str, yaml: &str) -> (bool, String) {
    let f = d.dir.join(format!("{tag}.yaml"));
    std::fs::write(&f, yaml).unwrap();
    let (ok, _, err) = d.ringctl(&["apply", "-f", f.to_str().unwrap()]);
    (ok, err)
}

/// Every stored document straight from etcd: `Kind/name` -> (protocol, times written).
fn stored_docs(etcd: &EtcdCluster) -> BTreeMap<String, (String, i64)> {
    etcd.read_prefix("/ringside/docs/")
        .into_iter()
        .map(|kv| {
            let doc: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
            let protocol = doc["spec"]["protocol"].as_str().unwrap_or("").to_string();
            let id = kv.key.strip_prefix("/ringside/docs/").unwrap().to_string();
            (id, (protocol, kv.version))
        })
        .collect()
}

/// `Kind/name` of every document, through `d`.
fn config(d: &Daemon) -> BTreeSet<String> {
    d.get_json("config")
        .as_array()
        .expect("a list of documents")
        .iter()
        .map(|v| {
            format!(
                "{}/{}",
                v["kind"].as_str().unwrap(),
                v["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// One etcd member killed (SIGKILL) during a stream of applies, a follower and then the
/// leader: every apply succeeds, none is stored twice (each document written exactly once,
/// read from etcd's own version counter), none half (both documents of each apply there), and
/// the daemon's listing agrees with etcd.
#[test]
fn a_member_killed_during_a_stream_of_applies_interrupts_nothing() {
    let started = Instant::now();
    let mut etcd = EtcdCluster::start();
    let d = daemon("stream", &etcd, &[]);
    let mut next = 0usize;
    let mut failures = Vec::new();
    let mut took = Vec::new();
    // Applies until `until` passes; returns how many.
    let mut stream = |d: &Daemon, until: Instant, failures: &mut Vec<String>| {
        let mut n = 0;
        while Instant::now() < until {
            let i = next;
            next += 1;
            let t = Instant::now();
            let (ok, err) = try_apply(
                d,
                &format!("s{i}"),
                &pair(&format!("s{i}-a"), &format!("s{i}-b"), "tcp"),
            );
            took.push(t.elapsed());
            if !ok {
                failures.push(format!("apply {i}: {err}"));
            }
            n += 1;
        }
        n
    };
    for victim in ["follower", "leader"] {
        let leader = etcd.leader().expect("the cluster has a leader");
        let kill = if victim == "leader" {
            leader
        } else {
            (leader + 1) % 3
        };
        // Applies before, while and after the member dies.
        let killer = {
            let pid = etcd.pid(kill).unwrap();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(800));
                // SAFETY: kill() with the PID of a member this test started and has not reaped
                // (the cluster reaps it below, in `kill`).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                Instant::now()
            })
        };
        let n = stream(&d, Instant::now() + Duration::from_secs(4), &mut failures);
        let ended = Instant::now();
        let killed_at = killer.join().unwrap();
        etcd.kill(kill);
        eprintln!("{victim} m{kill} killed; {n} applies around it");
        assert!(n >= 10, "too few applies around the kill: {n}");
        assert!(killed_at < ended, "the member died after the stream");
        // Two of three still serve: more applies, then the member comes back.
        stream(&d, Instant::now() + Duration::from_secs(1), &mut failures);
        etcd.restart(kill);
    }
    took.sort();
    eprintln!(
        "{next} applies: p50 {:?}, p99 {:?}, max {:?}",
        took[took.len() / 2],
        took[took.len() * 99 / 100],
        took.last().unwrap()
    );
    assert!(
        failures.is_empty(),
        "applies failed while a member was lost:\n{}\n{}",
        failures.join("\n"),
        d.log()
    );

    let stored = stored_docs(&etcd);
    let twice: Vec<_> = stored.iter().filter(|(_, (_, v))| *v != 1).collect();
    assert!(
        twice.is_empty(),
        "documents written more than once: {twice:?}"
    );
    for i in 0..next {
        for half in ["a", "b"] {
            let id = format!("ServiceDefaults/s{i}-{half}");
            assert!(
                stored.contains_key(&id),
                "{id} missing: apply {i} is not whole"
            );
        }
    }
    assert_eq!(stored.len(), 2 * next, "only what was applied");
    let listed = config(&d);
    assert_eq!(listed, stored.keys().cloned().collect::<BTreeSet<_>>());
    eprintln!("took {:?}", started.elapsed());
}

/// Two daemons on the cluster, many rounds: in each, both apply the same two documents with
/// different contents and register services (some under the same names) at the same moment.
/// After each round the two documents are both one daemon's (each apply whole); at the end every
/// service has one virtual IP, no IP is held twice, etcd's `vips/` keys match the services, and
/// both daemons list the same catalog.
#[test]
fn two_daemons_racing_applies_and_virtual_ips_never_collide() {
    const ROUNDS: usize = 12;
    let started = Instant::now();
    let etcd = EtcdCluster::start();
    let a = daemon("race-a", &etcd, &[]);
    let b = daemon("race-b", &etcd, &[]);
    let mut winners = BTreeMap::new();
    for round in 0..ROUNDS {
        let barrier = std::sync::Barrier::new(2);
        let run = |d: &Daemon, me: &str, protocol: &str| {
            barrier.wait();
            let (ok, err) = try_apply(d, &format!("r{round}"), &pair("x", "y", protocol));
            assert!(ok, "{me}'s apply in round {round}: {err}\n{}", d.log());
            for name in [format!("r{round}-{me}"), format!("r{round}-both")] {
                d.ok(&["register", "service", &name, "--port", "80:8080"]);
            }
        };
        std::thread::scope(|s| {
            s.spawn(|| run(&a, "a", "http"));
            s.spawn(|| run(&b, "b", "tcp"));
        });
        let docs = stored_docs(&etcd);
        let (x, y) = (&docs["ServiceDefaults/x"].0, &docs["ServiceDefaults/y"].0);
        assert_eq!(
            x, y,
            "round {round}: half of one apply and half of the other"
        );
        *winners.entry(x.clone()).or_insert(0) += 1;
    }
    eprintln!("last writer per round: {winners:?}");

    let services = a.get_json("services");
    let list: Vec<(String, String)> = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["virtual_ip"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(list.len(), 3 * ROUNDS, "{list:?}");
    let ips: BTreeSet<&String> = list.iter().map(|(_, ip)| ip).collect();
    assert_eq!(
        ips.len(),
        list.len(),
        "a virtual IP handed out twice: {list:?}"
    );
    let vips: BTreeMap<String, String> = etcd
        .read_prefix("/ringside/vips/")
        .into_iter()
        .map(|kv| {
            (
                kv.key.strip_prefix("/ringside/vips/").unwrap().to_string(),
                serde_json::from_slice(&kv.value).unwrap(),
            )
        })
        .collect();
    let held: BTreeMap<String, String> = list
        .iter()
        .map(|(name, ip)| (ip.clone(), name.clone()))
        .collect();
    assert_eq!(
        vips, held,
        "etcd's vips/ keys are the services' IPs, one each"
    );
    let through_b = b.get_json("services");
    assert_eq!(through_b, services, "both daemons list the same catalog");
    eprintln!("took {:?}", started.elapsed());
}
