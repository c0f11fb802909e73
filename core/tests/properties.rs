//! Properties of the decision core, checked on random inputs (proptest): intention precedence
//! against a brute-force reference, path normalization, protocol detection on arbitrary bytes,
//! endpoint choice fairness.

use proptest::prelude::*;
use ringside_core::decide::detect::{classify, Detection, Want};
use ringside_core::intentions::{Action, Intentions};
use ringside_core::policy::path::normalize;

const NAMES: [&str; 4] = ["a", "b", "c", "*"];

fn rules() -> impl Strategy<Value = Vec<(usize, usize, bool)>> {
    prop::collection::vec((0..4usize, 0..4usize, any::<bool>()), 0..12)
}

fn intentions(rules: &[(usize, usize, bool)], default_allow: bool) -> Intentions {
    let yaml = format!(
        "default: {}\nrules:\n{}",
        if default_allow { "allow" } else { "deny" },
        rules
            .iter()
            .map(|(s, d, allow)| format!(
                "  - {{ source: '{}', destination: '{}', action: {} }}\n",
                NAMES[*s],
                NAMES[*d],
                if *allow { "allow" } else { "deny" }
            ))
            .collect::<String>()
    );
    let yaml = if rules.is_empty() {
        yaml.replace("rules:\n", "rules: []\n")
    } else {
        yaml
    };
    serde_yaml::from_str(&yaml).unwrap()
}

/// Consul's precedence, spelled out: the most specific tier that has a matching rule decides
/// (exact/exact, */exact, exact/*, */*), and a deny in that tier wins.
fn reference(rules: &[(usize, usize, bool)], default_allow: bool, src: &str, dst: &str) -> bool {
    let m = |k: usize, name: &str| NAMES[k] == "*" || NAMES[k] == name;
    let exact = |k: usize| NAMES[k] != "*";
    for (src_exact, dst_exact) in [(true, true), (false, true), (true, false), (false, false)] {
        let tier: Vec<bool> = rules
            .iter()
            .filter(|(s, d, _)| {
                m(*s, src) && m(*d, dst) && exact(*s) == src_exact && exact(*d) == dst_exact
            })
            .map(|(_, _, allow)| *allow)
            .collect();
        if !tier.is_empty() {
            return tier.iter().all(|a| *a);
        }
    }
    default_allow
}

proptest! {
    #[test]
    fn intention_precedence_matches_the_reference(rules in rules(), default_allow in any::<bool>()) {
        let set = intentions(&rules, default_allow);
        for src in ["a", "b", "c", "d"] {
            for dst in ["a", "b", "c", "d"] {
                let got = set.evaluate(src, dst).action == Action::Allow;
                prop_assert_eq!(got, reference(&rules, default_allow, src, dst), "{} -> {}", src, dst);
            }
        }
    }

    #[test]
    fn normalized_paths_are_canonical(p in "/[a-zA-Z0-9%./_~-]{0,40}") {
        if let Ok(n) = normalize(&p) {
            prop_assert!(n.starts_with('/'), "{}", n);
            prop_assert!(!n.contains("//"), "{}", n);
            for seg in n.split('/') {
                prop_assert!(seg != "." && seg != "..", "{} has a dot segment", n);
            }
            prop_assert_eq!(normalize(&n), Ok(n.clone()), "idempotent");
        }
    }

    /// A permission on a prefix sees a path and its disguises alike: inserting `./`, `x/../` or
    /// a doubled slash, or percent-encoding an unreserved character, never changes the result.
    #[test]
    fn disguises_normalize_to_the_same_path(
        segs in prop::collection::vec("[a-z0-9]{1,6}", 1..5),
        at in 0usize..5,
        how in 0usize..4,
    ) {
        let plain = format!("/{}", segs.join("/"));
        // Before an existing segment: a dot segment or empty segment at the very end means the
        // directory (`/a/.` is `/a/`), which is a different resource.
        let k = at % segs.len();
        let mut parts: Vec<String> = segs.clone();
        match how {
            0 => parts.insert(k, ".".into()),
            1 => {
                parts.insert(k, "zz".into());
                parts.insert(k + 1, "..".into());
            }
            2 => parts.insert(k, String::new()),
            _ => {
                let s = &mut parts[k];
                let c = s.remove(0);
                *s = format!("%{:02X}{}", c as u32, s);
            }
        }
        let disguised = format!("/{}", parts.join("/"));
        prop_assert_eq!(normalize(&disguised), normalize(&plain), "{}", disguised);
    }

    /// Detection never panics, asks only for more than it has, and says TLS only for bytes that
    /// start like a TLS handshake.
    #[test]
    fn detection_on_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..600), tls in any::<bool>()) {
        let want = if tls { Want::TlsOrPlain } else { Want::Http };
        match classify(want, &b) {
            Detection::NeedMore(n) => prop_assert!(n > b.len(), "asks {} with {}", n, b.len()),
            Detection::Tls { .. } => prop_assert!(tls && b.first() == Some(&0x16)),
            Detection::Http => prop_assert!(!b.is_empty()),
            Detection::Other | Detection::Timeout => {}
        }
    }
}

/// Round-robin spreads picks evenly and least-connections never picks a busier endpoint than the
/// least busy one.
#[test]
fn endpoint_choice_is_fair() {
    use ringside_core::config::{LbPolicy, Service};
    use ringside_core::upstream::Cluster;
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Instant;
    let now = Instant::now();
    let eps: Vec<std::net::SocketAddr> = (0..5)
        .map(|i| format!("127.0.0.1:{}", 1000 + i).parse().unwrap())
        .collect();
    let mut s = Service::new("s", eps);
    s.lb = LbPolicy::RoundRobin;
    let c = Cluster::new(s.clone(), now);
    let mut counts = [0u32; 5];
    for _ in 0..1000 {
        counts[c.pick(0, now).unwrap()] += 1;
    }
    assert!(counts.iter().all(|&n| n == 200), "{counts:?}");
    s.lb = LbPolicy::LeastConnections;
    let c = Cluster::new(s, now);
    let mut guards = Vec::new();
    for _ in 0..50 {
        let i = c.pick(0, now).unwrap();
        let least = (0..5)
            .map(|k| c.endpoints[k].active.load(Relaxed))
            .min()
            .unwrap();
        assert_eq!(c.endpoints[i].active.load(Relaxed), least);
        guards.push(c.open(i));
    }
}
