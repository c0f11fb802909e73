//! Consul documents in effect, between sidecars in pods configured by the control daemon:
//! `mutualTLSMode` switching a service between permissive and strict, `localConnectTimeoutMs`
//! on a stuck application, `maxInboundConnections` (inbound only: the pod's outbound calls go on),
//! `upstreamConfig` `connectTimeoutMs` on an upstream that never accepts and
//! `limits.maxConnections`, `ServiceResolver` failover (HTTP and TCP), and
//! `localRequestTimeoutMs` on a slow application. Needs root.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use ringside_tests::ctl::Daemon;
use ringside_tests::http::{serve, Client};
use ringside_tests::pod::{pods_available, Net, Pod, Sidecar, PROXY_UID};

const DOCS: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: from-frontend
spec:
  destination:
    name: '*'
  sources:
    - name: frontend
      action: allow
    - name: api
      action: allow
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: api
spec:
  protocol: tcp
  mutualTLSMode: permissive
  maxInboundConnections: 2
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: web
spec:
  protocol: http
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: web-dr
spec:
  protocol: http
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceResolver
metadata:
  name: web
spec:
  connectTimeout: 2s
  failover:
    '*':
      targets:
        - service: web-dr
";

/// Send a line and read its echo within 3 s.
fn echo(s: &mut TcpStream) -> Result<(), String> {
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(b"ping\n").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).map_err(|e| e.to_string())?;
    (&buf == b"ping\n")
        .then_some(())
        .ok_or_else(|| format!("got {buf:?}"))
}

/// A connection from `pod` to `to` that echoed once, kept open.
fn open(pod: &Pod, to: SocketAddr) -> Result<TcpStream, String> {
    pod.enter(move || {
        let mut s =
            TcpStream::connect_timeout(&to, Duration::from_secs(3)).map_err(|e| e.to_string())?;
        echo(&mut s)?;
        Ok(s)
    })
    .join()
    .unwrap()
}

/// From `pod`, connect to `to`, send a byte and wait for the connection to end: how long it took.
fn time_to_close(pod: &Pod, to: SocketAddr) -> Duration {
    pod.enter(move || {
        let start = Instant::now();
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = s.write_all(b"x");
        let mut buf = [0u8; 16];
        let _ = s.read(&mut buf);
        start.elapsed()
    })
    .join()
    .unwrap()
}

