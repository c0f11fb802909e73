//! Intentions: which source services may connect to which destination services (pure code).
//!
//! The model and precedence follow Consul's service intentions (without namespaces):
//!
//! | precedence | source | destination |
//! |---|---|---|
//! | 4 | exact | exact |
//! | 3 | `*` | exact |
//! | 2 | exact | `*` |
//! | 1 | `*` | `*` |
//!
//! A more specific destination always beats a more specific source (as in Consul, where the
//! destination is compared first). Among the intentions that match a (source, destination) pair the
//! one with the highest precedence decides. Two matching intentions with the same precedence can
//! only come from duplicated rules for the same pair (Consul refuses those at write time); here
//! `deny` wins such a tie, so a duplicated rule can never open access by accident. When no
//! intention matches, the configured default action decides (deny for a zero-trust mesh; a
//! `* -> *` deny intention is the same thing written as a rule).

use serde::{Deserialize, Serialize};

/// What an intention does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let the connection through.
    Allow,
    /// Refuse it.
    Deny,
}

/// A service name or `*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Pattern {
    /// Any service.
    Any,
    /// Exactly this service.
    Exact(String),
}

impl From<String> for Pattern {
    fn from(s: String) -> Self {
        if s == "*" {
            Pattern::Any
        } else {
            Pattern::Exact(s)
        }
    }
}

impl From<Pattern> for String {
    fn from(p: Pattern) -> Self {
        match p {
            Pattern::Any => "*".into(),
            Pattern::Exact(s) => s,
        }
    }
}

impl Pattern {
    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(s) => s == name,
        }
    }

    fn is_exact(&self) -> bool {
        matches!(self, Pattern::Exact(_))
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Exact(s) => f.write_str(s),
        }
    }
}

/// One intention: `source -> destination: action`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intention {
    /// Calling service (or `*`).
    pub source: Pattern,
    /// Called service (or `*`).
    pub destination: Pattern,
    /// Allow or deny.
    pub action: Action,
    /// L7 permissions (HTTP services): the connection is allowed, each request is decided by the
    /// first permission that matches it (none: denied).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<crate::policy::rules::Permission>,
}

impl Intention {
    /// Consul's precedence for this intention (4 = most specific).
    pub fn precedence(&self) -> u8 {
        1 + 2 * self.destination.is_exact() as u8 + self.source.is_exact() as u8
    }
}

impl std::fmt::Display for Intention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = match self.action {
            _ if !self.permissions.is_empty() => "L7 permissions",
            Action::Allow => "allow",
            Action::Deny => "deny",
        };
        write!(f, "{} -> {}: {a}", self.source, self.destination)
    }
}

/// The rule set and its default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intentions {
    /// The intentions, in any order (order does not matter).
    #[serde(default)]
    pub rules: Vec<Intention>,
    /// What happens when none matches.
    #[serde(default = "deny")]
    pub default: Action,
}

fn deny() -> Action {
    Action::Deny
}

impl Default for Intentions {
    /// No rules, default deny: the zero-trust starting point.
    fn default() -> Self {
        Intentions {
            rules: Vec::new(),
            default: Action::Deny,
        }
    }
}

/// The outcome of an evaluation, with what decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    /// Allow or deny.
    pub action: Action,
    /// The intention that decided, or `None` when the default did.
    pub rule: Option<&'a Intention>,
}

impl Decision<'_> {
    /// Whether the connection may pass.
    pub fn allowed(&self) -> bool {
        self.action == Action::Allow
    }

    /// "intention products -> payments: deny" or "default deny", for logs and events.
    pub fn explain(&self) -> String {
        match self.rule {
            Some(r) => format!("intention {r}"),
            None => format!(
                "default {} (no intention matches)",
                if self.allowed() { "allow" } else { "deny" }
            ),
        }
    }
}

