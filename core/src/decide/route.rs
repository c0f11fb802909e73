//! Where a redirected connection goes, decided from its original destination (pure code).
//!
//! Outbound (from the pod's applications): a service's virtual IP and port, or one of its
//! endpoints, selects that service (load-balanced over its endpoints); anything else is passed
//! through to where the application addressed it, or refused in `registry_only` mode.
//! Inbound (to the pod): the original port selects the local service, whose application is reached
//! on its `target_port`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::Service;
use crate::reason::Reason;

/// The decision for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Load-balance over a service's endpoints (index into the services).
    Cluster(usize),
    /// Connect to the original destination itself.
    Passthrough(SocketAddr),
    /// Connect to the local application on `port` (inbound); `service` when it is a known one.
    Local {
        /// The local service, if the port is one.
        service: Option<usize>,
        /// The application's port.
        port: u16,
        /// The pod's own address (the original destination's IP).
        pod_ip: IpAddr,
    },
    /// Refuse with this reason.
    Refuse(Reason),
}

/// Lookup tables built once per configuration.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    by_dst: HashMap<SocketAddr, usize>,
    local_by_port: HashMap<u16, usize>,
    registry_only: bool,
}

impl Routes {
    /// Build the tables. When two services claim the same address the first one wins.
    pub fn new(services: &[Service], registry_only: bool) -> Routes {
        let mut r = Routes {
            registry_only,
            ..Routes::default()
        };
        // Subsets are reached through routes and splits, never by address.
        for (i, s) in services
            .iter()
            .enumerate()
            .filter(|(_, s)| s.subset.is_none())
        {
            if let (Some(vip), Some(port)) = (s.virtual_ip, s.port) {
                r.by_dst.entry(SocketAddr::new(vip, port)).or_insert(i);
            }
            for e in &s.endpoints {
                r.by_dst.entry(*e).or_insert(i);
            }
            if let (true, Some(port)) = (s.local, s.port) {
                r.local_by_port.entry(port).or_insert(i);
            }
        }
        r
    }

    /// Route an outbound connection by its original destination.
    pub fn outbound(&self, orig: SocketAddr) -> Route {
        match self.by_dst.get(&normalize(orig)) {
            Some(&i) => Route::Cluster(i),
            None if self.registry_only => Route::Refuse(Reason::UnknownDestination),
            None => Route::Passthrough(orig),
        }
    }

    /// Route an inbound connection by its original destination; `target_port` maps the service
    /// port to the application's.
    pub fn inbound(&self, orig: SocketAddr, target_port: impl Fn(usize) -> u16) -> Route {
        match self.local_by_port.get(&orig.port()) {
            Some(&i) => Route::Local {
                service: Some(i),
                port: target_port(i),
                pod_ip: orig.ip(),
            },
            None if self.registry_only => Route::Refuse(Reason::UnknownDestination),
            None => Route::Local {
                service: None,
                port: orig.port(),
                pod_ip: orig.ip(),
            },
        }
    }
}

/// `::ffff:a.b.c.d` is the IPv4 address it carries.
fn normalize(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// Where the local application is tried, in order. For a declared service's `targetPort`: IPv4
/// loopback, IPv6 loopback, the pod's own address (so that `localhost` meaning `::1`, or an app
/// bound to the pod IP only, still works). For any other port only the pod's address: an app
/// that listens on loopback only chose not to be reachable from outside the pod, and the mesh
/// must not change that.
pub fn local_candidates(port: u16, pod_ip: IpAddr, declared: bool) -> Vec<SocketAddr> {
    let mut v = Vec::with_capacity(3);
    if declared {
        v.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
        v.push(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port));
    }
    let pod = match pod_ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(pod_ip),
        ip => ip,
    };
    if !pod.is_loopback() && !pod.is_unspecified() {
        v.push(SocketAddr::new(pod, port));
    }
    v
}

