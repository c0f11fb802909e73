//! Relaying between a plaintext socket and a mesh-TLS socket.
//!
//! The handshake is rustls's, driven through its unbuffered (sans-IO) connection: the event loop
//! says when the socket is ready, the bytes move with non-blocking `recv`/`send`. Once it is done
//! the relay takes the traffic secrets and protects records itself ([`crate::tls::record`]), in
//! its own buffers: received records are decrypted where they landed and their plaintext goes out
//! from there in one `sendmsg`; plaintext is received (one `recvmsg`) straight into the slots of
//! the records that will carry it, sealed there and sent in one `send`. No byte is copied in user
//! space on either way.
//!
//! Only the sealing pump writes to the TLS socket (the key update a peer asks for goes out before
//! its next record), so neither pump ever waits for the other. Close semantics match the plaintext
//! relay: plaintext EOF becomes `close_notify` plus `shutdown(SHUT_WR)` on the TLS socket;
//! `close_notify` from the TLS side becomes `shutdown(SHUT_WR)` on the plaintext socket; a TLS
//! stream that ends without `close_notify` was cut, and any error resets both.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io::{self, ErrorKind, IoSlice, IoSliceMut};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use monoio::net::TcpStream;

use crate::io::relay::{IdleWatch, Pools, RelayCtx, EPISODE_BUDGET};
use crate::io::sys;
use crate::policy::identity::SpiffeId;
use crate::reason::Reason;
use crate::tls::record::{self, Opened, Records, MAX_CONTROL, MAX_SEALED};
use crate::tls::session::{Finished, Handshaking, Next};

/// Time allowed for a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Records one read fills on the sealing side (the pool's TLS buffers hold this many).
pub const SEAL_SLOTS: usize = 4;

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

/// A finished handshake: what the relay continues with.
#[derive(Debug)]
pub struct Established {
    records: Records,
    /// The verified peer's SPIFFE ID.
    pub peer: Option<SpiffeId>,
    /// The pooled buffer the handshake was read into, holding what was read behind the handshake
    /// (the start of a record not complete yet), if anything.
    carry: Option<Held>,
    /// Application data rustls decrypted along with the handshake (a client's first bytes right
    /// behind its Finished).
    early: Vec<u8>,
}

/// Drive the handshake to completion (or failure, after sending any alert). The peer's flights
/// are read into a pooled relay buffer, which the relay goes on with.
pub async fn handshake(
    session: Handshaking,
    sock: &TcpStream,
    pools: &Pools,
) -> Result<Established, TlsFailure> {
    let mut buf = pools.take_tls_buf();
    let r = monoio::time::timeout(HANDSHAKE_TIMEOUT, drive(session, sock, &mut buf)).await;
    let r = match r {
        Ok(r) => r,
        Err(_) => Err(TlsFailure::Timeout),
    };
    match r {
        Ok((f, filled)) => Ok(Established {
            records: f.records,
            peer: f.peer,
            carry: if filled > 0 {
                Some(Held {
                    buf,
                    start: 0,
                    filled,
                })
            } else {
                pools.give_tls_buf(buf);
                None
            },
            early: f.early,
        }),
        Err(e) => {
            pools.give_tls_buf(buf);
            Err(e)
        }
    }
}

/// The handshake over `sock`, reading into `incoming`; the session and how many bytes read
/// behind it are left at the start of `incoming`.
async fn drive(
    session: Handshaking,
    sock: &TcpStream,
    incoming: &mut [u8],
) -> Result<(Finished, usize), TlsFailure> {
    let mut hs = session.start();
    let mut filled = 0usize;
    loop {
        let (used, next) = hs.advance(&mut incoming[..filled]);
        incoming.copy_within(used..filled, 0);
        filled -= used;
        match next {
            Next::Send => {
                send_all(sock, hs.outgoing())
                    .await
                    .map_err(TlsFailure::Io)?;
                hs.sent();
            }
            Next::Read => read_more(sock, incoming, &mut filled).await?,
            Next::Done => break,
            Next::Failed(e) => {
                let _ = send_all(sock, hs.outgoing()).await;
                return Err(TlsFailure::Tls(e));
            }
        }
    }
    Ok((hs.finish().map_err(TlsFailure::Tls)?, filled))
}

