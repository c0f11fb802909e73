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
mod store;

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
enum CaCommand {
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

fn run_ca(command: CaCommand) -> Result<(), String> {
    match command {
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
        Command::Daemon { data_dir, socket } => match daemon::run(&data_dir, &socket) {
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
            if what != "config" {
                eprintln!("ringctl get: '{what}' is not known here yet (config)");
                return ExitCode::FAILURE;
            }
            report(
                daemon::call(&socket, hyper::Method::GET, "/v1/config", None),
                |v| {
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
