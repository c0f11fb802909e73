//! One connection -> what to do with it, decided once, with no socket and no clock.
//!
//! [`plan`] takes the listener, the original destination, the proxy's own addresses, the
//! configuration in force and, when it asked for them, what the first bytes are. It answers
//! either [`Plan::Detect`] (read the first bytes, then ask again) or the final plan. The
//! destination's side decides from **its own** configuration (the service's declared protocol),
//! never from what the caller offers: a service declared HTTP is served by the L7 path whatever
//! ALPN the caller sent or whether its ClientHello could be parsed.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::config::{Listener, ListenerKind, MtlsMode, Protocol, Service, ServiceMtls, TlsMode};
use crate::decide::detect::{Detection, Want};
use crate::decide::route::{Route, Routes};
use crate::reason::Reason;

/// How long an undeclared outbound connection may stay silent before it is taken as TCP.
pub const DETECT_HTTP: Duration = Duration::from_millis(100);
/// How long a strict-mTLS inbound connection may take to send its whole ClientHello.
pub const DETECT_STRICT: Duration = Duration::from_secs(5);
/// How long a permissive inbound connection may stay silent before it is taken as plaintext
/// (a server-first protocol never sends first).
pub const DETECT_PERMISSIVE: Duration = Duration::from_millis(300);

/// The proxy's own listening ports and the host's (pod's) addresses: a connection headed to one
/// of those is headed back into the proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnAddrs {
    /// Every port the proxy listens on (sidecar listeners, static listeners, admin, health).
    pub ports: Vec<u16>,
    /// The local addresses (loopback and unspecified always count).
    pub ips: Vec<IpAddr>,
}

impl OwnAddrs {
    /// Whether `a` is one of the proxy's own listeners.
    pub fn is_own(&self, a: SocketAddr) -> bool {
        let ip = canonical(a.ip());
        self.ports.contains(&a.port())
            && (ip.is_loopback() || ip.is_unspecified() || self.ips.contains(&ip))
    }

    /// Whether looking up the local addresses could change the answer for `a` (its port is
    /// ours, its address not known as local yet): the I/O side refreshes `ips` only then.
    pub fn needs_refresh(&self, a: SocketAddr) -> bool {
        self.ports.contains(&a.port()) && !self.is_own(a)
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Everything the plan is made from.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The listener that accepted the connection.
    pub listener: &'a Listener,
    /// Sidecar listeners: the original destination, or why there is none.
    pub orig_dst: Option<Result<SocketAddr, &'a str>>,
    /// The proxy's own listeners.
    pub own: &'a OwnAddrs,
    /// Services in force.
    pub services: &'a [Service],
    /// Original-destination lookup in force.
    pub routes: &'a Routes,
    /// The sidecar's mesh mTLS mode (`None`: no mesh mTLS).
    pub mesh: Option<MtlsMode>,
    /// Whether the L7 path runs.
    pub l7: bool,
}

/// What the L7 path is handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L7Plan {
    /// Outbound HTTP to a service; mTLS to its sidecars when `mesh`.
    Outbound {
        /// Index into the services.
        service: usize,
        /// Originate mesh mTLS.
        mesh: bool,
    },
    /// Inbound to a local HTTP service: every request is checked, then sent to the app.
    Inbound {
        /// Index into the services.
        service: usize,
        /// The application's port.
        port: u16,
        /// The pod's address.
        pod_ip: IpAddr,
        /// Mesh TLS to terminate first (false: permissive plaintext, no identity).
        tls: bool,
    },
    /// A static HTTP listener (reverse proxy, or a tunnel end with the listener's TLS).
    Static {
        /// Index into the services.
        service: usize,
    },
}