/// Read what the peer sent next, behind the `filled` bytes held.
async fn read_more(
    sock: &TcpStream,
    incoming: &mut [u8],
    filled: &mut usize,
) -> Result<(), TlsFailure> {
    if *filled == incoming.len() {
        // A flight larger than the relay's buffer (64 KiB; a mesh flight is a few KiB).
        return Err(TlsFailure::Tls(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::MessageTooLarge,
        )));
    }
    loop {
        sock.readable(false).await.map_err(TlsFailure::Io)?;
        match sys::recv(sock.as_raw_fd(), &mut incoming[*filled..]) {
            Ok(0) => return Err(TlsFailure::Io(ErrorKind::UnexpectedEof.into())),
            Ok(n) => {
                *filled += n;
                return Ok(());
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => return Err(TlsFailure::Io(e)),
        }
    }
}

/// Send all of `bytes`, waiting for the socket when it is full.
async fn send_all(sock: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    while !bytes.is_empty() {
        match sys::send(fd, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => sock.writable(false).await?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

/// Received TLS bytes held while the opening pump waits for the socket: records
/// `buf[start..filled]`, the last of them incomplete.
struct Held {
    buf: Box<[u8]>,
    start: usize,
    filled: usize,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("start", &self.start)
            .field("filled", &self.filled)
            .finish()
    }
}

/// What the two pumps share.
struct Shared {
    records: RefCell<Records>,
    /// The sealing pump is in the middle of sending records: nothing else may write to the TLS
    /// socket until it is done.
    sending: Cell<bool>,
    /// The opening pump's bytes while it waits for the TLS socket (for a last look at an alert).
    held: RefCell<Option<Held>>,
    /// The opening pump is delivering plaintext: records are half handled.
    delivering: Cell<bool>,
}

/// Relay between `plain` and `tls` (whose handshake is done). `tls_is_upstream` says which side
/// failures are attributed to.
pub async fn relay(
    ctx: &RelayCtx<'_>,
    plain: &TcpStream,
    tls: &TcpStream,
    est: Established,
    tls_is_upstream: bool,
) -> TlsRelayEnd {
    let Established {
        records,
        carry,
        early,
        ..
    } = est;
    let shared = Shared {
        records: RefCell::new(records),
        sending: Cell::new(false),
        held: RefCell::new(None),
        delivering: Cell::new(false),
    };
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
    let mut a = Some(pin!(seal(ctx, plain, tls, &shared, &sealed, seal_counter)));
    let mut b = Some(pin!(open(
        ctx,
        tls,
        plain,
        &shared,
        (early, carry),
        &opened,
        open_counter,
    )));
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
        Some((r, None)) if r == tls_side && !shared.delivering.get() => {
            Some(pending_alert(ctx, tls, &shared).unwrap_or((r, None)))
        }
        f => f,
    };
    if let Some(h) = shared.held.take() {
        ctx.pools.give_tls_buf(h.buf);
    }
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
    ctx: &RelayCtx<'_>,
    tls: &TcpStream,
    shared: &Shared,
) -> Option<(Reason, Option<rustls::Error>)> {
    let mut h = shared.held.take().unwrap_or_else(|| Held {
        buf: ctx.pools.take_tls_buf(),
        start: 0,
        filled: 0,
    });
    let mut found = None;
    let mut spans = Vec::new();
    for _ in 0..16 {
        match open_in_place(&mut shared.records.borrow_mut(), &mut h, &mut spans) {
            Err(e) => {
                if matches!(e, rustls::Error::AlertReceived(_)) {
                    found = Some((crate::tls::reason_for(&e), Some(e)));
                }
                break;
            }
            Ok(true) => break,
            Ok(false) => spans.clear(),
        }
        h.buf.copy_within(h.start..h.filled, 0);
        h.filled -= h.start;
        h.start = 0;
        match sys::recv(tls.as_raw_fd(), &mut h.buf[h.filled..]) {
            Ok(n) if n > 0 => h.filled += n,
            _ => break,
        }
    }
    ctx.pools.give_tls_buf(h.buf);
    found
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

/// Tell the peer why the connection ends, if the TLS socket is free for it (best effort: the
/// connection is reset right after).
fn send_alert(tls: RawFd, shared: &Shared, e: &rustls::Error) {
    let Some(alert) = record::alert_for(e) else {
        return;
    };
    if shared.sending.get() {
        return;
    }
    let mut out = [0u8; MAX_CONTROL];
    if let Ok(n) = shared.records.borrow_mut().seal_alert(alert, &mut out) {
        let _ = sys::send(tls, &out[..n]);
    }
}

/// Send sealed records; while they go out, nothing else writes to the TLS socket.
async fn send_records(tls: &TcpStream, shared: &Shared, bytes: &[u8]) -> Result<(), LegError> {
    shared.sending.set(true);
    let r = send_all(tls, bytes).await;
    shared.sending.set(false);
    r.map_err(LegError::TlsIo)
}

/// plain → TLS: encrypt what the plaintext side sends.
///
/// Plaintext is received into the payload slots of [`SEAL_SLOTS`] records laid out back to back
/// (header room, 16 KiB, room for the content type and tag), each filled before the next, so the
/// sealed records are contiguous and leave in one `send` (into the first slot alone, with a plain
/// `recv`, until a read fills a whole record). After a read that filled the buffer,
/// more is most likely queued: the pump reads again at once (up to the episode budget) instead
/// of asking the event loop whether the socket is readable.
async fn seal(
    ctx: &RelayCtx<'_>,
    plain: &TcpStream,
    tls: &TcpStream,
    shared: &Shared,
    moved: &Cell<u64>,
    counter: &crate::telemetry::stats::Counter,
) -> Result<(), LegError> {
    let pfd = plain.as_raw_fd();
    let mut must_wait = true;
    let mut budget = 0usize;
    let mut control = [0u8; MAX_CONTROL];
    // The last read filled a whole record: read several at once.
    let mut bulk = false;
    loop {
        if must_wait || budget == 0 {
            plain.readable(false).await.map_err(LegError::Plain)?;
            budget = EPISODE_BUDGET;
        }
        let mut buf = ctx.pools.take_tls_buf();
        let r = if !bulk {
            // Messages smaller than a record (request-response traffic): one plain `recv` into
            // the first slot costs the kernel less than a scattered one.
            let slot = &mut buf[record::HEADER..record::HEADER + record::MAX_PLAINTEXT];
            loop {
                match sys::recv(pfd, slot) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    r => break r,
                }
            }
        } else {
            let mut slots = buf.chunks_exact_mut(MAX_SEALED);
            let mut iov: [IoSliceMut<'_>; SEAL_SLOTS] = std::array::from_fn(|_| {
                let slot = slots.next().expect("a TLS buffer holds SEAL_SLOTS records");
                IoSliceMut::new(&mut slot[record::HEADER..record::HEADER + record::MAX_PLAINTEXT])
            });
            loop {
                match sys::recv_vectored(pfd, &mut iov) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    r => break r,
                }
            }
        };
        let n = match r {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                ctx.pools.give_tls_buf(buf);
                must_wait = true;
                continue;
            }
            Err(e) => {
                ctx.pools.give_tls_buf(buf);
                return Err(LegError::Plain(e));
            }
        };
        if n == 0 {
            ctx.pools.give_tls_buf(buf);
            let k = shared
                .records
                .borrow_mut()
                .seal_close_notify(&mut control)
                .map_err(LegError::Tls)?;
            send_records(tls, shared, &control[..k]).await?;
            sys::shutdown_write(tls.as_raw_fd());
            return Ok(());
        }
        let room = if bulk {
            SEAL_SLOTS * record::MAX_PLAINTEXT
        } else {
            record::MAX_PLAINTEXT
        };
        must_wait = n < room;
        bulk = n == room;
        budget = budget.saturating_sub(n);
        // A key update the peer asked for (or our key's limit) goes before the data.
        let due = shared.records.borrow_mut().seal_due(&mut control);
        match due {
            Ok(0) => {}
            Ok(k) => send_records(tls, shared, &control[..k]).await?,
            Err(e) => {
                ctx.pools.give_tls_buf(buf);
                return Err(LegError::Tls(e));
            }
        }
        let wire = match seal_in_place(&mut shared.records.borrow_mut(), &mut buf, n) {
            Ok(w) => w,
            Err(e) => {
                ctx.pools.give_tls_buf(buf);
                return Err(LegError::Tls(e));
            }
        };
        let sent = send_records(tls, shared, &buf[..wire]).await;
        ctx.pools.give_tls_buf(buf);
        sent?;
        counter.add(n as u64);
        moved.set(moved.get() + n as u64);
        crate::io::worker::touch();
    }
}

