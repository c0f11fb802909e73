//! The crypto library under rustls, chosen at build time: ring, or AWS-LC with the cargo feature
//! `aws-lc-rs`. This is the one place that reads the feature; everything else (mesh TLS, ringctl's
//! operator port) asks here. Both give the same TLS: the same suites in the same order, the same
//! key-exchange groups, TLS 1.3 only (the configs say so). ARCHITECTURE.md ("Mesh TLS") has the
//! measurements behind the default.
//!
//! rustls may have both libraries compiled in (a workspace build with the feature: the tests'
//! peers use ring); the feature alone decides which one ringside uses.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::ProducesTickets;

#[cfg(feature = "aws-lc-rs")]
use rustls::crypto::aws_lc_rs as backend;
#[cfg(not(feature = "aws-lc-rs"))]
use rustls::crypto::ring as backend;

/// The same library's AEADs, for the record layer of established mesh connections
/// ([`crate::tls::record`]): ring and AWS-LC have the same `aead` interface.
#[cfg(feature = "aws-lc-rs")]
pub use aws_lc_rs::aead;
#[cfg(not(feature = "aws-lc-rs"))]
pub use ring::aead;

/// The library's name, as the "ringside started" log line gives it (`tls_crypto`).
pub const NAME: &str = if cfg!(feature = "aws-lc-rs") {
    "aws-lc-rs"
} else {
    "ring"
};

/// The library's provider with its own suite order, restricted to the key-exchange groups both
/// libraries have (X25519, P-256, P-384: AWS-LC also has post-quantum hybrids, which ring does
/// not, and a mesh where one sidecar offers them and another does not would behave differently
/// by build). For ringctl's operator port, where the order is rustls's.
pub fn base() -> CryptoProvider {
    let mut p = backend::default_provider();
    p.kx_groups = vec![
        backend::kx_group::X25519,
        backend::kx_group::SECP256R1,
        backend::kx_group::SECP384R1,
    ];
    p
}

/// The mesh's provider: [`base`] with AES-128-GCM first. Both ends of a mesh connection are
/// ringside and the server follows the client's order, so mesh traffic uses AES-128-GCM (ten AES
/// rounds instead of AES-256's fourteen, as Envoy and BoringSSL prefer); the others stay offered.
pub fn mesh() -> Arc<CryptoProvider> {
    let mut p = base();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// Session tickets (resumption) from the same library: a rotating key, as rustls's ticketers do.
pub fn ticketer() -> Result<Arc<dyn ProducesTickets>, rustls::Error> {
    backend::Ticketer::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{CipherSuite, NamedGroup};

    /// Written out, not derived from a provider: whichever library is built, mesh connections
    /// negotiate the same way (scripts/test.sh runs this under both).
    #[test]
    fn mesh_connections_prefer_aes_128_gcm_with_the_same_suites_and_groups_on_either_library() {
        let p = mesh();
        let tls13: Vec<_> = p
            .cipher_suites
            .iter()
            .filter(|s| s.tls13().is_some())
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            tls13,
            [
                CipherSuite::TLS13_AES_128_GCM_SHA256,
                CipherSuite::TLS13_AES_256_GCM_SHA384,
                CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            ],
            "{NAME}"
        );
        let groups: Vec<_> = p.kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(
            groups,
            [
                NamedGroup::X25519,
                NamedGroup::secp256r1,
                NamedGroup::secp384r1
            ],
            "{NAME}"
        );
    }

    #[test]
    fn no_suite_of_the_library_is_dropped_and_base_keeps_its_order() {
        let mut all: Vec<_> = backend::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let mut ours: Vec<_> = mesh().cipher_suites.iter().map(|s| s.suite()).collect();
        all.sort_by_key(|s| u16::from(*s));
        ours.sort_by_key(|s| u16::from(*s));
        assert_eq!(ours, all, "no suite is dropped");
        let first = backend::default_provider().cipher_suites[0].suite();
        assert_eq!(
            base().cipher_suites[0].suite(),
            first,
            "base keeps the order"
        );
    }

    #[test]
    fn the_name_is_the_library_built() {
        // `Ring` or `AwsLcRs`: what rustls calls the library the provider really is.
        let built = format!("{:?}", mesh().key_provider).to_lowercase();
        assert_eq!(built, NAME.replace('-', ""));
    }
}