fn until(what: &str, within: Duration, logs: impl Fn() -> String, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < within,
            "{what}: not within {within:?}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An application that never accepts: its accept queue (backlog 0) is full, so connects to it
/// hang until the connector gives up. The listener and the connections filling it stay open.
fn stuck_app(pod: &Pod, port: u16) -> (TcpListener, Vec<TcpStream>) {
    pod.enter(move || {
        let l = TcpListener::bind(("0.0.0.0", port)).unwrap();
        // SAFETY: listen(2) on a socket this closure owns; it only shrinks the accept queue.
        let r = unsafe { libc::listen(l.as_raw_fd(), 0) };
        assert_eq!(r, 0, "listen: {}", std::io::Error::last_os_error());
        let to: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut fill = Vec::new();
        while let Ok(s) = TcpStream::connect_timeout(&to, Duration::from_millis(300)) {
            fill.push(s);
            assert!(fill.len() < 16, "the accept queue does not fill");
        }
        (l, fill)
    })
    .join()
    .unwrap()
}

fn vip(daemon: &Daemon, name: &str) -> IpAddr {
    daemon
        .get_json("services")
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["virtual_ip"].as_str())
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn consul_documents_take_effect_in_pods() {
    if !pods_available("consul_documents_take_effect_in_pods") {
        return;
    }
    let mut net = Net::new();
    let front = net.pod("front");
    let api = net.pod("api");
    let slow = net.pod("slow");
    let dr = net.pod("webdr");
    let outsider = net.pod("out");
    let range = format!("{}/28", net.virtual_ip(0));
    let daemon = Daemon::start(&net.id, &["--vip-range", &range]);
    daemon.ok(&["register", "service", "api", "--port", "9090:8080"]);
    daemon.ok(&["register", "service", "slow", "--port", "7000:7000"]);
    daemon.ok(&["register", "service", "web", "--port", "80:8080"]);
    daemon.ok(&["register", "service", "web-dr", "--port", "80:8080"]);
    daemon.ok(&["register", "service", "frontend"]);
    // An upstream whose one endpoint (outside the mesh) never accepts.
    daemon.ok(&["register", "service", "stuck", "--port", "7100:7100"]);
    let out_ip = outsider.ip4.to_string();
    daemon.ok(&["register", "endpoint", "stuck", &out_ip, "--node", "n1"]);
    daemon.apply(DOCS);
    for p in [&front, &api, &slow, &dr] {
        p.install_redirect(&[]);
    }
    api.echo_app("0.0.0.0:8080".parse().unwrap());
    let _stuck = stuck_app(&slow, 7000);
    let _stuck_upstream = stuck_app(&outsider, 7100);
    dr.enter(|| serve("web-dr-app", "127.0.0.1:8080".parse().unwrap()))
        .join()
        .unwrap();
    let mut sidecars = Vec::new();
    for (pod, service) in [
        (&api, "api"),
        (&slow, "slow"),
        (&dr, "web-dr"),
        (&front, "frontend"),
    ] {
        let args = daemon.sidecar_args(service, IpAddr::V4(pod.ip4), PROXY_UID);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sidecars.push(Sidecar::start_with(pod, "sidecar: {}\n", &args));
    }
    let logs = || {
        let mut s = format!("daemon:\n{}\n", daemon.log());
        for sc in &sidecars {
            s.push_str(&format!("----\n{}\n", sc.log_text()));
        }
        s
    };
    let api_vip = SocketAddr::new(vip(&daemon, "api"), 9090);
    let slow_vip = SocketAddr::new(vip(&daemon, "slow"), 7000);
    let web_url = format!("http://{}:80", vip(&daemon, "web"));
    let wait = Duration::from_secs(15);

    // 1. mutualTLSMode: permissive lets plaintext from outside the mesh reach api on its
    // strict sidecar; strict, applied later, refuses it while mesh callers go on.
    until("mesh call to api", wait, logs, || {
        open(&front, api_vip).is_ok()
    });
    until("permissive plaintext to api", wait, logs, || {
        open(&outsider, api.addr4(9090)).is_ok()
    });
    daemon.apply(&DOCS.replace("mutualTLSMode: permissive", "mutualTLSMode: strict"));
    until("strict refuses plaintext", wait, logs, || {
        open(&outsider, api.addr4(9090)).is_err()
    });
    open(&front, api_vip).unwrap_or_else(|e| panic!("mesh call in strict mode: {e}\n{}", logs()));

    // 2. maxInboundConnections: 2 held open, the third is closed at accept, and once one
    // closes a new one passes.
    let a = open(&front, api_vip).unwrap_or_else(|e| panic!("first: {e}\n{}", logs()));
    let b = open(&front, api_vip).unwrap_or_else(|e| panic!("second: {e}\n{}", logs()));
    let third = open(&front, api_vip);
    assert!(
        third.is_err(),
        "a third inbound connection passed\n{}",
        logs()
    );
    // The cap is inbound's: api's own outbound calls go on while its inbound is full.
    let dr_url = format!("http://{}:80/from-api", vip(&daemon, "web-dr"));
    for i in 0..3 {
        let u = dr_url.clone();
        let r = api.enter(move || Client::new().get(&u)).join().unwrap();
        assert!(
            r.as_ref()
                .is_ok_and(|r| r.status == 200 && r.header("x-server") == "web-dr-app"),
            "outbound call {i} from api while its inbound is at the cap: {r:?}\n{}",
            logs()
        );
    }
    assert!(
        open(&front, api_vip).is_err(),
        "the inbound cap no longer holds\n{}",
        logs()
    );
    drop(a);
    until("a connection after one closed", wait, logs, || {
        open(&front, api_vip).is_ok()
    });
    drop(b);

    // 3. localConnectTimeoutMs: the default gives the stuck app 2 s per address tried; 300 ms
    // set by the document ends the caller's connection well before one default timeout.
    let before = time_to_close(&front, slow_vip);
    assert!(
        before >= Duration::from_millis(1900),
        "{before:?}\n{}",
        logs()
    );
    daemon.apply(&format!(
        "{DOCS}---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: slow
spec:
  protocol: tcp
  localConnectTimeoutMs: 300
"
    ));
    let mut after = Duration::MAX;
    until(
        "the local connect timeout",
        Duration::from_secs(30),
        logs,
        || {
            after = time_to_close(&front, slow_vip);
            after < Duration::from_millis(1500)
        },
    );
    println!("stuck local app: caller closed after {before:?} by default, {after:?} with localConnectTimeoutMs 300");

    // 4. upstreamConfig: frontend's override for stuck sets the connect timeout its sidecar
    // uses (default 5 s).
    let stuck_vip = SocketAddr::new(vip(&daemon, "stuck"), 7100);
    let before = time_to_close(&front, stuck_vip);
    assert!(
        before >= Duration::from_millis(4900),
        "{before:?}\n{}",
        logs()
    );
    daemon.apply(&format!(
        "{DOCS}---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: frontend
spec:
  upstreamConfig:
    overrides:
      - name: stuck
        connectTimeoutMs: 300
      - name: api
        limits:
          maxConnections: 1
"
    ));
    let mut after = Duration::MAX;
    until(
        "the upstream connect timeout",
        Duration::from_secs(30),
        logs,
        || {
            after = time_to_close(&front, stuck_vip);
            after < Duration::from_millis(1500)
        },
    );
    assert!(
        after >= Duration::from_millis(250),
        "{after:?}: no connect was waited for"
    );
    println!("upstream that never accepts: caller closed after {before:?} by default, {after:?} with connectTimeoutMs 300");

    // And its limit on api: one connection open at once from this caller.
    let a = open(&front, api_vip).unwrap_or_else(|e| panic!("first: {e}\n{}", logs()));
    assert!(
        open(&front, api_vip).is_err(),
        "a second connection passed maxConnections 1\n{}",
        logs()
    );
    drop(a);
    until("a connection after the first closed", wait, logs, || {
        open(&front, api_vip).is_ok()
    });

    // 5. Failover: web has no endpoint; its resolver sends requests to web-dr.
    let mut served = String::new();
    until("failover to web-dr", wait, logs, || {
        let u = format!("{web_url}/x");
        served = front
            .enter(move || Client::new().get(&u).map(|r| r.header("x-server")))
            .join()
            .unwrap()
            .unwrap_or_default();
        served == "web-dr-app"
    });

    // 6. localRequestTimeoutMs: web-dr's app takes 1 s; by default that is answered, with 300 ms
    // set the destination sidecar answers 504 upstream_request_timeout.
    let slow_url = format!("http://{}:80/slow/1000", vip(&daemon, "web-dr"));
    let get = |pod: &Pod, url: String| pod.enter(move || Client::new().get(&url)).join().unwrap();
    let r = get(&front, slow_url.clone()).unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert_eq!(r.status, 200, "{r:?}");
    daemon.apply(&DOCS.replace(
        "  name: web-dr\nspec:\n  protocol: http\n",
        "  name: web-dr\nspec:\n  protocol: http\n  localRequestTimeoutMs: 300\n",
    ));
    let mut last = None;
    until("the local request timeout", wait, logs, || {
        let r = get(&front, slow_url.clone());
        let timed_out = r.as_ref().is_ok_and(|r| {
            r.status == 504 && r.header("x-ringside-reason") == "upstream_request_timeout"
        });
        last = Some(r);
        timed_out
    });

    // 7. Failover for TCP too (as Consul does it): db has no endpoint; its resolver sends new
    // connections to api, over mesh mTLS with api's identity, and they echo.
    daemon.ok(&["register", "service", "db", "--port", "5432:5432"]);
    let db_vip = SocketAddr::new(vip(&daemon, "db"), 5432);
    assert!(
        open(&front, db_vip).is_err(),
        "db has no endpoint and no failover yet\n{}",
        logs()
    );
    daemon.apply(&format!(
        "{DOCS}---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: db
spec:
  protocol: tcp
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceResolver
metadata:
  name: db
spec:
  failover:
    '*':
      targets:
        - service: api
"
    ));
    until("TCP failover to api", wait, logs, || {
        open(&front, db_vip).is_ok()
    });
}
