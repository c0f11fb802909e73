//! `ringctl why SRC DST[:PORT]`: what happens to connections from SRC to DST, and why they fail.
//!
//! It combines what the daemon knows (catalog, port mapping, the deciding intention, endpoints,
//! both sides' proxies: liveness, applied configuration version, certificate, their recent
//! failures with reason codes) with checks of the pods themselves when their network namespaces
//! are given (`--src-netns`, `--dst-netns`: redirect rules, the proxy's listeners, what the app
//! listens on). Checks run in the order a connection meets them; the first that fails is the cause.

use std::net::SocketAddr;

use ringside_core::control::api::{
    EndpointRecord, IntentionCheck, ProxyEvent, ProxyStatus, ServiceRecord,
};
use ringside_core::listening::ListenSocket;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::daemon;

/// One check and its outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Passed.
    pub ok: bool,
    /// What was checked.
    pub what: String,
    /// What was found.
    pub found: String,
}

/// The answer.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Source service.
    pub source: String,
    /// Destination service.
    pub destination: String,
    /// The reason code of the cause (as proxies report it), when there is one.
    pub reason: Option<String>,
    /// The cause, in a sentence.
    pub cause: Option<String>,
    /// What to do.
    pub fix: Option<String>,
    /// Every check, in order.
    pub checks: Vec<Check>,
}

/// How recent a proxy failure must be to count (seconds).
const EVENTS_WITHIN_S: i64 = 600;
/// A proxy that started this recently may have missed the first connections of its app.
const RECENT_START_S: i64 = 300;
/// Longest a live proxy takes to fetch a change (its watch is at most 10 s).
const UPDATE_WITHIN_S: i64 = 12;

fn get<T: DeserializeOwned>(at: &daemon::Target, path: &str) -> Result<T, String> {
    daemon::call(at, hyper::Method::GET, path, None).map_err(|e| e.to_string())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What listens (TCP) in a pod, read from its namespace's /proc/net/tcp{,6}.
pub fn netns_listeners(ns: &str) -> Result<Vec<ListenSocket>, String> {
    let mut all = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "cat", f])
            .output()
            .map_err(|e| format!("cannot run ip netns exec: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "network namespace '{ns}': {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        all.extend(ringside_core::listening::parse_proc_net_tcp(
            &String::from_utf8_lossy(&out.stdout),
        ));
    }
    Ok(all)
}

/// GET a path of a sidecar's admin server from inside its pod (it listens on the pod's loopback):
/// ringctl runs itself there with `admin-get`. `None` when nothing answers.
pub fn admin_get(ns: &str, path: &str) -> Option<String> {
    let me = std::env::current_exe().ok()?;
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(me)
        .args(["admin-get", &format!("http://127.0.0.1:15000{path}")])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A sidecar's live `/events`, read from inside its pod. They have the form proxies report.
pub fn netns_events(ns: &str) -> Vec<ProxyEvent> {
    admin_get(ns, "/events")
        .and_then(|body| serde_json::from_str::<Vec<ProxyEvent>>(&body).ok())
        .unwrap_or_default()
}

/// What a sidecar says of its own control connection (its `/config_dump`, read inside its pod).
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct SidecarControl {
    /// The configuration version it applied.
    pub version: u64,
    /// It cannot reach the daemon now.
    pub ctl_unreachable: bool,
}

/// Read [`SidecarControl`] from the sidecar in pod `ns`.
pub fn netns_control(ns: &str) -> Option<SidecarControl> {
    admin_get(ns, "/config_dump").and_then(|body| serde_json::from_str(&body).ok())
}

/// A process of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodProcess {
    /// Process id.
    pub pid: u32,
    /// Command name (`/proc/PID/comm`).
    pub comm: String,
    /// When it started, in clock ticks since boot (field 22 of `/proc/PID/stat`).
    pub start_ticks: u64,
}

/// Command name and start time out of the text of `/proc/PID/stat` (the name is in parentheses
/// and may itself hold spaces and parentheses).
pub fn parse_proc_stat(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    // Fields after the name start with field 3 (state); starttime is field 22.
    let start = stat
        .get(close + 1..)?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    Some((comm, start))
}

/// The processes whose network namespace is pod `ns` (thread-group leaders: what an app is).
pub fn netns_processes(ns: &str) -> Result<Vec<PodProcess>, String> {
    use std::os::unix::fs::MetadataExt;
    let want = std::fs::metadata(format!("/run/netns/{ns}"))
        .map_err(|e| format!("network namespace '{ns}': {e}"))?
        .ino();
    let want = format!("net:[{want}]");
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .map_err(|e| format!("/proc: {e}"))?
        .flatten()
    {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes end while we look: whatever cannot be read is not counted.
        match std::fs::read_link(entry.path().join("ns/net")) {
            Ok(link) if link.to_str() == Some(want.as_str()) => {}
            _ => continue,
        }
        if let Some((comm, start_ticks)) = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| parse_proc_stat(&s))
        {
            out.push(PodProcess {
                pid,
                comm,
                start_ticks,
            });
        }
    }
    Ok(out)
}

