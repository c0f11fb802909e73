//! `ringctl`: the operator CLI (and, later, the control daemon).
//!
//! For now it validates sidecar configuration files the way the proxy will read them, so a broken
//! file is caught before a rollout: `ringctl validate FILE...` prints each error with its field and
//! line and exits non-zero if any file is invalid.

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
