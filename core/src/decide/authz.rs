//! Authorization at the destination, pure: whether a verified peer may call a local service, and
//! whether one HTTP request may pass. Used by the TLS verifiers (in the handshake, so a refusal is
//! the `access_denied` alert) and by the L7 path (per request, with the configuration in force).
//!
//! The rules that make the boundary hold:
//! - no peer identity, or one from another trust domain or namespace, is refused;
//! - an allow that carries L7 permissions admits a connection only when it is served by the L7
//!   path, where every request is checked; on the L4 path nothing could check them, so the
//!   connection is refused (fail closed) and the detail says to declare the service `http`;
//! - permissions match the normalized path ([`crate::policy::path`]).

use crate::policy::identity::SpiffeId;
use crate::policy::intentions::Intentions;
use crate::policy::rules::permit;
use crate::reason::Reason;

/// The destination sidecar's own place in the mesh: peers must be in the same trust domain and
/// namespace (the mesh has no cross-namespace or federated trust yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Trust domain.
    pub trust_domain: String,
    /// Namespace.
    pub namespace: String,
}

impl Scope {
    /// The scope of a sidecar whose own identity is `id`.
    pub fn of(id: &SpiffeId) -> Scope {
        Scope {
            trust_domain: id.trust_domain.clone(),
            namespace: id.namespace.clone(),
        }
    }
}

/// How a connection is served: L7 permissions can only be checked on the HTTP path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Bytes relayed as they are.
    L4,
    /// Every request parsed and checked.
    L7,
}

/// A refusal: the reason code and what decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// Reason code.
    pub reason: Reason,
    /// The deciding rule or check, for logs and `/events`.
    pub detail: String,
}

fn denied(reason: Reason, detail: String) -> Denied {
    Denied { reason, detail }
}

/// Whether `peer` may open a connection to `destination`, served as `served`. `Ok` carries the
/// deciding rule.
pub fn authorize_peer(
    intentions: &Intentions,
    scope: &Scope,
    peer: Option<&SpiffeId>,
    destination: &str,
    served: Served,
) -> Result<String, Denied> {
    let Some(peer) = peer else {
        return Err(denied(
            Reason::IntentionDenied,
            format!("-> {destination}: the caller presented no SPIFFE identity"),
        ));
    };
    if peer.trust_domain != scope.trust_domain || peer.namespace != scope.namespace {
        return Err(denied(
            Reason::TlsIdentityMismatch,
            format!(
                "{peer} -> {destination}: the caller is outside this mesh's trust domain '{}' and namespace '{}'",
                scope.trust_domain, scope.namespace
            ),
        ));
    }
    let d = intentions.evaluate(&peer.service, destination);
    if !d.allowed() {
        return Err(denied(
            Reason::IntentionDenied,
            format!("{} -> {destination}: {}", peer.service, d.explain()),
        ));
    }
    if served == Served::L4 && d.rule.is_some_and(|r| !r.permissions.is_empty()) {
        return Err(denied(
            Reason::IntentionDenied,
            format!(
                "{} -> {destination}: {} has L7 permissions, which only the HTTP path can check; the connection is not HTTP here (declare the service http: ServiceDefaults protocol: http)",
                peer.service,
                d.explain()
            ),
        ));
    }
    Ok(d.explain())
}

/// One HTTP request on the L7 path: the peer must still be allowed (intentions in force now), and
/// the allowing intention's permissions, if any, must let the method, normalized path and headers
/// through.
pub fn authorize_request(
    intentions: &Intentions,
    scope: &Scope,
    peer: Option<&SpiffeId>,
    destination: &str,
    method: &str,
    path: &str,
    headers: &hyper::HeaderMap,
) -> Result<(), Denied> {
    authorize_peer(intentions, scope, peer, destination, Served::L7)?;
    let Some(peer) = peer else {
        unreachable!("authorize_peer refuses a missing identity")
    };
    let d = intentions.evaluate(&peer.service, destination);
    if let Some(rule) = d.rule.filter(|r| !r.permissions.is_empty()) {
        let (ok, why) = permit(&rule.permissions, method, path, headers);
        if !ok {
            return Err(denied(
                Reason::RequestDenied,
                format!(
                    "{} -> {destination}: {method} {path}: {why} of {}",
                    peer.service,
                    d.explain()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intentions(yaml: &str) -> Intentions {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    const GET_ONLY: &str = "default: deny
rules:
  - source: frontend
    destination: api
    action: allow
    permissions:
      - action: deny
        http: { pathPrefix: /admin, caseInsensitive: true }
      - action: allow
        http: { methods: [GET] }
  - source: batch
    destination: api
    action: allow
";

    fn scope() -> Scope {
        Scope {
            trust_domain: "dc1".into(),
            namespace: "default".into(),
        }
    }

    #[test]
    fn permissions_admit_only_the_http_path() {
        let i = intentions(GET_ONLY);
        let front = id("spiffe://dc1/ns/default/sa/frontend");
        let d = authorize_peer(&i, &scope(), Some(&front), "api", Served::L4).unwrap_err();
        assert_eq!(d.reason, Reason::IntentionDenied);
        assert!(d.detail.contains("L7 permissions"), "{}", d.detail);
        assert!(authorize_peer(&i, &scope(), Some(&front), "api", Served::L7).is_ok());
        let batch = id("spiffe://dc1/ns/default/sa/batch");
        assert!(
            authorize_peer(&i, &scope(), Some(&batch), "api", Served::L4).is_ok(),
            "a plain allow is fine on L4"
        );
    }

    #[test]
    fn no_identity_or_a_foreign_one_is_refused() {
        let i = intentions("default: allow\n");
        assert_eq!(
            authorize_peer(&i, &scope(), None, "api", Served::L7)
                .unwrap_err()
                .reason,
            Reason::IntentionDenied
        );
        for foreign in [
            "spiffe://evil/ns/default/sa/frontend",
            "spiffe://dc1/ns/other/sa/frontend",
        ] {
            assert_eq!(
                authorize_peer(&i, &scope(), Some(&id(foreign)), "api", Served::L4)
                    .unwrap_err()
                    .reason,
                Reason::TlsIdentityMismatch,
                "{foreign}"
            );
        }
    }

    #[test]
    fn requests_are_checked_on_the_normalized_path() {
        let i = intentions(GET_ONLY);
        let front = id("spiffe://dc1/ns/default/sa/frontend");
        let h = hyper::HeaderMap::new();
        let check = |method: &str, raw: &str| {
            let path = crate::policy::path::normalize(raw).unwrap();
            authorize_request(&i, &scope(), Some(&front), "api", method, &path, &h)
        };
        assert!(check("GET", "/items").is_ok());
        assert_eq!(
            check("DELETE", "/x").unwrap_err().reason,
            Reason::RequestDenied
        );
        for p in [
            "/admin",
            "//admin",
            "/%61dmin",
            "/a/../admin",
            "/./admin",
            "/admin/",
            "/ADMIN",
            "/Admin/x",
        ] {
            let d = check("GET", p).unwrap_err();
            assert_eq!(d.reason, Reason::RequestDenied, "{p}");
            assert!(d.detail.contains("permission 1"), "{p}: {}", d.detail);
        }
        assert_eq!(
            authorize_request(&i, &scope(), None, "api", "GET", "/items", &h)
                .unwrap_err()
                .reason,
            Reason::IntentionDenied,
            "no identity, no request"
        );
    }
}