/// Processes of a pod that are not its app: the sidecar, its installer, ringctl looking in, and the
/// process that only holds a Kubernetes pod's namespaces.
const NOT_THE_APP: &[&str] = &["ringside", "ringside-init", "ringctl", "pause", "ip"];

/// The app processes of a pod that started before its (running) sidecar, oldest first. `None`
/// when no sidecar process runs in the pod.
pub fn started_before_sidecar(procs: &[PodProcess]) -> Option<Vec<PodProcess>> {
    let sidecar = procs
        .iter()
        .filter(|p| p.comm == "ringside")
        .map(|p| p.start_ticks)
        .max()?;
    let mut early: Vec<PodProcess> = procs
        .iter()
        .filter(|p| !NOT_THE_APP.contains(&p.comm.as_str()) && p.start_ticks < sidecar)
        .cloned()
        .collect();
    early.sort_by_key(|p| p.start_ticks);
    Some(early)
}

/// GET a URL over plain HTTP/1.1 and return the body (for `admin-get`).
pub fn http_get(url: &str) -> Result<String, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = uri.host().ok_or("no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        use http_body_util::BodyExt;
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        .map_err(|_| format!("{url}: timed out"))?
        .map_err(|e| format!("{url}: {e}"))?;
        let (mut s, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(hyper::header::HOST, host.as_str())
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = s.send_request(req).await.map_err(|e| e.to_string())?;
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    })
}

/// Whether ringside's redirect rules are installed in a pod.
pub fn netns_has_rules(ns: &str) -> Result<bool, String> {
    use ringside_kernel_setup::redirect::{detect_backend, show, Target};
    let target = Target {
        backend: detect_backend(Some(ns)),
        netns: Some(ns.to_string()),
    };
    show(&target)
        .map(|s| !s.trim().is_empty())
        .map_err(|e| e.to_string())
}

/// A pod's namespace must be on this host for the checks inside it; when it is not, say on which
/// node the service's sidecars run (as their daemons report), so the operator runs `why` there.
fn pod_is_here(ns: &str, service: &str, proxies: &[&ProxyStatus]) -> Result<(), String> {
    if std::path::Path::new("/run/netns").join(ns).exists() {
        return Ok(());
    }
    Err(format!(
        "pod {ns} is not on this host: {}",
        nodes_of(service, proxies)
    ))
}

/// Where a service's sidecars run, in words.
fn nodes_of(service: &str, proxies: &[&ProxyStatus]) -> String {
    let mut nodes: Vec<&str> = proxies
        .iter()
        .filter(|p| !p.node.is_empty())
        .map(|p| p.node.as_str())
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    if nodes.is_empty() {
        format!("no sidecar of {service} reports a node; run this where its pod is")
    } else {
        format!(
            "{service}'s sidecars report to node {}; run this there",
            nodes.join(", ")
        )
    }
}

fn listens_on(l: &[ListenSocket], port: u16) -> bool {
    l.iter().any(|s| s.addr.port() == port)
}

/// Record a check; the first failing one is the cause (later checks are still listed).
fn check(
    v: &mut Verdict,
    ok: bool,
    what: String,
    found: String,
    cause: Option<(&str, String, String)>,
) {
    if !ok && v.cause.is_none() {
        if let Some((reason, c, f)) = cause {
            v.reason = Some(reason.to_string());
            v.cause = Some(c);
            v.fix = Some(f);
        }
    }
    v.checks.push(Check { ok, what, found });
}

