//! `ringctl doctor [--netns POD]`: a list of checks, each passing or failing with the fix. Without
//! a pod: the daemon, its store (`store_unreachable` when etcd cannot be reached) and every proxy
//! it knows (liveness, certificate, clock). With a pod: its redirect rules, its sidecar
//! (listeners, readiness, certificate), each local service's targetPort (is something listening,
//! and where), and `localhost` resolving to ::1 while an app listens only on 127.0.0.1.

use ringside_core::control::api::{ProxyStatus, StoreStatus};
use ringside_core::control::AnswerError;
use ringside_core::Reason;
use serde::Serialize;

use crate::daemon::{self, CallError};
use crate::why::{admin_get, netns_has_rules, netns_listeners};

/// One check.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    /// Passed.
    pub ok: bool,
    /// What was checked.
    pub check: String,
    /// What was found.
    pub found: String,
    /// What to do when it failed.
    pub fix: Option<String>,
}

fn item(
    ok: bool,
    check: impl Into<String>,
    found: impl Into<String>,
    fix: impl Into<String>,
) -> Item {
    Item {
        ok,
        check: check.into(),
        found: found.into(),
        fix: (!ok).then(|| fix.into()),
    }
}

/// Seconds of clock difference tolerated between a proxy and the daemon.
const MAX_SKEW_S: i64 = 5;
/// A certificate closer than this to its expiry is reported.
const CERT_MARGIN_S: i64 = 600;