impl Intentions {
    /// Decide whether `source` may connect to `destination`.
    pub fn evaluate(&self, source: &str, destination: &str) -> Decision<'_> {
        let mut best: Option<&Intention> = None;
        for r in &self.rules {
            if !(r.source.matches(source) && r.destination.matches(destination)) {
                continue;
            }
            best = match best {
                None => Some(r),
                Some(b) if r.precedence() > b.precedence() => Some(r),
                Some(b)
                    if r.precedence() == b.precedence()
                        && r.action == Action::Deny
                        && b.action == Action::Allow =>
                {
                    Some(r)
                }
                keep => keep,
            };
        }
        match best {
            Some(r) => Decision {
                action: r.action,
                rule: Some(r),
            },
            None => Decision {
                action: self.default,
                rule: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::{Allow, Deny};

    fn rule(src: &str, dst: &str, action: Action) -> Intention {
        Intention {
            source: src.to_string().into(),
            destination: dst.to_string().into(),
            action,
            permissions: Vec::new(),
        }
    }

    fn set(rules: &[(&str, &str, Action)], default: Action) -> Intentions {
        Intentions {
            rules: rules.iter().map(|&(s, d, a)| rule(s, d, a)).collect(),
            default,
        }
    }

    #[test]
    fn precedence_table() {
        assert_eq!(rule("a", "b", Allow).precedence(), 4);
        assert_eq!(rule("*", "b", Allow).precedence(), 3);
        assert_eq!(rule("a", "*", Allow).precedence(), 2);
        assert_eq!(rule("*", "*", Allow).precedence(), 1);
    }

    #[test]
    fn default_decides_when_nothing_matches() {
        let i = set(&[("web", "api", Allow)], Deny);
        let d = i.evaluate("web", "db");
        assert_eq!(d.action, Deny);
        assert_eq!(d.rule, None);
        assert!(d.explain().starts_with("default deny"));
        let open = set(&[], Allow);
        assert!(open.evaluate("x", "y").allowed());
        assert!(!Intentions::default().evaluate("x", "y").allowed());
    }

    /// Every combination of the four rule shapes, each present or absent, with each action:
    /// the most specific present rule decides, and destination specificity beats source.
    #[test]
    fn exhaustive_precedence() {
        let shapes = [("web", "api"), ("*", "api"), ("web", "*"), ("*", "*")];
        for mask in 0u32..(1 << 4) {
            for actions in 0u32..(1 << 4) {
                for default in [Allow, Deny] {
                    let mut rules = Vec::new();
                    for (k, &(s, d)) in shapes.iter().enumerate() {
                        if mask & (1 << k) != 0 {
                            let a = if actions & (1 << k) != 0 { Allow } else { Deny };
                            rules.push(rule(s, d, a));
                        }
                    }
                    let i = Intentions { rules, default };
                    // Expected: the first present shape in precedence order.
                    let expected = (0..4)
                        .find(|k| mask & (1 << k) != 0)
                        .map(|k| if actions & (1 << k) != 0 { Allow } else { Deny })
                        .unwrap_or(default);
                    let d = i.evaluate("web", "api");
                    assert_eq!(
                        d.action, expected,
                        "mask {mask:04b} actions {actions:04b} default {default:?}"
                    );
                    if mask != 0 {
                        let r = d.rule.expect("a rule decided");
                        let first = (0..4).find(|k| mask & (1 << k) != 0).unwrap();
                        assert_eq!(r.precedence(), 4 - first as u8);
                    }
                    // Other pairs only see the rules that match them.
                    let other = i.evaluate("batch", "db");
                    let star = i
                        .rules
                        .iter()
                        .find(|r| r.source == Pattern::Any && r.destination == Pattern::Any);
                    assert_eq!(other.action, star.map_or(default, |r| r.action));
                }
            }
        }
    }

    #[test]
    fn exact_destination_beats_exact_source() {
        // web -> * allow, * -> api deny: the destination-specific deny decides for web -> api.
        let i = set(&[("web", "*", Allow), ("*", "api", Deny)], Allow);
        let d = i.evaluate("web", "api");
        assert_eq!(d.action, Deny);
        assert_eq!(d.rule.unwrap().to_string(), "* -> api: deny");
        assert!(i.evaluate("web", "other").allowed());
    }

    #[test]
    fn zero_trust_with_explicit_allows() {
        let i = set(
            &[
                ("*", "*", Deny),
                ("frontend", "public-api", Allow),
                ("public-api", "products-api", Allow),
            ],
            Allow,
        );
        assert!(i.evaluate("frontend", "public-api").allowed());
        assert!(i.evaluate("public-api", "products-api").allowed());
        let d = i.evaluate("frontend", "products-api");
        assert!(!d.allowed());
        assert_eq!(d.explain(), "intention * -> *: deny");
    }

    #[test]
    fn duplicate_rules_tie_to_deny() {
        let i = set(&[("web", "api", Allow), ("web", "api", Deny)], Allow);
        assert_eq!(i.evaluate("web", "api").action, Deny);
        let i = set(&[("web", "api", Deny), ("web", "api", Allow)], Allow);
        assert_eq!(i.evaluate("web", "api").action, Deny);
    }

    #[test]
    fn names_are_exact_not_prefixes() {
        let i = set(&[("web", "api", Allow)], Deny);
        assert!(!i.evaluate("web2", "api").allowed());
        assert!(!i.evaluate("web", "api-v2").allowed());
        assert!(!i.evaluate("", "api").allowed());
    }

    #[test]
    fn serde_form() {
        let y = "rules:\n  - source: '*'\n    destination: api\n    action: deny\ndefault: allow\n";
        let i: Intentions = serde_yaml::from_str(y).unwrap();
        assert_eq!(i.rules[0].source, Pattern::Any);
        assert_eq!(i.rules[0].destination, Pattern::Exact("api".into()));
        assert_eq!(i.default, Allow);
    }
}
