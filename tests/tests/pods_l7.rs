//! The L7 path between sidecars in pods, configured by the control daemon: an HTTP service
//! (declared with ServiceDefaults) over mesh mTLS with the caller's identity passed to the app,
//! an intention deny answered with 403 and its reason, an undeclared server-first service that is
//! never held, and a service declared http whose app does not speak HTTP. Needs root.

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ringside_tests::ctl::Daemon;
use ringside_tests::http::{serve, Client, Got};
use ringside_tests::pod::{pods_available, Net, Pod, Sidecar, PROXY_UID};

const DEFAULTS: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: web
spec:
  protocol: http
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: banner
spec:
  protocol: http
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: web
spec:
  destination:
    name: web
  sources:
    - name: frontend
      action: allow
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: all-from-frontend
spec:
  destination:
    name: '*'
  sources:
    - name: frontend
      action: allow
";

const L7_DOCS: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceResolver
metadata:
  name: web
spec:
  defaultSubset: v1
  subsets:
    v1:
      filter: Service.Meta.version != v2
    v2:
      filter: Service.Meta.version == v2
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: web-v2
spec:
  protocol: http
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceSplitter
metadata:
  name: web
spec:
  splits:
    - weight: 75
    - weight: 25
      service: web-v2
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceRouter
metadata:
  name: web
spec:
    routes:
    - match:
        http:
          header:
            - name: x-version
              exact: \"2\"
      destination:
        serviceSubset: v2
    - match:
        http:
          pathPrefix: /v2/
      destination:
        service: web-v2
        prefixRewrite: /
    - match:
        http:
          header:
            - name: x-canary
              present: true
      destination:
        service: web-v2
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: web-v2
spec:
  destination:
    name: web-v2
  sources:
    - name: frontend
      permissions:
        - action: deny
          http:
            pathPrefix: /admin
        - action: allow
          http:
            pathPrefix: /
            methods: [GET]
";

