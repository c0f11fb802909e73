//! `ringside-echo ADDR`: an echo server in a process of its own (a thread per connection, every
//! byte back, EOF answered with EOF), for tests that kill the upstream with SIGKILL mid-stream.
//! Prints `listening ADDR` on stdout once bound (ADDR with the port the kernel chose for `:0`).

use std::io::Write;
use std::net::{SocketAddr, TcpListener};

fn main() -> anyhow::Result<()> {
    let arg = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: ringside-echo ADDR (e.g. 127.0.0.1:0)"))?;
    let addr: SocketAddr = arg
        .parse()
        .map_err(|e| anyhow::anyhow!("ADDR '{arg}' is no socket address: {e}"))?;
    let l = TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("bind {addr}: {e}"))?;
    let mut out = std::io::stdout();
    writeln!(out, "listening {}", l.local_addr()?)?;
    out.flush()?;
    ringside_tests::serve_echo(l, Default::default());
    Ok(())
}
