//! The CA signing proxies' CSRs (`ringctl daemon`'s `/v1/sign`): any bytes, a mutated valid CSR
//! or a well-signed CSR asking for names of the fuzzer's choosing, never a panic; and a signed
//! certificate, read back with x509-parser, carries exactly the SPIFFE identity the token allows
//! (one URI SAN, no other name), the CSR's public key, no CA rights, and the CA's signature.
#![no_main]
use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use rcgen::{CertificateParams, KeyPair, SanType};
use ringside_ctl::ca::{Ca, CaError};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

static CA: LazyLock<Ca> = LazyLock::new(|| Ca::generate("dc1", "fuzz").expect("a CA").0);
/// The proxy's key for the CSRs built here (a key per input would only slow the fuzzer).
static KEY: LazyLock<KeyPair> = LazyLock::new(|| KeyPair::generate().expect("a key"));
/// The services a token may be for.
const SERVICES: [&str; 3] = ["web", "products-api", "admin"];

/// A well-signed CSR asking for the names in `spec`, one a line: `uri:`, `dns:`, `ip:`, `email:`
/// and a bare line as a URI (what a proxy that tries another identity would send).
fn built_csr(spec: &str) -> Option<String> {
    let mut params = CertificateParams::new(Vec::<String>::new()).ok()?;
    for line in spec.lines() {
        let san = match line.split_once(':') {
            Some(("dns", v)) => SanType::DnsName(v.try_into().ok()?),
            Some(("ip", v)) => SanType::IpAddress(v.parse().ok()?),
            Some(("email", v)) => SanType::Rfc822Name(v.try_into().ok()?),
            Some(("uri", v)) => SanType::URI(v.try_into().ok()?),
            _ => SanType::URI(line.try_into().ok()?),
        };
        params.subject_alt_names.push(san);
    }
    params.serialize_request(&*KEY).ok()?.pem().ok()
}

fn check_leaf(leaf_pem: &str, csr_pem: &str, id: &str) {
    let (_, pem) = x509_parser::pem::parse_x509_pem(leaf_pem.as_bytes()).expect("a PEM leaf");
    let (_, leaf) = X509Certificate::from_der(&pem.contents).expect("a DER leaf");
    let sans = leaf
        .subject_alternative_name()
        .expect("one SAN extension")
        .expect("a SAN extension");
    let names = &sans.value.general_names;
    assert_eq!(names.len(), 1, "signed with names {names:?} for {id}");
    assert!(
        matches!(names[0], GeneralName::URI(u) if u == id),
        "signed {names:?} for a token of {id}"
    );
    assert!(!leaf.is_ca(), "a leaf with CA rights");
    // The CSR's key, and the CA's signature.
    // Read as the CA reads it (the `pem` crate finds the block after leading text, where
    // x509-parser's reader wants it first).
    let csr_der = pem::parse(csr_pem).expect("the CSR's PEM");
    let (_, csr) = X509CertificationRequest::from_der(csr_der.contents()).expect("the CSR");
    assert_eq!(
        leaf.public_key().raw,
        csr.certification_request_info.subject_pki.raw,
        "the leaf is not for the CSR's key"
    );
    let (_, ca_pem) = x509_parser::pem::parse_x509_pem(CA.cert_pem.as_bytes()).expect("CA PEM");
    let (_, ca) = X509Certificate::from_der(&ca_pem.contents).expect("CA DER");
    leaf.verify_signature(Some(ca.public_key()))
        .expect("signed by the CA");
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let service = SERVICES[usize::from(head & 0x3) % SERVICES.len()];
    let csr = match head >> 2 {
        // A CSR built for names of the fuzzer's choosing.
        0 => match std::str::from_utf8(rest).ok().and_then(built_csr) {
            Some(c) => c,
            None => return,
        },
        // DER bytes (a mutated CSR from the seeds) in a PEM envelope.
        1 => pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", rest)),
        // Text as the daemon receives it.
        _ => String::from_utf8_lossy(rest).into_owned(),
    };
    let id = format!("spiffe://dc1/ns/default/sa/{service}");
    match CA.sign_csr(&csr, "default", service, Duration::from_secs(3600)) {
        Ok(leaf) => check_leaf(&leaf, &csr, &id),
        Err(CaError::Identity(m)) => assert!(m.contains(&id), "{m}"),
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
