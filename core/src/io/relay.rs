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
use std::pin::{pin, Pin};
use std::task::Poll;

use monoio::net::TcpStream;

use crate::config::CopyMode;
use crate::io::sys::{self, Pipe};
use crate::reason::Reason;
use crate::telemetry::stats::{Counter, WorkerStats};

/// Bytes moved in one readiness episode before a pump yields to other connections.
pub(crate) const EPISODE_BUDGET: usize = 4 * 1024 * 1024;

/// Size of the buffers the mesh TLS relay reads into: four full TLS records with their headers and
/// tags, so that one read and one send move four records (with 16 KiB buffers the relay spent a
/// sixth more CPU per GB).
pub const TLS_BUFFER_SIZE: usize =
    crate::io::tls_relay::SEAL_SLOTS * crate::tls::record::MAX_SEALED;

/// Per-worker pools of pipes and copy buffers.
#[derive(Debug)]
pub struct Pools {
    pipes: RefCell<Vec<Pipe>>,
    bufs: RefCell<Vec<Box<[u8]>>>,
    tls_bufs: RefCell<Vec<Box<[u8]>>>,
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
            tls_bufs: RefCell::new(Vec::new()),
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

    pub(crate) fn take_buf(&self) -> Box<[u8]> {
        self.bufs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0u8; self.buffer_size].into_boxed_slice())
    }

    pub(crate) fn give_buf(&self, b: Box<[u8]>) {
        let mut bufs = self.bufs.borrow_mut();
        if bufs.len() < self.max_idle {
            bufs.push(b);
        }
    }

    /// A buffer for the TLS relay ([`TLS_BUFFER_SIZE`], or the copy buffer size when larger).
    pub(crate) fn take_tls_buf(&self) -> Box<[u8]> {
        self.tls_bufs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0u8; TLS_BUFFER_SIZE.max(self.buffer_size)].into_boxed_slice())
    }

    pub(crate) fn give_tls_buf(&self, b: Box<[u8]>) {
        // A quarter as many kept as copy buffers: they are four times larger.
        let mut bufs = self.tls_bufs.borrow_mut();
        if bufs.len() < self.max_idle / 4 {
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
    /// The worker's idle clock (`None`: no idle timeout): a connection on which no byte moved
    /// for `IDLE_TICKS` ticks is closed.
    pub idle: Option<&'a crate::io::worker::Signal>,
}

/// Relay between `client` and `upstream` until both directions end or one fails.
pub async fn relay(ctx: RelayCtx<'_>, client: &TcpStream, upstream: &TcpStream) -> RelayEnd {
    let up_bytes = Cell::new(0u64);
    let down_bytes = Cell::new(0u64);
    let ctx = &ctx;
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
    // Boxed, and only when configured: a timer is the largest thing a connection would otherwise
    // carry for its whole life.
    // No timer per connection: the worker ticks, the connection only counts quiet ticks (inline,
    // and small: it lives as long as the connection).
    let mut idle = ctx.idle.map(IdleWatch::new);
    let mut up = Some(up);
    let mut down = Some(down);

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
        if let Some(idle) = idle.as_mut() {
            if idle.poll_idle(cx, up_bytes.get() + down_bytes.get()) {
                return Poll::Ready(Some(Reason::IdleTimeout));
            }
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

/// Counts the ticks of the worker's idle clock during which no byte moved.
pub(crate) struct IdleWatch<'a> {
    tick: crate::io::worker::Fired<'a>,
    /// Bytes moved at the last tick.
    last: u64,
    /// Ticks in a row without a byte.
    quiet: u32,
}

impl<'a> IdleWatch<'a> {
    /// Start counting at the worker's next tick.
    pub(crate) fn new(tick: &'a crate::io::worker::Signal) -> Self {
        IdleWatch {
            tick: tick.next(),
            last: 0,
            quiet: 0,
        }
    }

    /// True once no byte moved for `IDLE_TICKS` ticks; `moved` is the bytes moved so far.
    pub(crate) fn poll_idle(&mut self, cx: &mut std::task::Context<'_>, moved: u64) -> bool {
        while Pin::new(&mut self.tick).poll(cx).is_ready() {
            if moved == self.last {
                self.quiet += 1;
                if self.quiet >= crate::io::worker::IDLE_TICKS {
                    return true;
                }
            } else {
                self.last = moved;
                self.quiet = 0;
            }
            self.tick = self.tick.again();
        }
        false
    }
}

/// What a pump holds between pulling bytes from the source and pushing them to the destination.
/// Buffers and pipes are taken from the pools for a burst and given back before the pump waits for
/// the source again, so an idle direction holds nothing.
struct Hold {
    buf: Option<Box<[u8]>>,
    /// Bytes `buf[start..end]` still to be written.
    start: usize,
    end: usize,
    pipe: Option<Pipe>,
    /// Bytes in `pipe` still to be written.
    in_pipe: usize,
}

impl Hold {
    fn release(&mut self, pools: &Pools) {
        debug_assert!(self.start == self.end && self.in_pipe == 0);
        if let Some(b) = self.buf.take() {
            pools.give_buf(b);
        }
        if let Some(p) = self.pipe.take() {
            pools.give_pipe(p);
        }
    }

    /// Write what is held. `Ok(true)`: all written; `Ok(false)`: the destination is full.
    fn flush(&mut self, dfd: RawFd) -> io::Result<bool> {
        while self.start < self.end {
            let buf = self.buf.as_ref().expect("bytes are held in a buffer");
            match sys::send(dfd, &buf[self.start..self.end]) {
                Ok(n) => self.start += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        while self.in_pipe > 0 {
            let pipe = self.pipe.as_ref().expect("bytes are held in a pipe");
            match sys::splice(pipe.r.as_raw_fd(), dfd, self.in_pipe) {
                Ok(n) => self.in_pipe -= n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        // A pipe that may still hold bytes must not go back to a pool: `Hold` is only dropped with
        // a pipe when the pump failed or was cancelled, and then the pipe is closed here.
        self.pipe.take();
    }
}

/// What one attempt to pull from the source gave.
enum Pull {
    /// Bytes are held, ready to be written. `drained`: a short read emptied the socket.
    Bytes { n: usize, drained: bool },
    /// Nothing to read now.
    Empty,
    /// End of stream.
    Eof,
}

/// One direction: `src` → `dst` until EOF (then half-close `dst`) or an error.
///
/// Written as one loop with two await points (source readable, destination writable) so that the
/// future stays small: it lives for the whole connection, twice per connection.
async fn pump(
    ctx: &RelayCtx<'_>,
    src: &TcpStream,
    dst: &TcpStream,
    counter: &Counter,
    moved: &Cell<u64>,
) -> Result<(), PumpError> {
    let (sfd, dfd) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut hold = Hold {
        buf: None,
        start: 0,
        end: 0,
        pipe: None,
        in_pipe: 0,
    };
    let mut bulk = ctx.mode == CopyMode::Splice;
    // Bytes moved since the source was last found empty, and since the pump last yielded.
    let mut burst = 0usize;
    let mut budget = EPISODE_BUDGET;
    let mut must_wait = true;
    loop {
        if must_wait {
            hold.release(ctx.pools);
            if ctx.mode == CopyMode::Adaptive && bulk && burst < ctx.pools.buffer_size {
                // The last burst was small: go back to copying through a buffer.
                bulk = false;
            }
            burst = 0;
            budget = EPISODE_BUDGET;
            src.readable(false).await.map_err(PumpError::Read)?;
        }
        let pulled = if bulk {
            pull_splice(ctx, sfd, &mut hold)
        } else {
            pull_copy(ctx, sfd, &mut hold)
        };
        match pulled.map_err(PumpError::Read)? {
            Pull::Empty => {
                must_wait = true;
                continue;
            }
            Pull::Eof => {
                hold.release(ctx.pools);
                sys::shutdown_write(dfd);
                return Ok(());
            }
            Pull::Bytes { n, drained } => {
                while !hold.flush(dfd).map_err(PumpError::Write)? {
                    dst.writable(false).await.map_err(PumpError::Write)?;
                }
                counter.add(n as u64);
                moved.set(moved.get() + n as u64);
                crate::io::worker::touch();
                burst += n;
                budget = budget.saturating_sub(n);
                if ctx.mode == CopyMode::Adaptive && !bulk && !drained {
                    // A full buffer: the transfer is bulk, splice the rest.
                    bulk = true;
                }
                // After a short read the socket is empty: wait rather than spend a syscall to learn
                // it. After the budget: wait too, so other connections on this worker get a turn.
                must_wait = drained || budget == 0;
            }
        }
    }
}

/// Read what the source has into a pooled buffer.
fn pull_copy(ctx: &RelayCtx<'_>, sfd: RawFd, hold: &mut Hold) -> io::Result<Pull> {
    let buf = hold.buf.get_or_insert_with(|| ctx.pools.take_buf());
    loop {
        return match sys::recv(sfd, buf) {
            Ok(0) => Ok(Pull::Eof),
            Ok(n) => {
                ctx.stats.copy_transfers.inc();
                hold.start = 0;
                hold.end = n;
                Ok(Pull::Bytes {
                    n,
                    drained: n < buf.len(),
                })
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(Pull::Empty),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
    }
}

/// Splice what the source has into a pooled pipe (or copy when no pipe can be had).
fn pull_splice(ctx: &RelayCtx<'_>, sfd: RawFd, hold: &mut Hold) -> io::Result<Pull> {
    if hold.pipe.is_none() {
        match ctx.pools.take_pipe(ctx.stats) {
            Some(p) => hold.pipe = Some(p),
            None => return pull_copy(ctx, sfd, hold),
        }
    }
    let pipe = hold.pipe.as_ref().expect("a pipe is held");
    loop {
        return match sys::splice(sfd, pipe.w.as_raw_fd(), ctx.pools.pipe_size) {
            Ok(0) => Ok(Pull::Eof),
            Ok(n) => {
                ctx.stats.splice_transfers.inc();
                hold.in_pipe = n;
                // A splice can stop short of the pipe's size with more data queued (page
                // boundaries), so only EAGAIN says the socket is empty.
                Ok(Pull::Bytes { n, drained: false })
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(Pull::Empty),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
    }
}
