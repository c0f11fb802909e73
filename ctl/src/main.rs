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
use ringside_core::Config;

#[derive(Parser, Debug)]
#[command(name = "ringctl", version, about = "ringside control CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the control daemon: state in DIR, HTTP/JSON API on a Unix socket.
    Daemon {
        /// Directory of the embedded store.
        #[arg(long)]
        data_dir: PathBuf,
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
    /// The mesh certificate authority (on files for now; the daemon will hold it).
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
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Result<(), String> {
    let start = std::time::Instant::now();
    loop {
        let (status, v) = daemon::call(socket, hyper::Method::GET, "/v1/proxies", None)
            .map_err(|e| format!("{e:#}"))?;
        if status != 200 {
            return Err(format!("cannot list proxies ({status})"));
        }
        let behind: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["live"].as_bool() == Some(true) && !ok(p))
            .map(|p| p["id"].as_str().unwrap_or("?").to_string())
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

fn ca_rotate(socket: &std::path::Path, timeout: std::time::Duration) -> Result<(), String> {
    let get = |method, path: &str| -> Result<serde_json::Value, String> {
        match daemon::call(socket, method, path, None) {
            Ok((200, v)) => Ok(v),
            Ok((status, v)) => Err(format!(
                "{} ({status})",
                v["error"].as_str().unwrap_or("request failed")
            )),
            Err(e) => Err(format!("{e:#}")),
        }
    };
    let mut state = get(hyper::Method::GET, "/v1/ca")?;
    let mut started = false;
    loop {
        match state["phase"].as_str().unwrap_or("") {
            "idle" if started => {
                println!(
                    "rollover done: signer {}",
                    state["roots"]["signer"].as_str().unwrap_or("")
                );
                return Ok(());
            }
            "idle" => {
                state = get(hyper::Method::POST, "/v1/ca/rotate")?;
                println!(
                    "1/3 new root {} trusted beside the old one",
                    state["roots"]["trusted"][1].as_str().unwrap_or("")
                );
            }
            "new_trusted" => {
                let index = state["index"].as_u64().unwrap_or(0);
                wait_proxies(socket, timeout, "taken the new trust bundle", |p| {
                    p["applied_index"].as_u64().unwrap_or(0) >= index
                })?;
                state = get(hyper::Method::POST, "/v1/ca/rotate")?;
                println!(
                    "2/3 every live proxy trusts both roots; the new root {} signs, leaves are being re-issued",
                    state["roots"]["signer"].as_str().unwrap_or("")
                );
            }
            "new_signing" => {
                let generation = state["generation"].as_u64().unwrap_or(0);
                wait_proxies(socket, timeout, "re-issued their certificates", |p| {
                    p["cert_generation"].as_u64().unwrap_or(0) >= generation
                })?;
                state = get(hyper::Method::POST, "/v1/ca/rotate")?;
                println!(
                    "3/3 every live proxy has a leaf from the new root; the old root is retired"
                );
            }
            other => return Err(format!("unknown rollover phase '{other}'")),
        }
        started = true;
    }
}

fn describe(socket: &std::path::Path, name: &str, json_out: bool) -> Result<(), String> {
    let get = |path: &str| -> Result<serde_json::Value, String> {
        match daemon::call(socket, hyper::Method::GET, path, None) {
            Ok((200, v)) => Ok(v),
            Ok((status, v)) => Err(format!(
                "{} ({status})",
                v["error"].as_str().unwrap_or("request failed")
            )),
            Err(e) => Err(format!("{e:#}")),
        }
    };
    let list = |v: serde_json::Value| v.as_array().cloned().unwrap_or_default();
    let service = list(get("/v1/services")?)
        .into_iter()
        .find(|s| s["name"] == name);
    let endpoints: Vec<_> = list(get("/v1/endpoints")?)
        .into_iter()
        .filter(|e| e["service"] == name)
        .collect();
    let intentions: Vec<_> = get("/v1/intentions")?["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r["destination"] == name || r["destination"] == "*")
        .collect();
    let proxies: Vec<_> = list(get("/v1/proxies")?)
        .into_iter()
        .filter(|p| p["service"] == name)
        .collect();
    let docs: Vec<_> = list(get("/v1/config")?)
        .into_iter()
        .filter(|d| d["name"] == name || d["spec"]["destination"]["name"] == name)
        .collect();
    if service.is_none() && docs.is_empty() && intentions.iter().all(|r| r["destination"] == "*") {
        return Err(format!(
            "no service '{name}' in the catalog and no document names it (ringctl get services lists them)"
        ));
    }
    let protocol = docs
        .iter()
        .find(|d| d["kind"] == "ServiceDefaults")
        .and_then(|d| d["spec"]["protocol"].as_str())
        .unwrap_or("tcp")
        .to_string();
    if json_out {
        let v = serde_json::json!({
            "service": service, "protocol": protocol, "endpoints": endpoints,
            "intentions": intentions, "proxies": proxies, "documents": docs,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("service:     {name}");
    match &service {
        Some(s) => {
            println!("virtual IP:  {}", s["virtual_ip"].as_str().unwrap_or(""));
            let ports: Vec<String> = s["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("{} -> {}", p["port"], p["target_port"]))
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
            e["address"].as_str().unwrap_or(""),
            e["node"].as_str().unwrap_or(""),
            if e["healthy"] == true {
                "healthy"
            } else {
                "unhealthy"
            }
        );
    }
    println!("intentions:  (highest precedence decides; no match: deny)");
    for r in &intentions {
        println!(
            "  {:<20} -> {:<20} {:<6} precedence {}",
            r["source"].as_str().unwrap_or(""),
            r["destination"].as_str().unwrap_or(""),
            r["action"].as_str().unwrap_or(""),
            r["precedence"]
        );
    }
    println!("proxies:     {}", proxies.len());
    for p in &proxies {
        println!(
            "  {:<24} {:<6} version {:<6} cert expires in {}s, issuer {}",
            p["id"].as_str().unwrap_or(""),
            if p["live"] == true { "live" } else { "silent" },
            p["applied_index"],
            p["cert_expires_in_s"],
            p["cert_issuer"].as_str().unwrap_or("")
        );
    }
    println!(
        "documents:   {}",
        docs.iter()
            .map(|d| format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or(""),
                d["name"].as_str().unwrap_or("")
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn run_ca(command: CaCommand) -> Result<(), String> {
    match command {
        CaCommand::Rotate { timeout, socket } => ca_rotate(&socket, timeout),
        CaCommand::Show { socket } => {
            match daemon::call(&socket, hyper::Method::GET, "/v1/ca", None) {
                Ok((200, v)) => {
                    println!("phase:   {}", v["phase"].as_str().unwrap_or(""));
                    println!("signer:  {}", v["roots"]["signer"].as_str().unwrap_or(""));
                    println!(
                        "trusted: {}",
                        v["roots"]["trusted"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|t| t.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    println!("leaf generation: {}", v["generation"]);
                    Ok(())
                }
                Ok((status, v)) => Err(format!(
                    "{} ({status})",
                    v["error"].as_str().unwrap_or("request failed")
                )),
                Err(e) => Err(format!("{e:#}")),
            }
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
fn report(
    r: anyhow::Result<(u16, serde_json::Value)>,
    ok: impl FnOnce(serde_json::Value),
) -> ExitCode {
    match r {
        Ok((200, v)) => {
            ok(v);
            ExitCode::SUCCESS
        }
        Ok((status, v)) => {
            eprintln!(
                "ringctl: {} ({status})",
                v["error"].as_str().unwrap_or("request failed")
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("ringctl: {e:#}");
            ExitCode::FAILURE
        }
    }
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
            let ports: Vec<_> = ports
                .iter()
                .map(|(p, t)| serde_json::json!({"port": p, "target_port": t}))
                .collect();
            let body = serde_json::json!({"name": name, "ports": ports}).to_string();
            report(
                daemon::call(&socket, hyper::Method::POST, "/v1/services", Some(body)),
                |v| {
                    println!(
                        "service {} registered, virtual IP {}",
                        v["name"].as_str().unwrap_or(""),
                        v["virtual_ip"].as_str().unwrap_or("")
                    );
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
            let meta: std::collections::BTreeMap<String, String> = meta.into_iter().collect();
            let body = serde_json::json!({"service": service, "address": address, "node": node, "healthy": true, "meta": meta}).to_string();
            report(
                daemon::call(&socket, hyper::Method::POST, "/v1/endpoints", Some(body)),
                |v| {
                    println!(
                        "endpoint {} of {} registered",
                        v["address"].as_str().unwrap_or(""),
                        v["service"].as_str().unwrap_or("")
                    );
                },
            )
        }
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
            report(r, |v| {
                let write = || -> Result<(), String> {
                    ca::write_private(&key_out, key.as_bytes()).map_err(|e| e.to_string())?;
                    std::fs::write(&cert_out, v["cert"].as_str().unwrap_or(""))
                        .map_err(|e| e.to_string())?;
                    std::fs::write(&bundle_out, v["bundle"].as_str().unwrap_or(""))
                        .map_err(|e| e.to_string())
                };
                match write() {
                    Ok(()) => println!(
                        "certificate issued for {}",
                        v["service"].as_str().unwrap_or("")
                    ),
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
        } => {
            let body = serde_json::json!({"service": service}).to_string();
            report(
                daemon::call(&socket, hyper::Method::POST, "/v1/tokens", Some(body)),
                |v| {
                    println!("{}", v["token"].as_str().unwrap_or(""));
                },
            )
        }
        Command::Daemon {
            data_dir,
            socket,
            trust_domain,
            vip_range,
            proxy_socket,
            leaf_lifetime,
        } => match daemon::run(&daemon::Options {
            proxy_socket: proxy_socket.unwrap_or_else(|| {
                socket
                    .parent()
                    .map(|d| d.join("proxy.sock"))
                    .unwrap_or_else(|| PathBuf::from(daemon::DEFAULT_PROXY_SOCKET))
            }),
            data_dir,
            socket,
            trust_domain,
            vip_range,
            leaf_lifetime,
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
                |v| {
                    for id in v["applied"].as_array().into_iter().flatten() {
                        println!("{} applied", id.as_str().unwrap_or(""));
                    }
                    println!("config index {}", v["index"]);
                },
            )
        }
        Command::Get {
            what,
            output,
            socket,
        } => {
            let path = match what.as_str() {
                "config" => "/v1/config",
                "services" => "/v1/services",
                "endpoints" => "/v1/endpoints",
                "intentions" => "/v1/intentions",
                "proxies" => "/v1/proxies",
                other => {
                    eprintln!("ringctl get: '{other}' is not known (config, services, endpoints, intentions, proxies)");
                    return ExitCode::FAILURE;
                }
            };
            let table = what.clone();
            report(
                daemon::call(&socket, hyper::Method::GET, path, None),
                move |v| {
                    if output.as_deref() != Some("json") && table == "intentions" {
                        println!(
                            "{:<20} {:<20} {:<6} PRECEDENCE",
                            "SOURCE", "DESTINATION", "ACTION"
                        );
                        for r in v["rules"].as_array().into_iter().flatten() {
                            println!(
                                "{:<20} {:<20} {:<6} {}",
                                r["source"].as_str().unwrap_or(""),
                                r["destination"].as_str().unwrap_or(""),
                                r["action"].as_str().unwrap_or(""),
                                r["precedence"]
                            );
                        }
                        println!("(no match: {})", v["default"].as_str().unwrap_or("deny"));
                        return;
                    }
                    if output.as_deref() != Some("json") && table == "proxies" {
                        println!(
                            "{:<24} {:<16} {:<8} {:<8} {:<12} {:<5} ISSUER",
                            "ID", "SERVICE", "STATE", "VERSION", "CERT EXPIRY", "GEN"
                        );
                        for p in v.as_array().into_iter().flatten() {
                            println!(
                                "{:<24} {:<16} {:<8} {:<8} {:<12} {:<5} {}",
                                p["id"].as_str().unwrap_or(""),
                                p["service"].as_str().unwrap_or(""),
                                if p["live"].as_bool() == Some(true) {
                                    "live"
                                } else {
                                    "silent"
                                },
                                p["applied_index"],
                                format!("{}s", p["cert_expires_in_s"]),
                                p["cert_generation"],
                                p["cert_issuer"].as_str().unwrap_or("")
                            );
                        }
                        return;
                    }
                    if output.as_deref() != Some("json") && table != "config" {
                        for row in v.as_array().into_iter().flatten() {
                            match table.as_str() {
                                "services" => println!(
                                    "{:<20} {:<16} {}",
                                    row["name"].as_str().unwrap_or(""),
                                    row["virtual_ip"].as_str().unwrap_or(""),
                                    row["ports"]
                                        .as_array()
                                        .into_iter()
                                        .flatten()
                                        .map(|p| format!("{}->{}", p["port"], p["target_port"]))
                                        .collect::<Vec<_>>()
                                        .join(",")
                                ),
                                _ => println!(
                                    "{:<20} {:<40} {}",
                                    row["service"].as_str().unwrap_or(""),
                                    row["address"].as_str().unwrap_or(""),
                                    row["node"].as_str().unwrap_or("")
                                ),
                            }
                        }
                        return;
                    }
                    if output.as_deref() == Some("json") {
                        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    } else {
                        println!("{:<20} NAME", "KIND");
                        for d in v.as_array().into_iter().flatten() {
                            println!(
                                "{:<20} {}",
                                d["kind"].as_str().unwrap_or(""),
                                d["name"].as_str().unwrap_or("")
                            );
                        }
                    }
                },
            )
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
                |v| {
                    println!(
                        "certificates of {} will be re-issued (config index {})",
                        v["rotated"].as_str().unwrap_or("*"),
                        v["index"]
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
            |v| println!("{} deleted", v["deleted"].as_str().unwrap_or("")),
        ),
        Command::Apply {
            file,
            dry_run: true,
            ..
        } => match read_docs(&file) {
            Ok(docs) => {
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
            |v| {
                let allowed = v["allowed"].as_bool().unwrap_or(false);
                println!(
                    "{}: {}",
                    if allowed { "allow" } else { "deny" },
                    v["decided_by"].as_str().unwrap_or("")
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
