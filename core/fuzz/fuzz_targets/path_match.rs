//! Path normalization and L7 permission matching, differential: a normalized path is canonical
//! and stable, and a prefix permission decides the same for a path and its normalized form
//! (so a request cannot get around a permission by the way it spells its path).
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringside_core::policy::path::normalize;
use ringside_core::policy::rules::HttpMatch;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (prefix, path) = s.split_once('\n').unwrap_or(("/admin", s));
    if let Ok(n) = normalize(path) {
        assert!(n.starts_with('/') || n == "*");
        assert!(!n.contains("//"));
        assert!(n.split('/').all(|seg| seg != "." && seg != ".."));
        assert_eq!(normalize(&n).as_deref(), Ok(n.as_str()));
        let Ok(p) = normalize(prefix) else {
            return;
        };
        let m: HttpMatch =
            serde_json::from_value(serde_json::json!({ "pathPrefix": p })).expect("a prefix match");
        let headers = hyper::HeaderMap::new();
        // The matcher sees only normalized paths: it agrees with a plain prefix test on them.
        assert_eq!(m.matches("GET", &n, &headers), n.starts_with(p.as_str()));
    }
});
