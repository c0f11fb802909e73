//! Relaying between a plaintext socket and a mesh-TLS socket, driving rustls's sans-IO connection
//! from the worker: the event loop says when a socket is ready, `read_tls`/`write_tls` move records
//! with non-blocking `recv`/`send`, and the plaintext side reuses the pump's pooled buffer.
//!
//! Both directions share one rustls connection (`RefCell`, never borrowed across an await). Close
//! semantics match the plaintext relay: plaintext EOF becomes `close_notify` plus `shutdown(SHUT_WR)`
//! on the TLS socket; `close_notify` from the TLS side becomes `shutdown(SHUT_WR)` on
//! the plaintext socket; any error resets both.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io::{self, BufRead, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use monoio::net::TcpStream;

use crate::io::flush_gate::FlushGate;
use crate::io::relay::{IdleWatch, RelayCtx, EPISODE_BUDGET};
use crate::io::sys;
use crate::reason::Reason;

/// Time allowed for a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A raw socket as `Read`/`Write` for rustls (non-blocking).
struct Fd(RawFd);

impl Read for Fd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sys::recv(self.0, buf)
    }
}

impl Write for Fd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sys::send(self.0, buf)
    }
    /// rustls hands over every pending record at once: one `sendmsg` sends them all (the default
    /// would send one record per system call).
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        sys::send_vectored(self.0, bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a TLS leg failed.
#[derive(Debug)]
pub enum TlsFailure {
    /// rustls refused something (mapped to a reason with [`crate::tls::reason_for`]).
    Tls(rustls::Error),
    /// The socket failed or closed during the handshake.
    Io(io::Error),
    /// The handshake did not finish in time.
    Timeout,
}

impl TlsFailure {
    /// The failure reason code.
    pub fn reason(&self, peer_is_upstream: bool) -> Reason {
        match self {
            TlsFailure::Tls(e) => crate::tls::reason_for(e),
            TlsFailure::Io(_) | TlsFailure::Timeout if peer_is_upstream => Reason::UpstreamReset,
            TlsFailure::Io(_) | TlsFailure::Timeout => Reason::DownstreamReset,
        }
    }
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsFailure::Tls(e) => write!(f, "{e}"),
            TlsFailure::Io(e) => write!(f, "{e}"),
            TlsFailure::Timeout => write!(f, "TLS handshake timed out after {HANDSHAKE_TIMEOUT:?}"),
        }
    }
}

