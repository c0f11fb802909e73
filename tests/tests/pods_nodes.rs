//! A mesh of two nodes on a 3-member etcd cluster: each node a group of pods on its own bridge,
//! the bridges joined by a router (pods reach each other routed, as across hosts), a
//! `ringctl daemon` per node with its sidecars. A pod on one node calls pods on the other over
//! mesh mTLS; an intention between two services of node A applied through node B's daemon is
//! enforced by node A's sidecars within a second; `ringctl ca rotate` started on node A re-issues every certificate on both
//! nodes while a connection across them keeps flowing; node B's daemon killed with SIGKILL: its
//! proxies' endpoints leave the catalog within the lease TTL and node A's proxies stop choosing
//! them, and they return when it is back. With the whole etcd cluster killed, sidecars keep
//! carrying traffic, `apply` fails naming the store (`store_unreachable`, also in `doctor`), and a
//! change made after etcd is back reaches the sidecars. Needs root.

use std::collections::BTreeSet;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringside_tests::ctl::Daemon;
use ringside_tests::etcd::EtcdCluster;
use ringside_tests::pod::{pods_available, Net, Pod, Router, Sidecar, PROXY_UID};
use ringside_tests::wait_for;

/// The lease TTL of both daemons (short, so the test waits little for it).
const TTL: Duration = Duration::from_secs(3);

const ALLOW: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: products
spec:
  destination:
    name: products
  sources:
    - name: frontend
      action: allow
    - name: batch
      action: allow
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: ledger
spec:
  destination:
    name: ledger
  sources:
    - name: batch
      action: allow
    - name: frontend
      action: allow
";

/// Denies frontend -> ledger: both ends on node A, so A's sidecars alone enforce it.
const DENY_FRONT_LEDGER: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: ledger
spec:
  destination:
    name: ledger
  sources:
    - name: batch
      action: allow
    - name: frontend
      action: deny
";

/// Send `len` bytes from `pod` to `to` and check the echo; `pace` sleeps between 64 KiB chunks.
fn roundtrip_paced(pod: &Pod, to: SocketAddr, len: u64, pace: Duration) -> Result<(), String> {
    pod.enter(move || {
        let s =
            TcpStream::connect_timeout(&to, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            for chunk in data.chunks(64 << 10) {
                std::io::Write::write_all(&mut w, chunk)?;
                if !pace.is_zero() {
                    std::thread::sleep(pace);
                }
            }
            let _ = w.shutdown(Shutdown::Write);
            Ok::<u64, std::io::Error>(xxhash_rust::xxh3::xxh3_64(&data))
        });
        let mut got = Vec::new();
        let mut r = s;
        std::io::Read::read_to_end(&mut r, &mut got).map_err(|e| e.to_string())?;
        let sent = writer.join().unwrap().map_err(|e| e.to_string())?;
        if got.len() as u64 != len || xxhash_rust::xxh3::xxh3_64(&got) != sent {
            return Err(format!("got {} of {len} bytes (or others)", got.len()));
        }
        Ok(())
    })
    .join()
    .unwrap()
}

fn roundtrip(pod: &Pod, to: SocketAddr) -> Result<(), String> {
    roundtrip_paced(pod, to, 10_000, Duration::ZERO)
}

/// One node: its pods' net and its daemon. Fields drop in order: sidecars first.
struct Node {
    sidecars: Vec<(String, Sidecar)>,
    daemon: Daemon,
    net: Net,
}

/// Two nodes on one etcd cluster, routed to each other. Node A: `front` (frontend), `ledger`
/// (ledger), `prod-a` (products); node B: `batch` (batch), `prod-b` (products).
struct Mesh {
    a: Node,
    b: Node,
    _router: Router,
    etcd: EtcdCluster,
    pods: std::collections::HashMap<&'static str, Pod>,
    apps: std::collections::HashMap<&'static str, Arc<AtomicUsize>>,
    products: SocketAddr,
    ledger: SocketAddr,
}

fn daemon(node: &str, net: &Net, etcd: &EtcdCluster, vips: &str) -> Daemon {
    let (url, secret) = (etcd.url(), etcd.ca_secret());
    Daemon::start(
        &format!("{}-{node}", net.id),
        &[
            "--store",
            &url,
            "--ca-secret",
            secret.to_str().unwrap(),
            "--node",
            node,
            "--lease-ttl",
            &format!("{}s", TTL.as_secs()),
            "--vip-range",
            vips,
        ],
    )
}

