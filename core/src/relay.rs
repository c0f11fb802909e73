//! Moving bytes between the two sockets of a proxied connection, both directions at once.
//!
//! Each direction is a *pump*: wait until the source is readable (an io_uring poll, or epoll
//! readiness), then move what is there with non-blocking calls until the source is drained, waiting
//! for writability of the destination when its send buffer is full. Nothing is held while a
//! connection is idle except the two pending readiness waits: pipes and buffers come from per-worker
//! pools and go back as soon as a burst is moved. That is what keeps an idle connection at a few
//! hundred bytes and the number of pipes at the number of *busy* directions.
//!
//! Why readiness plus direct `splice(2)` rather than io_uring's `IORING_OP_SPLICE`: the kernel
//! always runs io_uring splice requests on its io-wq worker threads (they are flagged force-async),
//! so every splice would cost a thread hand-off, and a splice armed on an idle socket would park a
//! kernel worker. A poll through the ring followed by a direct non-blocking splice moves the same
//! bytes with no hand-off. See ARCHITECTURE.md for the measurements.
//!
//! Half-close: EOF from the source becomes `shutdown(SHUT_WR)` on the destination; the other pump
//! keeps going until its own EOF. Any error (reset, broken pipe) ends both directions and the
//! connection is closed with RST on both sides (SO_LINGER 0), so a reset crosses the proxy.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use monoio::net::TcpStream;

use crate::config::CopyMode;
use crate::reason::Reason;
use crate::stats::{Counter, WorkerStats};
use crate::sys::{self, Pipe};

/// Bytes moved in one readiness episode before a pump yields to other connections.
const EPISODE_BUDGET: usize = 4 * 1024 * 1024;

/// Per-worker pools of pipes and copy buffers.
#[derive(Debug)]
pub struct Pools {
    pipes: RefCell<Vec<Pipe>>,
    bufs: RefCell<Vec<Box<[u8]>>>,
    pipe_size: usize,
    buffer_size: usize,
    max_idle: usize,
}

impl Pools {
    /// Empty pools; pipes and buffers are made on first use and kept up to `max_idle` each.
    pub fn new(pipe_size: usize, buffer_size: usize, max_idle: usize) -> Self {
        Pools {
            pipes: RefCell::new(Vec::new()),
            bufs: RefCell::new(Vec::new()),
            pipe_size,
            buffer_size,
            max_idle,
        }
    }

    /// An empty pipe, or `None` when none can be created (descriptor limit): the caller copies.
    fn take_pipe(&self, stats: &WorkerStats) -> Option<Pipe> {
        if let Some(p) = self.pipes.borrow_mut().pop() {
            return Some(p);
        }
        match Pipe::new(self.pipe_size) {
            Ok(p) => {
                stats.pipes_created.inc();
                Some(p)
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot create a pipe; copying instead");
                None
            }
        }
    }

    /// Return a pipe. It must be empty; a pipe that may hold bytes is dropped instead.
    fn give_pipe(&self, p: Pipe) {
        let mut pipes = self.pipes.borrow_mut();
        if pipes.len() < self.max_idle {
            pipes.push(p);
        }
    }

    fn take_buf(&self) -> Box<[u8]> {
        self.bufs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0u8; self.buffer_size].into_boxed_slice())
    }

    fn give_buf(&self, b: Box<[u8]>) {
        let mut bufs = self.bufs.borrow_mut();
        if bufs.len() < self.max_idle {
            bufs.push(b);
        }
    }

    /// Idle pipes held now.
    pub fn idle_pipes(&self) -> usize {
        self.pipes.borrow().len()
    }
}

/// Why a pump stopped early.
#[derive(Debug)]
enum PumpError {
    /// Reading the source failed (the source side is broken).
    Read(io::Error),
    /// Writing the destination failed (the destination side is broken).
    Write(io::Error),
}

/// What a relay ended with.
#[derive(Debug, Clone, Copy)]
pub struct RelayEnd {
    /// Bytes moved client → upstream.
    pub up_bytes: u64,
    /// Bytes moved upstream → client.
    pub down_bytes: u64,
    /// `None` for a clean end (both directions reached EOF).
    pub reason: Option<Reason>,
}

