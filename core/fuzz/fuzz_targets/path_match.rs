//! Path normalization and L7 permission matching, differential.
//!
//! Normalization: a normalized path is canonical and stable, and a prefix permission decides the
//! same for a path and its normalized form (a request cannot get around a permission by the way it
//! spells its path).
//!
//! Matching: `permit` (the first permission that matches decides; none: deny) over permissions
//! built from the input (exact or prefix path, case-insensitive or not, methods, one header
//! condition with present/exact/prefix/suffix/contains, ignore-case and invert) agrees with a
//! plain reference written from Consul's documentation of those fields.
//!
//! Input, one item a line: the request path, its method (also, normalized, the prefix of the
//! spelling check), the value of its `x-h` header (`!`:
//! none), then up to three permissions of three lines each: flags (`e` exact, `p` prefix, `i`
//! case-insensitive, `m` methods GET and post, `d` deny; header: `P` present, `A` absent, `E`
//! exact, `X` prefix, `S` suffix, `C` contains, `I` ignore case, `N` invert, `U` the name written
//! `X-H`), the path pattern, the header pattern.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringside_core::policy::path::normalize;
use ringside_core::policy::rules::{permit, HttpMatch, Permission};
use serde_json::{json, Map, Value};

/// One permission as the reference reads it.
struct Spec<'a> {
    flags: &'a str,
    pattern: &'a str,
    header: &'a str,
}

impl Spec<'_> {
    fn has(&self, f: char) -> bool {
        self.flags.contains(f)
    }

    fn has_header(&self) -> bool {
        self.flags.contains(['P', 'A', 'E', 'X', 'S', 'C'])
    }

    /// The permission as an operator writes it.
    fn json(&self) -> Value {
        let mut http = Map::new();
        if self.has('e') {
            http.insert("pathExact".into(), json!(self.pattern));
        }
        if self.has('p') {
            http.insert("pathPrefix".into(), json!(self.pattern));
        }
        if self.has('i') {
            http.insert("caseInsensitive".into(), json!(true));
        }
        if self.has('m') {
            http.insert("methods".into(), json!(["GET", "post"]));
        }
        if self.has_header() {
            let name = if self.has('U') { "X-H" } else { "x-h" };
            let mut h = Map::new();
            h.insert("name".into(), json!(name));
            for (f, key) in [
                ('E', "exact"),
                ('X', "prefix"),
                ('S', "suffix"),
                ('C', "contains"),
            ] {
                if self.has(f) {
                    h.insert(key.into(), json!(self.header));
                }
            }
            if self.has('P') {
                h.insert("present".into(), json!(true));
            }
            if self.has('A') {
                h.insert("present".into(), json!(false));
            }
            if self.has('I') {
                h.insert("ignoreCase".into(), json!(true));
            }
            if self.has('N') {
                h.insert("invert".into(), json!(true));
            }
            http.insert("header".into(), json!([h]));
        }
        let action = if self.has('d') { "deny" } else { "allow" };
        json!({ "action": action, "http": http })
    }

    /// The reference: every condition given holds.
    fn matches(&self, method: &str, path: &str, header: Option<&str>) -> bool {
        let ci = self.has('i');
        let fold = |s: &str, on: bool| {
            if on {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        let path_ok = (!self.has('e') || fold(path, ci) == fold(self.pattern, ci))
            && (!self.has('p') || fold(path, ci).starts_with(&fold(self.pattern, ci)));
        let method_ok =
            !self.has('m') || ["get", "post"].contains(&method.to_ascii_lowercase().as_str());
        let header_ok = !self.has_header() || {
            // `present: false` wins over `present: true` (the later key of the document).
            let holds = match header {
                None => self.has('A'),
                Some(v) => {
                    let ic = self.has('I');
                    let (v, p) = (fold(v, ic), fold(self.header, ic));
                    !self.has('A')
                        && (!self.has('E') || v == p)
                        && (!self.has('X') || v.starts_with(&p))
                        && (!self.has('S') || v.ends_with(&p))
                        && (!self.has('C') || v.contains(&p))
                }
            };
            holds != self.has('N')
        };
        path_ok && method_ok && header_ok
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let lines: Vec<&str> = s.split('\n').collect();
    let path = lines[0];
    let Ok(n) = normalize(path) else {
        return;
    };
    assert!(n.starts_with('/') || n == "*");
    assert!(!n.contains("//"));
    assert!(n.split('/').all(|seg| seg != "." && seg != ".."));
    assert_eq!(normalize(&n).as_deref(), Ok(n.as_str()));
    let empty = hyper::HeaderMap::new();
    // A prefix permission decides the same for any spelling of a path (the matcher sees only
    // normalized paths): it agrees with a plain prefix test on the normalized form.
    if let Ok(p) = normalize(lines.get(1).copied().unwrap_or("/admin")) {
        let m: HttpMatch =
            serde_json::from_value(json!({ "pathPrefix": p })).expect("a prefix match");
        assert_eq!(m.matches("GET", &n, &empty), n.starts_with(p.as_str()));
    }

    let method = lines.get(1).copied().unwrap_or("GET");
    // What the proxy sees of the header: a value hyper accepts and can show as text.
    let raw = lines.get(2).copied().unwrap_or("!");
    let mut headers = hyper::HeaderMap::new();
    if raw != "!" {
        if let Ok(v) = hyper::header::HeaderValue::from_str(raw) {
            headers.insert("x-h", v);
        }
    }
    let visible = raw != "!"
        && raw
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
    let header = visible.then_some(raw);
    let specs: Vec<Spec> = lines[3.min(lines.len())..]
        .chunks(3)
        .take(3)
        .map(|c| Spec {
            flags: c[0],
            pattern: c.get(1).copied().unwrap_or(""),
            header: c.get(2).copied().unwrap_or(""),
        })
        .collect();
    let permissions: Vec<Permission> = specs
        .iter()
        .map(|p| serde_json::from_value(p.json()).expect("a permission"))
        .collect();
    let (allowed, _) = permit(&permissions, method, &n, &headers);
    let expected = specs
        .iter()
        .find(|p| p.matches(method, &n, header))
        .is_some_and(|p| !p.has('d'));
    assert_eq!(allowed, expected, "{method} {n} x-h: {header:?}");
});
