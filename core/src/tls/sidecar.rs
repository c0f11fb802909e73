//! The sidecar's TLS material, one config per role: one client config for every outbound
//! destination (the expected identity comes from the server name), and per local mesh service the
//! inbound server configs whose verifiers ask that service's intentions: an L4 one (allows that
//! carry L7 permissions are refused: nothing on L4 could check them) and an L7 one (permissions
//! are checked per request). Which ones a service gets follows its declared protocol.

use std::sync::Arc;

use crate::config::{MtlsDoc, MtlsMode, Protocol, Service, ServiceMtls, TlsFiles};
use crate::decide::authz::{Scope, Served};
use crate::policy::intentions::Intentions;
use crate::tls::{Expect, IntentionAuthorizer, MeshTls, TlsError, TlsRole};

/// The sidecar's TLS material.
#[derive(Debug)]
pub struct SidecarTls {
    /// Strict or permissive.
    pub mode: MtlsMode,
    /// Outbound: one client config for every destination (expected identity from the server name).
    pub outbound: Arc<MeshTls>,
    /// The certificate files (inbound configs per local service are built from them).
    pub files: TlsFiles,
    /// This sidecar's trust domain and namespace (from its certificate).
    pub scope: Scope,
    /// This sidecar's own identity (its certificate's SPIFFE ID), as the access log names it.
    pub id: Arc<str>,
}

/// Inbound server configs of one local service.
#[derive(Debug, Clone, Default)]
pub struct InboundTls {
    /// For connections relayed on L4 (services declared `tcp`, or undeclared ones whose caller
    /// does not ask for HTTP).
    pub l4: Option<Arc<MeshTls>>,
    /// For connections served by the L7 path (services declared HTTP, or undeclared ones whose
    /// caller asks for `ringside/http`).
    pub l7: Option<Arc<MeshTls>>,
}

impl SidecarTls {
    /// Load the sidecar's certificate; its SPIFFE ID gives the mesh's trust domain and namespace.
    pub fn load(m: &MtlsDoc) -> anyhow::Result<SidecarTls> {
        let files = TlsFiles {
            cert: m.cert.clone(),
            key: m.key.clone(),
            ca: m.ca.clone(),
        };
        let material = crate::tls::Material::load(&files)?;
        let id = material.id.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: the certificate must carry exactly one URI SAN, a SPIFFE ID spiffe://<trust-domain>/ns/<ns>/sa/<service>",
                files.cert.display()
            )
        })?;
        let outbound = MeshTls::load(
            files.clone(),
            TlsRole::Origin {
                expect: Expect::ByServerName {
                    trust_domain: id.trust_domain.clone(),
                    namespace: id.namespace.clone(),
                },
                resumption: true,
            },
        )?;
        tracing::info!(identity = %id, mode = ?m.mode, "sidecar mTLS on");
        Ok(SidecarTls {
            mode: m.mode,
            outbound,
            files,
            scope: Scope::of(&id),
            id: id.to_string().into(),
        })
    }

    /// Inbound TLS per service (same order as `services`).
    pub fn inbound_for(
        &self,
        services: &[Service],
        intentions: &Arc<Intentions>,
    ) -> Result<Vec<InboundTls>, TlsError> {
        let role = |s: &Service, served| {
            MeshTls::load(
                self.files.clone(),
                TlsRole::Terminate {
                    authorizer: Arc::new(IntentionAuthorizer {
                        intentions: intentions.clone(),
                        destination: s.name.clone(),
                        scope: self.scope.clone(),
                        served,
                    }),
                },
            )
            .map(Some)
        };
        services
            .iter()
            .map(|s| {
                if !(s.local && s.subset.is_none() && s.mtls == ServiceMtls::Enable) {
                    return Ok(InboundTls::default());
                }
                let (l4, l7) = match s.protocol {
                    p if p.is_http() => (false, true),
                    Protocol::Auto => (true, true),
                    _ => (true, false),
                };
                Ok(InboundTls {
                    l4: if l4 { role(s, Served::L4)? } else { None },
                    l7: if l7 { role(s, Served::L7)? } else { None },
                })
            })
            .collect()
    }
}
