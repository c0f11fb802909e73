//! SPIFFE identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, carried as the
//! URI SAN of a workload's X.509 certificate. The service account is the service's name.

use std::fmt;
use std::str::FromStr;

/// A parsed SPIFFE ID in the mesh's layout.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct SpiffeId {
    /// Trust domain, e.g. `dc1`.
    pub trust_domain: String,
    /// Namespace, e.g. `default`.
    pub namespace: String,
    /// Service account = service name, e.g. `products-api`.
    pub service: String,
}

impl SpiffeId {
    /// A SPIFFE ID from its parts.
    pub fn new(trust_domain: &str, namespace: &str, service: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service: service.into(),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service
        )
    }
}

impl FromStr for SpiffeId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| {
            format!("'{s}' is not a SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<name>)")
        })?;
        let parts: Vec<&str> = rest.split('/').collect();
        let ok_part = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if ok_part(td) && ok_part(ns) && ok_part(sa) => Ok(SpiffeId::new(td, ns, sa)),
            _ => Err(format!(
                "'{s}' is not a mesh SPIFFE ID: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id: SpiffeId = "spiffe://dc1/ns/default/sa/products-api".parse().unwrap();
        assert_eq!(id, SpiffeId::new("dc1", "default", "products-api"));
        assert_eq!(id.to_string(), "spiffe://dc1/ns/default/sa/products-api");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "http://dc1/ns/default/sa/x",
            "spiffe://dc1/ns/default/sa/",
            "spiffe://dc1/ns/default/sa/x/extra",
            "spiffe://dc1/sa/x",
            "spiffe:///ns/a/sa/b",
            "spiffe://dc1/ns/a b/sa/c",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} accepted");
        }
    }
}