/// Work out the answer.
pub fn why(
    at: &daemon::Target,
    src: &str,
    dst: &str,
    port: Option<u16>,
    src_ns: Option<&str>,
    dst_ns: Option<&str>,
) -> Result<Verdict, String> {
    let mut v = Verdict {
        source: src.into(),
        destination: dst.into(),
        reason: None,
        cause: None,
        fix: None,
        checks: Vec::new(),
    };
    let t = now();

    // 1. The catalog.
    let services: Vec<ServiceRecord> = get(at, "/v1/services")?;
    let dst_svc = services.into_iter().find(|s| s.name == dst);
    let Some(dst_svc) = dst_svc else {
        check(
            &mut v,
            false,
            format!("{dst} is registered"),
            "not in the catalog".into(),
            Some((
                "unknown_destination",
                format!("{dst} is not registered: no virtual IP, no endpoints; {src}'s sidecar does not know where {dst} is"),
                format!("ringctl register service {dst} --port PORT:TARGET_PORT, then start {dst}'s sidecar with its token (it registers its pod address)"),
            )),
        );
        return Ok(v);
    };
    let ports: Vec<(u16, u16)> = dst_svc
        .ports
        .iter()
        .map(|p| (p.port, p.target_port))
        .collect();
    let ports_text = ports
        .iter()
        .map(|(p, t)| format!("{p} -> {t}"))
        .collect::<Vec<_>>()
        .join(", ");
    check(
        &mut v,
        true,
        format!("{dst} is registered"),
        format!(
            "virtual IP {}, ports {}",
            dst_svc.virtual_ip,
            if ports_text.is_empty() {
                "(none)".into()
            } else {
                ports_text.clone()
            }
        ),
        None,
    );
    let target_port = match port {
        Some(p) => match ports.iter().find(|(sp, _)| *sp == p) {
            Some((_, tp)) => {
                check(
                    &mut v,
                    true,
                    format!("{dst} has service port {p}"),
                    format!("{p} -> targetPort {tp}"),
                    None,
                );
                Some(*tp)
            }
            None => {
                check(
                    &mut v,
                    false,
                    format!("{dst} has service port {p}"),
                    format!("its ports: {ports_text}"),
                    Some((
                        "unknown_destination",
                        format!("{dst} has no service port {p} (its ports: {ports_text}); connections to {p} are not routed to it"),
                        format!("call one of its ports, or add the port: ringctl register service {dst} --port {p}:TARGET_PORT"),
                    )),
                );
                None
            }
        },
        None => ports.first().map(|(_, tp)| *tp),
    };

    // 2. The intention that decides.
    let ic: IntentionCheck = get(
        at,
        &format!("/v1/intentions/check?source={src}&destination={dst}"),
    )?;
    let allowed = ic.allowed;
    let rule = ic.decided_by;
    check(
        &mut v,
        allowed,
        format!("an intention allows {src} -> {dst}"),
        rule.clone(),
        Some((
            "intention_denied",
            format!("{src} -> {dst} is denied by {rule}: {dst}'s sidecar refuses the mTLS handshake (the source sees denied_by_destination)"),
            format!("apply a ServiceIntentions for {dst} with source {src} action allow (an exact rule beats a wildcard)"),
        )),
    );

    // 3. Endpoints.
    let endpoints: Vec<EndpointRecord> = get::<Vec<EndpointRecord>>(at, "/v1/endpoints")?
        .into_iter()
        .filter(|e| e.service == dst)
        .collect();
    let healthy = endpoints.iter().filter(|e| e.healthy).count();
    check(
        &mut v,
        healthy > 0,
        format!("{dst} has endpoints"),
        format!("{healthy} healthy of {}", endpoints.len()),
        Some((
            "no_healthy_endpoint",
            format!("{dst} has no endpoint: its sidecar never registered its pod address"),
            format!("start {dst}'s sidecar with --address POD_IP, or ringctl register endpoint {dst} POD_IP"),
        )),
    );

    // 4. The proxies.
    let proxies: Vec<ProxyStatus> = get(at, "/v1/proxies")?;
    let of = |name: &str| -> Vec<&ProxyStatus> {
        proxies
            .iter()
            .filter(|p| p.report.service == name)
            .collect()
    };
    let (src_px, dst_px) = (of(src), of(dst));

    // Node checks: redirect rules and the proxy's listener in each pod.
    for (side, name, ns, port, role) in [
        ("destination", dst, dst_ns, 15006u16, "inbound"),
        ("source", src, src_ns, 15001u16, "outbound"),
    ] {
        let Some(ns) = ns else { continue };
        let here = if side == "source" { &src_px } else { &dst_px };
        pod_is_here(ns, name, here)?;
        let l = netns_listeners(ns)?;
        let rules = netns_has_rules(ns)?;
        let proxy_up = listens_on(&l, port);
        check(
            &mut v,
            proxy_up || !rules,
            format!("{name}'s sidecar listens on {port} in pod {ns}"),
            format!(
                "{}; redirect rules {}",
                if proxy_up { "listening" } else { "nothing listens" },
                if rules { "installed" } else { "absent" }
            ),
            Some((
                "proxy_not_running",
                format!("{name}'s sidecar is not running in pod {ns}, but its redirect rules send every {role} connection to port {port}, where nothing listens: the {side}'s connections are refused (error 111)"),
                format!("start {name}'s sidecar (ringside run --ctl ...), or remove the rules while it is down: ringctl redirect remove --netns {ns}"),
            )),
        );
    }

    // The source's sidecar must know the destination: it applied a config at least as new as
    // the destination's registration.
    let registered_index = dst_svc.registered_index;
    let registered_at = dst_svc.registered_at;
    // What the source's sidecar says itself, read inside its pod: it cannot reach the daemon
    // now, and the version it applied (newer than its last report when reports fail).
    let live = src_ns.and_then(netns_control);
    if let (Some(live), Some(ns)) = (live, src_ns) {
        let applied = src_px
            .iter()
            .map(|p| p.report.applied_index)
            .max()
            .unwrap_or(0)
            .max(live.version);
        let knows = applied >= registered_index;
        check(
            &mut v,
            !live.ctl_unreachable,
            format!("{src}'s sidecar reaches the control daemon"),
            format!(
                "its admin port in pod {ns} says {}; it applied version {applied}",
                if live.ctl_unreachable { "ctl_unreachable: it cannot reach the daemon" } else { "it is connected" }
            ),
            Some((
                "ctl_unreachable",
                if knows {
                    format!("{src}'s sidecar cannot reach the control daemon (its admin port in pod {ns} says so): it still routes to {dst} with its last good configuration (version {applied}), but it takes no new intention, endpoint or certificate until it is back")
                } else {
                    format!("{src}'s sidecar cannot reach the control daemon (its admin port in pod {ns} says so) and {dst} was registered after its last configuration (version {registered_index}, it has {applied}): it does not know {dst}'s address, so connections to {dst} are not routed")
                },
                format!("restore {src}'s sidecar's access to the daemon's proxy socket (mounted in the pod, writable by the proxy's user; the daemon running); it keeps serving its last good configuration meanwhile"),
            )),
        );
    }
    if let Some(p) = src_px.iter().max_by_key(|p| p.last_seen) {
        let applied = p.report.applied_index.max(live.map_or(0, |l| l.version));
        let last_seen = p.last_seen;
        let knows = applied >= registered_index;
        let lost = last_seen <= registered_at && t - registered_at > UPDATE_WITHIN_S;
        check(
            &mut v,
            knows,
            format!("{src}'s sidecar has a configuration that includes {dst}"),
            format!(
                "it applied version {applied}; {dst} was registered at version {registered_index}; it last reported {}s ago",
                t - last_seen
            ),
            Some(if lost {
                (
                    "ctl_unreachable",
                    format!("{src}'s sidecar cannot reach the control daemon (silent for {}s) and {dst} was registered after it lost contact (version {registered_index}, it has {applied}): it does not know {dst}'s address, so connections to {dst} are not routed", t - last_seen),
                    format!("restore {src}'s sidecar's access to the daemon's proxy socket (its log says ctl_unreachable); it keeps serving its last good configuration meanwhile"),
                )
            } else {
                (
                    "ctl_unreachable",
                    format!("{src}'s sidecar has not applied the configuration that added {dst} yet (it has version {applied}, {dst} came with {registered_index})"),
                    "wait a few seconds; if it stays behind, check the sidecar's log for ctl_unreachable".into(),
                )
            }),
        );
    } else {
        check(
            &mut v,
            false,
            format!("{src} has a sidecar registered with the daemon"),
            "no proxy with a token of this service ever reported".into(),
            Some((
                "unknown_destination",
                format!("{src} has no sidecar known to the daemon: its connections are not proxied (or its sidecar uses a file config)"),
                format!("start {src}'s sidecar with --ctl and a token of {src} (ringctl token create --service {src})"),
            )),
        );
    }

    // 5. The destination's certificate.
    for p in &dst_px {
        let na = p.report.cert_not_after;
        check(
            &mut v,
            na > t,
            format!("{dst}'s certificate ({}) is valid", p.report.id),
            if na > t { format!("expires in {}s", na - t) } else { format!("EXPIRED {}s ago", t - na) },
            Some((
                "tls_cert_expired",
                format!("{dst}'s certificate expired {}s ago: sources fail the mTLS handshake (tls_cert_expired)", t - na),
                format!("the sidecar renews at half the lifetime: check that it reaches the daemon (ctl_unreachable in its log), then ringctl cert rotate --service {dst}"),
            )),
        );
    }

    // 6. What the proxies saw: recent failures between the two (reported to the daemon, and
    // live from the pods when their namespaces are given).
    let mut events: Vec<(i64, ProxyEvent)> = Vec::new();
    let mut consider = |e: &ProxyEvent, from_dst: bool| {
        let at = (e.time_ms / 1000) as i64;
        if t - at <= EVENTS_WITHIN_S && (from_dst || e.destination == dst) {
            events.push((at, e.clone()));
        }
    };
    for p in &src_px {
        p.report.events.iter().for_each(|e| consider(e, false));
    }
    for p in &dst_px {
        p.report.events.iter().for_each(|e| consider(e, true));
    }
    if let Some(ns) = src_ns {
        netns_events(ns).iter().for_each(|e| consider(e, false));
    }
    if let Some(ns) = dst_ns {
        netns_events(ns).iter().for_each(|e| consider(e, true));
    }
    events.sort_by_key(|(at, _)| -at);
    if let Some((at, e)) = events.first() {
        let reason = e.reason.clone();
        let detail = e.detail.clone();
        let (cause, fix) = match reason.as_str() {
            "app_not_listening" => (
                format!("{dst}'s app does not accept on its targetPort{}: {detail}", target_port.map(|p| format!(" {p}")).unwrap_or_default()),
                format!("make the app listen on the targetPort (on 0.0.0.0, 127.0.0.1 or the pod address), or change the service's targetPort: ringctl register service {dst} --port PORT:TARGET_PORT"),
            ),
            "protocol_mismatch" => (
                format!("{dst} is declared HTTP but its app does not speak HTTP ({detail})"),
                format!("declare it tcp: a ServiceDefaults for {dst} with protocol: tcp"),
            ),
            _ => (
                format!("{} reported {reason}: {detail}", e.destination),
                ringside_core::Reason::ALL
                    .iter()
                    .find(|r| r.as_str() == reason)
                    .map(|r| r.hint().to_string())
                    .unwrap_or_default(),
            ),
        };
        check(
            &mut v,
            false,
            "no recent failures reported by the proxies".into(),
            format!("{reason} {}s ago: {detail}", t - at),
            Some((&reason, cause, fix)),
        );
    } else {
        check(
            &mut v,
            true,
            "no recent failures reported by the proxies".into(),
            "none".into(),
            None,
        );
    }

    // 7. The destination's app, seen from its pod.
    if let (Some(ns), Some(tp)) = (dst_ns, target_port) {
        let l = netns_listeners(ns)?;
        let app: Vec<SocketAddr> = l
            .iter()
            .filter(|s| s.addr.port() == tp)
            .map(|s| s.addr)
            .collect();
        let elsewhere: Vec<String> = l
            .iter()
            .filter(|s| ![15000u16, 15001, 15006, 15021].contains(&s.addr.port()))
            .map(|s| s.addr.to_string())
            .collect();
        // The sidecar tries 127.0.0.1, ::1 and the pod address (any non-loopback one).
        let reachable = app.iter().any(|a| match a.ip() {
            std::net::IpAddr::V4(ip) => {
                ip.is_unspecified() || ip == std::net::Ipv4Addr::LOCALHOST || !ip.is_loopback()
            }
            std::net::IpAddr::V6(ip) => {
                ip.is_unspecified() || ip == std::net::Ipv6Addr::LOCALHOST || !ip.is_loopback()
            }
        });
        let found = if app.is_empty() {
            format!(
                "nothing listens on {tp}; listening: {}",
                if elsewhere.is_empty() {
                    "nothing".into()
                } else {
                    elsewhere.join(", ")
                }
            )
        } else {
            format!(
                "listening at {}",
                app.iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        check(
            &mut v,
            reachable,
            format!("{dst}'s app listens on targetPort {tp} where the sidecar can reach it"),
            found.clone(),
            Some((
                "app_not_listening",
                format!("in {dst}'s pod {found}"),
                format!("make the app listen on {tp} at 0.0.0.0, 127.0.0.1 or the pod address, or set targetPort to the port it uses"),
            )),
        );
    }

    // 8. The source's app started before its sidecar: its first connections were refused (the
    // redirect rules were in place, nothing listened on 15001). Blamed only with evidence: an app
    // process in the pod older than the sidecar, and connections that failed in the pod before
    // the sidecar started; and only when nothing else was found (`check` keeps the first cause).
    if let Some(p) = src_px.iter().max_by_key(|p| p.report.started_at) {
        let started = p.report.started_at;
        let failed = p.report.failed_connects_before_start;
        let recent = started > 0 && t - started < RECENT_START_S;
        let early = match src_ns {
            Some(ns) if recent => started_before_sidecar(&netns_processes(ns)?),
            _ => None,
        };
        let apps = early
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|p| format!("{} (pid {})", p.comm, p.pid))
            .collect::<Vec<_>>()
            .join(", ");
        let blame = failed > 0 && !apps.is_empty();
        let found = match (recent, src_ns, &early) {
            (false, _, _) => format!("started {}s ago", t - started),
            (true, None, _) => format!(
                "started {}s ago; {failed} connection attempts had failed in its pod before (give --src-netns to see whether its app started first)",
                t - started
            ),
            (true, Some(_), None) => format!(
                "started {}s ago; no sidecar process runs in the pod now",
                t - started
            ),
            (true, Some(_), Some(_)) => format!(
                "started {}s ago; app processes started before it: {}; {failed} connection attempts had failed in the pod before it started",
                t - started,
                if apps.is_empty() { "none".to_string() } else { apps.clone() }
            ),
        };
        check(
            &mut v,
            !blame,
            format!("{src}'s app did not start before its sidecar"),
            found,
            Some((
                "proxy_not_running",
                format!("{src}'s app ({apps}) started before its sidecar, which started {}s ago: {failed} connection attempts failed in the pod before the sidecar listened (the redirect rules were in place, nothing listened on 15001); nothing else is wrong now", t - started),
                "start the app after its sidecar is ready: run `ringside wait-ready` before the app (or use the proxy's ready file)".into(),
            )),
        );
    }
    Ok(v)
}

/// Print a verdict for people.
pub fn print(v: &Verdict) {
    println!("{} -> {}", v.source, v.destination);
    match (&v.cause, &v.fix) {
        (Some(c), Some(f)) => {
            println!("CAUSE ({}): {c}", v.reason.as_deref().unwrap_or("?"));
            println!("FIX: {f}");
        }
        _ => println!(
            "no cause found: {} may connect to {} and every check passes",
            v.source, v.destination
        ),
    }
    println!();
    for c in &v.checks {
        println!(
            "  [{}] {}: {}",
            if c.ok { "ok" } else { "FAIL" },
            c.what,
            c.found
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_name_and_start() {
        let stat =
            "4242 (my app) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 1000 50";
        assert_eq!(parse_proc_stat(stat), Some(("my app".into(), 987654)));
        // A name holding ") " does not shift the fields.
        let stat = "7 (a) b) R 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0";
        assert_eq!(parse_proc_stat(stat), Some(("a) b".into(), 55)));
        assert_eq!(parse_proc_stat("7 (short) R 1"), None);
    }

    fn p(pid: u32, comm: &str, start_ticks: u64) -> PodProcess {
        PodProcess {
            pid,
            comm: comm.into(),
            start_ticks,
        }
    }

    #[test]
    fn apps_older_than_the_sidecar() {
        let procs = [
            p(1, "pause", 10),
            p(2, "psql", 20),
            p(3, "ringside", 30),
            p(4, "worker", 40),
            p(5, "ringctl", 5),
        ];
        assert_eq!(started_before_sidecar(&procs), Some(vec![p(2, "psql", 20)]));
        // Only the sidecar and what is not an app: nothing to blame.
        assert_eq!(started_before_sidecar(&procs[..1]), None);
        assert_eq!(
            started_before_sidecar(&[p(3, "ringside", 30), p(4, "worker", 40)]),
            Some(vec![])
        );
        // A restarted sidecar: the running (youngest) one counts.
        assert_eq!(
            started_before_sidecar(&[p(3, "ringside", 30), p(4, "app", 40), p(6, "ringside", 50)]),
            Some(vec![p(4, "app", 40)])
        );
    }
}
