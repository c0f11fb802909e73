//! `ringctl`: the operator CLI (and, later, the control daemon).
//!
//! For now it works on files, so a broken file is caught before a rollout:
//! - `ringctl validate FILE...`: sidecar configuration files, checked the way the proxy reads them;
//! - `ringctl apply --dry-run -f FILE`: Consul-style documents (ServiceDefaults, ServiceIntentions,
//!   ServiceRouter, ServiceSplitter, ServiceResolver), checked whole;
//! - `ringctl intention check SRC DST -f FILE`: which intention decides, and what it says.
//!
//! Errors name the document, the field and the line; the exit status is non-zero on any error.

mod consul;

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
    /// Check Consul-style configuration documents (the daemon that stores them comes next; for now
    /// only --dry-run, which checks the whole file and prints what it holds).
    Apply {
        /// YAML file with one or more documents separated by `---`.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Check only.
        #[arg(long, required = true)]
        dry_run: bool,
    },
    /// Intentions.
    Intention {
        #[command(subcommand)]
        command: IntentionCommand,
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
enum IntentionCommand {
    /// Print allow or deny for SRC -> DST, and the intention that decides.
    Check {
        /// Source service.
        src: String,
        /// Destination service.
        dst: String,
        /// File with ServiceIntentions documents.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Action when no intention matches.
        #[arg(long, default_value = "deny")]
        default: String,
    },
}

fn read_docs(file: &PathBuf) -> Result<Vec<consul::Document>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    consul::parse(&text).map_err(|e| format!("{}: {e}", file.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Apply { file, dry_run: _ } => match read_docs(&file) {
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
                    file,
                    default,
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
