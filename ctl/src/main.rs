//! `ringctl`: the mesh's control daemon (`ringctl daemon`) and the operator CLI that talks to it.
//!
//! - `ringctl daemon`: the control plane of a node or a mesh: the catalog (services, endpoints,
//!   proxies), the config documents, the mesh CA and the tokens, kept in redb or etcd, served to
//!   operators on a socket (or TLS port) and to proxies on the proxy socket.
//! - Operating the mesh: `apply`, `get`, `describe`, `delete`, `register`, `token`, `ca`,
//!   `cert`, `inject` and `manifests`.
//! - Diagnosis: `ringctl why SRC DST` names why a connection fails (a reason code and its fix),
//!   `ringctl doctor` checks the mesh and a pod; both exit non-zero when they find something.
//! - Offline checks, so a broken file is caught before a rollout: `ringctl validate FILE...`
//!   (sidecar configuration files, read the way the proxy reads them), `ringctl apply --dry-run -f
//!   FILE` (Consul-style documents, checked whole) and `ringctl intention check SRC DST -f FILE`.
//!
//! Errors name the document, the field and the line; the exit status is non-zero on any error.
//!
//! Every command that talks to the daemon finds it the same way (global options, before or after
//! the subcommand): `--server https://HOST:PORT` / `RINGCTL_SERVER` (its TCP operator port, with
//! `--ca-file` and an operator token), else `--socket` / `RINGCTL_SOCKET`, else the default
//! socket.

mod client;
mod daemon;
mod deploy;
mod doctor;
mod inject;
mod store;
mod why;

// The CA and the Consul documents are the library's (ctl/src/lib.rs): named here, they keep their
// `crate::ca` and `crate::consul` paths for the binary's modules.
use ringside_ctl::{ca, consul};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use client::Target;
use ringside_core::control::api::{
    ApplyResponse, CaStatus, CertRotateResponse, DeleteResponse, DeregisterResponse,
    EndpointRecord, IntentionCheck, IntentionList, IntentionRow, OperatorTokenRecord,
    OperatorTokenRequest, OperatorTokenResponse, OperatorTokenRevoked, PortMap, ProxyStatus,
    RegisterService, RotationPhase, ServiceRecord, SignResponse, TokenInfo, TokenRequest,
    TokenResponse,
};
use ringside_core::control::AnswerError;
use ringside_core::intentions::{Action, Pattern};
use ringside_core::Config;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The daemon holds a stream per proxy and many short-lived answers: mimalloc returns their
/// memory where glibc's arenas keep it. (`--features system-allocator` leaves it out, for heap
/// profilers.)
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's options `arena_eager_commit` and `allow_thp` (indices in its option enum).
#[cfg(not(feature = "system-allocator"))]
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
#[cfg(not(feature = "system-allocator"))]
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// The daemon's heap is many small objects per proxy (its stream, its record, answers in
/// flight): mimalloc's default, arenas committed eagerly and advised as transparent huge pages,
/// makes every touched 2 MiB resident whole. Measured on an idle daemon: 30 MB RSS with the
/// defaults, 14 MB without; and its RSS grew 2 to 4 times its live heap per proxy. The daemon's
/// work is answers, not TLB-bound loops, so it gives nothing up. The options must be set
/// before mimalloc reserves its first arena, which the Rust runtime's first allocation does
/// before `main`: hence a constructor (as the proxy does for `arena_eager_commit`).
#[cfg(not(feature = "system-allocator"))]
extern "C" fn small_pages_lazy_commit() {
    // SAFETY: runs once at load time, single-threaded, before any allocation through mimalloc;
    // `mi_option_set` only stores the option's value.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0);
    }
}

#[cfg(not(feature = "system-allocator"))]
#[used]
#[link_section = ".init_array"]
static SMALL_PAGES_LAZY_COMMIT: extern "C" fn() = small_pages_lazy_commit;

#[derive(Parser, Debug)]
#[command(name = "ringctl", version, about = "ringside control CLI")]
struct Cli {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: Command,
}

/// How to reach the daemon: global options, accepted before or after the subcommand. The TCP
/// port (`--server`) is taken when given, else the socket.
#[derive(clap::Args, Debug)]
struct Connection {
    /// The daemon's operator socket on this host (used when no --server is given).
    #[arg(long, global = true, env = "RINGCTL_SOCKET", value_name = "PATH",
          default_value = daemon::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// The daemon's TCP operator port (`ringctl daemon --listen`), reached with TLS.
    #[arg(
        long,
        global = true,
        env = "RINGCTL_SERVER",
        value_name = "https://HOST:PORT"
    )]
    server: Option<String>,
    /// With --server: the mesh CA bundle (PEM) the daemon's certificate is checked against
    /// (`ringctl ca bundle --out FILE` on a node).
    #[arg(long, global = true, env = "RINGCTL_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// With --server: the operator token (`ringctl operator token create`). Other local users
    /// can read a command line: prefer --token-file or RINGCTL_TOKEN.
    #[arg(
        long,
        global = true,
        env = "RINGCTL_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// With --server: a file holding the operator token.
    #[arg(long, global = true, env = "RINGCTL_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
}