/// Run the checks.
pub fn doctor(at: &daemon::Target, netns: Option<&str>) -> Vec<Item> {
    let mut out = Vec::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    // The daemon and its store.
    let mut reached = false;
    // A daemon older than /v1/store, or none, fails it: the proxies' listing below says which.
    if let Ok(st) = daemon::call::<StoreStatus>(at, hyper::Method::GET, "/v1/store", None) {
        reached = true;
        out.push(item(true, "control daemon reachable", at.to_string(), ""));
        out.push(item(
            st.reachable,
            format!("store reachable ({})", st.store),
            if st.reachable {
                format!("config index {}", st.served_index)
            } else {
                format!(
                    "{}: {} for {}s; writes are refused, proxies are served the last good state (config index {})",
                    Reason::StoreUnreachable.as_str(),
                    st.reason.unwrap_or_default(),
                    st.unreachable_for_s,
                    st.served_index
                )
            },
            Reason::StoreUnreachable.hint(),
        ));
    }
    let proxies = match daemon::call::<Vec<ProxyStatus>>(
        at,
        hyper::Method::GET,
        "/v1/proxies",
        None,
    ) {
        Ok(list) => {
            if !reached {
                out.push(item(true, "control daemon reachable", at.to_string(), ""));
            }
            list
        }
        Err(CallError::Answer(AnswerError::Refused { status, error })) if reached => {
            out.push(item(
                false,
                "proxies listed by the daemon",
                format!("{status}: {}", error.unwrap_or_default()),
                "see the store check above",
            ));
            Vec::new()
        }
        Err(CallError::Answer(AnswerError::Refused { status, error })) => {
            out.push(item(
                false,
                "control daemon reachable",
                format!("{status}: {}", error.unwrap_or_default()),
                "check the daemon's log",
            ));
            Vec::new()
        }
        Err(CallError::Answer(e @ AnswerError::Unreadable(_))) => {
            out.push(item(
                false,
                "control daemon reachable",
                e.to_string(),
                "run a ringctl of the same version as the daemon",
            ));
            Vec::new()
        }
        Err(CallError::Unreachable(e)) => {
            out.push(item(
                    false,
                    "control daemon reachable",
                    format!("{e:#}"),
                    "start it: ringctl daemon --data-dir DIR (or pass --socket, or --server for its TCP port)",
                ));
            Vec::new()
        }
    };
    for p in &proxies {
        let id = &p.report.id;
        out.push(item(
            p.live,
            format!("proxy {id} reports to the daemon"),
            format!("last report {}s ago", now - p.last_seen),
            "check that it runs and can reach the daemon's proxy socket (ctl_unreachable in its log)",
        ));
        let exp = p.report.cert_not_after - now;
        out.push(item(
            exp > CERT_MARGIN_S,
            format!("proxy {id}: certificate valid and not close to expiry"),
            if exp > 0 {
                format!("expires in {exp}s")
            } else {
                format!("EXPIRED {}s ago", -exp)
            },
            "it renews at half its lifetime: check it reaches the daemon; ringctl cert rotate",
        ));
        let skew = p.report.clock - p.last_seen;
        out.push(item(
            skew.abs() <= MAX_SKEW_S,
            format!("proxy {id}: clock agrees with the daemon's"),
            format!("{skew:+}s"),
            "synchronize the clocks (NTP): skew breaks certificate validity checks",
        ));
    }
    let Some(ns) = netns else {
        return out;
    };
    // The pod.
    match netns_has_rules(ns) {
        Ok(true) => {
            let rules = std::process::Command::new("ip")
                .args(["netns", "exec", ns, "iptables-save", "-t", "nat"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let nft = std::process::Command::new("ip")
                .args(["netns", "exec", ns, "nft", "list", "ruleset"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let text = rules + &nft;
            let both = text.contains("15001") && text.contains("15006");
            out.push(item(
                both,
                format!("redirect rules in pod {ns}"),
                if both {
                    "outbound -> 15001 and inbound -> 15006 installed".to_string()
                } else {
                    "incomplete".into()
                },
                format!("ringctl redirect install --netns {ns}"),
            ));
        }
        Ok(false) => out.push(item(
            false,
            format!("redirect rules in pod {ns}"),
            "none: traffic bypasses the sidecar",
            format!("ringctl redirect install --netns {ns}"),
        )),
        Err(e) => out.push(item(
            false,
            format!("redirect rules in pod {ns}"),
            e,
            "check the namespace name",
        )),
    }
    let listeners = match netns_listeners(ns) {
        Ok(l) => l,
        Err(e) => {
            out.push(item(
                false,
                format!("pod {ns} exists"),
                e,
                "check the namespace name (ip netns list)",
            ));
            return out;
        }
    };
    for (port, what) in [(15001u16, "outbound"), (15006, "inbound")] {
        let up = listeners.iter().any(|s| s.addr.port() == port);
        out.push(item(
            up,
            format!("sidecar {what} listener on {port}"),
            if up { "bound" } else { "nothing listens" },
            "start the sidecar (ringside run); with the rules installed and no sidecar every connection is refused",
        ));
    }
    let ready = admin_get(ns, "/ready");
    out.push(item(
        ready.as_deref().is_some_and(|r| r.starts_with("LIVE")),
        "sidecar ready (admin /ready)",
        ready
            .unwrap_or_else(|| "no answer on 127.0.0.1:15000".into())
            .trim()
            .to_string(),
        "check the sidecar's log; it is ready once its listeners are bound and its config applied",
    ));
    if let Some(certs) =
        admin_get(ns, "/certs").and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    {
        for c in certs.as_array().into_iter().flatten() {
            let exp = c["expires_in_s"].as_i64().unwrap_or(0);
            out.push(item(
                exp > CERT_MARGIN_S,
                format!(
                    "sidecar certificate {} valid",
                    c["identity"].as_str().unwrap_or("")
                ),
                if exp > 0 {
                    format!("expires in {exp}s")
                } else {
                    format!("EXPIRED {}s ago", -exp)
                },
                "check the sidecar reaches the daemon (it renews at half the lifetime)",
            ));
        }
    }
    // Each local service's targetPort.
    if let Some(dump) = admin_get(ns, "/config_dump")
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    {
        for s in dump["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["local"] == true)
        {
            let name = s["name"].as_str().unwrap_or("?");
            let tp = s["target_port"]
                .as_u64()
                .or(s["port"].as_u64())
                .unwrap_or(0) as u16;
            let on: Vec<String> = listeners
                .iter()
                .filter(|l| l.addr.port() == tp)
                .map(|l| l.addr.to_string())
                .collect();
            let reachable = listeners.iter().any(|l| {
                l.addr.port() == tp
                    && (l.addr.ip().is_unspecified()
                        || l.addr.ip() == std::net::IpAddr::from([127, 0, 0, 1])
                        || l.addr.ip() == std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
                        || !l.addr.ip().is_loopback())
            });
            let others: Vec<String> = listeners
                .iter()
                .filter(|l| ![15000u16, 15001, 15006, 15021].contains(&l.addr.port()))
                .map(|l| l.addr.to_string())
                .collect();
            out.push(item(
                reachable,
                format!("{name}: the app listens on targetPort {tp}"),
                if on.is_empty() { format!("nothing on {tp}; listening: {}", others.join(", ")) } else { format!("at {}", on.join(", ")) },
                format!("make the app listen on {tp} at 0.0.0.0, 127.0.0.1 or the pod address, or fix the service's targetPort"),
            ));
        }
    }
    // localhost -> ::1 while an app listens on 127.0.0.1 only.
    let resolved = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "getent", "ahosts", "localhost"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let first_v6 = resolved
        .lines()
        .next()
        .is_some_and(|l| l.starts_with("::1"));
    let v4_only: Vec<u16> = listeners
        .iter()
        .filter(|l| l.addr.ip() == std::net::IpAddr::from([127, 0, 0, 1]))
        .map(|l| l.addr.port())
        .filter(|p| {
            !listeners.iter().any(|o| {
                o.addr.port() == *p && (o.addr.ip().is_unspecified() || o.addr.ip().is_ipv6())
            })
        })
        .collect();
    let trap = first_v6 && !v4_only.is_empty();
    out.push(item(
        !trap,
        "localhost resolves to an address the apps listen on",
        if trap {
            format!("localhost resolves to ::1 first, but port(s) {v4_only:?} listen only on 127.0.0.1: clients of localhost:PORT are refused")
        } else {
            "ok".to_string()
        },
        "listen on both 127.0.0.1 and ::1 (or on ::), or have clients use 127.0.0.1 instead of localhost",
    ));
    out
}

/// Print the checks for people.
pub fn print(items: &[Item]) {
    for i in items {
        println!(
            "[{}] {}: {}",
            if i.ok { " ok " } else { "FAIL" },
            i.check,
            i.found
        );
        if let Some(f) = &i.fix {
            println!("       fix: {f}");
        }
    }
    let failed = items.iter().filter(|i| !i.ok).count();
    println!("\n{} checks, {failed} failed", items.len());
}