/// What a relay needs from its worker.
#[derive(Debug, Clone, Copy)]
pub struct RelayCtx<'a> {
    /// Pipe and buffer pools.
    pub pools: &'a Pools,
    /// The worker's counters.
    pub stats: &'a WorkerStats,
    /// Copy strategy.
    pub mode: CopyMode,
    /// Close after this long without a byte moving.
    pub idle_timeout: Option<Duration>,
}

/// Relay between `client` and `upstream` until both directions end or one fails.
pub async fn relay(ctx: RelayCtx<'_>, client: &TcpStream, upstream: &TcpStream) -> RelayEnd {
    let up_bytes = Cell::new(0u64);
    let down_bytes = Cell::new(0u64);
    let up = pin!(pump(
        ctx,
        client,
        upstream,
        &ctx.stats.downstream_cx_rx_bytes_total,
        &up_bytes
    ));
    let down = pin!(pump(
        ctx,
        upstream,
        client,
        &ctx.stats.downstream_cx_tx_bytes_total,
        &down_bytes
    ));
    let idle = pin!(idle_watch(ctx.idle_timeout, &up_bytes, &down_bytes));
    let mut up = Some(up);
    let mut down = Some(down);
    let mut idle = idle;

    let reason = poll_fn(|cx| {
        if let Some(f) = up.as_mut() {
            if let Poll::Ready(r) = f.as_mut().poll(cx) {
                up = None;
                if let Err(e) = r {
                    let (reason, err) = match e {
                        PumpError::Read(e) => (Reason::DownstreamReset, e),
                        PumpError::Write(e) => (Reason::UpstreamReset, e),
                    };
                    tracing::debug!(error = %err, reason = reason.as_str(), "relay failed");
                    return Poll::Ready(Some(reason));
                }
            }
        }
        if let Some(f) = down.as_mut() {
            if let Poll::Ready(r) = f.as_mut().poll(cx) {
                down = None;
                if let Err(e) = r {
                    let (reason, err) = match e {
                        PumpError::Read(e) => (Reason::UpstreamReset, e),
                        PumpError::Write(e) => (Reason::DownstreamReset, e),
                    };
                    tracing::debug!(error = %err, reason = reason.as_str(), "relay failed");
                    return Poll::Ready(Some(reason));
                }
            }
        }
        if up.is_none() && down.is_none() {
            return Poll::Ready(None);
        }
        if idle.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Reason::IdleTimeout));
        }
        Poll::Pending
    })
    .await;

    if reason.is_some() {
        // Propagate the failure as a reset to whichever side is still there.
        sys::set_linger_zero(client.as_raw_fd());
        sys::set_linger_zero(upstream.as_raw_fd());
    }
    RelayEnd {
        up_bytes: up_bytes.get(),
        down_bytes: down_bytes.get(),
        reason,
    }
}

/// Resolves when no byte moved for `timeout` (never when `None`). Checks four times per period, so
/// an idle connection closes between 1x and 1.25x the timeout.
async fn idle_watch(timeout: Option<Duration>, a: &Cell<u64>, b: &Cell<u64>) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let tick = timeout / 4;
    let mut last = a.get() + b.get();
    let mut quiet = Duration::ZERO;
    loop {
        monoio::time::sleep(tick).await;
        let now = a.get() + b.get();
        if now == last {
            quiet += tick;
            if quiet >= timeout {
                return;
            }
        } else {
            last = now;
            quiet = Duration::ZERO;
        }
    }
}

enum Episode {
    /// The source is drained for now: wait for readiness again.
    Wait,
    /// The source reached EOF.
    Eof,
    /// (Adaptive copy only) a full buffer was read: the transfer is bulk, splice the rest.
    Bulk,
}

