//! `ringctl apply` of Consul's own files (tests/fixtures/consul: CRDs and `consul config write`
//! JSON entries, written the way Consul's documentation writes them) against a real daemon: the
//! warnings it prints for fields without effect, the refusals, and what the daemon then sends
//! the proxies.

use std::path::PathBuf;
use std::time::Duration;

use ringside_tests::ctl::Daemon;

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/consul")
        .join(name)
        .display()
        .to_string()
}

/// What the daemon sends a proxy of `service` now.
fn proxy_config(d: &Daemon, service: &str) -> serde_json::Value {
    let token = d.ok(&["token", "create", "--service", service]);
    let token = token
        .split_whitespace()
        .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap()
        .to_string();
    let (status, body) = ringside_core::control::http_call(
        &d.proxy_socket,
        "GET",
        "/v1/proxy/config?index=0&wait=0",
        None,
        Some(&token),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// The `warning:` lines of an apply's stderr.
fn warnings(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect()
}

#[test]
fn consul_files_apply_with_warnings_and_take_effect() {
    let d = Daemon::start("consul-files", &[]);
    d.ok(&["register", "service", "api", "--port", "80:8080"]);
    d.ok(&["register", "service", "web", "--port", "80:8080"]);

    // Every file of the corpus applies; each field without effect is named on stderr, with its
    // document and line; the dry run says the same and stores nothing.
    for (file, warned) in [
        ("service-defaults.yaml", 12),
        ("service-intentions.yaml", 0),
        ("service-router.yaml", 4),
        ("service-splitter.yaml", 1),
        ("service-resolver.yaml", 2),
        ("web-intentions.json", 0),
        ("web-defaults.json", 1),
        ("web-resolver-router.json", 0),
    ] {
        let path = fixture(file);
        let (ok, out, err) = d.ringctl(&["apply", "-f", &path, "--dry-run"]);
        assert!(ok, "{file}: {out}{err}");
        assert!(out.contains("nothing stored"), "{file}: {out}");
        assert_eq!(warnings(&err).len(), warned, "{file}: {err}");
        let (ok, out, err) = d.ringctl(&["apply", "-f", &path]);
        assert!(ok, "{file}: {out}{err}\n{}", d.log());
        assert!(out.contains("applied"), "{file}: {out}");
        let w = warnings(&err);
        assert_eq!(w.len(), warned, "{file}: {err}");
        for line in w {
            assert!(
                line.contains("has no effect in ringside") && line.contains(", field `"),
                "{file}: {line}"
            );
        }
    }
    let (_, _, err) = d.ringctl(&["apply", "-f", &fixture("service-defaults.yaml")]);
    assert!(
        err.contains("warning: document 1 (ServiceDefaults/api), line 13, field `spec.transparentProxy`: has no effect in ringside"),
        "{err}"
    );

    // Refused files say why and store nothing.
    let before = d.get_json("config");
    for (file, says) in [
        ("refused/jwt-permission.yaml", "cannot verify JWTs"),
        ("refused/peer-source.yaml", "spec.sources[0].peer"),
        ("refused/typo-matcher.yaml", "unknown field `pathPrefx`"),
        (
            "refused/typo-defaults.yaml",
            "unknown field `localConectTimeoutMs`",
        ),
    ] {
        let (ok, out, err) = d.ringctl(&["apply", "-f", &fixture(file)]);
        assert!(!ok, "{file} was applied: {out}");
        assert!(err.contains(says), "{file}: {err}");
        assert!(err.contains("nothing applied"), "{file}: {err}");
    }
    assert_eq!(d.get_json("config"), before);

    // What api's proxies are sent: its ServiceDefaults (Consul's mutualTLSMode spelling kept).
    let stored = d.get_json("config");
    let api_defaults = stored
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["kind"] == "ServiceDefaults" && v["name"] == "api")
        .unwrap();
    assert_eq!(api_defaults["spec"]["mutualTLSMode"], "permissive");
    let c = proxy_config(&d, "api");
    assert_eq!(c["inbound"]["mtls_mode"], "permissive", "{c}");
    assert_eq!(c["inbound"]["local_connect_timeout"], "3s", "{c}");
    assert_eq!(c["inbound"]["local_request_timeout"], "20s", "{c}");
    assert_eq!(c["inbound"]["max_inbound_connections"], 100, "{c}");
    assert_eq!(c["upstreams"]["*"]["connect_timeout"], "1s 500ms", "{c}");
    assert_eq!(c["upstreams"]["*"]["max_requests"], 256, "{c}");
    assert_eq!(c["upstreams"]["db"]["connect_timeout"], "250ms", "{c}");
    assert!(c["upstreams"].get("billing").is_none(), "{c}");
    assert_eq!(c["l7"]["resolvers"]["api"]["connectTimeout"], "2s", "{c}");
    assert_eq!(
        c["l7"]["routers"]["web"]["routes"][0]["destination"]["retryOn"][0], "5xx",
        "{c}"
    );
    // And web's, from the JSON config entry.
    let c = proxy_config(&d, "web");
    assert_eq!(c["inbound"]["mtls_mode"], "strict", "{c}");
    assert_eq!(c["inbound"]["max_inbound_connections"], 50, "{c}");
    assert_eq!(c["upstreams"]["api"]["outlier_5xx"], 7, "{c}");
    let sources = &c["intentions"]["rules"];
    assert!(
        sources
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["destination"] == "web" && r["source"] == "frontend"),
        "{c}"
    );
}
