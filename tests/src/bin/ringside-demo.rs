//! `ringside-demo`: the demo mesh on one machine.
//!
//! Pods (network namespaces on a bridge, the host joined to it) for an edge HTTP proxy, a
//! frontend, a public API, a products API, a payments service (service port 1800, container port
//! 8080) and PostgreSQL; `ringctl daemon` with the catalog and `demo/mesh.yaml` (default deny plus
//! explicit allows); in every pod the redirect rules and a ringside sidecar configured by the
//! daemon, so every hop is mesh mTLS. It sends a request end to end and shows the identity each hop
//! saw, a call an intention denies with what `ringctl why` says about it, and `ringctl get`; then it
//! runs until Ctrl-C (or, with `--once`, stops at once) and removes everything it created.
//!
//! What it creates is written to a state file before it is created, so a demo that was killed
//! is cleaned up by the next start: processes by PID (checked against their start time) and
//! every process inside the demo's namespaces, then the namespaces, the host link and the
//! directories.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ringside_tests::ctl::Daemon;
use ringside_tests::http::Client;
use ringside_tests::pod::{Net, Pod, Sidecar, PROXY_UID};
use ringside_tests::postgres::Postgres;
use ringside_tests::{workspace_bin, ChildGuard};
use serde_json::{json, Value};

const STATE: &str = "/run/ringside-demo.json";
const ID: &str = "rsdemo";
const SUBNET: u8 = 254;
const HOST_LINK: &str = "rsdemo-host";
/// The uid the demo's apps run as (not the proxy's, so their traffic is redirected).
const APP_UID: u32 = 65534;

static STOP: AtomicBool = AtomicBool::new(false);

/// Services: (name, pod, catalog port mapping).
const SERVICES: [(&str, Option<&str>); 6] = [
    ("edge", None),
    ("frontend", Some("80:8080")),
    ("public-api", Some("80:8080")),
    ("products-api", Some("80:8080")),
    ("payments", Some("1800:8080")),
    ("postgres", Some("5432:5432")),
];

fn main() {
    let once = std::env::args().any(|a| a == "--once");
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("usage: ringside-demo [--once]   (as root; Ctrl-C stops and removes everything)");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("ringside-demo: needs root (it creates network namespaces and redirect rules)");
        std::process::exit(2);
    }
    catch_signals();
    if let Err(e) = clean_leftovers() {
        eprintln!("ringside-demo: cleaning up an earlier run failed: {e:#}");
        std::process::exit(1);
    }
    let result = std::panic::catch_unwind(|| run(once));
    // Everything `run` created is gone (dropped) by now.
    let _ = std::fs::remove_file(STATE);
    match result {
        Ok(Ok(())) => println!("\n== removed the demo's pods, rules, processes and files"),
        Ok(Err(e)) => {
            eprintln!("ringside-demo: {e:#}");
            std::process::exit(1);
        }
        Err(_) => std::process::exit(1),
    }
}

/// Block SIGINT/SIGTERM in every thread and turn them into [`STOP`] (children get a clean mask).
fn catch_signals() {
    // SAFETY: sigset manipulation on a local set, then masking the calling thread before any other
    // thread exists, so every later thread inherits the mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: waits for one of the blocked signals in `set`.
        unsafe { libc::sigwait(&set, &mut sig) };
        STOP.store(true, Ordering::SeqCst);
    });
}

fn stopped() -> anyhow::Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// What the demo has created (or is about to), for the next start to clean up after a crash.
#[derive(Default)]
struct State {
    netns: Vec<String>,
    dirs: Vec<PathBuf>,
    processes: Vec<(u32, u64)>,
}

impl State {
    fn save(&self) {
        let v = json!({
            "netns": self.netns,
            "host_link": HOST_LINK,
            "dirs": self.dirs,
            "processes": self.processes,
        });
        let tmp = format!("{STATE}.tmp");
        if std::fs::write(&tmp, v.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, STATE);
        }
    }

    fn process(&mut self, pid: u32) {
        if let Some(t) = start_time(pid) {
            self.processes.push((pid, t));
            self.save();
        }
    }
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22, counted after the command name (which may contain spaces) ends with ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