/// One direction: `src` → `dst` until EOF (then half-close `dst`) or an error.
async fn pump(
    ctx: RelayCtx<'_>,
    src: &TcpStream,
    dst: &TcpStream,
    counter: &Counter,
    moved: &Cell<u64>,
) -> Result<(), PumpError> {
    let (sfd, dfd) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut bulk = ctx.mode == CopyMode::Splice;
    loop {
        src.readable(false).await.map_err(PumpError::Read)?;
        let mut episode = if bulk {
            Episode::Bulk
        } else {
            copy_episode(ctx, sfd, dst, dfd, counter, moved).await?
        };
        if let Episode::Bulk = episode {
            let before = moved.get();
            episode = match ctx.pools.take_pipe(ctx.stats) {
                Some(pipe) => splice_episode(ctx, sfd, dst, dfd, pipe, counter, moved).await?,
                None => copy_episode(ctx, sfd, dst, dfd, counter, moved).await?,
            };
            // Adaptive: a burst smaller than one buffer is not bulk; go back to copying.
            if ctx.mode == CopyMode::Adaptive {
                bulk = moved.get() - before >= ctx.pools.buffer_size as u64;
            }
        }
        match episode {
            Episode::Eof => {
                sys::shutdown_write(dfd);
                return Ok(());
            }
            Episode::Wait | Episode::Bulk => {}
        }
    }
}

/// Move what `sfd` has through a pooled buffer.
async fn copy_episode(
    ctx: RelayCtx<'_>,
    sfd: RawFd,
    dst: &TcpStream,
    dfd: RawFd,
    counter: &Counter,
    moved: &Cell<u64>,
) -> Result<Episode, PumpError> {
    let mut buf = ctx.pools.take_buf();
    let mut budget = EPISODE_BUDGET;
    let result = loop {
        match sys::recv(sfd, &mut buf) {
            Ok(0) => break Ok(Episode::Eof),
            Ok(n) => {
                if let Err(e) = write_all(dst, dfd, &buf[..n]).await {
                    break Err(PumpError::Write(e));
                }
                counter.add(n as u64);
                moved.set(moved.get() + n as u64);
                if n < buf.len() {
                    // A short read drained the socket; do not spend a syscall to learn EAGAIN.
                    break Ok(Episode::Wait);
                }
                if ctx.mode == CopyMode::Adaptive {
                    break Ok(Episode::Bulk);
                }
                budget = budget.saturating_sub(n);
                if budget == 0 {
                    break Ok(Episode::Wait);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(Episode::Wait),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => break Err(PumpError::Read(e)),
        }
    };
    ctx.stats.copy_transfers.inc();
    ctx.pools.give_buf(buf);
    result
}

async fn write_all(dst: &TcpStream, dfd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match sys::send(dfd, data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => dst.writable(false).await?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Move what `sfd` has through a pooled pipe, with splice on both sides.
async fn splice_episode(
    ctx: RelayCtx<'_>,
    sfd: RawFd,
    dst: &TcpStream,
    dfd: RawFd,
    pipe: Pipe,
    counter: &Counter,
    moved: &Cell<u64>,
) -> Result<Episode, PumpError> {
    let (pr, pw) = (pipe.r.as_raw_fd(), pipe.w.as_raw_fd());
    let mut budget = EPISODE_BUDGET;
    ctx.stats.splice_transfers.inc();
    loop {
        let n = match sys::splice(sfd, pw, ctx.pools.pipe_size) {
            Ok(0) => {
                ctx.pools.give_pipe(pipe);
                return Ok(Episode::Eof);
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                ctx.pools.give_pipe(pipe);
                return Ok(Episode::Wait);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                // Nothing entered the pipe: it is still clean.
                ctx.pools.give_pipe(pipe);
                return Err(PumpError::Read(e));
            }
        };
        let mut left = n;
        while left > 0 {
            match sys::splice(pr, dfd, left) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // Destination full. (A pipe that is empty cannot give WouldBlock here since
                    // `left` bytes are in it.)
                    if let Err(e) = dst.writable(false).await {
                        return Err(PumpError::Write(e)); // the pipe holds bytes: drop it
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(PumpError::Write(e)), // the pipe holds bytes: drop it
            }
        }
        counter.add(n as u64);
        moved.set(moved.get() + n as u64);
        budget = budget.saturating_sub(n);
        if budget == 0 {
            ctx.pools.give_pipe(pipe);
            return Ok(Episode::Wait);
        }
    }
}