/// TLS → plain: decrypt what the TLS side sends.
///
/// The socket is read into a buffer of several records; every complete record is opened where it
/// lies, and their plaintexts go to the plaintext socket together. An incomplete record stays for
/// the next read (moved to the front only when the room behind it is less than a record).
async fn open(
    ctx: &RelayCtx<'_>,
    tls: &TcpStream,
    plain: &TcpStream,
    shared: &Shared,
    (early, carry): (Vec<u8>, Option<Held>),
    moved: &Cell<u64>,
    counter: &crate::telemetry::stats::Counter,
) -> Result<(), LegError> {
    let tfd = tls.as_raw_fd();
    let pfd = plain.as_raw_fd();
    // The handshake may have read application data along with the peer's last handshake message
    // (a client sends its first request right behind its Finished): deliver it before waiting for
    // the socket, or a request-response protocol would stall here.
    if !early.is_empty() {
        shared.delivering.set(true);
        let n = deliver(plain, pfd, &early, std::slice::from_ref(&(0..early.len()))).await?;
        shared.delivering.set(false);
        counter.add(n);
        moved.set(moved.get() + n);
    }
    drop(early);
    if shared.records.borrow().peer_closed() {
        sys::shutdown_write(pfd);
        return Ok(());
    }
    let mut held = carry;
    let mut spans: Vec<Range<usize>> = Vec::new();
    let mut must_wait = true;
    let mut budget = 0usize;
    loop {
        // Open every complete record held.
        if let Some(h) = held.as_mut() {
            let opened = open_in_place(&mut shared.records.borrow_mut(), h, &mut spans);
            let closed = match opened {
                Ok(closed) => closed,
                Err(e) => {
                    send_alert(tfd, shared, &e);
                    return Err(LegError::Tls(e));
                }
            };
            if !spans.is_empty() {
                shared.delivering.set(true);
                let n = deliver(plain, pfd, &h.buf, &spans).await?;
                shared.delivering.set(false);
                spans.clear();
                counter.add(n);
                moved.set(moved.get() + n);
                crate::io::worker::touch();
            }
            if closed {
                // A clean close: close_notify, every byte before it delivered.
                sys::shutdown_write(pfd);
                if let Some(h) = held.take() {
                    ctx.pools.give_tls_buf(h.buf);
                }
                return Ok(());
            }
            if h.start == h.filled {
                (h.start, h.filled) = (0, 0);
            } else if h.buf.len() - h.filled < record::MAX_RECEIVED {
                h.buf.copy_within(h.start..h.filled, 0);
                h.filled -= h.start;
                h.start = 0;
            }
        }
        if must_wait || budget == 0 {
            // Waiting: an empty buffer goes back to the pool (an idle connection holds none);
            // an incomplete record is kept where the relay can look at it if the other way fails.
            match held.take() {
                Some(h) if h.filled == 0 => ctx.pools.give_tls_buf(h.buf),
                h => *shared.held.borrow_mut() = h,
            }
            let ready = tls.readable(false).await;
            held = shared.held.take();
            ready.map_err(LegError::TlsIo)?;
            budget = EPISODE_BUDGET;
        }
        let h = held.get_or_insert_with(|| Held {
            buf: ctx.pools.take_tls_buf(),
            start: 0,
            filled: 0,
        });
        let room = h.buf.len() - h.filled;
        match sys::recv(tfd, &mut h.buf[h.filled..]) {
            // The TCP stream ended without close_notify: it was cut, and a cut must not look
            // complete on the other side (a truncated response would pass for a whole one): it
            // fails, and the plaintext side gets a reset instead of a FIN.
            Ok(0) => {
                return Err(LegError::TlsIo(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the TLS stream ended without close_notify",
                )))
            }
            Ok(n) => {
                h.filled += n;
                must_wait = n < room;
                budget = budget.saturating_sub(n);
            }
            Err(e) => match e.kind() {
                ErrorKind::WouldBlock => must_wait = true,
                ErrorKind::Interrupted => must_wait = false,
                _ => return Err(LegError::TlsIo(e)),
            },
        }
    }
}