/// Write every pending TLS record.
async fn flush(conn: &RefCell<rustls::Connection>, sock: &TcpStream) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    loop {
        if !conn.borrow().wants_write() {
            return Ok(());
        }
        let r = conn.borrow_mut().write_tls(&mut Fd(fd));
        match r {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => sock.writable(false).await?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// One flusher at a time for the TLS socket. Both pumps produce TLS records (data one way, key
/// updates and tickets the other); only one of them may wait for the socket to become writable,
/// since the epoll driver keeps a single waiter per direction and a second one would never wake.
/// The other waits for the turn until the flusher is done, then flushes what is left ([`FlushGate`],
/// loom-checked).
///
/// The decrypting pump must never wait for the TLS socket to become writable: it would stop reading
/// while the peer proxy, symmetrically, waits for us to read — a deadlock under bidirectional bulk
/// load. It only tries a non-blocking flush and, if records remain, kicks the drainer (a third
/// future of the relay) to wait for writability on its behalf.
#[derive(Default)]
struct TlsOut {
    gate: FlushGate,
}

impl TlsOut {
    /// Write what can be written now; if records remain, have the drainer finish the job.
    fn try_flush(&self, conn: &RefCell<rustls::Connection>, sock: &TcpStream) -> io::Result<()> {
        let fd = sock.as_raw_fd();
        while !self.gate.is_busy() && conn.borrow().wants_write() {
            let r = conn.borrow_mut().write_tls(&mut Fd(fd));
            match r {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if conn.borrow().wants_write() {
            self.gate.kick();
        }
        Ok(())
    }

    /// The drainer: flush (waiting for writability) whenever kicked; the relay drops it when both
    /// pumps are done.
    async fn drain(&self, conn: &RefCell<rustls::Connection>, sock: &TcpStream) -> io::Result<()> {
        loop {
            if self.gate.kicked().await {
                self.flush(conn, sock).await?;
            } else {
                // Closed: the relay never closes its gate (it drops the drainer instead), and a
                // drainer must not finish while the relay polls it.
                std::future::pending::<()>().await;
            }
        }
    }

    async fn flush(&self, conn: &RefCell<rustls::Connection>, sock: &TcpStream) -> io::Result<()> {
        let _turn = self.gate.turn().await;
        flush(conn, sock).await
    }
}

/// Drive the handshake to completion (or failure, after sending any alert).
pub async fn handshake(
    conn: &RefCell<rustls::Connection>,
    sock: &TcpStream,
) -> Result<(), TlsFailure> {
    let work = async {
        let fd = sock.as_raw_fd();
        loop {
            flush(conn, sock).await.map_err(TlsFailure::Io)?;
            if !conn.borrow().is_handshaking() {
                return Ok(());
            }
            sock.readable(false).await.map_err(TlsFailure::Io)?;
            let r = conn.borrow_mut().read_tls(&mut Fd(fd));
            match r {
                Ok(0) => return Err(TlsFailure::Io(ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    continue
                }
                Err(e) => return Err(TlsFailure::Io(e)),
            }
            let processed = conn.borrow_mut().process_new_packets().map(|_| ());
            if let Err(e) = processed {
                // Send the alert rustls queued before giving up.
                let _ = flush(conn, sock).await;
                return Err(TlsFailure::Tls(e));
            }
        }
    };
    match monoio::time::timeout(HANDSHAKE_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(TlsFailure::Timeout),
    }
}

/// How a TLS relay ended.
#[derive(Debug)]
pub struct TlsRelayEnd {
    /// Plaintext bytes plain → TLS.
    pub sealed: u64,
    /// Plaintext bytes TLS → plain.
    pub opened: u64,
    /// `None` for a clean end; else the reason (and the TLS error, if any).
    pub failure: Option<(Reason, Option<rustls::Error>)>,
}

/// Relay between `plain` and `tls` (whose handshake is done). `tls_is_upstream` says which side
/// failures are attributed to.
pub async fn relay(
    ctx: &RelayCtx<'_>,
    plain: &TcpStream,
    tls: &TcpStream,
    conn: &RefCell<rustls::Connection>,
    tls_is_upstream: bool,
) -> TlsRelayEnd {
    let sealed = Cell::new(0u64);
    let opened = Cell::new(0u64);
    let (seal_counter, open_counter) = if tls_is_upstream {
        (
            &ctx.stats.downstream_cx_rx_bytes_total,
            &ctx.stats.downstream_cx_tx_bytes_total,
        )
    } else {
        (
            &ctx.stats.downstream_cx_tx_bytes_total,
            &ctx.stats.downstream_cx_rx_bytes_total,
        )
    };
    let out = TlsOut::default();
    // True while the decrypting pump holds bytes read from the socket that rustls has not taken yet:
    // reading the socket again then would skip them.
    let feeding = Cell::new(false);
    let mut a = Some(pin!(seal(
        ctx,
        plain,
        tls,
        conn,
        &out,
        &sealed,
        seal_counter
    )));
    let mut b = Some(pin!(open(
        ctx,
        tls,
        plain,
        conn,
        &out,
        &opened,
        open_counter,
        &feeding
    )));
    let mut drainer = pin!(out.drain(conn, tls));
    // The same idle clock as the plaintext relay: no timer per connection.
    let mut idle = ctx.idle.map(IdleWatch::new);
    let (plain_side, tls_side) = if tls_is_upstream {
        (Reason::DownstreamReset, Reason::UpstreamReset)
    } else {
        (Reason::UpstreamReset, Reason::DownstreamReset)
    };
    let failure = poll_fn(|cx| {
        if let Some(f) = a.as_mut() {
            if let Poll::Ready(r) = f.as_mut().poll(cx) {
                a = None;
                if let Err(e) = r {
                    return Poll::Ready(Some(e.classify(plain_side, tls_side)));
                }
            }
        }
        if let Some(f) = b.as_mut() {
            if let Poll::Ready(r) = f.as_mut().poll(cx) {
                b = None;
                if let Err(e) = r {
                    return Poll::Ready(Some(e.classify(plain_side, tls_side)));
                }
            }
        }
        if a.is_none() && b.is_none() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(Err(e)) = drainer.as_mut().poll(cx) {
            return Poll::Ready(Some(LegError::TlsIo(e).classify(plain_side, tls_side)));
        }
        if let Some(idle) = idle.as_mut() {
            if idle.poll_idle(cx, sealed.get() + opened.get()) {
                return Poll::Ready(Some((Reason::IdleTimeout, None)));
            }
        }
        Poll::Pending
    })
    .await;
    // A reset from the TLS peer often follows an alert that says why (access_denied, an expired
    // certificate): read what is still queued and prefer the alert's reason.
    let failure = match failure {
        Some((r, None)) if r == tls_side && !feeding.get() => {
            Some(pending_alert(conn, tls).unwrap_or((r, None)))
        }
        f => f,
    };
    if failure.is_some() {
        sys::set_linger_zero(plain.as_raw_fd());
        sys::set_linger_zero(tls.as_raw_fd());
    }
    TlsRelayEnd {
        sealed: sealed.get(),
        opened: opened.get(),
        failure,
    }
}

/// A TLS alert still queued on the socket, as a failure reason.
fn pending_alert(
    conn: &RefCell<rustls::Connection>,
    tls: &TcpStream,
) -> Option<(Reason, Option<rustls::Error>)> {
    let fd = tls.as_raw_fd();
    for _ in 0..16 {
        let r = conn.borrow_mut().read_tls(&mut Fd(fd));
        match r {
            Ok(n) if n > 0 => {
                let processed = conn.borrow_mut().process_new_packets().map(|_| ());
                if let Err(e) = processed {
                    return Some((crate::tls::reason_for(&e), Some(e)));
                }
            }
            _ => return None,
        }
    }
    None
}

enum LegError {
    Plain(io::Error),
    TlsIo(io::Error),
    Tls(rustls::Error),
}

impl LegError {
    fn classify(self, plain_side: Reason, tls_side: Reason) -> (Reason, Option<rustls::Error>) {
        match self {
            LegError::Plain(e) => {
                tracing::debug!(error = %e, "plaintext side failed");
                (plain_side, None)
            }
            LegError::TlsIo(e) => {
                tracing::debug!(error = %e, "TLS side failed");
                (tls_side, None)
            }
            LegError::Tls(e) => {
                let r = crate::tls::reason_for(&e);
                (
                    if r == Reason::TlsHandshakeFailed {
                        tls_side
                    } else {
                        r
                    },
                    Some(e),
                )
            }
        }
    }
}

/// plain → TLS: encrypt what the plaintext side sends.
///
/// After a read that filled the buffer, more is most likely queued: the pump reads again at once
/// (up to the episode budget) instead of asking the event loop whether the socket is readable.
async fn seal(
    ctx: &RelayCtx<'_>,
    plain: &TcpStream,
    tls: &TcpStream,
    conn: &RefCell<rustls::Connection>,
    out: &TlsOut,
    moved: &Cell<u64>,
    counter: &crate::telemetry::stats::Counter,
) -> Result<(), LegError> {
    let pfd = plain.as_raw_fd();
    let mut must_wait = true;
    let mut budget = 0usize;
    loop {
        if must_wait || budget == 0 {
            plain.readable(false).await.map_err(LegError::Plain)?;
            budget = EPISODE_BUDGET;
        }
        let mut buf = ctx.pools.take_tls_buf();
        let r = loop {
            match sys::recv(pfd, &mut buf) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        match r {
            Ok(0) => {
                ctx.pools.give_tls_buf(buf);
                conn.borrow_mut().send_close_notify();
                out.flush(conn, tls).await.map_err(LegError::TlsIo)?;
                sys::shutdown_write(tls.as_raw_fd());
                return Ok(());
            }
            Ok(n) => {
                let w = conn.borrow_mut().writer().write_all(&buf[..n]);
                must_wait = n < buf.len();
                ctx.pools.give_tls_buf(buf);
                w.map_err(LegError::TlsIo)?;
                out.flush(conn, tls).await.map_err(LegError::TlsIo)?;
                counter.add(n as u64);
                moved.set(moved.get() + n as u64);
                budget = budget.saturating_sub(n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                ctx.pools.give_tls_buf(buf);
                must_wait = true;
            }
            Err(e) => {
                ctx.pools.give_tls_buf(buf);
                return Err(LegError::Plain(e));
            }
        }
    }
}

/// TLS → plain: decrypt what the TLS side sends.
///
/// The socket is read in buffer-sized chunks and the chunk is fed to rustls from memory (rustls
/// reads at most 4 KiB per `read_tls`, which straight from the socket would be four system calls
/// per record); decrypted bytes go to the plaintext socket straight from rustls's buffer.
#[allow(clippy::too_many_arguments)]
async fn open(
    ctx: &RelayCtx<'_>,
    tls: &TcpStream,
    plain: &TcpStream,
    conn: &RefCell<rustls::Connection>,
    out: &TlsOut,
    moved: &Cell<u64>,
    counter: &crate::telemetry::stats::Counter,
    feeding: &Cell<bool>,
) -> Result<(), LegError> {
    let tfd = tls.as_raw_fd();
    let pfd = plain.as_raw_fd();
    // The handshake may have read application data along with the peer's last handshake message
    // (a client sends its first request right behind its Finished): deliver what rustls already
    // holds before waiting for the socket, or a request-response protocol would stall here.
    if deliver(conn, plain, pfd, moved, counter).await? {
        sys::shutdown_write(pfd);
        return Ok(());
    }
    let mut must_wait = true;
    let mut budget = 0usize;
    loop {
        if must_wait || budget == 0 {
            tls.readable(false).await.map_err(LegError::TlsIo)?;
            budget = EPISODE_BUDGET;
        }
        let mut buf = ctx.pools.take_tls_buf();
        let n = match sys::recv(tfd, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                ctx.pools.give_tls_buf(buf);
                match e.kind() {
                    ErrorKind::WouldBlock => must_wait = true,
                    ErrorKind::Interrupted => must_wait = false,
                    _ => return Err(LegError::TlsIo(e)),
                }
                continue;
            }
        };
        must_wait = n < buf.len();
        budget = budget.saturating_sub(n);
        feeding.set(true);
        let fed = feed(conn, plain, tls, out, &buf[..n], pfd, moved, counter).await;
        feeding.set(false);
        ctx.pools.give_tls_buf(buf);
        // A clean close (close_notify, every byte delivered) or the end of the TCP stream (a cut
        // without close_notify fails in `deliver` before this).
        if fed? || n == 0 {
            sys::shutdown_write(pfd);
            return Ok(());
        }
    }
}

/// Feed `chunk` read from the TLS socket (empty: the TCP stream ended) to rustls, delivering the
/// plaintext as records complete. `Ok(true)`: the peer closed the TLS stream cleanly.
#[allow(clippy::too_many_arguments)]
async fn feed(
    conn: &RefCell<rustls::Connection>,
    plain: &TcpStream,
    tls: &TcpStream,
    out: &TlsOut,
    mut chunk: &[u8],
    pfd: RawFd,
    moved: &Cell<u64>,
    counter: &crate::telemetry::stats::Counter,
) -> Result<bool, LegError> {
    let eof = chunk.is_empty();
    loop {
        let r = conn.borrow_mut().read_tls(&mut chunk);
        // `Ok(0)` with bytes left: a close_notify came before them, and they are not read.
        let stalled = matches!(r, Ok(0)) && !eof;
        r.map_err(LegError::TlsIo)?;
        let processed = conn.borrow_mut().process_new_packets().map(|_| ());
        if let Err(e) = processed {
            // Send the alert if it can go now; the connection is failing anyway.
            let _ = out.try_flush(conn, tls);
            return Err(LegError::Tls(e));
        }
        let closed = deliver(conn, plain, pfd, moved, counter).await?;
        // Records the peer's messages asked for (key updates, tickets) go out without this pump
        // ever waiting for the TLS socket (see `TlsOut`).
        out.try_flush(conn, tls).map_err(LegError::TlsIo)?;
        if closed || stalled || chunk.is_empty() {
            return Ok(closed);
        }
    }
}

/// Send every decrypted byte rustls holds to the plaintext side, from rustls's own buffer.
/// `Ok(true)`: the peer closed the TLS stream cleanly and everything was delivered.
async fn deliver(
    conn: &RefCell<rustls::Connection>,
    plain: &TcpStream,
    pfd: RawFd,
    moved: &Cell<u64>,
    counter: &crate::telemetry::stats::Counter,
) -> Result<bool, LegError> {
    loop {
        let sent = {
            let mut c = conn.borrow_mut();
            let mut reader = c.reader();
            match reader.fill_buf() {
                Ok([]) => return Ok(true),
                Ok(data) => {
                    let r = sys::send(pfd, data);
                    if let Ok(n) = r {
                        reader.consume(n);
                    }
                    r
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                // TCP closed without close_notify: the stream was cut, and a cut must not look
                // complete on the other side (a truncated response would pass for a whole one):
                // it fails, and the plaintext side gets a reset instead of a FIN.
                Err(e) => return Err(LegError::TlsIo(e)),
            }
        };
        match sent {
            Ok(n) => {
                counter.add(n as u64);
                moved.set(moved.get() + n as u64);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                plain.writable(false).await.map_err(LegError::Plain)?
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(LegError::Plain(e)),
        }
    }
}