fn kill9(pid: u32) {
    // SAFETY: kill() of a PID we recorded (checked against its start time) or found in one of
    // the demo's own namespaces.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

fn clean_leftovers() -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(STATE) else {
        return Ok(());
    };
    println!("== an earlier demo did not finish: removing what it left");
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    for p in v["processes"].as_array().into_iter().flatten() {
        let (Some(pid), Some(t)) = (p[0].as_u64(), p[1].as_u64()) else {
            continue;
        };
        if start_time(pid as u32) == Some(t) {
            println!("   process {pid}");
            kill9(pid as u32);
        }
    }
    let namespaces: Vec<&str> = v["netns"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for ns in &namespaces {
        if !Path::new("/run/netns").join(ns).exists() {
            continue;
        }
        let out = Command::new("ip").args(["netns", "pids", ns]).output()?;
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
        {
            println!("   process {pid} in {ns}");
            kill9(pid);
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    for ns in &namespaces {
        if Path::new("/run/netns").join(ns).exists() {
            println!("   namespace {ns}");
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
    }
    if let Some(link) = v["host_link"].as_str() {
        if Path::new("/sys/class/net").join(link).exists() {
            println!("   link {link}");
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
    }
    for d in v["dirs"].as_array().into_iter().flatten() {
        if let Some(d) = d.as_str() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    std::fs::remove_file(STATE)?;
    Ok(())
}

fn repo_dir() -> PathBuf {
    std::env::var_os("RINGSIDE_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

fn step(text: &str) {
    println!("\n== {text}");
    let _ = std::io::stdout().flush();
}

/// An app process in a pod, as [`APP_UID`], output to a log file.
fn start_app(pod: &Pod, dir: &Path, name: &str, program: &str, args: &[String]) -> ChildGuard {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("app log");
    let mut cmd = pod.cmd_as(APP_UID, APP_UID, program);
    cmd.args(args).stdout(Stdio::null()).stderr(log);
    ChildGuard::spawn(&mut cmd)
}

/// Wait until something in `pod` listens where `addr` reaches. Read from the pod's socket table,
/// not by connecting: a refused probe would count as a failed connection attempt in the pod,
/// which `ringctl why` takes as evidence of an app that called out before its sidecar was up.
fn wait_listening(pod: &Pod, addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let ok = pod
            .enter(move || {
                ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
                    .iter()
                    .filter_map(|f| std::fs::read_to_string(f).ok())
                    .flat_map(|t| ringside_core::listening::parse_proc_net_tcp(&t))
                    .any(|l| {
                        l.addr.port() == addr.port()
                            && (l.addr.ip() == addr.ip() || l.addr.ip().is_unspecified())
                    })
            })
            .join()
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("{what} is not listening on {addr} in {}", pod.name);
        }
        stopped()?;
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ringctl_show(daemon: &Daemon, args: &[&str]) {
    println!("$ ringctl {}", args.join(" "));
    let (_, out, err) = daemon.ringctl(args);
    print!("{out}{err}");
}

fn run(once: bool) -> anyhow::Result<()> {
    let repo = repo_dir();
    let mesh_yaml = repo.join("demo/mesh.yaml");
    let service_py = repo.join("scripts/demo_service.py");
    for f in [&mesh_yaml, &service_py] {
        anyhow::ensure!(f.exists(), "{} is missing", f.display());
    }
    let pg_bin = ringside_tests::postgres::bin_dir()
        .context("PostgreSQL is not installed (scripts/deps.sh installs it)")?;
    let pod_names = [
        "edge",
        "frontend",
        "public-api",
        "products-api",
        "payments",
        "postgres",
    ];
    let logs = std::env::temp_dir().join(format!("{ID}-logs"));
    let mut state = State {
        netns: std::iter::once(format!("{ID}-sw"))
            .chain(pod_names.iter().map(|p| format!("{ID}-{p}")))
            .collect(),
        dirs: std::iter::once(logs.clone())
            .chain(std::iter::once(
                std::env::temp_dir().join(format!("{ID}-ctl")),
            ))
            .chain(
                pod_names
                    .iter()
                    .map(|p| std::env::temp_dir().join(format!("{ID}-{p}-sidecar"))),
            )
            .collect(),
        processes: Vec::new(),
    };
    state.save();
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs)?;
    std::os::unix::fs::chown(&logs, Some(APP_UID), Some(APP_UID))?;

    step("pods: one network namespace each, on a bridge the host is joined to");
    let mut net = Net::named(ID, SUBNET);
    let pods: Vec<Pod> = pod_names.iter().map(|p| net.pod(p)).collect();
    let host_ip = net.link_host(HOST_LINK);
    let pod = |name: &str| pods.iter().find(|p| p.short == name).unwrap();
    for p in &pods {
        println!("   {:<13} {:<16} (netns {})", p.short, p.ip4, p.name);
    }
    stopped()?;

    step("ringctl daemon: catalog, intentions, certificate authority");
    let range = format!("198.18.{SUBNET}.224/27");
    let daemon = Daemon::start(ID, &["--vip-range", &range]);
    if let Some(c) = &daemon.child {
        state.process(c.pid());
    }
    for (name, port) in SERVICES {
        let mut args = vec!["register", "service", name];
        if let Some(p) = port {
            args.extend(["--port", p]);
        }
        daemon.ok(&args);
    }
    println!("$ ringctl apply -f demo/mesh.yaml");
    print!(
        "{}",
        daemon.ok(&["apply", "-f", mesh_yaml.to_str().unwrap()])
    );
    let services = daemon.get_json("services");
    let vip = |name: &str| -> Ipv4Addr {
        services
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name))
            .and_then(|s| s["virtual_ip"].as_str())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no virtual IP for {name}"))
    };
    // Service names resolve to their virtual IPs inside every pod.
    let mut hosts = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost\n");
    for (name, _) in SERVICES.iter().skip(1) {
        hosts.push_str(&format!("{} {name}\n", vip(name)));
    }
    for p in &pods {
        let dir = format!("/etc/netns/{}", p.name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(format!("{dir}/hosts"), &hosts)?;
    }
    stopped()?;

    step("redirect rules (ringside-init) in every pod; the edge takes outside traffic on 8080");
    for p in &pods {
        if p.short == "edge" {
            p.install_redirect(&["--exclude-inbound-ports", "8080"]);
        } else {
            p.install_redirect(&[]);
        }
    }

    step("PostgreSQL in the postgres pod (a real server, a 'shop' database)");
    let pg = Postgres::start_in(Some(&pod("postgres").name), 5432);
    state.dirs.push(pg.dir.clone());
    state.save();
    for sql in [
        "create database shop",
        "\\c shop\n create table products (id int primary key, name text, price numeric);\n insert into products values (1, 'espresso machine', 349.00), (2, 'grinder', 129.50), (3, 'milk jug', 12.90);",
    ] {
        let out = pg
            .cmd("psql")
            .args(["-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-q", "-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(sql.as_bytes())?;
                c.wait_with_output()
            })?;
        anyhow::ensure!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stopped()?;

    step("apps (uid 65534; their traffic is redirected to their sidecars)");
    let py = |name: &str, listen: &str, extra: &[&str]| -> Vec<String> {
        [
            service_py.to_str().unwrap(),
            "--name",
            name,
            "--listen",
            listen,
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    let psql = pg_bin.join("psql");
    let apps = [
        (
            "payments",
            py("payments", "0.0.0.0:8080", &[]),
            SocketAddr::from(([127, 0, 0, 1], 8080)),
        ),
        (
            "products-api",
            py(
                "products-api",
                "127.0.0.1:8080",
                &[
                    "--pg",
                    "postgres:5432",
                    "--psql",
                    psql.to_str().unwrap(),
                    "--sql",
                    "select id, name, price from products order by id",
                ],
            ),
            SocketAddr::from(([127, 0, 0, 1], 8080)),
        ),
        (
            "public-api",
            py(
                "public-api",
                "127.0.0.1:8080",
                &[
                    "--call",
                    "products-api=http://products-api/products",
                    "--call",
                    "payments=http://payments:1800/quote",
                ],
            ),
            SocketAddr::from(([127, 0, 0, 1], 8080)),
        ),
        (
            "frontend",
            py(
                "frontend",
                "127.0.0.1:8080",
                &["--call", "public-api=http://public-api/catalog"],
            ),
            SocketAddr::from(([127, 0, 0, 1], 8080)),
        ),
    ];
    let mut children = Vec::new();
    for (name, args, addr) in &apps {
        let c = start_app(pod(name), &logs, name, "/usr/bin/python3", args);
        state.process(c.pid());
        children.push(c);
        wait_listening(pod(name), *addr, name)?;
        println!(
            "   {name:<13} demo_service.py on {addr}{}",
            if *name == "payments" {
                " (all addresses; service port 1800)"
            } else {
                ""
            }
        );
    }
    let edge_args: Vec<String> = [
        "forward",
        "0.0.0.0:8080",
        &format!("{}:80", vip("frontend")),
        "--protocol",
        "http",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let ringside = workspace_bin("ringside");
    let c = start_app(
        pod("edge"),
        &logs,
        "edge",
        ringside.to_str().unwrap(),
        &edge_args,
    );
    state.process(c.pid());
    children.push(c);
    wait_listening(
        pod("edge"),
        SocketAddr::from(([127, 0, 0, 1], 8080)),
        "edge",
    )?;
    println!(
        "   {:<13} ringside forward --protocol http 0.0.0.0:8080 -> frontend ({}:80)",
        "edge",
        vip("frontend")
    );
    stopped()?;

    step("sidecars: certificates and configuration from the daemon, mTLS between every pod");
    let mut sidecars = Vec::new();
    for p in &pods {
        let mut args = daemon.sidecar_args(&p.short, IpAddr::V4(p.ip4), PROXY_UID);
        let access = std::env::temp_dir()
            .join(format!("{}-sidecar", p.name))
            .join("access.log");
        args.extend(["--access-log".to_string(), access.display().to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let sc = Sidecar::start_with(p, "sidecar: {}\n", &args);
        state.process(sc.child.pid());
        println!("   {:<13} ready (pid {})", p.short, sc.child.pid());
        sidecars.push(sc);
        stopped()?;
    }

    let url = format!("http://{}:8080/shop", pod("edge").ip4);
    step(&format!("a request from the host, end to end: curl {url}"));
    let start = Instant::now();
    let answer = loop {
        match Client::new().get(&url) {
            Ok(r) if r.status == 200 => {
                let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                if v.to_string().contains("\"error\"") && start.elapsed() < Duration::from_secs(10)
                {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                break v;
            }
            other if start.elapsed() > Duration::from_secs(20) => {
                bail!("no answer through the mesh: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
        stopped()?;
    };
    println!(
        "   edge           <- {host_ip} (outside the mesh: port 8080 is not redirected in the edge pod)"
    );
    // The edge passes the frontend's answer on as it is.
    print_hops(&answer, 1);
    // The last hop is TCP: its identity is in the postgres sidecar's access log.
    let pg_access = std::env::temp_dir()
        .join(format!("{}-sidecar", pod("postgres").name))
        .join("access.log");
    let pg_line = std::fs::read_to_string(&pg_access)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| l.contains("peer_id"))
        .map(str::to_string)
        .unwrap_or_default();
    let pg_entry: Value = serde_json::from_str(&pg_line).unwrap_or(Value::Null);
    println!(
        "            postgres (tcp) <- {}   (postgres sidecar access log: {} bytes up, {} down)",
        pg_entry["peer_id"].as_str().unwrap_or("?"),
        pg_entry["bytes_up"],
        pg_entry["bytes_down"]
    );
    stopped()?;

    step("a call no intention allows: the frontend calls payments directly");
    let pay_url = format!("http://{}:1800/charge", vip("payments"));
    println!("$ (in the frontend pod) curl -i {pay_url}");
    let denied = pod("frontend")
        .enter(move || Client::new().get(&pay_url))
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
    match denied {
        Ok(r) => {
            println!("   HTTP {}", r.status);
            println!("   x-ringside-reason: {}", r.header("x-ringside-reason"));
            println!("   {}", r.text().trim());
        }
        Err(e) => println!("   failed: {e}"),
    }
    println!();
    ringctl_show(
        &daemon,
        &[
            "why",
            "frontend",
            "payments:1800",
            "--src-netns",
            &pod("frontend").name,
            "--dst-netns",
            &pod("payments").name,
        ],
    );
    stopped()?;

    step("what the control plane knows");
    ringctl_show(&daemon, &["get", "services"]);
    println!();
    ringctl_show(&daemon, &["get", "intentions"]);
    println!();
    ringctl_show(&daemon, &["get", "proxies"]);

    if !once {
        step("running; Ctrl-C stops the demo and removes everything");
        println!("   curl {url}");
        println!(
            "   ringctl --socket {} get proxies",
            daemon.socket.display()
        );
        println!(
            "   ringctl --socket {} why frontend payments:1800",
            daemon.socket.display()
        );
        println!(
            "   ip netns exec {} curl -s http://payments:1800/   # denied: frontend may not call payments",
            pod("frontend").name
        );
        println!("   logs: {} and /tmp/{ID}-*-sidecar/", logs.display());
        let _ = std::io::stdout().flush();
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    step("stopping");
    drop(children);
    drop(sidecars);
    drop(pg);
    drop(daemon);
    drop(net);
    let _ = std::fs::remove_dir_all(&logs);
    for d in &state.dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(())
}

/// Print one service's answer and the answers of what it called, indented per hop.
fn print_hops(v: &Value, depth: usize) {
    if v.is_null() {
        return;
    }
    let pad = "   ".repeat(depth);
    if let Some(err) = v.get("error") {
        println!(
            "{pad}error {err} reason {}",
            v["reason"].as_str().unwrap_or("-")
        );
        return;
    }
    println!(
        "{pad}{} <- {}   (request {})",
        v["service"].as_str().unwrap_or("?"),
        v["caller"].as_str().unwrap_or("(no client certificate)"),
        v["request_id"].as_str().unwrap_or("-")
    );
    if let Some(rows) = v["rows"].as_array() {
        for r in rows {
            println!(
                "{pad}   row: {}",
                r.as_array()
                    .map(|c| c
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(" | "))
                    .unwrap_or_else(|| r.to_string())
            );
        }
    }
    if let Some(calls) = v["calls"].as_object() {
        for (_, c) in calls {
            print_hops(c, depth + 1);
        }
    }
}
