//! `ringside-init`: install, remove or show a pod's traffic-redirect rules (run once per pod, as
//! root, before the application starts — the role of istio-iptables or
//! `consul connect redirect-traffic`).

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ringside_kernel_setup::redirect::{self, Backend, Family, RedirectSpec, Target};

#[derive(Parser, Debug)]
#[command(
    name = "ringside-init",
    version,
    about = "ringside traffic-redirect rules"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install the rules (idempotent: installing twice is one install).
    Install {
        #[command(flatten)]
        at: At,
        /// The proxy's uid: its own connections are never redirected.
        #[arg(long, default_value_t = 1337)]
        proxy_uid: u32,
        /// Outbound listener port.
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        /// Inbound listener port.
        #[arg(long, default_value_t = 15006)]
        inbound_port: u16,
        /// Destination ports not redirected outbound (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        exclude_outbound_ports: Vec<u16>,
        /// Destination networks not redirected outbound (CIDRs, comma-separated or repeated).
        #[arg(long, value_delimiter = ',', value_parser = redirect::parse_cidr)]
        exclude_outbound_cidrs: Vec<redirect::Cidr>,
        /// Ports not redirected inbound (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        exclude_inbound_ports: Vec<u16>,
        /// Print the exact rules instead of installing them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove exactly the rules `install` added.
    Remove {
        #[command(flatten)]
        at: At,
    },
    /// Print the rules ringside has installed.
    Show {
        #[command(flatten)]
        at: At,
    },
}

#[derive(Args, Debug)]
struct At {
    /// Network namespace (as in `ip netns`); default: the current one.
    #[arg(long)]
    netns: Option<String>,
    /// iptables-nft, iptables-legacy or nft; default: the one the system already uses.
    #[arg(long, value_parser = parse_backend)]
    backend: Option<Backend>,
}

fn parse_backend(s: &str) -> Result<Backend, String> {
    Backend::parse(s)
        .ok_or_else(|| format!("unknown backend '{s}' (iptables-nft, iptables-legacy, nft)"))
}

impl At {
    fn target(&self) -> Target {
        Target {
            backend: self
                .backend
                .unwrap_or_else(|| redirect::detect_backend(self.netns.as_deref())),
            netns: self.netns.clone(),
        }
    }
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Install {
            at,
            proxy_uid,
            outbound_port,
            inbound_port,
            exclude_outbound_ports,
            exclude_outbound_cidrs,
            exclude_inbound_ports,
            dry_run,
        } => {
            let spec = RedirectSpec {
                proxy_uid,
                outbound_port,
                inbound_port,
                exclude_outbound_ports,
                exclude_outbound_cidrs,
                exclude_inbound_ports,
                ..RedirectSpec::default()
            };
            let target = at.target();
            if dry_run {
                match target.backend {
                    Backend::Nft => print!("{}", spec.nft_rules()),
                    _ => {
                        println!("# {} (iptables-restore --noflush)", target.backend.name());
                        print!("{}", spec.iptables_rules(Family::V4, true));
                        println!("# ip6tables-restore --noflush");
                        print!("{}", spec.iptables_rules(Family::V6, true));
                    }
                }
                Ok(())
            } else {
                redirect::install(&spec, &target).map(|()| {
                    println!(
                        "installed ({}{})",
                        target.backend.name(),
                        target
                            .netns
                            .as_ref()
                            .map(|n| format!(", netns {n}"))
                            .unwrap_or_default()
                    )
                })
            }
        }
        Command::Remove { at } => {
            let target = at.target();
            redirect::remove(&target).map(|()| println!("removed ({})", target.backend.name()))
        }
        Command::Show { at } => redirect::show(&at.target()).map(|s| print!("{s}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringside-init: {e}");
            ExitCode::FAILURE
        }
    }
}