/// What to do with one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Refuse at once; nothing is connected.
    Refuse {
        /// Reason code.
        reason: Reason,
        /// What decided it.
        detail: String,
    },
    /// Read the first bytes (within `wait`), then plan again with what they are.
    Detect {
        /// What to tell apart.
        want: Want,
        /// The detection deadline, from now.
        wait: Duration,
    },
    /// Plain bytes both ways where the route says (splice or copy).
    Relay(Route),
    /// Outbound to a mesh service: connect to an endpoint, originate mTLS, relay.
    Originate {
        /// Index into the services.
        service: usize,
    },
    /// Inbound mesh TLS for a local TCP service: terminate (the verifier asks the intentions,
    /// L4 rules), then relay to the app.
    Terminate {
        /// Index into the services.
        service: usize,
        /// Where the app is.
        app: Route,
    },
    /// A static listener with TLS: plaintext in and mTLS out, or mTLS in and plaintext out.
    Tunnel {
        /// Index into the services.
        service: usize,
        /// Which end.
        mode: TlsMode,
    },
    /// Hand the connection to the L7 path.
    L7(L7Plan),
}

fn refuse(reason: Reason, detail: String) -> Plan {
    Plan::Refuse { reason, detail }
}

/// Decide what to do with a connection. Call it with `detected: None` first; a
/// [`Plan::Detect`] answer asks for the first bytes, then call it again with what they are.
pub fn plan(input: &Input, detected: Option<&Detection>) -> Plan {
    let l = input.listener;
    match l.kind {
        ListenerKind::Static(service) => match (&l.tls, l.protocol.is_http() && input.l7) {
            (_, true) => Plan::L7(L7Plan::Static { service }),
            (Some(tls), false) => Plan::Tunnel {
                service,
                mode: tls.mode,
            },
            (None, false) => Plan::Relay(Route::Cluster(service)),
        },
        ListenerKind::Outbound | ListenerKind::Inbound => {
            let orig = match input.orig_dst {
                Some(Ok(a)) => a,
                Some(Err(_)) | None => {
                    let why = input.orig_dst.and_then(|r| r.err()).unwrap_or("none");
                    return refuse(
                        Reason::UnknownDestination,
                        format!(
                            "the connection reached {} without being redirected (no original destination: {why}); connect to the service, not to the proxy port",
                            l.address
                        ),
                    );
                }
            };
            if input.own.is_own(orig) {
                return refuse(
                    Reason::ProxyLoop,
                    format!(
                        "the original destination {orig} is this proxy's own listener; a connection there would loop through the proxy"
                    ),
                );
            }
            if l.kind == ListenerKind::Outbound {
                outbound(input, orig, detected)
            } else {
                inbound(input, orig, detected)
            }
        }
    }
}

fn outbound(input: &Input, orig: SocketAddr, detected: Option<&Detection>) -> Plan {
    let i = match input.routes.outbound(orig) {
        Route::Cluster(i) => i,
        Route::Refuse(reason) => {
            return refuse(
                reason,
                format!("{orig} is not a service of the mesh and registry_only is on"),
            )
        }
        other => return Plan::Relay(other),
    };
    let svc = &input.services[i];
    let mesh = input.mesh.is_some() && svc.mtls == ServiceMtls::Enable;
    let http = input.l7
        && match svc.protocol {
            p if p.is_http() => true,
            Protocol::Auto => match detected {
                None => {
                    return Plan::Detect {
                        want: Want::Http,
                        wait: DETECT_HTTP,
                    }
                }
                Some(d) => *d == Detection::Http,
            },
            _ => false,
        };
    match (http, mesh) {
        (true, _) => Plan::L7(L7Plan::Outbound { service: i, mesh }),
        (false, true) => Plan::Originate { service: i },
        (false, false) => Plan::Relay(Route::Cluster(i)),
    }
}