/// `ServiceResolver` failover, for TCP as for HTTP (Consul's semantics): when `service` has no
/// endpoint that may be chosen at `now` (none, or all ejected), the first of its failover
/// `targets` that has one; otherwise `service` itself. Subsets are not failover targets.
pub fn fail_over(
    clusters: &[std::sync::Arc<crate::decide::cluster::Cluster>],
    service: usize,
    targets: &[&str],
    now: std::time::Instant,
) -> usize {
    let usable = |i: usize| {
        let c = &clusters[i];
        (0..c.endpoints.len()).any(|e| !c.is_ejected(e, now))
    };
    if targets.is_empty() || usable(service) {
        return service;
    }
    targets
        .iter()
        .find_map(|t| {
            clusters
                .iter()
                .position(|c| c.service.name == *t && c.service.subset.is_none())
                .filter(|&i| usable(i))
        })
        .unwrap_or(service)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Format};

    fn config(registry_only: bool) -> Config {
        let y = format!(
            "sidecar:\n  registry_only: {registry_only}\nservices:\n  - name: payments\n    port: 1800\n    target_port: 8080\n    local: true\n  - name: products\n    virtual_ip: 198.18.100.1\n    port: 9090\n    endpoints: [\"198.18.0.3:9090\", \"[fd00::3]:9090\"]\n"
        );
        Config::parse(&y, Format::Yaml).unwrap()
    }

    #[test]
    fn outbound_by_vip_or_endpoint() {
        let c = config(false);
        let r = Routes::new(
            &c.services,
            c.sidecar.as_ref().is_some_and(|s| s.registry_only),
        );
        assert_eq!(
            r.outbound("198.18.100.1:9090".parse().unwrap()),
            Route::Cluster(1)
        );
        assert_eq!(
            r.outbound("198.18.0.3:9090".parse().unwrap()),
            Route::Cluster(1)
        );
        assert_eq!(
            r.outbound("[fd00::3]:9090".parse().unwrap()),
            Route::Cluster(1)
        );
        assert_eq!(
            r.outbound("[::ffff:198.18.0.3]:9090".parse().unwrap()),
            Route::Cluster(1)
        );
        let other: SocketAddr = "198.18.0.9:80".parse().unwrap();
        assert_eq!(r.outbound(other), Route::Passthrough(other));
        assert_eq!(
            r.outbound("198.18.100.1:9091".parse().unwrap()),
            Route::Passthrough("198.18.100.1:9091".parse().unwrap())
        );
        let strict = {
            let c = config(true);
            Routes::new(&c.services, true)
        };
        assert_eq!(
            strict.outbound(other),
            Route::Refuse(Reason::UnknownDestination)
        );
    }

    #[test]
    fn inbound_maps_service_port_to_target_port() {
        let c = config(false);
        let r = Routes::new(
            &c.services,
            c.sidecar.as_ref().is_some_and(|s| s.registry_only),
        );
        let tp = |i: usize| c.services[i].target_port.or(c.services[i].port).unwrap();
        assert_eq!(
            r.inbound("198.18.0.2:1800".parse().unwrap(), tp),
            Route::Local {
                service: Some(0),
                port: 8080,
                pod_ip: "198.18.0.2".parse().unwrap()
            }
        );
        assert_eq!(
            r.inbound("198.18.0.2:7000".parse().unwrap(), tp),
            Route::Local {
                service: None,
                port: 7000,
                pod_ip: "198.18.0.2".parse().unwrap()
            }
        );
        let strict = {
            let c = config(true);
            Routes::new(&c.services, true)
        };
        assert_eq!(
            strict.inbound("198.18.0.2:7000".parse().unwrap(), tp),
            Route::Refuse(Reason::UnknownDestination)
        );
    }

    #[test]
    fn local_candidates_order() {
        let v: Vec<String> = local_candidates(8080, "198.18.0.2".parse().unwrap(), true)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(v, vec!["127.0.0.1:8080", "[::1]:8080", "198.18.0.2:8080"]);
        assert_eq!(
            local_candidates(8080, "127.0.0.1".parse().unwrap(), true).len(),
            2
        );
        assert_eq!(
            local_candidates(1, "::ffff:198.18.0.2".parse().unwrap(), true)[2].to_string(),
            "198.18.0.2:1"
        );
        let undeclared: Vec<String> = local_candidates(6379, "198.18.0.2".parse().unwrap(), false)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(
            undeclared,
            vec!["198.18.0.2:6379"],
            "loopback-only apps stay private"
        );
    }

    #[test]
    fn failover_only_when_the_service_has_no_usable_endpoint() {
        use crate::decide::cluster::Cluster;
        let y = "sidecar: {}\nservices:\n  - name: db\n    endpoints: [\"10.0.0.8:5432\"]\n  - name: db-dr\n    endpoints: [\"10.0.0.9:5432\"]\n  - name: db-dr2\n    endpoints: [\"10.0.0.10:5432\"]\n  - name: api\n    endpoints: [\"10.0.0.11:80\"]\n";
        let c = Config::parse(y, Format::Yaml).unwrap();
        let now = std::time::Instant::now();
        let clusters: Vec<_> = c
            .services
            .iter()
            .map(|s| Cluster::new(s.clone(), now))
            .collect();
        // Its endpoint usable: itself, whatever its failover.
        assert_eq!(fail_over(&clusters, 0, &["db-dr", "db-dr2"], now), 0);
        // Its only endpoint ejected: the first target that has one.
        clusters[0].report_failure(0, now);
        assert_eq!(fail_over(&clusters, 0, &["db-dr", "db-dr2"], now), 1);
        // No failover configured, or a service with endpoints: itself.
        assert_eq!(fail_over(&clusters, 0, &[], now), 0);
        assert_eq!(fail_over(&clusters, 3, &["db-dr"], now), 3);
        // An unknown target is skipped; none usable: itself.
        assert_eq!(fail_over(&clusters, 0, &["nowhere", "db-dr2"], now), 2);
        assert_eq!(fail_over(&clusters, 0, &["nowhere"], now), 0);
        // The first target's only endpoint ejected: the next target.
        clusters[1].report_failure(0, now);
        assert!(clusters[1].is_ejected(0, now));
        assert_eq!(fail_over(&clusters, 0, &["db-dr", "db-dr2"], now), 2);
    }
}