fn get(pod: &Pod, url: String) -> Result<Got, String> {
    pod.enter(move || Client::new().get(&url)).join().unwrap()
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
fn http_between_sidecars_over_mtls() {
    if !pods_available("http_between_sidecars_over_mtls") {
        return;
    }
    let mut net = Net::new();
    let front = net.pod("front");
    let web = net.pod("web");
    let mail = net.pod("mail");
    let ssh = net.pod("ssh");
    let web2 = net.pod("web2");
    let webb = net.pod("webb");
    let range = format!("{}/29", net.virtual_ip(0));
    let daemon = Daemon::start(&net.id, &["--vip-range", &range]);
    daemon.ok(&["register", "service", "web", "--port", "80:8080"]);
    daemon.ok(&["register", "service", "mail", "--port", "2525:2525"]);
    daemon.ok(&["register", "service", "banner", "--port", "22:2222"]);
    daemon.ok(&["register", "service", "frontend"]);
    daemon.apply(DEFAULTS);
    daemon.ok(&["register", "service", "web-v2", "--port", "80:8080"]);
    daemon.apply(L7_DOCS);
    for p in [&front, &web, &mail, &ssh, &web2, &webb] {
        p.install_redirect(&[]);
    }
    // Apps: an HTTP server, a server-first protocol (greets, then echoes a line), and something
    // that is not HTTP behind a service declared http.
    web.enter(|| serve("web-app", "127.0.0.1:8080".parse().unwrap()))
        .join()
        .unwrap();
    web2.enter(|| serve("web-v2-app", "127.0.0.1:8080".parse().unwrap()))
        .join()
        .unwrap();
    webb.enter(|| serve("web-b-app", "127.0.0.1:8080".parse().unwrap()))
        .join()
        .unwrap();
    mail.enter(|| {
        let l = std::net::TcpListener::bind("0.0.0.0:2525").unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let mut s = s;
                let _ = std::io::Write::write_all(&mut s, b"220 mail ESMTP ready\r\n");
            }
        });
    })
    .join()
    .unwrap();
    ssh.enter(|| {
        let l2 = std::net::TcpListener::bind("127.0.0.1:2222").unwrap();
        std::thread::spawn(move || {
            for s in l2.incoming().flatten() {
                let mut s = s;
                let _ = std::io::Write::write_all(&mut s, b"SSH-2.0-OpenSSH_9.2\r\n");
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    })
    .join()
    .unwrap();
    let mut sidecars = Vec::new();
    let mut sidecars_b = Vec::new();
    // A second endpoint of web, marked version v2 (a ServiceResolver subset selects it).
    {
        let mut args = daemon.sidecar_args_tagged("web", IpAddr::V4(webb.ip4), PROXY_UID, "web-b");
        args.extend(["--meta".to_string(), "version=v2".to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sidecars_b.push(Sidecar::start_with(&webb, "sidecar: {}\n", &args));
    }
    for (pod, service) in [
        (&web2, "web-v2"),
        (&ssh, "banner"),
        (&web, "web"),
        (&mail, "mail"),
        (&front, "frontend"),
    ] {
        let args = daemon.sidecar_args(service, IpAddr::V4(pod.ip4), PROXY_UID);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sidecars.push(Sidecar::start_with(pod, "sidecar: {}\n", &args));
    }
    let logs = |sc: &[Sidecar]| {
        sc.iter()
            .map(|s| s.log_text())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    let web_url = format!("http://{}", SocketAddr::new(vip(&daemon, "web"), 80));

    // HTTP over mTLS: the app sees the caller's verified identity.
    let start = Instant::now();
    let r = loop {
        match get(&front, format!("{web_url}/hello")) {
            Ok(r) if r.status == 200 => break r,
            other if start.elapsed() > Duration::from_secs(10) => {
                panic!("{other:?}\n{}", logs(&sidecars))
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let t = r.text();
    // (The splitter sends a quarter of the requests to web-v2.)
    assert!(
        t.contains("server: web-app") || t.contains("server: web-v2-app"),
        "{t}"
    );
    assert!(
        t.contains("x-forwarded-client-cert: URI=spiffe://dc1/ns/default/sa/frontend"),
        "{t}"
    );
    assert!(
        t.contains("x-request-id: ") && !t.contains("x-request-id: \n"),
        "{t}"
    );
    for _ in 0..20 {
        assert_eq!(get(&front, format!("{web_url}/x")).unwrap().status, 200);
    }

    // ServiceSplitter: 75/25 between web and web-v2 (400 requests: 25 % is 100 +- 35 at 4 sd).
    let (tx, rx) = std::sync::mpsc::channel();
    let url = format!("{web_url}/split");
    front.enter(move || {
        let c = Client::new();
        let v2 = (0..400)
            .filter(|_| c.get(&url).unwrap().header("x-server") == "web-v2-app")
            .count();
        tx.send(v2).unwrap();
    });
    let v2 = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(
        (65..=135).contains(&v2),
        "{v2} of 400 requests went to web-v2 (25 % expected)"
    );

    // ServiceResolver subsets: web's default subset (version v1, or unmarked) never reaches the
    // endpoint marked v2; the x-version header routes to subset v2, which only it serves.
    let from = |pod: &Pod, url: String, headers: Vec<(&'static str, &'static str)>| {
        pod.enter(move || {
            let c = Client::new();
            (0..30)
                .map(|_| {
                    c.send("GET", &url, &headers, Vec::new())
                        .unwrap()
                        .header("x-server")
                })
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap()
    };
    let plain = from(&front, format!("{web_url}/s"), vec![]);
    assert!(!plain.iter().any(|s| s == "web-b-app"), "{plain:?}");
    let v2 = from(&front, format!("{web_url}/s"), vec![("x-version", "2")]);
    assert!(v2.iter().all(|s| s == "web-b-app"), "{v2:?}");

    // ServiceRouter: /v2/ goes to web-v2 with the prefix rewritten; a header routes too.
    let r = get(&front, format!("{web_url}/v2/items")).unwrap();
    assert_eq!(r.header("x-server"), "web-v2-app", "{r:?}");
    let r = front
        .enter({
            let u = format!("{web_url}/plain");
            move || Client::new().send("GET", &u, &[("x-canary", "1")], Vec::new())
        })
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(r.header("x-server"), "web-v2-app", "{r:?}");

    // L7 permissions on web-v2: GET allowed, /admin denied, other methods denied.
    let r = get(&front, format!("{web_url}/v2/admin/users")).unwrap();
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("x-ringside-reason"), "request_denied");
    assert!(r.text().contains("frontend -> web-v2"), "{}", r.text());
    let r = front
        .enter({
            let u = format!("{web_url}/v2/items");
            move || Client::new().send("POST", &u, &[], b"x".to_vec())
        })
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.text().contains("no permission matches"), "{}", r.text());

    // Deny: 403 with the reason, from the source sidecar.
    daemon.apply(&DEFAULTS.replace(
        "    - name: frontend\n      action: allow\n---\napiVersion: consul.hashicorp.com/v1alpha1\nkind: ServiceIntentions\nmetadata:\n  name: all",
        "    - name: frontend\n      action: deny\n---\napiVersion: consul.hashicorp.com/v1alpha1\nkind: ServiceIntentions\nmetadata:\n  name: all",
    ));
    let start = Instant::now();
    let denied = loop {
        let r = get(&front, format!("{web_url}/x")).unwrap();
        if r.status == 403 {
            break r;
        }
        assert!(start.elapsed() < Duration::from_secs(2), "{r:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    // A kept-alive connection gets the destination's per-request answer, a new one the TLS
    // refusal; both say who decided.
    assert!(
        ["intention_denied", "denied_by_destination"]
            .contains(&denied.header("x-ringside-reason").as_str()),
        "{denied:?}"
    );
    assert!(
        denied.header("x-ringside-reason") != "intention_denied"
            || denied.text().contains("frontend -> web"),
        "{}",
        denied.text()
    );

    // A server-first protocol on an undeclared service: the greeting arrives (held no longer than
    // the detection time).
    let mail_addr = SocketAddr::new(vip(&daemon, "mail"), 2525);
    let greeting = front
        .enter(move || {
            let mut s = TcpStream::connect_timeout(&mail_addr, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let t = Instant::now();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap();
            (String::from_utf8_lossy(&buf[..n]).into_owned(), t.elapsed())
        })
        .join()
        .unwrap();
    assert!(greeting.0.starts_with("220 mail"), "{greeting:?}");
    assert!(
        greeting.1 < Duration::from_secs(1),
        "held for {:?}",
        greeting.1
    );

    // Declared http, but the app is not HTTP: protocol_mismatch, with the hint.
    let banner_url = format!("http://{}", SocketAddr::new(vip(&daemon, "banner"), 22));
    let r = get(&front, format!("{banner_url}/")).unwrap();
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(
        r.header("x-ringside-reason"),
        "protocol_mismatch",
        "{}",
        r.text()
    );
    assert!(r.text().contains("declare it tcp"), "{}", r.text());

    let front_counters = sidecars.pop().unwrap().stop();
    assert!(front_counters["http_rq_total"] >= 22, "{front_counters:?}");
    assert_eq!(
        front_counters["protocol_detect_timeout"], 1,
        "{front_counters:?}"
    );
    let _mail = sidecars.pop().unwrap().stop();
    let web_counters = sidecars.pop().unwrap().stop();
    assert!(web_counters["http_rq_total"] >= 21, "{web_counters:?}");
    assert!(
        web_counters["fail.intention_denied"] >= 1,
        "{web_counters:?}"
    );
}