/// Seal the `n` bytes received into `buf`'s record slots where they are; returns the length of
/// the records, back to back from the start of `buf`.
fn seal_in_place(records: &mut Records, buf: &mut [u8], n: usize) -> Result<usize, rustls::Error> {
    let mut wire = 0;
    let mut left = n;
    for slot in buf.chunks_exact_mut(MAX_SEALED) {
        let len = left.min(record::MAX_PLAINTEXT);
        if len == 0 {
            break;
        }
        wire += records.seal_data(slot, len)?;
        left -= len;
    }
    Ok(wire)
}

/// Open every complete record held, where it lies, noting where their plaintexts are in
/// `spans`. `Ok(true)`: the peer's close_notify came (what follows it is not read).
fn open_in_place(
    records: &mut Records,
    h: &mut Held,
    spans: &mut Vec<Range<usize>>,
) -> Result<bool, rustls::Error> {
    loop {
        let len = match record::record_len(&h.buf[h.start..h.filled])? {
            Some(len) if h.start + len <= h.filled => len,
            _ => return Ok(false),
        };
        let at = h.start;
        h.start += len;
        match records.open(&mut h.buf[at..at + len])? {
            Opened::Data(r) if !r.is_empty() => spans.push(at + r.start..at + r.end),
            Opened::Data(_) | Opened::Control => {}
            Opened::Closed => return Ok(true),
        }
    }
}

/// Send the `spans` of `data` to the plaintext side, up to 64 in one `sendmsg`; returns the
/// bytes sent.
async fn deliver(
    plain: &TcpStream,
    pfd: RawFd,
    data: &[u8],
    spans: &[Range<usize>],
) -> Result<u64, LegError> {
    let mut total = 0u64;
    if let [one] = spans {
        // One record's plaintext (request-response traffic): a plain `send`.
        let bytes = &data[one.clone()];
        send_all(plain, bytes).await.map_err(LegError::Plain)?;
        total = bytes.len() as u64;
        return Ok(total);
    }
    for group in spans.chunks(64) {
        let mut iov: [IoSlice<'_>; 64] = std::array::from_fn(|i| {
            group
                .get(i)
                .map_or(IoSlice::new(&[]), |r| IoSlice::new(&data[r.clone()]))
        });
        let mut left = &mut iov[..group.len()];
        while !left.is_empty() {
            match sys::send_vectored(pfd, left) {
                Ok(n) => {
                    total += n as u64;
                    IoSlice::advance_slices(&mut left, n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    plain.writable(false).await.map_err(LegError::Plain)?
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(LegError::Plain(e)),
            }
        }
    }
    Ok(total)
}
