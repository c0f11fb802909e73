//! Traffic-redirect rules: the kernel hands every TCP connection of a pod to its sidecar.
//!
//! - OUTPUT (connections the pod's applications open): return for the proxy's uid (its own upstream
//!   connections), for loopback destinations, for excluded ports and CIDRs; REDIRECT all other TCP
//!   to the outbound listener (15001).
//! - PREROUTING (connections arriving at the pod): return for the mesh ports (15000-15021) and
//!   excluded ports; REDIRECT all other TCP to the inbound listener (15006).
//!
//! Three backends, all applied atomically and all idempotent:
//! - iptables-nft and iptables-legacy: ringside's own chains `RINGSIDE_OUTPUT` and
//!   `RINGSIDE_PREROUTING` in the `nat` table, one jump to each from `OUTPUT`/`PREROUTING`, loaded
//!   with `iptables-restore --noflush` (and `ip6tables-restore`); nothing else is touched.
//! - nft: ringside's own table `inet ringside`, replaced whole in one `nft -f` transaction.
//!
//! Everything here that decides is pure ([`RedirectSpec::iptables_rules`], [`RedirectSpec::nft_rules`],
//! [`parse_cidr`]); the functions that run commands are at the end of the file.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// Chain for outbound redirection (iptables backends).
pub const OUTPUT_CHAIN: &str = "RINGSIDE_OUTPUT";
/// Chain for inbound redirection (iptables backends).
pub const PREROUTING_CHAIN: &str = "RINGSIDE_PREROUTING";
/// Table of the nft backend.
pub const NFT_TABLE: &str = "ringside";

/// Which rule tool programs the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables` with the nf_tables kernel API (`iptables-nft`).
    IptablesNft,
    /// `iptables` with the legacy xtables kernel API.
    IptablesLegacy,
    /// Native `nft`.
    Nft,
}

impl Backend {
    /// Parse a backend name as given on the command line.
    pub fn parse(s: &str) -> Option<Backend> {
        match s {
            "iptables-nft" => Some(Backend::IptablesNft),
            "iptables-legacy" => Some(Backend::IptablesLegacy),
            "nft" => Some(Backend::Nft),
            _ => None,
        }
    }

    /// The name used on the command line and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Backend::IptablesNft => "iptables-nft",
            Backend::IptablesLegacy => "iptables-legacy",
            Backend::Nft => "nft",
        }
    }

    /// The commands this backend runs, for "tool missing" errors.
    fn tools(self) -> &'static [&'static str] {
        match self {
            Backend::IptablesNft => &[
                "iptables-nft-restore",
                "ip6tables-nft-restore",
                "iptables-nft-save",
                "ip6tables-nft-save",
            ],
            Backend::IptablesLegacy => &[
                "iptables-legacy-restore",
                "ip6tables-legacy-restore",
                "iptables-legacy-save",
                "ip6tables-legacy-save",
            ],
            Backend::Nft => &["nft"],
        }
    }
}

/// An IP network (address and prefix length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parse `10.0.0.0/8`, `fd00::/8` or a bare address (a /32 or /128).
pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (a, p) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = a
        .parse()
        .map_err(|_| format!("'{s}' is not an IP address or CIDR"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match p {
        None => max,
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|&p| p <= max)
            .ok_or_else(|| format!("'{s}': prefix length must be 0 to {max}"))?,
    };
    Ok(Cidr { addr, prefix })
}

/// What to redirect, and what to leave alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectSpec {
    /// The proxy's uid: its own connections are never redirected.
    pub proxy_uid: u32,
    /// Outbound listener port (15001).
    pub outbound_port: u16,
    /// Inbound listener port (15006).
    pub inbound_port: u16,
    /// Mesh ports never redirected inbound (15000-15021).
    pub mesh_ports: (u16, u16),
    /// Destination ports not redirected outbound.
    pub exclude_outbound_ports: Vec<u16>,
    /// Destination networks not redirected outbound.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Destination ports not redirected inbound.
    pub exclude_inbound_ports: Vec<u16>,
}

impl Default for RedirectSpec {
    fn default() -> Self {
        RedirectSpec {
            proxy_uid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            mesh_ports: (15000, 15021),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            exclude_inbound_ports: Vec::new(),
        }
    }
}

/// IPv4 or IPv6 rules (iptables needs one file per family).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// iptables.
    V4,
    /// ip6tables.
    V6,
}

