//! SPIFFE IDs and certificates: parsing never panics; a parsed ID prints back to itself; a
//! certificate yields an identity only from exactly one URI SAN.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringside_core::identity::SpiffeId;
use ringside_core::tls::CertInfo;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(id) = s.parse::<SpiffeId>() {
            assert_eq!(id.to_string(), s);
            assert_eq!(id.to_string().parse::<SpiffeId>(), Ok(id));
        }
    }
    if let Ok(info) = CertInfo::from_der(data) {
        if info.spiffe_id().is_some() {
            assert_eq!(info.uris.len(), 1);
        }
    }
});
