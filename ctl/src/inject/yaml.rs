//! YAML for Kubernetes' readers. kubectl and the API server read YAML 1.1 (go-yaml), where plain
//! `on`, `yes`, `n`, `1_000` or `0b11` are not strings; serde_yaml writes YAML 1.2 and would leave
//! them plain, so an annotation `"on"` would come back a boolean. Here a string is plain only
//! when it cannot be read as anything else (conservatively), and double-quoted with JSON's escapes
//! (valid YAML) otherwise. Block style, two spaces, one document.

use serde_yaml::{Mapping, Value};

/// `v` (a mapping: a document) as block YAML.
pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Mapping(m) if !m.is_empty() => mapping(m, 0, false, &mut out),
        other => {
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
    out
}

fn pad(n: usize, out: &mut String) {
    out.extend(std::iter::repeat_n(' ', n));
}

/// The value after `key:` or `-`, whose children are at `indent`.
fn value(v: &Value, indent: usize, out: &mut String) {
    match v {
        Value::Mapping(m) if !m.is_empty() => {
            out.push('\n');
            mapping(m, indent, false, out);
        }
        Value::Sequence(s) if !s.is_empty() => {
            out.push('\n');
            sequence(s, indent, out);
        }
        Value::Tagged(t) => value(&t.value, indent, out),
        other => {
            out.push(' ');
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
}

/// Entries at `indent`; with `inline` the first goes on the current line (after `- `).
fn mapping(m: &Mapping, indent: usize, inline: bool, out: &mut String) {
    for (i, (k, v)) in m.iter().enumerate() {
        if !(inline && i == 0) {
            pad(indent, out);
        }
        out.push_str(&scalar(k));
        out.push(':');
        value(v, indent + 2, out);
    }
}

fn sequence(s: &[Value], indent: usize, out: &mut String) {
    for item in s {
        pad(indent, out);
        out.push('-');
        match item {
            Value::Mapping(m) if !m.is_empty() => {
                out.push(' ');
                mapping(m, indent + 2, true, out);
            }
            other => value(other, indent + 2, out),
        }
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if plain(s) => s.clone(),
        Value::String(s) => serde_json::to_string(s).unwrap_or_default(),
        Value::Mapping(_) => "{}".into(),
        Value::Sequence(_) => "[]".into(),
        Value::Tagged(t) => scalar(&t.value),
    }
}

/// Whether `s` reads back as this string in YAML 1.1 and 1.2 when written plain.
fn plain(s: &str) -> bool {
    const WORDS: [&str; 10] = [
        "y", "n", "yes", "no", "on", "off", "true", "false", "null", "~",
    ];
    let Some(first) = s.chars().next() else {
        return false;
    };
    let ok_chars = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c));
    // Numbers in any base, with underscores, exponents, sexagesimal (`1:30`), versions: quoted.
    let numberish = first.is_ascii_digit()
        && (s.contains(['-', ':'])
            || s.chars()
                .all(|c| c.is_ascii_hexdigit() || "xXoO_.+".contains(c)));
    ok_chars
        && (first.is_ascii_alphanumeric() || first == '/' || first == '_')
        && !numberish
        && !WORDS.contains(&s.to_ascii_lowercase().as_str())
        && !s.ends_with(':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_a_yaml_1_1_reader_would_take_for_something_else_are_quoted() {
        for s in [
            "on",
            "Off",
            "yes",
            "NO",
            "y",
            "N",
            "true",
            "null",
            "~",
            "",
            "1_000",
            "0b11",
            "1:30",
            "0x1F",
            "1e3",
            "017",
            "2.4.1",
            "10",
            ".inf",
            "2026-10-02T08:14:55Z",
            "-dash",
            "a: b",
            "a #b",
            "two words",
            "multi\nline",
            "tab\t",
            "café",
            "{x}",
            "*ref",
            "&a",
            "!tag",
            "k:",
            "'q'",
            "\"dq\"",
        ] {
            let out = to_yaml(&Value::Mapping(Mapping::from_iter([(
                Value::String("k".into()),
                Value::String(s.into()),
            )])));
            assert!(out.starts_with("k: \""), "{s:?} written plain: {out}");
            let back: Value = serde_yaml::from_str(&out).unwrap();
            assert_eq!(back["k"].as_str(), Some(s), "{out}");
        }
        for s in [
            "nginx",
            "registry.example.com:5000/shop/web:2.4.1",
            "250m",
            "1Gi",
            "app.kubernetes.io/name",
            "f:spec",
            "/healthz/ready",
            "--listen=:8080x",
        ] {
            let plain_expected = !s.starts_with('-');
            let out = to_yaml(&Value::Mapping(Mapping::from_iter([(
                Value::String("k".into()),
                Value::String(s.into()),
            )])));
            assert_eq!(out == format!("k: {s}\n"), plain_expected, "{s:?}: {out}");
        }
    }

    #[test]
    fn documents_read_back_as_they_were() {
        let text = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {app.kubernetes.io/version: "2.4.1"}, annotations: {a: "on"}}
spec:
  replicas: 3
  template:
    spec:
      containers:
        - name: web
          args: ["--x=1", "sleep 5"]
          ports: [{containerPort: 8080, name: http}]
          env: []
          resources: {}
      nested: [[1, 2], [], [{a: 1, b: [x]}]]
      managedFields:
        - fieldsV1: {"f:spec": {"k:{\"name\":\"web\"}": {".": {}}}}
      ratio: 1.5
      flag: false
      nothing: null
      script: |
        set -e
        echo "done"
"#;
        let v: Value = serde_yaml::from_str(text).unwrap();
        let out = to_yaml(&v);
        let back: Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(back, v, "{out}");
        assert!(
            out.contains("\n        - name: web\n          args:\n"),
            "{out}"
        );
    }
}
