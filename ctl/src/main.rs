//! `ringctl`: the operator CLI (and, later, the control daemon).
//!
//! For now it works on files, so a broken file is caught before a rollout:
//! - `ringctl validate FILE...`: sidecar configuration files, checked the way the proxy reads them;
//! - `ringctl apply --dry-run -f FILE`: Consul-style documents (ServiceDefaults, ServiceIntentions,
//!   ServiceRouter, ServiceSplitter, ServiceResolver), checked whole;
//! - `ringctl intention check SRC DST -f FILE`: which intention decides, and what it says.
//!
//! Errors name the document, the field and the line; the exit status is non-zero on any error.

mod ca;
mod consul;
mod daemon;
mod doctor;
mod store;
mod why;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringside_core::control::api::{
    ApplyResponse, CaStatus, CertRotateResponse, DeleteResponse, DeregisterResponse,
    EndpointRecord, IntentionCheck, IntentionList, IntentionRow, PortMap, ProxyStatus,
    RegisterService, RotationPhase, ServiceRecord, SignResponse, TokenRequest, TokenResponse,
};
use ringside_core::control::AnswerError;
use ringside_core::intentions::{Action, Pattern};
use ringside_core::Config;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(name = "ringctl", version, about = "ringside control CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the control daemon: state in DIR (or in etcd with --store), HTTP/JSON API on a Unix
    /// socket.
    Daemon {
        /// Directory of the embedded store and of its CA (with --store etcd the CA is the mesh's,
        /// in etcd; a CA found here seeds it when the mesh has none yet).
        #[arg(long)]
        data_dir: PathBuf,
        /// Where the state is kept: `redb` (the embedded store in --data-dir, for one node) or
        /// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` (shared by every daemon pointed at it: one
        /// mesh; keys under PREFIX, /ringside/ by default).
        #[arg(long, default_value = "redb")]
        store: String,
        /// CA certificate (PEM) of etcd's server certificates: etcd is reached over TLS.
        #[arg(long)]
        etcd_ca: Option<PathBuf>,
        /// Client certificate (PEM) for etcd (with --etcd-key and --etcd-ca).
        #[arg(long)]
        etcd_cert: Option<PathBuf>,
        /// The client certificate's private key (PEM).
        #[arg(long)]
        etcd_key: Option<PathBuf>,
        /// With --store etcd (required): a secret file shared by every daemon of the mesh (out of
        /// band, mode 0600) that seals the mesh CA's private keys in etcd (`ringctl ca secret`).
        #[arg(long)]
        ca_secret: Option<PathBuf>,
        /// How long endpoints outlive what registered them: the TTL of the daemon's etcd lease
        /// (its proxies' endpoints leave the catalog this long after it dies), and how long a
        /// proxy may stay silent before its endpoint is removed (either store).
        #[arg(long, default_value = "15s", value_parser = humantime_parse)]
        lease_ttl: std::time::Duration,
        /// API socket.
        #[arg(long, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Trust domain of the mesh's SPIFFE IDs.
        #[arg(long, default_value = "dc1")]
        trust_domain: String,
        /// Virtual IPs for services are allocated from this IPv4 range.
        #[arg(long, default_value = "240.0.0.0/16", value_parser = parse_range)]
        vip_range: (std::net::Ipv4Addr, u8),
        /// Proxy API socket (mode 0666; every request needs a proxy token). Default: `proxy.sock`
        /// beside --socket (/run/ringside/proxy.sock).
        #[arg(long)]
        proxy_socket: Option<PathBuf>,
        /// Lifetime of issued leaf certificates (proxies renew at about half of it).
        #[arg(long, default_value = "72h", value_parser = humantime_parse)]
        leaf_lifetime: std::time::Duration,
    },
    /// Register a service (ports as PORT or PORT:TARGET_PORT) or an endpoint.
    Register {
        #[command(subcommand)]
        what: RegisterCommand,
        /// The daemon's socket.
        #[arg(long, global = true, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Remove an endpoint (one registered by hand; a running proxy's comes back with its next
    /// report).
    Deregister {
        #[command(subcommand)]
        what: DeregisterCommand,
        /// The daemon's socket.
        #[arg(long, global = true, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Get a workload certificate from the daemon with a proxy token: a key and CSR are made
    /// here (the key never leaves this host), the daemon signs for the token's service.
    Issue {
        /// The proxy token (`ringctl token create`).
        #[arg(long)]
        token: String,
        /// Where to write the private key (mode 0600).
        #[arg(long)]
        key_out: PathBuf,
        /// Where to write the certificate.
        #[arg(long)]
        cert_out: PathBuf,
        /// Where to write the trust bundle.
        #[arg(long)]
        bundle_out: PathBuf,
        /// The daemon's socket.
        #[arg(long, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// A pod's traffic-redirect rules (the same as `ringside-init`).
    Redirect {
        /// install, remove or show.
        action: String,
        /// The pod's network namespace.
        #[arg(long)]
        netns: Option<String>,
        /// The proxy's uid.
        #[arg(long, default_value_t = 1337)]
        proxy_uid: u32,
        /// iptables-nft, iptables-legacy or nft (default: the one in use).
        #[arg(long)]
        backend: Option<String>,
    },
    /// Proxy tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        /// The daemon's socket.
        #[arg(long, global = true, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Apply Consul-style documents (ServiceDefaults, ServiceIntentions, ServiceRouter,
    /// ServiceSplitter, ServiceResolver): the whole file or nothing.
    Apply {
        /// YAML file with one or more documents separated by `---`.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Check only; store nothing (no daemon needed).
        #[arg(long)]
        dry_run: bool,
        /// The daemon's socket.
        #[arg(long, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// List what the daemon stores.
    Get {
        /// `config` (every document).
        what: String,
        /// `json` for JSON.
        #[arg(short = 'o', long)]
        output: Option<String>,
        /// The daemon's socket.
        #[arg(long, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Delete a stored document.
    Delete {
        /// Kind, e.g. ServiceIntentions.
        kind: String,
        /// Name.
        name: String,
        /// The daemon's socket.
        #[arg(long, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Intentions.
    Intention {
        #[command(subcommand)]
        command: IntentionCommand,
    },
    /// The mesh certificate authority: the daemon's (rollover, roots, the etcd CA secret) or one
    /// on files.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Everything the daemon knows about one service: ports, virtual IP, protocol, endpoints,
    /// who may call it, its proxies and the documents that mention it.
    Describe {
        /// Service name.
        service: String,
        /// `json` for JSON.
        #[arg(short = 'o', long)]
        output: Option<String>,
        /// The daemon's socket.
        #[arg(long, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Why connections from SRC to DST fail (or that they should not): catalog, ports,
    /// intentions, endpoints, both proxies, certificates, their recent failures, and the pods
    /// themselves when their network namespaces are given. Prints the cause and the fix.
    Why {
        /// Source service.
        src: String,
        /// Destination service, optionally with the service port (DST:PORT).
        dst: String,
        /// The source pod's network namespace (checks its redirect rules and sidecar).
        #[arg(long)]
        src_netns: Option<String>,
        /// The destination pod's network namespace (rules, sidecar, what the app listens on).
        #[arg(long)]
        dst_netns: Option<String>,
        /// `json` for JSON.
        #[arg(short = 'o', long)]
        output: Option<String>,
        /// The daemon's socket.
        #[arg(long, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Checks of the mesh and, with --netns, of one pod: each passes or fails with the fix.
    Doctor {
        /// The pod's network namespace.
        #[arg(long)]
        netns: Option<String>,
        /// `json` for JSON.
        #[arg(short = 'o', long)]
        output: Option<String>,
        /// The daemon's socket.
        #[arg(long, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// GET an HTTP URL and print the body (used by `why` inside a pod's namespace).
    #[command(hide = true)]
    AdminGet {
        /// The URL.
        url: String,
    },
    /// Workload certificates.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Validate ringside configuration files (TOML or YAML).
    Validate {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print each valid file's resolved configuration as JSON.
        #[arg(long)]
        print: bool,
    },
}

#[derive(Subcommand, Debug)]
enum RegisterCommand {
    /// A service, e.g. `payments --port 1800:8080`.
    Service {
        /// Name.
        name: String,
        /// PORT or PORT:TARGET_PORT (repeat).
        #[arg(long = "port", value_parser = parse_port_map)]
        ports: Vec<(u16, u16)>,
    },
    /// An endpoint of a service.
    Endpoint {
        /// Service.
        service: String,
        /// Address of the pod.
        address: std::net::IpAddr,
        /// Node name.
        #[arg(long, default_value = "local")]
        node: String,
        /// Metadata KEY=VALUE (repeat), e.g. version=v2 for ServiceResolver subsets.
        #[arg(long, value_parser = parse_kv)]
        meta: Vec<(String, String)>,
    },
}

#[derive(Subcommand, Debug)]
enum DeregisterCommand {
    /// An endpoint of a service, e.g. `payments 10.0.1.7`.
    Endpoint {
        /// Service.
        service: String,
        /// Address of the endpoint.
        address: std::net::IpAddr,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("'{s}' is not KEY=VALUE"))
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a token for the proxies of a service.
    Create {
        /// Service.
        #[arg(long)]
        service: String,
    },
}

fn parse_range(s: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| format!("'{s}' is not a CIDR like 240.0.0.0/16"))?;
    let a: std::net::Ipv4Addr = a
        .parse()
        .map_err(|_| format!("'{a}' is not an IPv4 address"))?;
    let p: u8 = p
        .parse()
        .ok()
        .filter(|p| (8..=30).contains(p))
        .ok_or("prefix length must be 8 to 30")?;
    Ok((a, p))
}

fn parse_port_map(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("'{s}' is not PORT or PORT:TARGET_PORT");
    match s.split_once(':') {
        Some((a, b)) => Ok((a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?)),
        None => {
            let p = s.parse().map_err(|_| bad())?;
            Ok((p, p))
        }
    }
}

#[derive(Subcommand, Debug)]
enum CertCommand {
    /// Make proxies re-issue their certificates now (all, or one service's).
    Rotate {
        /// Only this service's proxies.
        #[arg(long)]
        service: Option<String>,
        /// The daemon's socket.
        #[arg(long, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Roll the daemon's root over without dropping a connection: a new root is trusted beside
    /// the old one, every live proxy takes the new bundle, the new root starts signing and every
    /// leaf is re-issued, then the old root is retired. Interrupted, it continues where it stopped.
    Rotate {
        /// The longest to wait for the proxies at each step.
        #[arg(long, value_parser = humantime_parse, default_value = "120s")]
        timeout: std::time::Duration,
        /// The daemon's socket.
        #[arg(long, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Make a secret for `ringctl daemon --ca-secret` (32 random bytes in hex, mode 0600): give
    /// the same file to every daemon of a mesh on etcd. An existing file is not replaced.
    Secret {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Show the daemon's roots and any rollover in progress.
    Show {
        /// The daemon's socket.
        #[arg(long, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Create the root in DIR (ca.pem, ca.key with mode 0600), or load it; print the root.
    Init {
        /// Directory for ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain of the mesh.
        #[arg(long, default_value = "dc1")]
        trust_domain: String,
    },
    /// Make a private key and a CSR, as a proxy does (the key never leaves it).
    Request {
        /// Where to write the private key (mode 0600).
        #[arg(long)]
        key_out: PathBuf,
        /// Where to write the CSR.
        #[arg(long)]
        csr_out: PathBuf,
    },
    /// Sign a CSR for a service: the identity comes from --service, not from the CSR.
    Sign {
        /// Directory of the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain of the mesh.
        #[arg(long, default_value = "dc1")]
        trust_domain: String,
        /// The CSR (PEM).
        #[arg(long)]
        csr: PathBuf,
        /// Service (SPIFFE service account).
        #[arg(long)]
        service: String,
        /// Namespace.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Leaf lifetime (default 72h).
        #[arg(long, value_parser = humantime_parse)]
        lifetime: Option<std::time::Duration>,
    },
}

fn humantime_parse(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 72h, 30m or 3600s"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("'{s}': unit must be s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

/// Wait until every live proxy satisfies `ok` (or `timeout` passes).
fn wait_proxies(
    socket: &std::path::Path,
    timeout: std::time::Duration,
    what: &str,
    ok: impl Fn(&ProxyStatus) -> bool,
) -> Result<(), String> {
    let start = std::time::Instant::now();
    loop {
        let proxies: Vec<ProxyStatus> =
            match daemon::call(socket, hyper::Method::GET, "/v1/proxies", None) {
                Ok(p) => p,
                Err(daemon::CallError::Answer(AnswerError::Refused { status, .. })) => {
                    return Err(format!("cannot list proxies ({status})"))
                }
                Err(e) => return Err(e.to_string()),
            };
        let behind: Vec<String> = proxies
            .iter()
            .filter(|p| p.live && !ok(p))
            .map(|p| p.report.id.clone())
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(format!(
                "{} live proxies have not {what} after {timeout:?}: {}; run `ringctl ca rotate` again to continue",
                behind.len(),
                behind.join(", ")
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The daemon's store from `--store` and the `--etcd-*` files.
fn store_choice(
    store: &str,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> anyhow::Result<daemon::StoreChoice> {
    if store == "redb" {
        if ca.is_some() || cert.is_some() || key.is_some() {
            anyhow::bail!("--etcd-ca, --etcd-cert and --etcd-key are for --store etcd://...");
        }
        return Ok(daemon::StoreChoice::Redb);
    }
    let mut o = store::EtcdOptions::parse(store).map_err(|e| {
        anyhow::anyhow!("--store: {e} (or `redb`, the embedded store in --data-dir)")
    })?;
    (o.ca, o.cert, o.key) = (ca, cert, key);
    Ok(daemon::StoreChoice::Etcd(o))
}

/// A daemon answer read as `T`, or the error as the CLI prints it.
fn fetch<T: DeserializeOwned>(
    socket: &std::path::Path,
    method: hyper::Method,
    path: &str,
) -> Result<T, String> {
    daemon::call(socket, method, path, None).map_err(|e| e.to_string())
}

fn ca_rotate(socket: &std::path::Path, timeout: std::time::Duration) -> Result<(), String> {
    let mut state: CaStatus = fetch(socket, hyper::Method::GET, "/v1/ca")?;
    let mut started = false;
    loop {
        match state.phase {
            RotationPhase::Idle if started => {
                println!("rollover done: signer {}", state.roots.signer);
                return Ok(());
            }
            RotationPhase::Idle => {
                state = fetch(socket, hyper::Method::POST, "/v1/ca/rotate?from=idle")?;
                println!(
                    "1/3 new root {} trusted beside the old one",
                    state.roots.trusted.get(1).map_or("", |t| t.as_str())
                );
            }
            RotationPhase::NewTrusted => {
                let index = state.index;
                wait_proxies(socket, timeout, "taken the new trust bundle", |p| {
                    p.report.applied_index >= index
                })?;
                state = fetch(
                    socket,
                    hyper::Method::POST,
                    "/v1/ca/rotate?from=new_trusted",
                )?;
                println!(
                    "2/3 every live proxy trusts both roots; the new root {} signs, leaves are being re-issued",
                    state.roots.signer
                );
            }
            RotationPhase::NewSigning => {
                let generation = state.generation;
                wait_proxies(socket, timeout, "re-issued their certificates", |p| {
                    p.report.cert_generation >= generation
                })?;
                state = fetch(
                    socket,
                    hyper::Method::POST,
                    "/v1/ca/rotate?from=new_signing",
                )?;
                println!(
                    "3/3 every live proxy has a leaf from the new root; the old root is retired"
                );
            }
        }
        started = true;
    }
}

/// An intention's action as the API writes it.
fn action_name(a: Action) -> &'static str {
    match a {
        Action::Allow => "allow",
        Action::Deny => "deny",
    }
}

/// JSON as `-o json` prints it: pretty, with object keys sorted (the order it always had).
fn print_json<T: Serialize>(v: &T) {
    let v = serde_json::to_value(v).unwrap_or_default();
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

fn describe(socket: &std::path::Path, name: &str, json_out: bool) -> Result<(), String> {
    let get = hyper::Method::GET;
    let service = fetch::<Vec<ServiceRecord>>(socket, get.clone(), "/v1/services")?
        .into_iter()
        .find(|s| s.name == name);
    let endpoints: Vec<EndpointRecord> =
        fetch::<Vec<EndpointRecord>>(socket, get.clone(), "/v1/endpoints")?
            .into_iter()
            .filter(|e| e.service == name)
            .collect();
    let for_it = |p: &Pattern| match p {
        Pattern::Any => true,
        Pattern::Exact(d) => d == name,
    };
    let intentions: Vec<IntentionRow> =
        fetch::<IntentionList>(socket, get.clone(), "/v1/intentions")?
            .rules
            .into_iter()
            .filter(|r| for_it(&r.intention.destination))
            .collect();
    let proxies: Vec<ProxyStatus> = fetch::<Vec<ProxyStatus>>(socket, get.clone(), "/v1/proxies")?
        .into_iter()
        .filter(|p| p.report.service == name)
        .collect();
    // The stored documents are shown as stored (`-o json`); they are read as documents to pick
    // the ones about this service.
    let mut docs: Vec<(consul::Document, serde_json::Value)> = Vec::new();
    for v in fetch::<Vec<serde_json::Value>>(socket, get, "/v1/config")? {
        let d: consul::Document = serde_json::from_value(v.clone())
            .map_err(|e| format!("a stored document cannot be read: {e}"))?;
        if d.name() == name || d.destination() == Some(name) {
            docs.push((d, v));
        }
    }
    let everywhere = |r: &IntentionRow| r.intention.destination == Pattern::Any;
    if service.is_none() && docs.is_empty() && intentions.iter().all(everywhere) {
        return Err(format!(
            "no service '{name}' in the catalog and no document names it (ringctl get services lists them)"
        ));
    }
    let protocol = docs
        .iter()
        .find_map(|(d, _)| match d {
            consul::Document::ServiceDefaults { spec, .. } => Some(spec.protocol.as_str()),
            _ => None,
        })
        .unwrap_or("tcp")
        .to_string();
    if json_out {
        let documents: Vec<&serde_json::Value> = docs.iter().map(|(_, v)| v).collect();
        let v = serde_json::json!({
            "service": service, "protocol": protocol, "endpoints": endpoints,
            "intentions": intentions, "proxies": proxies, "documents": documents,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("service:     {name}");
    match &service {
        Some(s) => {
            println!("virtual IP:  {}", s.virtual_ip);
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|p| format!("{} -> {}", p.port, p.target_port))
                .collect();
            println!(
                "ports:       {}",
                if ports.is_empty() {
                    "(none)".into()
                } else {
                    ports.join(", ")
                }
            );
        }
        None => println!(
            "catalog:     NOT REGISTERED (ringctl register service {name} --port PORT:TARGET_PORT)"
        ),
    }
    println!("protocol:    {protocol}");
    println!("endpoints:   {}", endpoints.len());
    for e in &endpoints {
        println!(
            "  {:<40} node {:<24} {}",
            e.address.to_string(),
            e.node,
            if e.healthy { "healthy" } else { "unhealthy" }
        );
    }
    println!("intentions:  (highest precedence decides; no match: deny)");
    for r in &intentions {
        println!(
            "  {:<20} -> {:<20} {:<6} precedence {}",
            r.intention.source.to_string(),
            r.intention.destination.to_string(),
            action_name(r.intention.action),
            r.precedence
        );
    }
    println!("proxies:     {}", proxies.len());
    for p in &proxies {
        // The version is not padded: the table has always printed it so.
        println!(
            "  {:<24} {:<6} version {} cert expires in {}s, issuer {}",
            p.report.id,
            if p.live { "live" } else { "silent" },
            p.report.applied_index,
            p.cert_expires_in_s,
            p.report.cert_issuer
        );
    }
    println!(
        "documents:   {}",
        docs.iter()
            .map(|(d, _)| d.id())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn run_ca(command: CaCommand) -> Result<(), String> {
    match command {
        CaCommand::Rotate { timeout, socket } => ca_rotate(&socket, timeout),
        CaCommand::Show { socket } => {
            let v: CaStatus = fetch(&socket, hyper::Method::GET, "/v1/ca")?;
            println!("phase:   {}", v.phase.as_str());
            println!("signer:  {}", v.roots.signer);
            println!("trusted: {}", v.roots.trusted.join(", "));
            println!("leaf generation: {}", v.generation);
            Ok(())
        }
        CaCommand::Secret { out } => {
            if out.exists() {
                return Err(format!("{} exists: kept as it is", out.display()));
            }
            ca::SealKey::generate_file(&out).map_err(|e| e.to_string())?;
            println!(
                "{}: a new CA secret (mode 0600); give every daemon of the mesh this file (--ca-secret)",
                out.display()
            );
            Ok(())
        }
        CaCommand::Init { dir, trust_domain } => {
            let ca = ca::Ca::load_or_create(&dir, &trust_domain).map_err(|e| e.to_string())?;
            print!("{}", ca.cert_pem);
            Ok(())
        }
        CaCommand::Request { key_out, csr_out } => {
            let (csr, key) = ca::make_csr().map_err(|e| e.to_string())?;
            ca::write_private(&key_out, key.as_bytes()).map_err(|e| e.to_string())?;
            std::fs::write(&csr_out, csr).map_err(|e| format!("{}: {e}", csr_out.display()))
        }
        CaCommand::Sign {
            dir,
            trust_domain,
            csr,
            service,
            namespace,
            lifetime,
        } => {
            let ca = ca::Ca::load_or_create(&dir, &trust_domain).map_err(|e| e.to_string())?;
            let csr =
                std::fs::read_to_string(&csr).map_err(|e| format!("{}: {e}", csr.display()))?;
            let lifetime = lifetime.unwrap_or(ca::DEFAULT_LEAF_LIFETIME);
            let leaf = ca
                .sign_csr(&csr, &namespace, &service, lifetime)
                .map_err(|e| e.to_string())?;
            print!("{leaf}");
            Ok(())
        }
    }
}

#[derive(Subcommand, Debug)]
enum IntentionCommand {
    /// Print allow or deny for SRC -> DST, and the intention that decides.
    Check {
        /// Source service.
        src: String,
        /// Destination service.
        dst: String,
        /// File with ServiceIntentions documents (default: ask the daemon).
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// The daemon's socket.
        #[arg(long, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Action when no intention matches.
        #[arg(long, default_value = "deny")]
        default: String,
    },
}

/// Print a daemon answer, or its error; the exit status says which.
fn report<T>(r: Result<T, daemon::CallError>, ok: impl FnOnce(T)) -> ExitCode {
    match r {
        Ok(v) => {
            ok(v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ringctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A request body as JSON.
fn body<T: Serialize>(v: &T) -> Option<String> {
    // The API's request bodies are plain data: they always serialize.
    Some(serde_json::to_string(v).unwrap_or_default())
}

fn read_docs(file: &PathBuf) -> Result<Vec<consul::Document>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    consul::parse(&text).map_err(|e| format!("{}: {e}", file.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Register {
            what: RegisterCommand::Service { name, ports },
            socket,
        } => {
            let req = RegisterService {
                name,
                ports: ports
                    .iter()
                    .map(|&(port, target_port)| PortMap { port, target_port })
                    .collect(),
            };
            report(
                daemon::call(&socket, hyper::Method::POST, "/v1/services", body(&req)),
                |s: ServiceRecord| {
                    println!("service {} registered, virtual IP {}", s.name, s.virtual_ip);
                },
            )
        }
        Command::Register {
            what:
                RegisterCommand::Endpoint {
                    service,
                    address,
                    node,
                    meta,
                },
            socket,
        } => {
            let req = EndpointRecord {
                service,
                address,
                node,
                healthy: true,
                meta: meta.into_iter().collect(),
            };
            report(
                daemon::call(&socket, hyper::Method::POST, "/v1/endpoints", body(&req)),
                |e: EndpointRecord| {
                    println!("endpoint {} of {} registered", e.address, e.service);
                },
            )
        }
        Command::Deregister {
            what: DeregisterCommand::Endpoint { service, address },
            socket,
        } => report(
            daemon::call(
                &socket,
                hyper::Method::DELETE,
                &format!("/v1/endpoints/{service}/{address}"),
                None,
            ),
            |d: DeregisterResponse| {
                println!("endpoint {} of {} deregistered", d.address, d.service);
            },
        ),
        Command::Issue {
            token,
            key_out,
            cert_out,
            bundle_out,
            socket,
        } => {
            let (csr, key) = match ca::make_csr() {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("ringctl issue: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let r = daemon::call_with(
                &socket,
                hyper::Method::POST,
                "/v1/sign",
                Some(csr),
                Some(&token),
            );
            report(r, |v: SignResponse| {
                let write = || -> Result<(), String> {
                    ca::write_private(&key_out, key.as_bytes()).map_err(|e| e.to_string())?;
                    std::fs::write(&cert_out, &v.cert).map_err(|e| e.to_string())?;
                    std::fs::write(&bundle_out, &v.bundle).map_err(|e| e.to_string())
                };
                match write() {
                    Ok(()) => println!("certificate issued for {}", v.service),
                    Err(e) => eprintln!("ringctl issue: {e}"),
                }
            })
        }
        Command::Redirect {
            action,
            netns,
            proxy_uid,
            backend,
        } => {
            use ringside_kernel_setup::redirect;
            let backend = match backend.as_deref().map(redirect::Backend::parse) {
                None => redirect::detect_backend(netns.as_deref()),
                Some(Some(b)) => b,
                Some(None) => {
                    eprintln!(
                        "ringctl redirect: unknown backend (iptables-nft, iptables-legacy, nft)"
                    );
                    return ExitCode::FAILURE;
                }
            };
            let target = redirect::Target { backend, netns };
            let spec = redirect::RedirectSpec {
                proxy_uid,
                ..Default::default()
            };
            let r = match action.as_str() {
                "install" => redirect::install(&spec, &target)
                    .map(|()| println!("installed ({})", backend.name())),
                "remove" => {
                    redirect::remove(&target).map(|()| println!("removed ({})", backend.name()))
                }
                "show" => redirect::show(&target).map(|s| print!("{s}")),
                other => {
                    eprintln!("ringctl redirect: '{other}' is not install, remove or show");
                    return ExitCode::FAILURE;
                }
            };
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ringctl redirect: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Token {
            command: TokenCommand::Create { service },
            socket,
        } => report(
            daemon::call(
                &socket,
                hyper::Method::POST,
                "/v1/tokens",
                body(&TokenRequest { service }),
            ),
            |t: TokenResponse| {
                println!("{}", t.token);
            },
        ),
        Command::Daemon {
            data_dir,
            store,
            etcd_ca,
            etcd_cert,
            etcd_key,
            ca_secret,
            lease_ttl,
            socket,
            trust_domain,
            vip_range,
            proxy_socket,
            leaf_lifetime,
        } => match store_choice(&store, etcd_ca, etcd_cert, etcd_key).and_then(|store| {
            daemon::run(&daemon::Options {
                proxy_socket: proxy_socket.unwrap_or_else(|| {
                    socket
                        .parent()
                        .map(|d| d.join("proxy.sock"))
                        .unwrap_or_else(|| PathBuf::from(daemon::DEFAULT_PROXY_SOCKET))
                }),
                data_dir,
                store,
                ca_secret,
                lease_ttl,
                socket,
                trust_domain,
                vip_range,
                leaf_lifetime,
            })
        }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ringctl daemon: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Apply {
            file,
            dry_run: false,
            socket,
        } => {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            report(
                daemon::call(&socket, hyper::Method::POST, "/v1/apply", Some(text)),
                |a: ApplyResponse| {
                    for w in &a.warnings {
                        eprintln!("warning: {w}");
                    }
                    for id in &a.applied {
                        println!("{id} applied");
                    }
                    println!("config index {}", a.index);
                },
            )
        }
        Command::Get {
            what,
            output,
            socket,
        } => {
            let json_out = output.as_deref() == Some("json");
            let socket = socket.as_path();
            fn get<T: DeserializeOwned>(
                socket: &std::path::Path,
                path: &str,
            ) -> Result<T, daemon::CallError> {
                daemon::call(socket, hyper::Method::GET, path, None)
            }
            match what.as_str() {
                // The stored documents are the operators' own: `-o json` shows them as stored.
                "config" if json_out => {
                    report(get(socket, "/v1/config"), |docs: Vec<serde_json::Value>| {
                        print_json(&docs)
                    })
                }
                "config" => report(get(socket, "/v1/config"), |docs: Vec<consul::Document>| {
                    println!("{:<20} NAME", "KIND");
                    for d in &docs {
                        println!("{:<20} {}", d.kind(), d.name());
                    }
                }),
                "services" => report(get(socket, "/v1/services"), |rows: Vec<ServiceRecord>| {
                    if json_out {
                        return print_json(&rows);
                    }
                    for s in &rows {
                        println!(
                            "{:<20} {:<16} {}",
                            s.name,
                            s.virtual_ip.to_string(),
                            s.ports
                                .iter()
                                .map(|p| format!("{}->{}", p.port, p.target_port))
                                .collect::<Vec<_>>()
                                .join(",")
                        );
                    }
                }),
                "endpoints" => report(get(socket, "/v1/endpoints"), |rows: Vec<EndpointRecord>| {
                    if json_out {
                        return print_json(&rows);
                    }
                    for e in &rows {
                        println!("{:<20} {:<40} {}", e.service, e.address.to_string(), e.node);
                    }
                }),
                "intentions" => report(get(socket, "/v1/intentions"), |l: IntentionList| {
                    if json_out {
                        return print_json(&l);
                    }
                    println!(
                        "{:<20} {:<20} {:<6} PRECEDENCE",
                        "SOURCE", "DESTINATION", "ACTION"
                    );
                    for r in &l.rules {
                        println!(
                            "{:<20} {:<20} {:<6} {}",
                            r.intention.source.to_string(),
                            r.intention.destination.to_string(),
                            action_name(r.intention.action),
                            r.precedence
                        );
                    }
                    println!("(no match: {})", action_name(l.default));
                }),
                "proxies" => report(get(socket, "/v1/proxies"), |rows: Vec<ProxyStatus>| {
                    if json_out {
                        return print_json(&rows);
                    }
                    println!(
                        "{:<24} {:<16} {:<8} {:<8} {:<12} {:<5} ISSUER",
                        "ID", "SERVICE", "STATE", "VERSION", "CERT EXPIRY", "GEN"
                    );
                    // VERSION and GEN are not padded: the table has always printed them so.
                    for p in &rows {
                        println!(
                            "{:<24} {:<16} {:<8} {} {:<12} {} {}",
                            p.report.id,
                            p.report.service,
                            if p.live { "live" } else { "silent" },
                            p.report.applied_index,
                            format!("{}s", p.cert_expires_in_s),
                            p.report.cert_generation,
                            p.report.cert_issuer
                        );
                    }
                }),
                other => {
                    eprintln!("ringctl get: '{other}' is not known (config, services, endpoints, intentions, proxies)");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Doctor {
            netns,
            output,
            socket,
        } => {
            let items = doctor::doctor(&socket, netns.as_deref());
            if output.as_deref() == Some("json") {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&items).unwrap_or_default()
                );
            } else {
                doctor::print(&items);
            }
            if items.iter().all(|i| i.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::AdminGet { url } => match why::http_get(&url) {
            Ok(body) => {
                print!("{body}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ringctl admin-get: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Why {
            src,
            dst,
            src_netns,
            dst_netns,
            output,
            socket,
        } => {
            let (dst, port) = match dst.rsplit_once(':') {
                Some((d, p)) => match p.parse::<u16>() {
                    Ok(p) => (d.to_string(), Some(p)),
                    Err(_) => {
                        eprintln!("ringctl why: '{p}' is not a port (DST or DST:PORT)");
                        return ExitCode::FAILURE;
                    }
                },
                None => (dst, None),
            };
            match why::why(
                &socket,
                &src,
                &dst,
                port,
                src_netns.as_deref(),
                dst_netns.as_deref(),
            ) {
                Ok(v) => {
                    if output.as_deref() == Some("json") {
                        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    } else {
                        why::print(&v);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ringctl why: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Describe {
            service,
            output,
            socket,
        } => match describe(&socket, &service, output.as_deref() == Some("json")) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ringctl describe: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Cert {
            command: CertCommand::Rotate { service, socket },
        } => {
            let path = match &service {
                Some(s) => format!("/v1/certs/rotate?service={s}"),
                None => "/v1/certs/rotate".to_string(),
            };
            report(
                daemon::call(&socket, hyper::Method::POST, &path, None),
                |r: CertRotateResponse| {
                    println!(
                        "certificates of {} will be re-issued (config index {})",
                        r.rotated, r.index
                    )
                },
            )
        }
        Command::Delete { kind, name, socket } => report(
            daemon::call(
                &socket,
                hyper::Method::DELETE,
                &format!("/v1/config/{kind}/{name}"),
                None,
            ),
            |d: DeleteResponse| println!("{} deleted", d.deleted),
        ),
        Command::Apply {
            file,
            dry_run: true,
            ..
        } => match std::fs::read_to_string(&file)
            .map_err(|e| format!("{}: {e}", file.display()))
            .and_then(|t| consul::parse_checked(&t).map_err(|e| format!("{}: {e}", file.display())))
        {
            Ok(consul::Parsed { docs, warnings }) => {
                for w in &warnings {
                    eprintln!("warning: {w}");
                }
                for d in &docs {
                    println!("{} (valid)", d.id());
                }
                println!(
                    "{}: {} documents, all valid (dry run: nothing stored)",
                    file.display(),
                    docs.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                eprintln!("nothing applied: a file is applied whole or not at all");
                ExitCode::FAILURE
            }
        },
        Command::Intention {
            command:
                IntentionCommand::Check {
                    src,
                    dst,
                    file: None,
                    socket,
                    ..
                },
        } => report(
            daemon::call(
                &socket,
                hyper::Method::GET,
                &format!("/v1/intentions/check?source={src}&destination={dst}"),
                None,
            ),
            |c: IntentionCheck| {
                println!(
                    "{}: {}",
                    if c.allowed { "allow" } else { "deny" },
                    c.decided_by
                );
            },
        ),
        Command::Intention {
            command:
                IntentionCommand::Check {
                    src,
                    dst,
                    file: Some(file),
                    default,
                    ..
                },
        } => {
            let default = match default.as_str() {
                "allow" => ringside_core::intentions::Action::Allow,
                "deny" => ringside_core::intentions::Action::Deny,
                other => {
                    eprintln!("--default: '{other}' is not allow or deny");
                    return ExitCode::FAILURE;
                }
            };
            match read_docs(&file) {
                Ok(docs) => {
                    let set = ringside_core::intentions::Intentions {
                        rules: consul::intentions(&docs),
                        default,
                    };
                    let d = set.evaluate(&src, &dst);
                    println!(
                        "{}: {}",
                        if d.allowed() { "allow" } else { "deny" },
                        d.explain()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ca { command } => match run_ca(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ringctl ca: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Validate { files, print } => {
            let mut bad = 0;
            for f in &files {
                match Config::load(f) {
                    Ok(c) => {
                        println!(
                            "{}: ok ({} listeners, {} services)",
                            f.display(),
                            c.listeners.len(),
                            c.services.len()
                        );
                        if print {
                            match serde_json::to_string_pretty(&c) {
                                Ok(j) => println!("{j}"),
                                Err(e) => eprintln!("{}: cannot print: {e}", f.display()),
                            }
                        }
                    }
                    Err(e) => {
                        eprintln!("{}: {e}", f.display());
                        bad += 1;
                    }
                }
            }
            if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