impl RedirectSpec {
    /// The chain contents for `iptables-restore --noflush` (declaring a chain flushes it, so loading
    /// twice gives the same rules). `add_jumps` adds the jumps from the built-in chains; pass false
    /// when they exist already (see [`install`]).
    pub fn iptables_rules(&self, family: Family, add_jumps: bool) -> String {
        let mut s = String::from("*nat\n");
        let _ = writeln!(s, ":{OUTPUT_CHAIN} - [0:0]");
        let _ = writeln!(s, ":{PREROUTING_CHAIN} - [0:0]");
        let loopback = match family {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        };
        let o = OUTPUT_CHAIN;
        let _ = writeln!(
            s,
            "-A {o} -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        );
        let _ = writeln!(s, "-A {o} -d {loopback} -j RETURN");
        for p in &self.exclude_outbound_ports {
            let _ = writeln!(s, "-A {o} -p tcp --dport {p} -j RETURN");
        }
        for c in &self.exclude_outbound_cidrs {
            if c.addr.is_ipv4() == (family == Family::V4) {
                let _ = writeln!(s, "-A {o} -d {c} -j RETURN");
            }
        }
        let _ = writeln!(
            s,
            "-A {o} -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        );
        let i = PREROUTING_CHAIN;
        let _ = writeln!(
            s,
            "-A {i} -p tcp --dport {}:{} -j RETURN",
            self.mesh_ports.0, self.mesh_ports.1
        );
        for p in &self.exclude_inbound_ports {
            let _ = writeln!(s, "-A {i} -p tcp --dport {p} -j RETURN");
        }
        let _ = writeln!(
            s,
            "-A {i} -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        );
        if add_jumps {
            s.push_str(&jump_rule("-A", "OUTPUT", OUTPUT_CHAIN));
            s.push_str(&jump_rule("-A", "PREROUTING", PREROUTING_CHAIN));
        }
        s.push_str("COMMIT\n");
        s
    }

    /// The `nft -f` script: creates the table if missing, deletes it, and defines it again, all in
    /// one transaction.
    pub fn nft_rules(&self) -> String {
        let mut s = format!(
            "table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\ntable inet {NFT_TABLE} {{\n"
        );
        s.push_str("  chain output {\n    type nat hook output priority -100; policy accept;\n");
        s.push_str("    meta l4proto != tcp return\n");
        let _ = writeln!(s, "    meta skuid {} return", self.proxy_uid);
        s.push_str("    ip daddr 127.0.0.0/8 return\n    ip6 daddr ::1 return\n");
        if !self.exclude_outbound_ports.is_empty() {
            let _ = writeln!(
                s,
                "    tcp dport {{ {} }} return",
                join(&self.exclude_outbound_ports)
            );
        }
        let v4: Vec<_> = self
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| c.addr.is_ipv4())
            .collect();
        let v6: Vec<_> = self
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| c.addr.is_ipv6())
            .collect();
        if !v4.is_empty() {
            let _ = writeln!(s, "    ip daddr {{ {} }} return", join(&v4));
        }
        if !v6.is_empty() {
            let _ = writeln!(s, "    ip6 daddr {{ {} }} return", join(&v6));
        }
        let _ = writeln!(
            s,
            "    meta l4proto tcp redirect to :{}",
            self.outbound_port
        );
        s.push_str("  }\n");
        s.push_str(
            "  chain prerouting {\n    type nat hook prerouting priority -100; policy accept;\n",
        );
        s.push_str("    meta l4proto != tcp return\n");
        let _ = writeln!(
            s,
            "    tcp dport {}-{} return",
            self.mesh_ports.0, self.mesh_ports.1
        );
        if !self.exclude_inbound_ports.is_empty() {
            let _ = writeln!(
                s,
                "    tcp dport {{ {} }} return",
                join(&self.exclude_inbound_ports)
            );
        }
        let _ = writeln!(s, "    meta l4proto tcp redirect to :{}", self.inbound_port);
        s.push_str("  }\n}\n");
        s
    }
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn jump_rule(op: &str, builtin: &str, chain: &str) -> String {
    format!("{op} {builtin} -p tcp -j {chain}\n")
}

/// The `iptables-restore --noflush` input that removes ringside's chains and jumps, given which
/// jumps are present.
pub fn iptables_removal(jumps: &[(&str, &str)], chains: &[&str]) -> String {
    let mut s = String::from("*nat\n");
    for (builtin, chain) in jumps {
        s.push_str(&jump_rule("-D", builtin, chain));
    }
    for c in chains {
        let _ = writeln!(s, "-F {c}");
    }
    for c in chains {
        let _ = writeln!(s, "-X {c}");
    }
    s.push_str("COMMIT\n");
    s
}

// ---------------------------------------------------------------------------------------------
// Running the tools.
// ---------------------------------------------------------------------------------------------

/// Why installing, removing or showing rules failed.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// Not allowed to change netfilter rules.
    #[error("changing redirect rules needs root or CAP_NET_ADMIN (running as uid {uid}); run ringside-init as root")]
    NotPermitted {
        /// The effective uid.
        uid: u32,
    },
    /// A command this backend needs is not installed.
    #[error("'{tool}' is not installed (needed by the {backend} backend): install the iptables or nftables package, or choose another --backend")]
    ToolMissing {
        /// The missing command.
        tool: String,
        /// The backend.
        backend: &'static str,
    },
    /// The network namespace does not exist.
    #[error("network namespace '{0}' does not exist (see `ip netns list`)")]
    NetnsMissing(String),
    /// The tool ran and failed.
    #[error("{command} failed: {stderr}")]
    Command {
        /// What was run.
        command: String,
        /// What it said.
        stderr: String,
    },
    /// Could not run the tool at all.
    #[error("cannot run {command}: {source}")]
    Spawn {
        /// What was run.
        command: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Where rules are applied: the current namespace or a named one (`ip netns`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Backend.
    pub backend: Backend,
    /// Named network namespace, if any.
    pub netns: Option<String>,
}

impl Target {
    fn command(&self, tool: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, tool]);
                c
            }
            None => Command::new(tool),
        }
    }

    /// Run `tool args` (with `input` on stdin); returns stdout.
    fn run(&self, tool: &str, args: &[&str], input: Option<&str>) -> Result<String, RedirectError> {
        let mut cmd = self.command(tool);
        cmd.args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let shown = format!("{tool} {}", args.join(" "));
        let mut child = cmd.spawn().map_err(|source| RedirectError::Spawn {
            command: shown.clone(),
            source,
        })?;
        if let Some(text) = input {
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(text.as_bytes());
            }
        }
        let out = child
            .wait_with_output()
            .map_err(|source| RedirectError::Spawn {
                command: shown.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(RedirectError::Command {
                command: shown,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn check(&self) -> Result<(), RedirectError> {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if uid != 0 && !has_cap_net_admin() {
            return Err(RedirectError::NotPermitted { uid });
        }
        if let Some(ns) = &self.netns {
            if !std::path::Path::new("/run/netns").join(ns).exists() {
                return Err(RedirectError::NetnsMissing(ns.clone()));
            }
        }
        for tool in self.backend.tools() {
            if which(tool).is_none() {
                return Err(RedirectError::ToolMissing {
                    tool: tool.to_string(),
                    backend: self.backend.name(),
                });
            }
        }
        Ok(())
    }

    fn iptables_tool(&self, family: Family, what: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let flavour = match self.backend {
            Backend::IptablesLegacy => "legacy",
            _ => "nft",
        };
        format!("{base}-{flavour}-{what}")
    }

    /// The nat table as the backend prints it (for [`show`] and checks).
    fn iptables_save(&self, family: Family) -> Result<String, RedirectError> {
        self.run(&self.iptables_tool(family, "save"), &["-t", "nat"], None)
    }
}

/// Whether the effective capability set has CAP_NET_ADMIN (read from /proc/self/status).
fn has_cap_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// Find a command on PATH (and in the sbin directories, which a non-root PATH may lack).
pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| std::path::Path::new(d).join(tool))
        .find(|p| p.is_file());
    found
}

/// Pick the backend the system already uses: the one that holds rules now (legacy vs nf_tables),
/// else what the `iptables` command is, else nft when no iptables is installed.
pub fn detect_backend(netns: Option<&str>) -> Backend {
    let probe = |backend: Backend| Target {
        backend,
        netns: netns.map(str::to_string),
    };
    let count = |backend: Backend| -> usize {
        let t = probe(backend);
        [Family::V4, Family::V6]
            .iter()
            .filter_map(|&f| t.run(&t.iptables_tool(f, "save"), &[], None).ok())
            .map(|out| out.lines().filter(|l| l.starts_with("-A")).count())
            .sum()
    };
    let has_legacy = which("iptables-legacy-save").is_some();
    let has_nft_iptables = which("iptables-nft-save").is_some();
    if has_legacy && count(Backend::IptablesLegacy) > 0 {
        return Backend::IptablesLegacy;
    }
    if has_nft_iptables && count(Backend::IptablesNft) > 0 {
        return Backend::IptablesNft;
    }
    if let Ok(out) = Command::new(which("iptables").unwrap_or_else(|| "iptables".into()))
        .arg("-V")
        .output()
    {
        let v = String::from_utf8_lossy(&out.stdout);
        if v.contains("legacy") {
            return Backend::IptablesLegacy;
        }
        if v.contains("nf_tables") {
            return Backend::IptablesNft;
        }
    }
    if which("nft").is_some() && !has_nft_iptables {
        return Backend::Nft;
    }
    Backend::IptablesNft
}

/// Install (or refresh) the rules. Idempotent: a second install leaves the same rules.
pub fn install(spec: &RedirectSpec, target: &Target) -> Result<(), RedirectError> {
    target.check()?;
    match target.backend {
        Backend::Nft => {
            target.run("nft", &["-f", "-"], Some(&spec.nft_rules()))?;
        }
        Backend::IptablesNft | Backend::IptablesLegacy => {
            for family in [Family::V4, Family::V6] {
                let current = target.iptables_save(family)?;
                let has_jumps = current.contains(&jump_rule("-A", "OUTPUT", OUTPUT_CHAIN))
                    && current.contains(&jump_rule("-A", "PREROUTING", PREROUTING_CHAIN));
                let rules = spec.iptables_rules(family, !has_jumps);
                target.run(
                    &target.iptables_tool(family, "restore"),
                    &["--noflush"],
                    Some(&rules),
                )?;
            }
        }
    }
    Ok(())
}

/// Remove exactly what [`install`] added. Removing when nothing is installed is not an error.
pub fn remove(target: &Target) -> Result<(), RedirectError> {
    target.check()?;
    match target.backend {
        Backend::Nft => {
            // Create-then-delete in one transaction: succeeds whether or not the table exists.
            let script = format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n");
            target.run("nft", &["-f", "-"], Some(&script))?;
        }
        Backend::IptablesNft | Backend::IptablesLegacy => {
            for family in [Family::V4, Family::V6] {
                let current = target.iptables_save(family)?;
                let jumps: Vec<(&str, &str)> =
                    [("OUTPUT", OUTPUT_CHAIN), ("PREROUTING", PREROUTING_CHAIN)]
                        .into_iter()
                        .filter(|(b, c)| current.contains(&jump_rule("-A", b, c)))
                        .collect();
                let chains: Vec<&str> = [OUTPUT_CHAIN, PREROUTING_CHAIN]
                    .into_iter()
                    .filter(|c| current.contains(&format!(":{c} ")))
                    .collect();
                if jumps.is_empty() && chains.is_empty() {
                    continue;
                }
                let script = iptables_removal(&jumps, &chains);
                target.run(
                    &target.iptables_tool(family, "restore"),
                    &["--noflush"],
                    Some(&script),
                )?;
            }
        }
    }
    Ok(())
}

/// The rules ringside has installed now, as the backend prints them (empty when none).
pub fn show(target: &Target) -> Result<String, RedirectError> {
    target.check()?;
    match target.backend {
        Backend::Nft => match target.run("nft", &["list", "table", "inet", NFT_TABLE], None) {
            Ok(s) => Ok(s),
            Err(RedirectError::Command { stderr, .. }) if stderr.contains("No such file") => {
                Ok(String::new())
            }
            Err(e) => Err(e),
        },
        Backend::IptablesNft | Backend::IptablesLegacy => {
            let mut out = String::new();
            for (family, name) in [(Family::V4, "# IPv4 (nat)"), (Family::V6, "# IPv6 (nat)")] {
                let current = target.iptables_save(family)?;
                let ours: Vec<&str> = current
                    .lines()
                    .filter(|l| l.contains(OUTPUT_CHAIN) || l.contains(PREROUTING_CHAIN))
                    .collect();
                if !ours.is_empty() {
                    let _ = writeln!(out, "{name}");
                    for l in ours {
                        let _ = writeln!(out, "{l}");
                    }
                }
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RedirectSpec {
        RedirectSpec {
            exclude_outbound_ports: vec![5432, 8500],
            exclude_outbound_cidrs: vec![
                parse_cidr("10.0.0.0/8").unwrap(),
                parse_cidr("fd00::/8").unwrap(),
            ],
            exclude_inbound_ports: vec![22],
            ..RedirectSpec::default()
        }
    }

    #[test]
    fn iptables_v4_rules_in_order() {
        let r = spec().iptables_rules(Family::V4, true);
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines[0], "*nat");
        assert_eq!(lines[1], ":RINGSIDE_OUTPUT - [0:0]");
        assert_eq!(
            lines[3],
            "-A RINGSIDE_OUTPUT -m owner --uid-owner 1337 -j RETURN"
        );
        assert_eq!(lines[4], "-A RINGSIDE_OUTPUT -d 127.0.0.0/8 -j RETURN");
        assert!(r.contains("-A RINGSIDE_OUTPUT -p tcp --dport 5432 -j RETURN\n"));
        assert!(r.contains("-A RINGSIDE_OUTPUT -d 10.0.0.0/8 -j RETURN\n"));
        assert!(!r.contains("fd00::/8"), "v6 CIDRs stay out of v4 rules");
        let redirect_out = r
            .find("-A RINGSIDE_OUTPUT -p tcp -j REDIRECT --to-ports 15001")
            .unwrap();
        assert!(
            r.find("--dport 8500").unwrap() < redirect_out,
            "returns come before the redirect"
        );
        assert!(r.contains("-A RINGSIDE_PREROUTING -p tcp --dport 15000:15021 -j RETURN\n"));
        assert!(r.contains("-A RINGSIDE_PREROUTING -p tcp --dport 22 -j RETURN\n"));
        assert!(r.contains("-A RINGSIDE_PREROUTING -p tcp -j REDIRECT --to-ports 15006\n"));
        assert!(r.contains("-A OUTPUT -p tcp -j RINGSIDE_OUTPUT\n"));
        assert!(r.contains("-A PREROUTING -p tcp -j RINGSIDE_PREROUTING\n"));
        assert!(r.ends_with("COMMIT\n"));
        assert!(!spec()
            .iptables_rules(Family::V4, false)
            .contains("-A OUTPUT"));
    }

    #[test]
    fn iptables_v6_rules() {
        let r = spec().iptables_rules(Family::V6, true);
        assert!(r.contains("-A RINGSIDE_OUTPUT -d ::1/128 -j RETURN\n"));
        assert!(r.contains("-A RINGSIDE_OUTPUT -d fd00::/8 -j RETURN\n"));
        assert!(!r.contains("10.0.0.0/8"));
    }

    #[test]
    fn nft_rules_are_one_replacing_transaction() {
        let r = spec().nft_rules();
        assert!(r.starts_with(
            "table inet ringside\ndelete table inet ringside\ntable inet ringside {\n"
        ));
        assert!(r.contains("meta skuid 1337 return"));
        assert!(r.contains("tcp dport { 5432, 8500 } return"));
        assert!(r.contains("ip daddr { 10.0.0.0/8 } return"));
        assert!(r.contains("ip6 daddr { fd00::/8 } return"));
        assert!(r.contains("redirect to :15001"));
        assert!(r.contains("tcp dport 15000-15021 return"));
        assert!(r.contains("tcp dport { 22 } return"));
        assert!(r.contains("redirect to :15006"));
        let plain = RedirectSpec::default().nft_rules();
        assert!(!plain.contains("{  }"), "no empty sets: {plain}");
    }

    #[test]
    fn removal_script() {
        let s = iptables_removal(
            &[("OUTPUT", OUTPUT_CHAIN)],
            &[OUTPUT_CHAIN, PREROUTING_CHAIN],
        );
        assert_eq!(
            s,
            "*nat\n-D OUTPUT -p tcp -j RINGSIDE_OUTPUT\n-F RINGSIDE_OUTPUT\n-F RINGSIDE_PREROUTING\n-X RINGSIDE_OUTPUT\n-X RINGSIDE_PREROUTING\nCOMMIT\n"
        );
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.1.0.0/16").unwrap().to_string(),
            "10.1.0.0/16"
        );
        assert_eq!(parse_cidr("10.1.2.3").unwrap().prefix, 32);
        assert_eq!(parse_cidr("fd00::1").unwrap().prefix, 128);
        assert!(parse_cidr("10.0.0.0/33").unwrap_err().contains("0 to 32"));
        assert!(parse_cidr("example.com").is_err());
    }

    #[test]
    fn backend_names_round_trip() {
        for b in [Backend::IptablesNft, Backend::IptablesLegacy, Backend::Nft] {
            assert_eq!(Backend::parse(b.name()), Some(b));
        }
        assert_eq!(Backend::parse("ipchains"), None);
    }
}