impl Connection {
    /// Where the daemon is, from these options (`m`: where each value came from).
    fn target(&self, m: &ArgMatches) -> Result<Target, String> {
        let Some(server) = &self.server else {
            return Ok(Target::Socket(self.socket.clone()));
        };
        let from_flag = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
        // A flag beats an environment variable; --token beats --token-file.
        let token = match (&self.token, &self.token_file) {
            (Some(t), Some(_)) if from_flag("token") || !from_flag("token_file") => Some(t.clone()),
            (_, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| format!("--token-file {}: {e}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            (t, None) => t.clone(),
        };
        client::Remote::new(server, self.ca_file.as_deref(), token)
            .map(Target::Remote)
            .map_err(|e| format!("{e:#}"))
    }
}

/// `-o` of `get`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// JSON, as the daemon's API answers.
    Json,
    /// The same, as YAML.
    Yaml,
    /// The table with more columns.
    Wide,
}

/// `-o` of `describe`, `why` and `doctor` (text when not given).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// JSON or YAML as `-o` prints it: object keys sorted (the order JSON always had).
fn print_as<T: Serialize>(v: &T, yaml: bool) {
    let v = serde_json::to_value(v).unwrap_or_default();
    if yaml {
        print!("{}", serde_yaml::to_string(&v).unwrap_or_default());
    } else {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the control daemon: state in DIR (or in etcd with --store), HTTP/JSON API on a Unix
    /// socket and, with --listen, on TCP with TLS and operator tokens.
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
        /// proxy may stay silent before its endpoint is removed (either store). Proxies report
        /// at least every half of it.
        #[arg(long, default_value = "15s", value_parser = humantime_parse)]
        lease_ttl: std::time::Duration,
        /// The operator socket it serves (mode 0660). Like the clients' global --socket, it
        /// follows RINGCTL_SOCKET.
        #[arg(long, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Also serve the operator API on this TCP address (e.g. 0.0.0.0:8501), with TLS (a
        /// certificate from the mesh CA) and operator tokens (`ringctl operator token create`).
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Another name (DNS name or IP address) for the --listen certificate, beside the node,
        /// the host name, localhost and the listen address (repeat).
        #[arg(long = "tls-san", value_name = "NAME")]
        tls_san: Vec<String>,
        /// This daemon's node name, shown with its proxies (`ringctl get proxies`). Default: the
        /// host name.
        #[arg(long)]
        node: Option<String>,
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
    },
    /// Remove an endpoint (one registered by hand; a running proxy's comes back with its next
    /// report).
    Deregister {
        #[command(subcommand)]
        what: DeregisterCommand,
    },
    /// Get a workload certificate from the daemon with a proxy token: a key and CSR are made
    /// here (the key never leaves this host), the daemon signs for the token's service.
    Issue {
        /// The proxy token of the service (`ringctl token create`).
        #[arg(long)]
        proxy_token: String,
        /// Where to write the private key (mode 0600).
        #[arg(long)]
        key_out: PathBuf,
        /// Where to write the certificate.
        #[arg(long)]
        cert_out: PathBuf,
        /// Where to write the trust bundle.
        #[arg(long)]
        bundle_out: PathBuf,
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
    /// Operator tokens: the credentials of the daemon's TCP operator port (`--listen`).
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// Proxy tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
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
    },
    /// List what the daemon stores: config (every document), services, endpoints, intentions,
    /// proxies (of every node).
    Get {
        /// config, services, endpoints, intentions, proxies (singular works too), or a document
        /// kind (ServiceDefaults, ServiceIntentions, ServiceRouter, ServiceSplitter,
        /// ServiceResolver).
        what: String,
        /// Only this one: a service (its endpoints), a destination (the intentions that can
        /// decide for it), a proxy id or service, a document name.
        name: Option<String>,
        /// json, yaml, or wide (the table with more columns); default: the table.
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
    },
    /// Delete a stored document.
    Delete {
        /// Kind, e.g. ServiceIntentions.
        kind: String,
        /// Name.
        name: String,
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
        /// `service`, `intentions` or `proxy` followed by NAME; a NAME alone is a service.
        what: String,
        /// The service, the destination whose intentions to show, or the proxy id.
        name: Option<String>,
        /// json or yaml; default: text.
        #[arg(short = 'o', long, value_enum)]
        output: Option<Format>,
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
        /// json or yaml; default: text.
        #[arg(short = 'o', long, value_enum)]
        output: Option<Format>,
    },
    /// Checks of the mesh and, with --netns, of one pod: each passes or fails with the fix.
    Doctor {
        /// The pod's network namespace.
        #[arg(long)]
        netns: Option<String>,
        /// json or yaml; default: text.
        #[arg(short = 'o', long, value_enum)]
        output: Option<Format>,
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
    /// Add ringside to Kubernetes workloads (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job,
    /// CronJob, Pod, and Lists of them) and print the manifests; every other document is printed
    /// as it was. All or nothing: on an error nothing is printed.
    Inject {
        /// Manifests (YAML, many documents per file); `-` or none: stdin.
        #[arg(short = 'f', long = "file")]
        files: Vec<PathBuf>,
        /// Image of the added containers (`ringside`, `ringside-init`).
        #[arg(long, default_value = inject::DEFAULT_IMAGE)]
        image: String,
    },
    /// Print the control plane's Kubernetes manifests (deploy/kubernetes/ringside.yaml) for an
    /// image: the `ringctl daemon` DaemonSet, its ConfigMap, namespace and service account.
    Manifests {
        /// Image of the daemon.
        #[arg(long, default_value = inject::DEFAULT_IMAGE)]
        image: String,
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
    /// Print a completion script for a shell (generated from these very definitions), e.g.
    /// `ringctl completion bash > /etc/bash_completion.d/ringctl`.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages for ringctl and each of its commands into a directory, e.g.
    /// `ringctl man --out /usr/local/share/man/man1`.
    Man {
        /// Directory to write `ringctl.1`, `ringctl-why.1`, ... into (created if missing).
        #[arg(long, default_value = ".")]
        out: PathBuf,
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
enum OperatorCommand {
    /// Operator tokens.
    Token {
        #[command(subcommand)]
        command: OperatorTokenCommand,
    },
}

#[derive(Subcommand, Debug)]
enum OperatorTokenCommand {
    /// Create an operator token (printed once; the daemon keeps its hash).
    Create {
        /// Who or what it is for (unique; 1 to 64 letters, digits, '.', '_', '-', '@').
        #[arg(long)]
        name: String,
    },
    /// List the operator tokens (names and creation times; never the tokens).
    List {
        /// json or yaml; default: a table.
        #[arg(short = 'o', long, value_enum)]
        output: Option<Format>,
    },
    /// Revoke the operator token named NAME: refused from its next request on.
    Revoke {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a token for the proxies of a service (printed once; the daemon keeps its hash).
    Create {
        /// Service.
        #[arg(long)]
        service: String,
        /// How long it is valid (e.g. 24h, 30m, 7d); without it, until revoked.
        #[arg(long, value_parser = humantime_parse)]
        ttl: Option<std::time::Duration>,
    },
    /// List the tokens: id, service, created, expires (never the tokens themselves).
    List,
    /// Revoke a token: its proxies' next request is refused.
    Revoke {
        /// Its id (or a prefix of at least 4 hex digits naming one token), from `token list`.
        id: String,
    },
}

fn token_command(socket: &daemon::Target, command: TokenCommand) -> ExitCode {
    match command {
        TokenCommand::Create { service, ttl } => report(
            daemon::call(
                socket,
                hyper::Method::POST,
                "/v1/tokens",
                body(&TokenRequest {
                    service,
                    ttl_s: ttl.map(|t| t.as_secs()),
                }),
            ),
            |t: TokenResponse| {
                // The token alone on stdout (scripts read it); what it is on stderr.
                eprintln!(
                    "token {} for service {}, {}",
                    t.id,
                    t.service,
                    t.expires.map_or("until revoked".to_string(), |e| format!(
                        "expires {}",
                        daemon::show_time(e)
                    ))
                );
                println!("{}", t.token);
            },
        ),
        TokenCommand::List => report(
            daemon::call(socket, hyper::Method::GET, "/v1/tokens", None),
            |rows: Vec<TokenInfo>| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                println!(
                    "{:<16}  {:<24}  {:<20}  EXPIRES",
                    "ID", "SERVICE", "CREATED"
                );
                for t in rows {
                    let created = if t.created > 0 {
                        daemon::show_time(t.created)
                    } else {
                        "-".into()
                    };
                    let expires = match t.expires {
                        None => "never".to_string(),
                        Some(e) if t.expired_at(now) => {
                            format!("{} (expired)", daemon::show_time(e))
                        }
                        Some(e) => daemon::show_time(e),
                    };
                    println!(
                        "{:<16}  {:<24}  {:<20}  {expires}",
                        t.id, t.service, created
                    );
                }
            },
        ),
        TokenCommand::Revoke { id } => report(
            daemon::call(
                socket,
                hyper::Method::DELETE,
                &format!("/v1/tokens/{id}"),
                None,
            ),
            |t: TokenInfo| println!("revoked token {} of service {}", t.id, t.service),
        ),
    }
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
    },
    /// Make a secret for `ringctl daemon --ca-secret` (32 random bytes in hex, mode 0600): give
    /// the same file to every daemon of a mesh on etcd. An existing file is not replaced.
    Secret {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Show the daemon's roots and any rollover in progress.
    Show,
    /// Print the mesh CA bundle (the roots the daemon trusts), or write it to a file: what
    /// `--ca-file` needs to reach the daemon's TCP operator port.
    Bundle {
        /// Write it here instead (an existing file is replaced).
        #[arg(long)]
        out: Option<PathBuf>,
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
    humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration like 72h, 1m30s or 500ms: {e}"))
}

/// Wait until every live proxy satisfies `ok` (or `timeout` passes).
fn wait_proxies(
    at: &Target,
    timeout: std::time::Duration,
    what: &str,
    ok: impl Fn(&ProxyStatus) -> bool,
) -> Result<(), String> {
    let start = std::time::Instant::now();
    loop {
        let proxies: Vec<ProxyStatus> =
            match daemon::call(at, hyper::Method::GET, "/v1/proxies", None) {
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
fn fetch<T: DeserializeOwned>(at: &Target, method: hyper::Method, path: &str) -> Result<T, String> {
    daemon::call(at, method, path, None).map_err(|e| e.to_string())
}

fn ca_rotate(at: &Target, timeout: std::time::Duration) -> Result<(), String> {
    let mut state: CaStatus = fetch(at, hyper::Method::GET, "/v1/ca")?;
    let mut started = false;
    loop {
        match state.phase {
            RotationPhase::Idle if started => {
                println!("rollover done: signer {}", state.roots.signer);
                return Ok(());
            }
            RotationPhase::Idle => {
                state = fetch(at, hyper::Method::POST, "/v1/ca/rotate?from=idle")?;
                println!(
                    "1/3 new root {} trusted beside the old one",
                    state.roots.trusted.get(1).map_or("", |t| t.as_str())
                );
            }
            RotationPhase::NewTrusted => {
                let index = state.index;
                wait_proxies(at, timeout, "taken the new trust bundle", |p| {
                    p.report.applied_index >= index
                })?;
                state = fetch(at, hyper::Method::POST, "/v1/ca/rotate?from=new_trusted")?;
                println!(
                    "2/3 every live proxy trusts both roots; the new root {} signs, leaves are being re-issued",
                    state.roots.signer
                );
            }
            RotationPhase::NewSigning => {
                let generation = state.generation;
                wait_proxies(at, timeout, "re-issued their certificates", |p| {
                    p.report.cert_generation >= generation
                })?;
                state = fetch(at, hyper::Method::POST, "/v1/ca/rotate?from=new_signing")?;
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

/// `-o json|yaml` of `describe`, `why`, `doctor` and `operator token list`: the fields in the
/// order of the answer's type.
fn print_format<T: Serialize>(v: &T, f: Format) {
    match f {
        Format::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Format::Yaml => print!("{}", serde_yaml::to_string(v).unwrap_or_default()),
    }
}

/// A table: a header, then the rows, columns padded to their widest cell (two spaces apart; the
/// last column is not padded).
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// `ringctl get WHAT [-o json|yaml|wide]`.
/// What `get` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GetKind {
    /// Stored documents, of one kind or all.
    Config(Option<&'static str>),
    Services,
    Endpoints,
    Intentions,
    Proxies,
}

impl GetKind {
    fn plural(self) -> &'static str {
        match self {
            GetKind::Config(_) => "documents",
            GetKind::Services => "services",
            GetKind::Endpoints => "endpoints",
            GetKind::Intentions => "intentions",
            GetKind::Proxies => "proxies",
        }
    }
}

/// The kinds `get` knows, as users type them (singular, plural, short, or a document kind).
fn get_kind(what: &str) -> Option<GetKind> {
    let kinds = [
        "ServiceDefaults",
        "ServiceIntentions",
        "ServiceRouter",
        "ServiceSplitter",
        "ServiceResolver",
    ];
    let w = what.to_ascii_lowercase();
    Some(match w.as_str() {
        "config" | "configs" | "documents" | "docs" => GetKind::Config(None),
        "services" | "service" | "svc" => GetKind::Services,
        "endpoints" | "endpoint" | "ep" => GetKind::Endpoints,
        "intentions" | "intention" => GetKind::Intentions,
        "proxies" | "proxy" => GetKind::Proxies,
        _ => {
            let kind = kinds.iter().find(|k| {
                k.eq_ignore_ascii_case(&w) || format!("{}s", k.to_ascii_lowercase()) == w
            })?;
            GetKind::Config(Some(*kind))
        }
    })
}

fn get(at: &Target, what: &str, name: Option<&str>, output: Option<Output>) -> ExitCode {
    let Some(kind) = get_kind(what) else {
        eprintln!("ringctl get: '{what}' is not known (config, services, endpoints, intentions, proxies, or a document kind such as ServiceDefaults)");
        return ExitCode::FAILURE;
    };
    // With a NAME: only what it names (a service's endpoints, the intentions for a destination,
    // a proxy by id or service, a document by name); none is an error.
    let named = |n: &str| name.is_none_or(|want| want == n);
    let none_named = |rows: usize| -> bool {
        if rows == 0 {
            if let Some(n) = name {
                eprintln!("ringctl get: no {} named '{n}'", kind.plural());
                return true;
            }
        }
        false
    };
    let mut missing = false;
    fn fetch_as<T: DeserializeOwned>(at: &Target, path: &str) -> Result<T, daemon::CallError> {
        daemon::call(at, hyper::Method::GET, path, None)
    }
    let wide = output == Some(Output::Wide);
    // JSON and YAML show the answer (object keys sorted, the order JSON always had).
    let as_data = matches!(output, Some(Output::Json | Output::Yaml));
    let yaml = output == Some(Output::Yaml);
    let status = match kind {
        // The stored documents are the operators' own: shown as stored.
        GetKind::Config(doc_kind) => report(
            fetch_as(at, "/v1/config"),
            |docs: Vec<serde_json::Value>| {
                // Read as documents to select; shown as stored.
                let docs: Vec<(serde_json::Value, Option<consul::Document>)> = docs
                    .into_iter()
                    .map(|v| {
                        let d = serde_json::from_value::<consul::Document>(v.clone()).ok();
                        (v, d)
                    })
                    .filter(|(_, d)| {
                        d.as_ref().is_none_or(|d| {
                            named(d.name()) && doc_kind.is_none_or(|k| d.kind() == k)
                        })
                    })
                    .collect();
                if none_named(docs.len()) {
                    missing = true;
                    return;
                }
                if as_data {
                    let raw: Vec<&serde_json::Value> = docs.iter().map(|(v, _)| v).collect();
                    return print_as(&raw, yaml);
                }
                let rows: Vec<Vec<String>> = docs
                    .iter()
                    .filter_map(|(_, d)| d.as_ref())
                    .map(|d| vec![d.kind().to_string(), d.name().to_string()])
                    .collect();
                print_table(&["KIND", "NAME"], &rows);
            },
        ),
        GetKind::Services => report(fetch_as(at, "/v1/services"), |rows: Vec<ServiceRecord>| {
            let rows: Vec<ServiceRecord> = rows.into_iter().filter(|s| named(&s.name)).collect();
            if none_named(rows.len()) {
                missing = true;
                return;
            }
            if as_data {
                return print_as(&rows, yaml);
            }
            let rows: Vec<Vec<String>> = rows
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.virtual_ip.to_string(),
                        s.ports
                            .iter()
                            .map(|p| format!("{}->{}", p.port, p.target_port))
                            .collect::<Vec<_>>()
                            .join(","),
                    ]
                })
                .collect();
            print_table(&["NAME", "VIRTUAL IP", "PORTS"], &rows);
        }),
        GetKind::Endpoints => report(
            fetch_as(at, "/v1/endpoints"),
            |rows: Vec<EndpointRecord>| {
                let rows: Vec<EndpointRecord> =
                    rows.into_iter().filter(|e| named(&e.service)).collect();
                if none_named(rows.len()) {
                    missing = true;
                    return;
                }
                if as_data {
                    return print_as(&rows, yaml);
                }
                let rows: Vec<Vec<String>> = rows
                    .iter()
                    .map(|e| {
                        let mut r = vec![e.service.clone(), e.address.to_string(), e.node.clone()];
                        if wide {
                            r.push(if e.healthy { "healthy" } else { "unhealthy" }.into());
                            r.push(
                                e.meta
                                    .iter()
                                    .map(|(k, v)| format!("{k}={v}"))
                                    .collect::<Vec<_>>()
                                    .join(","),
                            );
                        }
                        r
                    })
                    .collect();
                // NODE: the node given at registration, or the proxy that registered it.
                let header: &[&str] = if wide {
                    &["SERVICE", "ADDRESS", "NODE", "HEALTH", "META"]
                } else {
                    &["SERVICE", "ADDRESS", "NODE"]
                };
                print_table(header, &rows);
            },
        ),
        GetKind::Intentions => report(fetch_as(at, "/v1/intentions"), |mut l: IntentionList| {
            // Named: the rules that can decide for that destination (its own and wildcards).
            l.rules.retain(|r| match &r.intention.destination {
                Pattern::Any => true,
                Pattern::Exact(d) => named(d),
            });
            if as_data {
                return print_as(&l, yaml);
            }
            let rows: Vec<Vec<String>> = l
                .rules
                .iter()
                .map(|r| {
                    vec![
                        r.intention.source.to_string(),
                        r.intention.destination.to_string(),
                        action_name(r.intention.action).to_string(),
                        r.precedence.to_string(),
                    ]
                })
                .collect();
            print_table(&["SOURCE", "DESTINATION", "ACTION", "PRECEDENCE"], &rows);
            println!("(no match: {})", action_name(l.default));
        }),
        GetKind::Proxies => report(fetch_as(at, "/v1/proxies"), |rows: Vec<ProxyStatus>| {
            let rows: Vec<ProxyStatus> = rows
                .into_iter()
                .filter(|p| named(&p.report.id) || named(&p.report.service))
                .collect();
            if none_named(rows.len()) {
                missing = true;
                return;
            }
            if as_data {
                return print_as(&rows, yaml);
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let rows: Vec<Vec<String>> = rows
                .iter()
                .map(|p| {
                    let mut r = vec![
                        p.report.id.clone(),
                        if p.node.is_empty() {
                            "-".into()
                        } else {
                            p.node.clone()
                        },
                        p.report.service.clone(),
                        if p.live { "live" } else { "silent" }.into(),
                        p.report.applied_index.to_string(),
                        format!("{}s", p.cert_expires_in_s),
                        p.report.cert_generation.to_string(),
                    ];
                    if wide {
                        r.push(p.report.address.map_or("-".into(), |a| a.to_string()));
                        r.push(format!("{}s", now - p.last_seen));
                    }
                    r.push(p.report.cert_issuer.clone());
                    r
                })
                .collect();
            let header: &[&str] = if wide {
                &[
                    "ID",
                    "NODE",
                    "SERVICE",
                    "STATE",
                    "VERSION",
                    "CERT EXPIRY",
                    "GEN",
                    "ADDRESS",
                    "LAST REPORT",
                    "ISSUER",
                ]
            } else {
                &[
                    "ID",
                    "NODE",
                    "SERVICE",
                    "STATE",
                    "VERSION",
                    "CERT EXPIRY",
                    "GEN",
                    "ISSUER",
                ]
            };
            print_table(header, &rows);
        }),
    };
    if missing {
        ExitCode::FAILURE
    } else {
        status
    }
}

/// `describe [KIND] NAME`.
fn describe_any(
    at: &Target,
    what: &str,
    name: Option<String>,
    output: Option<Format>,
) -> Result<(), String> {
    let Some(name) = name else {
        return describe(at, what, output);
    };
    match what.to_ascii_lowercase().as_str() {
        "service" | "services" | "svc" => describe(at, &name, output),
        "intention" | "intentions" => describe_intentions(at, &name, output),
        "proxy" | "proxies" => describe_proxy(at, &name, output),
        other => Err(format!(
            "'{other}' is not a kind to describe (service, intentions, proxy)"
        )),
    }
}

/// `describe intentions DST`: the rules that can decide for DST, its documents, and what they
/// decide for every registered service calling it.
fn describe_intentions(at: &Target, dst: &str, output: Option<Format>) -> Result<(), String> {
    let get = hyper::Method::GET;
    let list: IntentionList = fetch(at, get.clone(), "/v1/intentions")?;
    let rules: Vec<&IntentionRow> = list
        .rules
        .iter()
        .filter(|r| match &r.intention.destination {
            Pattern::Any => true,
            Pattern::Exact(d) => d == dst,
        })
        .collect();
    let mut verdicts = Vec::new();
    for s in fetch::<Vec<ServiceRecord>>(at, get.clone(), "/v1/services")? {
        if s.name == dst {
            continue;
        }
        let c: IntentionCheck = fetch(
            at,
            get.clone(),
            &format!("/v1/intentions/check?source={}&destination={dst}", s.name),
        )?;
        verdicts.push((s.name, c));
    }
    let documents: Vec<String> = fetch::<Vec<serde_json::Value>>(at, get, "/v1/config")?
        .into_iter()
        .filter_map(|v| serde_json::from_value::<consul::Document>(v).ok())
        .filter(|d| d.kind() == "ServiceIntentions" && d.destination() == Some(dst))
        .map(|d| d.id())
        .collect();
    if let Some(f) = output {
        let v = serde_json::json!({
            "destination": dst,
            "default": action_name(list.default),
            "rules": rules,
            "documents": documents,
            "sources": verdicts.iter().map(|(s, c)| serde_json::json!({
                "source": s, "allowed": c.allowed, "decided_by": c.decided_by,
            })).collect::<Vec<_>>(),
        });
        print_format(&v, f);
        return Ok(());
    }
    println!("destination: {dst}");
    println!(
        "documents:   {}",
        if documents.is_empty() {
            "(none: only wildcard rules and the default decide)".to_string()
        } else {
            documents.join(", ")
        }
    );
    println!(
        "rules:       (highest precedence decides; no match: {})",
        action_name(list.default)
    );
    for r in &rules {
        println!(
            "  {:<20} -> {:<20} {:<6} precedence {}",
            r.intention.source.to_string(),
            r.intention.destination.to_string(),
            action_name(r.intention.action),
            r.precedence
        );
    }
    println!("registered services calling {dst}:");
    let rows: Vec<Vec<String>> = verdicts
        .iter()
        .map(|(s, c)| {
            vec![
                s.clone(),
                if c.allowed { "allow" } else { "deny" }.to_string(),
                c.decided_by.clone(),
            ]
        })
        .collect();
    print_table(&["SOURCE", "DECISION", "DECIDED BY"], &rows);
    Ok(())
}

/// `describe proxy ID`: one proxy's last report, with its recent failures.
fn describe_proxy(at: &Target, id: &str, output: Option<Format>) -> Result<(), String> {
    let proxies: Vec<ProxyStatus> = fetch(at, hyper::Method::GET, "/v1/proxies")?;
    let Some(p) = proxies.into_iter().find(|p| p.report.id == id) else {
        return Err(format!(
            "no proxy '{id}' (ringctl get proxies lists their ids)"
        ));
    };
    if let Some(f) = output {
        print_format(&p, f);
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let r = &p.report;
    println!("proxy:       {}", r.id);
    println!("service:     {}", r.service);
    println!(
        "node:        {}",
        if p.node.is_empty() { "-" } else { &p.node }
    );
    println!(
        "address:     {}",
        r.address.map_or("-".to_string(), |a| a.to_string())
    );
    println!(
        "state:       {} (last report {}s ago)",
        if p.live { "live" } else { "silent" },
        now - p.last_seen
    );
    println!("started:     {}s ago", now - r.started_at);
    println!("version:     {} (configuration applied)", r.applied_index);
    println!(
        "certificate: generation {}, expires in {}s, issuer {}",
        r.cert_generation, p.cert_expires_in_s, r.cert_issuer
    );
    if r.ctl_unreachable_since > 0 {
        println!(
            "control:     could not reach the daemon for a while from {}s ago (ctl_unreachable)",
            now - r.ctl_unreachable_since
        );
    }
    if r.failed_connects_before_start > 0 {
        println!(
            "pod:         {} connection attempts had failed in its pod before it started",
            r.failed_connects_before_start
        );
    }
    println!("failures:    {} recent", r.events.len());
    let rows: Vec<Vec<String>> = r
        .events
        .iter()
        .rev()
        .map(|e| {
            vec![
                format!("{}s ago", now - (e.time_ms / 1000) as i64),
                e.reason.clone(),
                e.source.clone(),
                e.destination.clone(),
                e.detail.clone(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        print_table(
            &["WHEN", "REASON", "SOURCE", "DESTINATION", "DETAIL"],
            &rows,
        );
    }
    Ok(())
}

fn describe(at: &Target, name: &str, output: Option<Format>) -> Result<(), String> {
    let get = hyper::Method::GET;
    let service = fetch::<Vec<ServiceRecord>>(at, get.clone(), "/v1/services")?
        .into_iter()
        .find(|s| s.name == name);
    let endpoints: Vec<EndpointRecord> =
        fetch::<Vec<EndpointRecord>>(at, get.clone(), "/v1/endpoints")?
            .into_iter()
            .filter(|e| e.service == name)
            .collect();
    let for_it = |p: &Pattern| match p {
        Pattern::Any => true,
        Pattern::Exact(d) => d == name,
    };
    let intentions: Vec<IntentionRow> = fetch::<IntentionList>(at, get.clone(), "/v1/intentions")?
        .rules
        .into_iter()
        .filter(|r| for_it(&r.intention.destination))
        .collect();
    let proxies: Vec<ProxyStatus> = fetch::<Vec<ProxyStatus>>(at, get.clone(), "/v1/proxies")?
        .into_iter()
        .filter(|p| p.report.service == name)
        .collect();
    // The stored documents are shown as stored (`-o json`); they are read as documents to pick
    // the ones about this service.
    let mut docs: Vec<(consul::Document, serde_json::Value)> = Vec::new();
    for v in fetch::<Vec<serde_json::Value>>(at, get, "/v1/config")? {
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
    if let Some(f) = output {
        let documents: Vec<&serde_json::Value> = docs.iter().map(|(_, v)| v).collect();
        let v = serde_json::json!({
            "service": service, "protocol": protocol, "endpoints": endpoints,
            "intentions": intentions, "proxies": proxies, "documents": documents,
        });
        print_format(&v, f);
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

fn run_ca(command: CaCommand, at: &Target) -> Result<(), String> {
    match command {
        CaCommand::Bundle { out } => {
            let v: CaStatus = fetch(at, hyper::Method::GET, "/v1/ca")?;
            let bundle = v.bundle.unwrap_or_default();
            match out {
                None => print!("{bundle}"),
                Some(f) => {
                    std::fs::write(&f, &bundle).map_err(|e| format!("{}: {e}", f.display()))?;
                    eprintln!(
                        "{}: the mesh CA bundle ({} roots); take it again after `ringctl ca rotate`",
                        f.display(),
                        v.roots.trusted.len()
                    );
                }
            }
            Ok(())
        }
        CaCommand::Rotate { timeout } => ca_rotate(at, timeout),
        CaCommand::Show => {
            let v: CaStatus = fetch(at, hyper::Method::GET, "/v1/ca")?;
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
        /// Action when no intention matches.
        #[arg(long, default_value = "deny")]
        default: String,
    },
}

/// Exit status of `why` when it found a cause, of `doctor` when a check failed, of `intention
/// check` when the connection would be denied.
const EXIT_FOUND: u8 = 1;
/// Exit status of `why` and `intention check` when they could not answer (daemon unreachable,
/// bad arguments, unreadable file).
const EXIT_ERROR: u8 = 2;

/// `ringctl operator token ...`.
fn operator_token(at: &Target, command: OperatorTokenCommand) -> ExitCode {
    match command {
        OperatorTokenCommand::Create { name } => report(
            daemon::call(
                at,
                hyper::Method::POST,
                "/v1/operator/tokens",
                body(&OperatorTokenRequest { name }),
            ),
            |t: OperatorTokenResponse| println!("{}", t.token),
        ),
        OperatorTokenCommand::List { output } => report(
            daemon::call(at, hyper::Method::GET, "/v1/operator/tokens", None),
            |rows: Vec<OperatorTokenRecord>| match output {
                Some(f) => print_format(&rows, f),
                None => {
                    let rows: Vec<Vec<String>> = rows
                        .iter()
                        .map(|r| {
                            let created = std::time::UNIX_EPOCH
                                + std::time::Duration::from_secs(r.created.max(0) as u64);
                            vec![
                                r.name.clone(),
                                humantime::format_rfc3339_seconds(created).to_string(),
                            ]
                        })
                        .collect();
                    print_table(&["NAME", "CREATED"], &rows);
                }
            },
        ),
        OperatorTokenCommand::Revoke { name } => report(
            daemon::call(
                at,
                hyper::Method::DELETE,
                &format!("/v1/operator/tokens/{name}"),
                None,
            ),
            |r: OperatorTokenRevoked| println!("operator token {} revoked", r.name),
        ),
    }
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

/// Whether a command talks to the daemon (as a client).
fn needs_daemon(c: &Command) -> bool {
    match c {
        Command::Daemon { .. }
        | Command::Redirect { .. }
        | Command::AdminGet { .. }
        | Command::Validate { .. }
        | Command::Apply { dry_run: true, .. } => false,
        Command::Intention {
            command: IntentionCommand::Check { file, .. },
        } => file.is_none(),
        Command::Ca { command } => matches!(
            command,
            CaCommand::Rotate { .. } | CaCommand::Show | CaCommand::Bundle { .. }
        ),
        _ => true,
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let at = if needs_daemon(&cli.command) {
        match cli.conn.target(&matches) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("ringctl: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        Target::Socket(cli.conn.socket.clone())
    };
    if let Command::Daemon { .. } = cli.command {
        // The daemon serves; the client options would be silently ignored.
        for (id, flag) in [
            ("server", "--server"),
            ("ca_file", "--ca-file"),
            ("token", "--token"),
            ("token_file", "--token-file"),
        ] {
            if matches.value_source(id) == Some(ValueSource::CommandLine) {
                eprintln!("ringctl daemon: {flag} is for clients; the daemon's TCP operator port is --listen ADDR");
                return ExitCode::FAILURE;
            }
        }
    }
    match cli.command {
        Command::Inject { files, image } => inject::main(&files, &inject::Options { image }),
        Command::Manifests { image } => match deploy::control_plane(&image) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ringctl manifests: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Register {
            what: RegisterCommand::Service { name, ports },
        } => {
            let req = RegisterService {
                name,
                ports: ports
                    .iter()
                    .map(|&(port, target_port)| PortMap { port, target_port })
                    .collect(),
            };
            report(
                daemon::call(&at, hyper::Method::POST, "/v1/services", body(&req)),
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
        } => {
            let req = EndpointRecord {
                service,
                address,
                node,
                healthy: true,
                meta: meta.into_iter().collect(),
            };
            report(
                daemon::call(&at, hyper::Method::POST, "/v1/endpoints", body(&req)),
                |e: EndpointRecord| {
                    println!("endpoint {} of {} registered", e.address, e.service);
                },
            )
        }
        Command::Deregister {
            what: DeregisterCommand::Endpoint { service, address },
        } => report(
            daemon::call(
                &at,
                hyper::Method::DELETE,
                &format!("/v1/endpoints/{service}/{address}"),
                None,
            ),
            |d: DeregisterResponse| {
                println!("endpoint {} of {} deregistered", d.address, d.service);
            },
        ),
        Command::Issue {
            proxy_token,
            key_out,
            cert_out,
            bundle_out,
        } => {
            let (csr, key) = match ca::make_csr() {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("ringctl issue: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let r = daemon::call_with(
                &at,
                hyper::Method::POST,
                "/v1/sign",
                Some(csr),
                Some(&proxy_token),
            );
            let v: SignResponse = match r {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("ringctl: {e}");
                    return ExitCode::FAILURE;
                }
            };
            {
                let write = || -> Result<(), String> {
                    ca::write_private(&key_out, key.as_bytes()).map_err(|e| e.to_string())?;
                    std::fs::write(&cert_out, &v.cert).map_err(|e| e.to_string())?;
                    std::fs::write(&bundle_out, &v.bundle).map_err(|e| e.to_string())
                };
                match write() {
                    Ok(()) => {
                        println!("certificate issued for {}", v.service);
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("ringctl issue: cannot write the certificate files: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
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
        Command::Operator {
            command: OperatorCommand::Token { command },
        } => operator_token(&at, command),
        Command::Token { command } => token_command(&at, command),
        Command::Daemon {
            data_dir,
            store,
            etcd_ca,
            etcd_cert,
            etcd_key,
            ca_secret,
            lease_ttl,
            socket,
            listen,
            tls_san,
            node,
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
                node: node
                    .or_else(daemon::hostname)
                    .unwrap_or_else(|| "localhost".into()),
                listen,
                tls_names: tls_san,
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
        } => {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            report(
                daemon::call(&at, hyper::Method::POST, "/v1/apply", Some(text)),
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
        Command::Get { what, name, output } => get(&at, &what, name.as_deref(), output),
        Command::Doctor { netns, output } => {
            let items = doctor::doctor(&at, netns.as_deref());
            match output {
                Some(f) => print_format(&items, f),
                None => doctor::print(&items),
            }
            if items.iter().all(|i| i.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "ringctl", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man { out } => {
            let written = std::fs::create_dir_all(&out).and_then(|()| {
                clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), &out)
            });
            match written {
                Ok(()) => {
                    println!("man pages written to {}", out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ringctl man: {}: {e}", out.display());
                    ExitCode::FAILURE
                }
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
        } => {
            let (dst, port) = match dst.rsplit_once(':') {
                Some((d, p)) => match p.parse::<u16>() {
                    Ok(p) => (d.to_string(), Some(p)),
                    Err(_) => {
                        eprintln!("ringctl why: '{p}' is not a port (DST or DST:PORT)");
                        return ExitCode::from(EXIT_ERROR);
                    }
                },
                None => (dst, None),
            };
            match why::why(
                &at,
                &src,
                &dst,
                port,
                src_netns.as_deref(),
                dst_netns.as_deref(),
            ) {
                Ok(v) => {
                    match output {
                        Some(f) => print_format(&v, f),
                        None => why::print(&v),
                    }
                    // Like `linkerd check`: scripts see a found cause in the exit status.
                    if v.reason.is_some() {
                        ExitCode::from(EXIT_FOUND)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("ringctl why: {e}");
                    ExitCode::from(EXIT_ERROR)
                }
            }
        }
        Command::Describe { what, name, output } => match describe_any(&at, &what, name, output) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ringctl describe: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Cert {
            command: CertCommand::Rotate { service },
        } => {
            let path = match &service {
                Some(s) => format!("/v1/certs/rotate?service={s}"),
                None => "/v1/certs/rotate".to_string(),
            };
            report(
                daemon::call(&at, hyper::Method::POST, &path, None),
                |r: CertRotateResponse| {
                    println!(
                        "certificates of {} will be re-issued (config index {})",
                        r.rotated, r.index
                    )
                },
            )
        }
        Command::Delete { kind, name } => report(
            daemon::call(
                &at,
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
                    ..
                },
        } => match daemon::call::<IntentionCheck>(
            &at,
            hyper::Method::GET,
            &format!("/v1/intentions/check?source={src}&destination={dst}"),
            None,
        ) {
            Ok(c) => {
                println!(
                    "{}: {}",
                    if c.allowed { "allow" } else { "deny" },
                    c.decided_by
                );
                if c.allowed {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EXIT_FOUND)
                }
            }
            Err(e) => {
                eprintln!("ringctl: {e}");
                ExitCode::from(EXIT_ERROR)
            }
        },
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
                    return ExitCode::from(EXIT_ERROR);
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
                    if d.allowed() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(EXIT_FOUND)
                    }
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(EXIT_ERROR)
                }
            }
        }
        Command::Ca { command } => match run_ca(command, &at) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn socket_is_global_and_the_daemon_serves_it() {
        let cli = Cli::try_parse_from(["ringctl", "get", "proxies", "--socket", "/y"]).unwrap();
        assert_eq!(cli.conn.socket, PathBuf::from("/y"));
        let cli = Cli::try_parse_from(["ringctl", "--socket", "/x", "ca", "show"]).unwrap();
        assert_eq!(cli.conn.socket, PathBuf::from("/x"));
        let cli = Cli::try_parse_from(["ringctl", "--socket", "/x", "daemon", "--data-dir", "/d"])
            .unwrap();
        let Command::Daemon { socket, .. } = cli.command else {
            panic!("not the daemon")
        };
        assert_eq!(socket, PathBuf::from("/x"));
        let cli = Cli::try_parse_from(["ringctl", "daemon", "--data-dir", "/d", "--socket", "/z"])
            .unwrap();
        let Command::Daemon { socket, .. } = cli.command else {
            panic!("not the daemon")
        };
        assert_eq!(socket, PathBuf::from("/z"));
    }
}
