//! Request paths as permissions and routes see them (RFC 3986 normalization, as Envoy's
//! `normalize_path` and `merge_slashes` do): percent-encoded unreserved characters are decoded,
//! other escapes keep their byte with uppercase hex, `//` becomes `/`, and `.`/`..` segments are
//! removed. An encoded `/` or `\` (and a literal `\`) is refused: an application may read it as a
//! separator where a permission saw one segment, which is the classic way around path rules.
//!
//! The normalized path is also what the application receives, so the proxy and the app agree on
//! which resource is asked for.

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `%2F`, `%5C` or a literal backslash.
    #[error("the path contains an encoded slash or a backslash")]
    EscapedSlash,
    /// A `%` not followed by two hex digits.
    #[error("the path has an invalid percent-encoding")]
    BadEscape,
    /// The path does not start with `/`.
    #[error("the path does not start with '/'")]
    NotAbsolute,
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether `path` is already normal: it starts with `/` and has only letters, digits, `-`, `_`,
/// `~` and single `/` (no `%`, no `.`, no backslash, no `//`), all of which [`normalize`] leaves
/// as they are (a property test checks it). Most request paths are; one pass over the bytes,
/// nothing allocated, where normalizing costs a thousand instructions per request.
pub fn is_normal(path: &str) -> bool {
    let b = path.as_bytes();
    b.first() == Some(&b'/')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'~' | b'/'))
        && !b.windows(2).any(|w| w == b"//")
}

/// Normalize the path part of a request target (no query). `*` (server-wide `OPTIONS`) is kept.
pub fn normalize(path: &str) -> Result<String, PathError> {
    if path == "*" {
        return Ok(path.to_string());
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // 1. Percent-decoding of unreserved characters; other escapes in uppercase.
    let b = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let v = h << 4 | l;
                if v == b'/' || v == b'\\' {
                    return Err(PathError::EscapedSlash);
                }
                if unreserved(v) {
                    decoded.push(v as char);
                } else {
                    decoded.push_str(&format!("%{v:02X}"));
                }
                i += 3;
            }
            b'\\' => return Err(PathError::EscapedSlash),
            _ => {
                // Multi-byte UTF-8 stays as it is: push the whole char.
                let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
                decoded.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    // 2. Merge slashes and remove dot segments (RFC 3986 5.2.4 on whole segments).
    let mut out: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
        || decoded == "/";
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut norm = String::with_capacity(decoded.len());
    for s in &out {
        norm.push('/');
        norm.push_str(s);
    }
    if norm.is_empty() || trailing {
        norm.push('/');
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ways_around_a_prefix_all_land_on_it() {
        for p in [
            "/admin",
            "//admin",
            "/%61dmin",
            "/%61%64%6D%69%6E",
            "/a/../admin",
            "/./admin",
            "/x/y/../../admin",
            "/../admin",
            "/%2E%2E/admin",
            "/.%2e/admin",
            "///admin",
        ] {
            assert_eq!(normalize(p).unwrap(), "/admin", "{p}");
        }
        assert_eq!(normalize("/admin/").unwrap(), "/admin/");
        assert_eq!(normalize("/admin/.").unwrap(), "/admin/");
        assert_eq!(normalize("/admin/x/..").unwrap(), "/admin/");
    }

    #[test]
    fn separators_in_disguise_are_refused() {
        for p in ["/admin%2Fx", "/a%2f..%2fadmin", "/a%5Cadmin", "/a\\admin"] {
            assert_eq!(normalize(p), Err(PathError::EscapedSlash), "{p}");
        }
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%4"), Err(PathError::BadEscape));
        assert_eq!(normalize("admin"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn ordinary_paths_are_unchanged() {
        for p in [
            "/",
            "/api/v1/items",
            "/a%20b",
            "/%C3%A9t%C3%A9",
            "/a-b_c~d.e",
            "*",
        ] {
            assert_eq!(normalize(p).unwrap(), p, "{p}");
        }
        assert_eq!(normalize("/a%2cb").unwrap(), "/a%2Cb", "hex in uppercase");
        assert_eq!(normalize("/..").unwrap(), "/");
    }
}