fn mesh() -> Mesh {
    let etcd = EtcdCluster::start();
    let (mut net_a, mut net_b) = (Net::new(), Net::new());
    let mut pods = std::collections::HashMap::new();
    for (net, names) in [
        (&mut net_a, &["front", "ledger", "prod-a"][..]),
        (&mut net_b, &["batch", "prod-b"][..]),
    ] {
        for n in names {
            pods.insert(*n, net.pod(n));
        }
    }
    let mut router = Router::new(&format!("{}r", net_a.id));
    router.join(&net_a, &[&pods["front"], &pods["ledger"], &pods["prod-a"]]);
    router.join(&net_b, &[&pods["batch"], &pods["prod-b"]]);
    // Virtual IPs in node A's subnet: routed from node B's pods like any of its addresses.
    let vips = format!("{}/29", net_a.virtual_ip(0));
    let da = daemon("node-a", &net_a, &etcd, &vips);
    let db = daemon("node-b", &net_b, &etcd, &vips);
    da.ok(&["register", "service", "products", "--port", "9090:8080"]);
    da.ok(&["register", "service", "ledger", "--port", "9191:8080"]);
    db.ok(&["register", "service", "frontend"]);
    db.ok(&["register", "service", "batch"]);
    db.apply(ALLOW);
    let mut apps = std::collections::HashMap::new();
    for n in ["ledger", "prod-a", "prod-b"] {
        apps.insert(n, pods[n].echo_app("127.0.0.1:8080".parse().unwrap()));
    }
    let start = |d: &Daemon, pod: &Pod, service: &str| {
        pod.install_redirect(&[]);
        let args = d.sidecar_args_tagged(service, IpAddr::V4(pod.ip4), PROXY_UID, &pod.short);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (
            pod.short.clone(),
            Sidecar::start_with(pod, "sidecar: {}\nproxy:\n  stats_interval: 1s\n", &args),
        )
    };
    let a_sidecars = vec![
        start(&da, &pods["front"], "frontend"),
        start(&da, &pods["ledger"], "ledger"),
        start(&da, &pods["prod-a"], "products"),
    ];
    let b_sidecars = vec![
        start(&db, &pods["batch"], "batch"),
        start(&db, &pods["prod-b"], "products"),
    ];
    let vip = |name: &str, port: u16| {
        let services = da.get_json("services");
        let ip: IpAddr = services
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .and_then(|s| s["virtual_ip"].as_str())
            .unwrap()
            .parse()
            .unwrap();
        SocketAddr::new(ip, port)
    };
    let (products, ledger) = (vip("products", 9090), vip("ledger", 9191));
    Mesh {
        a: Node {
            sidecars: a_sidecars,
            daemon: da,
            net: net_a,
        },
        b: Node {
            sidecars: b_sidecars,
            daemon: db,
            net: net_b,
        },
        _router: router,
        etcd,
        pods,
        apps,
        products,
        ledger,
    }
}

impl Mesh {
    fn logs(&self) -> String {
        let mut s = String::new();
        for (name, node) in [("A", &self.a), ("B", &self.b)] {
            s.push_str(&format!("daemon {name}:\n{}\n", node.daemon.log()));
            for (pod, sc) in &node.sidecars {
                s.push_str(&format!("sidecar {pod}:\n{}\n", sc.log_text()));
            }
        }
        s
    }

    fn sidecar(&self, pod: &str) -> &Sidecar {
        self.a
            .sidecars
            .iter()
            .chain(&self.b.sidecars)
            .find(|(p, _)| p == pod)
            .map(|(_, s)| s)
            .unwrap()
    }

    fn served(&self, app: &str) -> usize {
        self.apps[app].load(Ordering::SeqCst)
    }