fn inbound(input: &Input, orig: SocketAddr, detected: Option<&Detection>) -> Plan {
    let app = input.routes.inbound(orig, |i| {
        let s = &input.services[i];
        s.target_port.or(s.port).unwrap_or(orig.port())
    });
    let (service, port, pod_ip) = match app {
        Route::Local {
            service,
            port,
            pod_ip,
        } => (service, port, pod_ip),
        Route::Refuse(reason) => {
            return refuse(
                reason,
                format!(
                    "port {} is not a service of this pod and registry_only is on",
                    orig.port()
                ),
            )
        }
        other => return Plan::Relay(other),
    };
    let svc = service.map(|i| (i, &input.services[i]));
    let l7_inbound = |tls: bool| {
        svc.map(|(i, _)| {
            Plan::L7(L7Plan::Inbound {
                service: i,
                port,
                pod_ip,
                tls,
            })
        })
    };
    let declared_http = input.l7 && svc.is_some_and(|(_, s)| s.protocol.is_http());
    let Some(mode) = input.mesh else {
        // No mesh mTLS: plaintext; declared HTTP still goes through the L7 path, so identity
        // headers from the caller never reach the app.
        return match declared_http {
            true => l7_inbound(false).unwrap_or(Plan::Relay(app)),
            false => Plan::Relay(app),
        };
    };
    // The control daemon may set the service's own mode (Consul's `mutualTLSMode`).
    let mode = svc.and_then(|(_, s)| s.inbound.mtls_mode).unwrap_or(mode);
    if svc.is_some_and(|(_, s)| s.mtls == ServiceMtls::Disable) {
        // The app speaks its own TLS: passthrough (zero-copy), also in strict mode.
        return Plan::Relay(app);
    }
    let Some(detected) = detected else {
        return Plan::Detect {
            want: Want::TlsOrPlain,
            wait: match mode {
                MtlsMode::Strict => DETECT_STRICT,
                MtlsMode::Permissive => DETECT_PERMISSIVE,
            },
        };
    };
    match (detected, mode) {
        (Detection::Tls { alpn }, _) => {
            let Some((i, s)) = svc else {
                return refuse(
                    Reason::UnknownDestination,
                    format!(
                        "mesh TLS arrived for port {}, which is not a local mesh service",
                        orig.port()
                    ),
                );
            };
            // The destination's own declaration decides; ALPN only tells an undeclared
            // service's HTTP callers apart (and the L4 verifier refuses allows that carry
            // L7 permissions, so choosing L4 can never skip them).
            let offers_http = alpn
                .as_ref()
                .is_some_and(|a| a.iter().any(|p| p == crate::decide::detect::ALPN_HTTP));
            let http = input.l7
                && match s.protocol {
                    p if p.is_http() => true,
                    Protocol::Auto => offers_http,
                    _ => false,
                };
            if http {
                l7_inbound(true).unwrap_or(Plan::Relay(app))
            } else {
                Plan::Terminate { service: i, app }
            }
        }
        (Detection::Timeout, MtlsMode::Strict) => refuse(
            Reason::DetectTimeout,
            format!(
                "no complete TLS ClientHello within {DETECT_STRICT:?} (a slow or silent client on a strict mTLS port)"
            ),
        ),
        (_, MtlsMode::Strict) => refuse(
            Reason::PlaintextRejected,
            "plaintext arrived at a strict mTLS sidecar".into(),
        ),
        (Detection::Http, MtlsMode::Permissive)
            if input.l7
                && svc.is_some_and(|(_, s)| {
                    s.protocol.is_http() || s.protocol == Protocol::Auto
                }) =>
        {
            l7_inbound(false).unwrap_or(Plan::Relay(app))
        }
        (_, MtlsMode::Permissive) => Plan::Relay(app),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Format};

    const YAML: &str = "sidecar:
  registry_only: false
services:
  - name: web
    port: 80
    target_port: 8080
    local: true
    protocol: http
  - name: db
    port: 5432
    local: true
    protocol: tcp
  - name: misc
    port: 7000
    local: true
    protocol: auto
  - name: legacy
    port: 9443
    local: true
    mtls: disable
  - name: api
    virtual_ip: 198.18.100.1
    port: 80
    endpoints: [\"198.18.0.3:8080\"]
    protocol: http
  - name: pg
    virtual_ip: 198.18.100.2
    port: 5432
    endpoints: [\"198.18.0.4:5432\"]
    protocol: tcp
  - name: undeclared
    virtual_ip: 198.18.100.3
    port: 9000
    endpoints: [\"198.18.0.5:9000\"]
    protocol: auto
";

    struct World {
        config: Config,
        routes: Routes,
        own: OwnAddrs,
    }

    fn world(registry_only: bool) -> World {
        let y = YAML.replace(
            "registry_only: false",
            &format!("registry_only: {registry_only}"),
        );
        let config = Config::parse(&y, Format::Yaml).unwrap();
        let routes = Routes::new(&config.services, registry_only);
        World {
            routes,
            own: OwnAddrs {
                ports: vec![15001, 15006, 15000, 15021],
                ips: vec!["198.18.0.2".parse().unwrap()],
            },
            config,
        }
    }

    fn listener(w: &World, kind: ListenerKind) -> &Listener {
        w.config.listeners.iter().find(|l| l.kind == kind).unwrap()
    }

    fn run(
        w: &World,
        kind: ListenerKind,
        orig: &str,
        mesh: Option<MtlsMode>,
        detected: Option<Detection>,
    ) -> Plan {
        let orig: SocketAddr = orig.parse().unwrap();
        let input = Input {
            listener: listener(w, kind),
            orig_dst: Some(Ok(orig)),
            own: &w.own,
            services: &w.config.services,
            routes: &w.routes,
            mesh,
            l7: true,
        };
        plan(&input, detected.as_ref())
    }

    fn idx(w: &World, name: &str) -> usize {
        w.config
            .services
            .iter()
            .position(|s| s.name == name)
            .unwrap()
    }

    const STRICT: Option<MtlsMode> = Some(MtlsMode::Strict);
    const PERMISSIVE: Option<MtlsMode> = Some(MtlsMode::Permissive);

    fn tls(alpn: Option<&[u8]>) -> Option<Detection> {
        Some(Detection::Tls {
            alpn: alpn.map(|a| vec![a.to_vec()]),
        })
    }

    #[test]
    fn own_listeners_are_refused_on_every_address_both_ways() {
        let w = world(false);
        for kind in [ListenerKind::Outbound, ListenerKind::Inbound] {
            for mesh in [None, STRICT, PERMISSIVE] {
                for orig in [
                    "127.0.0.1:15001",
                    "127.0.0.1:15006",
                    "198.18.0.2:15006",
                    "198.18.0.2:15000",
                    "198.18.0.2:15021",
                    "[::1]:15001",
                    "[::ffff:198.18.0.2]:15006",
                    "0.0.0.0:15006",
                ] {
                    match run(&w, kind, orig, mesh, None) {
                        Plan::Refuse {
                            reason: Reason::ProxyLoop,
                            ..
                        } => {}
                        p => panic!("{kind:?} {mesh:?} {orig}: {p:?}"),
                    }
                }
            }
        }
        // Another pod's 15006 is not ours: passed through (its own sidecar refuses it there).
        assert_eq!(
            run(&w, ListenerKind::Outbound, "198.18.0.9:15006", None, None),
            Plan::Relay(Route::Passthrough("198.18.0.9:15006".parse().unwrap()))
        );
        let own = OwnAddrs {
            ports: vec![15006],
            ips: vec![],
        };
        assert!(own.needs_refresh("198.18.0.2:15006".parse().unwrap()));
        assert!(!own.needs_refresh("198.18.0.2:80".parse().unwrap()));
        assert!(!own.needs_refresh("127.0.0.1:15006".parse().unwrap()));
    }

    #[test]
    fn unredirected_connections_are_refused() {
        let w = world(false);
        let input = Input {
            listener: listener(&w, ListenerKind::Outbound),
            orig_dst: Some(Err("ENOENT")),
            own: &w.own,
            services: &w.config.services,
            routes: &w.routes,
            mesh: STRICT,
            l7: true,
        };
        match plan(&input, None) {
            Plan::Refuse {
                reason: Reason::UnknownDestination,
                detail,
            } => assert!(detail.contains("without being redirected"), "{detail}"),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn outbound_by_declared_protocol() {
        let w = world(false);
        let o = ListenerKind::Outbound;
        let (api, pg, und) = (idx(&w, "api"), idx(&w, "pg"), idx(&w, "undeclared"));
        assert_eq!(
            run(&w, o, "198.18.100.1:80", STRICT, None),
            Plan::L7(L7Plan::Outbound {
                service: api,
                mesh: true
            })
        );
        assert_eq!(
            run(&w, o, "198.18.100.2:5432", STRICT, None),
            Plan::Originate { service: pg }
        );
        assert_eq!(
            run(&w, o, "198.18.100.2:5432", None, None),
            Plan::Relay(Route::Cluster(pg))
        );
        assert_eq!(
            run(&w, o, "198.18.100.3:9000", STRICT, None),
            Plan::Detect {
                want: Want::Http,
                wait: DETECT_HTTP
            }
        );
        assert_eq!(
            run(&w, o, "198.18.100.3:9000", STRICT, Some(Detection::Http)),
            Plan::L7(L7Plan::Outbound {
                service: und,
                mesh: true
            })
        );
        for d in [Detection::Other, Detection::Timeout] {
            assert_eq!(
                run(&w, o, "198.18.100.3:9000", STRICT, Some(d)),
                Plan::Originate { service: und }
            );
        }
        let other: SocketAddr = "198.18.0.99:443".parse().unwrap();
        assert_eq!(
            run(&w, o, "198.18.0.99:443", STRICT, None),
            Plan::Relay(Route::Passthrough(other))
        );
        let strict = world(true);
        match run(&strict, o, "198.18.0.99:443", STRICT, None) {
            Plan::Refuse {
                reason: Reason::UnknownDestination,
                ..
            } => {}
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn inbound_http_service_is_l7_whatever_the_caller_offers() {
        let w = world(false);
        let i = ListenerKind::Inbound;
        let web = idx(&w, "web");
        let want = Plan::L7(L7Plan::Inbound {
            service: web,
            port: 8080,
            pod_ip: "198.18.0.2".parse().unwrap(),
            tls: true,
        });
        for alpn in [
            Some(&b"ringside/http"[..]),
            Some(&b"ringside/tcp"[..]),
            Some(&b"h2"[..]),
            None,
        ] {
            assert_eq!(
                run(&w, i, "198.18.0.2:80", STRICT, tls(alpn)),
                want,
                "{alpn:?}"
            );
        }
        assert_eq!(
            run(&w, i, "198.18.0.2:80", STRICT, None),
            Plan::Detect {
                want: Want::TlsOrPlain,
                wait: DETECT_STRICT
            }
        );
    }

    #[test]
    fn inbound_tcp_and_undeclared_services() {
        let w = world(false);
        let i = ListenerKind::Inbound;
        let (db, misc) = (idx(&w, "db"), idx(&w, "misc"));
        let pod: IpAddr = "198.18.0.2".parse().unwrap();
        let local = |service, port| Route::Local {
            service: Some(service),
            port,
            pod_ip: pod,
        };
        assert_eq!(
            run(
                &w,
                i,
                "198.18.0.2:5432",
                STRICT,
                tls(Some(b"ringside/http"))
            ),
            Plan::Terminate {
                service: db,
                app: local(db, 5432)
            },
            "a tcp service stays L4 even when the caller asks for HTTP"
        );
        assert_eq!(
            run(
                &w,
                i,
                "198.18.0.2:7000",
                STRICT,
                tls(Some(b"ringside/http"))
            ),
            Plan::L7(L7Plan::Inbound {
                service: misc,
                port: 7000,
                pod_ip: pod,
                tls: true
            })
        );
        assert_eq!(
            run(&w, i, "198.18.0.2:7000", STRICT, tls(Some(b"ringside/tcp"))),
            Plan::Terminate {
                service: misc,
                app: local(misc, 7000)
            }
        );
        let legacy = idx(&w, "legacy");
        assert_eq!(
            run(&w, i, "198.18.0.2:9443", STRICT, None),
            Plan::Relay(local(legacy, 9443)),
            "mtls: disable passes through without detection"
        );
        match run(&w, i, "198.18.0.2:6379", STRICT, tls(None)) {
            Plan::Refuse {
                reason: Reason::UnknownDestination,
                ..
            } => {}
            p => panic!("mesh TLS to an undeclared port: {p:?}"),
        }
    }

    #[test]
    fn the_service_mode_pushed_by_the_daemon_overrides_the_sidecars() {
        let mut w = world(false);
        let i = ListenerKind::Inbound;
        let db = idx(&w, "db");
        let pod: IpAddr = "198.18.0.2".parse().unwrap();
        // Strict sidecar, service set permissive: plaintext reaches the app.
        w.config.services[db].inbound.mtls_mode = Some(MtlsMode::Permissive);
        assert_eq!(
            run(&w, i, "198.18.0.2:5432", STRICT, Some(Detection::Other)),
            Plan::Relay(Route::Local {
                service: Some(db),
                port: 5432,
                pod_ip: pod
            })
        );
        // Other services keep the sidecar's mode.
        match run(&w, i, "198.18.0.2:80", STRICT, Some(Detection::Other)) {
            Plan::Refuse {
                reason: Reason::PlaintextRejected,
                ..
            } => {}
            p => panic!("{p:?}"),
        }
        // Permissive sidecar, service set strict: plaintext is refused.
        w.config.services[db].inbound.mtls_mode = Some(MtlsMode::Strict);
        match run(&w, i, "198.18.0.2:5432", PERMISSIVE, Some(Detection::Other)) {
            Plan::Refuse {
                reason: Reason::PlaintextRejected,
                ..
            } => {}
            p => panic!("{p:?}"),
        }
        assert_eq!(
            run(&w, i, "198.18.0.2:5432", PERMISSIVE, None),
            Plan::Detect {
                want: Want::TlsOrPlain,
                wait: DETECT_STRICT
            }
        );
    }

    #[test]
    fn strict_and_permissive_plaintext() {
        let w = world(false);
        let i = ListenerKind::Inbound;
        let pod: IpAddr = "198.18.0.2".parse().unwrap();
        for d in [Detection::Http, Detection::Other] {
            match run(&w, i, "198.18.0.2:80", STRICT, Some(d.clone())) {
                Plan::Refuse {
                    reason: Reason::PlaintextRejected,
                    ..
                } => {}
                p => panic!("{d:?}: {p:?}"),
            }
        }
        match run(&w, i, "198.18.0.2:80", STRICT, Some(Detection::Timeout)) {
            Plan::Refuse {
                reason: Reason::DetectTimeout,
                ..
            } => {}
            p => panic!("{p:?}"),
        }
        assert_eq!(
            run(&w, i, "198.18.0.2:80", PERMISSIVE, None),
            Plan::Detect {
                want: Want::TlsOrPlain,
                wait: DETECT_PERMISSIVE
            }
        );
        let web = idx(&w, "web");
        assert_eq!(
            run(&w, i, "198.18.0.2:80", PERMISSIVE, Some(Detection::Http)),
            Plan::L7(L7Plan::Inbound {
                service: web,
                port: 8080,
                pod_ip: pod,
                tls: false
            }),
            "permissive plaintext HTTP goes through the L7 path (identity headers removed)"
        );
        let db = idx(&w, "db");
        assert_eq!(
            run(
                &w,
                i,
                "198.18.0.2:5432",
                PERMISSIVE,
                Some(Detection::Timeout)
            ),
            Plan::Relay(Route::Local {
                service: Some(db),
                port: 5432,
                pod_ip: pod
            }),
            "a silent (server-first) client is plaintext in permissive mode"
        );
        assert_eq!(
            run(&w, i, "198.18.0.2:6379", PERMISSIVE, Some(Detection::Other)),
            Plan::Relay(Route::Local {
                service: None,
                port: 6379,
                pod_ip: pod
            })
        );
        assert_eq!(
            run(&w, i, "198.18.0.2:80", None, None),
            Plan::L7(L7Plan::Inbound {
                service: web,
                port: 8080,
                pod_ip: pod,
                tls: false
            }),
            "no mesh mTLS: declared HTTP still goes through the L7 path"
        );
    }

    #[test]
    fn static_listeners() {
        let c = Config::forward(
            "127.0.0.1:7000".parse().unwrap(),
            vec!["127.0.0.1:7001".parse().unwrap()],
            Default::default(),
        )
        .unwrap();
        let routes = Routes::new(&c.services, false);
        let own = OwnAddrs::default();
        let input = Input {
            listener: &c.listeners[0],
            orig_dst: None,
            own: &own,
            services: &c.services,
            routes: &routes,
            mesh: None,
            l7: false,
        };
        assert_eq!(plan(&input, None), Plan::Relay(Route::Cluster(0)));
    }

    /// A static listener with mesh TLS is a tunnel end (either way) unless it speaks HTTP to the
    /// L7 path; a static HTTP listener is served by the L7 path (with or without TLS) and is
    /// relayed as bytes only when the L7 path does not run.
    #[test]
    fn static_listeners_with_tls_or_http() {
        use crate::config::{ListenerTls, TlsFiles};
        let c = Config::forward(
            "127.0.0.1:7000".parse().unwrap(),
            vec!["127.0.0.1:7001".parse().unwrap()],
            Default::default(),
        )
        .unwrap();
        let routes = Routes::new(&c.services, false);
        let own = OwnAddrs::default();
        let with = |tls: Option<TlsMode>, protocol: Protocol| {
            let mut l = c.listeners[0].clone();
            l.tls = tls.map(|mode| ListenerTls {
                mode,
                files: TlsFiles {
                    cert: "c.pem".into(),
                    key: "k.pem".into(),
                    ca: "ca.pem".into(),
                },
                expect_id: None,
                allow_ids: Vec::new(),
                resumption: true,
            });
            l.protocol = protocol;
            l
        };
        let run = |l: &Listener, l7: bool| {
            let input = Input {
                listener: l,
                orig_dst: None,
                own: &own,
                services: &c.services,
                routes: &routes,
                mesh: None,
                l7,
            };
            plan(&input, None)
        };
        for mode in [TlsMode::Origin, TlsMode::Terminate] {
            for l7 in [true, false] {
                assert_eq!(
                    run(&with(Some(mode), Protocol::Tcp), l7),
                    Plan::Tunnel { service: 0, mode },
                    "tcp, {mode:?}, l7 {l7}"
                );
            }
            assert_eq!(
                run(&with(Some(mode), Protocol::Http), false),
                Plan::Tunnel { service: 0, mode },
                "http without the L7 path, {mode:?}"
            );
            assert_eq!(
                run(&with(Some(mode), Protocol::Http), true),
                Plan::L7(L7Plan::Static { service: 0 }),
                "http, {mode:?}"
            );
        }
        for protocol in [Protocol::Http, Protocol::Http2, Protocol::Grpc] {
            assert_eq!(
                run(&with(None, protocol), true),
                Plan::L7(L7Plan::Static { service: 0 }),
                "{protocol:?}"
            );
            assert_eq!(
                run(&with(None, protocol), false),
                Plan::Relay(Route::Cluster(0)),
                "{protocol:?} without the L7 path"
            );
        }
        assert_eq!(
            run(&with(None, Protocol::Tcp), true),
            Plan::Relay(Route::Cluster(0))
        );
    }
}