    /// Retry until a connection from `pod` to `to` passes.
    fn until_ok(&self, pod: &str, to: SocketAddr, within: Duration) {
        let start = Instant::now();
        while let Err(e) = roundtrip(&self.pods[pod], to) {
            assert!(
                start.elapsed() < within,
                "{pod} -> {to}: no connection within {within:?}: {e}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `n` connections from front to products: how many each products pod served.
    fn spread(&self, n: usize) -> (usize, usize) {
        let (a0, b0) = (self.served("prod-a"), self.served("prod-b"));
        for _ in 0..n {
            roundtrip(&self.pods["front"], self.products)
                .unwrap_or_else(|e| panic!("front -> products: {e}\n{}", self.logs()));
        }
        (self.served("prod-a") - a0, self.served("prod-b") - b0)
    }

    /// The endpoint addresses of `service`, as daemon `d` lists them.
    fn endpoints(d: &Daemon, service: &str) -> BTreeSet<String> {
        d.get_json("endpoints")
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["service"] == service)
            .map(|e| e["address"].as_str().unwrap().to_string())
            .collect()
    }
}

/// The proxies' (id, node, certificate issuer, generation) through `d`.
fn proxies(d: &Daemon) -> Vec<(String, String, String, u64)> {
    d.get_json("proxies")
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_string(),
                p["node"].as_str().unwrap_or("").to_string(),
                p["cert_issuer"].as_str().unwrap_or("").to_string(),
                p["cert_generation"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn two_nodes_on_one_etcd_are_one_mesh() {
    if !pods_available("two_nodes_on_one_etcd_are_one_mesh") {
        return;
    }
    let started = Instant::now();
    let mut m = mesh();
    eprintln!("two nodes up in {:?}", started.elapsed());

    // Across nodes over mTLS: front (A) reaches both products pods, one of them on B; batch
    // (B) reaches ledger (A).
    m.until_ok("front", m.products, Duration::from_secs(10));
    m.until_ok("batch", m.ledger, Duration::from_secs(10));
    wait_for(
        "front reaches prod-b on node B",
        Duration::from_secs(10),
        || m.spread(4).1 > 0,
    );
    let (to_a, to_b) = m.spread(20);
    assert!(
        to_a > 0 && to_b > 0,
        "both nodes' products pods: {to_a}/{to_b}"
    );
    let prod_b = m.sidecar("prod-b").log_text();
    assert!(
        prod_b.contains("certificate issued by the control daemon"),
        "{prod_b}"
    );
    // One mesh: both daemons list the five proxies, each with its node.
    let listed = proxies(&m.a.daemon);
    assert_eq!(listed.len(), 5, "{listed:?}");
    let nodes: BTreeSet<&str> = listed.iter().map(|p| p.1.as_str()).collect();
    assert_eq!(nodes, BTreeSet::from(["node-a", "node-b"]), "{listed:?}");
    // `why` on node A about a pod that is not on this host names the node its sidecar reports to.
    let (ok, out, err) = m.a.daemon.ringctl(&[
        "why",
        "batch",
        "ledger:9191",
        "--src-netns",
        "rs-pod-on-another-host",
    ]);
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains("not on this host") && err.contains("node node-b"),
        "{out}{err}"
    );

    // `ca rotate` started on node A: every certificate on both nodes re-issued from the new
    // root while a connection from B to A keeps flowing.
    let (batch, ledger) = (m.pods["batch"].clone(), m.ledger);
    let long = std::thread::spawn(move || {
        roundtrip_paced(&batch, ledger, 12 << 20, Duration::from_millis(40))
    });
    std::thread::sleep(Duration::from_millis(500));
    let rotating = Instant::now();
    let out = m.a.daemon.ok(&["ca", "rotate", "--timeout", "60s"]);
    assert!(out.contains("3/3"), "{out}");
    eprintln!("ca rotate across nodes took {:?}", rotating.elapsed());
    let after = proxies(&m.b.daemon);
    assert!(
        after.iter().all(|p| p.2.contains("(root-") && p.3 >= 1),
        "every leaf, on both nodes, from the new root: {after:?}"
    );
    assert!(
        !long.is_finished(),
        "the transfer must span the rollover (make it longer)"
    );
    long.join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the connection across nodes dropped: {e}\n{}", m.logs()));
    m.until_ok("front", m.products, Duration::from_secs(5));

    // An intention applied through B's daemon between two services of node A: A's sidecars
    // enforce it within a second.
    m.until_ok("front", m.ledger, Duration::from_secs(5));
    let served = m.served("ledger");
    m.b.daemon.apply(DENY_FRONT_LEDGER);
    let applied = Instant::now();
    while roundtrip(&m.pods["front"], m.ledger).is_ok() {
        assert!(
            applied.elapsed() < Duration::from_secs(1),
            "front still reaches ledger 1 s after the deny was applied on B\n{}",
            m.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "deny applied on B in force on A after {:?}",
        applied.elapsed()
    );
    // A connection the app accepted just before the deny (and the sidecar then closed) may
    // still be counting: the count settles first.
    std::thread::sleep(Duration::from_millis(300));
    let denied = m.served("ledger");
    assert!(roundtrip(&m.pods["front"], m.ledger).is_err());
    assert_eq!(m.served("ledger"), denied, "nothing denied reaches the app");
    assert!(denied >= served);
    wait_for(
        "the reason in node A's logs",
        Duration::from_secs(5),
        || {
            ["front", "ledger"].iter().any(|p| {
                let log = m.sidecar(p).log_text();
                log.contains("intention_denied") && log.contains("frontend -> ledger")
            })
        },
    );
    roundtrip(&m.pods["batch"], m.ledger).unwrap_or_else(|e| panic!("{e}\n{}", m.logs()));

    // B's daemon SIGKILLed: its proxies' endpoints leave the catalog within the TTL, and A's
    // proxies stop choosing them (the pods themselves still run).
    let (ip_a, ip_b) = (
        m.pods["prod-a"].ip4.to_string(),
        m.pods["prod-b"].ip4.to_string(),
    );
    let both = BTreeSet::from([ip_a.clone(), ip_b.clone()]);
    assert_eq!(Mesh::endpoints(&m.a.daemon, "products"), both);
    m.b.daemon.kill9();
    let killed = Instant::now();
    wait_for(
        "prod-b's endpoint leaves the catalog",
        TTL + Duration::from_secs(5),
        || Mesh::endpoints(&m.a.daemon, "products") == BTreeSet::from([ip_a.clone()]),
    );
    eprintln!(
        "B's endpoints gone {:?} after its SIGKILL",
        killed.elapsed()
    );
    assert!(!Mesh::endpoints(&m.a.daemon, "batch").contains(&m.pods["batch"].ip4.to_string()));
    // Once front's sidecar has the catalog without it, no connection goes to prod-b.
    wait_for(
        "front stops choosing prod-b",
        Duration::from_secs(5),
        || m.spread(6).1 == 0,
    );
    let (to_a, to_b) = m.spread(20);
    assert_eq!((to_a, to_b), (20, 0), "front chose a node B endpoint");

    // B restarted: its proxies report again and their endpoints return.
    m.b.daemon.restart();
    let restarted = Instant::now();
    wait_for("prod-b's endpoint returns", Duration::from_secs(25), || {
        Mesh::endpoints(&m.a.daemon, "products") == both
    });
    eprintln!(
        "B's endpoints back {:?} after its restart",
        restarted.elapsed()
    );
    wait_for("front chooses prod-b again", Duration::from_secs(5), || {
        m.spread(6).1 > 0
    });
    let _ = &m.b.net;
    let _ = &m.a.net;
    m.etcd.leader().expect("the cluster still has a leader");
    eprintln!("took {:?}", started.elapsed());
}

#[test]
fn sidecars_keep_serving_while_the_whole_etcd_cluster_is_down() {
    if !pods_available("sidecars_keep_serving_while_the_whole_etcd_cluster_is_down") {
        return;
    }
    let started = Instant::now();
    let mut m = mesh();
    m.until_ok("front", m.products, Duration::from_secs(10));
    m.until_ok("batch", m.ledger, Duration::from_secs(10));
    m.until_ok("front", m.ledger, Duration::from_secs(10));
    // A connection held open across the outage.
    let (front, products) = (m.pods["front"].clone(), m.products);
    let long = std::thread::spawn(move || {
        roundtrip_paced(&front, products, 8 << 20, Duration::from_millis(60))
    });

    m.etcd.kill_all();
    let down = Instant::now();
    // Sidecars carry traffic, across nodes too.
    for _ in 0..5 {
        m.spread(4);
        roundtrip(&m.pods["batch"], m.ledger).unwrap_or_else(|e| panic!("{e}\n{}", m.logs()));
        std::thread::sleep(Duration::from_millis(300));
    }
    // Writes fail naming the store, through either daemon.
    let f = m.a.daemon.dir.join("deny.yaml");
    std::fs::write(&f, DENY_FRONT_LEDGER).unwrap();
    for d in [&m.a.daemon, &m.b.daemon] {
        let (ok, _, err) = d.ringctl(&["apply", "-f", f.to_str().unwrap()]);
        assert!(!ok, "apply succeeded with etcd down");
        assert!(
            err.contains("store_unreachable") && err.contains("etcd at 127.0.0.1:"),
            "{err}"
        );
        let (ok, out, _) = d.ringctl(&["doctor"]);
        assert!(
            !ok && out.contains("FAIL") && out.contains("store_unreachable"),
            "{out}"
        );
    }
    assert!(
        down.elapsed() < Duration::from_secs(30),
        "{:?}",
        down.elapsed()
    );
    // Still serving after a few seconds of outage.
    let (to_a, to_b) = m.spread(10);
    assert_eq!(to_a + to_b, 10);
    roundtrip(&m.pods["batch"], m.ledger).unwrap_or_else(|e| panic!("{e}\n{}", m.logs()));

    m.etcd.restart_all();
    eprintln!("etcd down for {:?}", down.elapsed());
    // The state catches up: the apply goes through, and the sidecars on A enforce it.
    let d = &m.a.daemon;
    wait_for("apply works again", Duration::from_secs(30), || {
        d.ringctl(&["apply", "-f", f.to_str().unwrap()]).0
    });
    let applied = Instant::now();
    while roundtrip(&m.pods["front"], m.ledger).is_ok() {
        assert!(
            applied.elapsed() < Duration::from_secs(5),
            "the deny applied after etcd came back does not reach A's sidecars\n{}",
            m.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("deny in force {:?} after apply", applied.elapsed());
    // B's daemon catches up too, once its watch is back (it has no write of its own to make).
    wait_for(
        "node B's daemon sees the store again",
        Duration::from_secs(15),
        || {
            !m.b.daemon
                .ringctl(&["doctor"])
                .1
                .contains("store_unreachable")
        },
    );
    long.join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the connection held across the outage: {e}\n{}", m.logs()));
    m.spread(4);
    eprintln!("took {:?}", started.elapsed());
}
