//! A fast-path worker: one thread, one monoio runtime (io_uring or epoll), pinned to a core, with
//! its own `SO_REUSEPORT` copy of every listener. A connection is accepted here and served on this
//! thread by the function the server passes in (`conn::serve`); nothing on the path takes a lock.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use monoio::net::{TcpListener, TcpStream, UnixStream};
use tracing::{debug, warn, Instrument};

use crate::config::{DriverKind, ListenerKind};
use crate::decide::spin::IdleSpin;
use crate::io::relay::{Pools, RelayCtx};
use crate::reason::Reason;
use crate::server::Shared;
use crate::telemetry::stats::WorkerStats;

/// Quiet ticks of the idle clock after which a connection is idle (one tick is the idle timeout
/// divided by this): closed between the timeout and a quarter more.
pub(crate) const IDLE_TICKS: u32 = 4;
/// How often a draining worker looks for its last connection to end (or the drain deadline).
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// Back-off after accept() failed for lack of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Idle pipes and buffers a worker keeps for reuse. Pipes beyond it are closed when returned: the
/// kernel charges pipe capacity to the proxy's user (fs.pipe-user-pages-soft, 64 MiB by default),
/// so 2 workers x 64 pipes x 256 KiB stay within it.
const POOL_IDLE: usize = 64;

/// State of one worker, shared by its tasks (single-threaded, hence `Rc` and `Cell`).
pub(crate) struct Worker {
    pub(crate) id: usize,
    pub(crate) shared: Arc<Shared>,
    pub(crate) pools: Pools,
    /// Connections this worker is relaying now.
    active: Cell<usize>,
    /// Sequence for connection ids.
    next_id: Cell<u64>,
    /// The generation of the configuration snapshot this worker last saw.
    config_seen: Cell<u64>,
    /// Fired when the configuration in force changed: connections that must be re-authorized
    /// wait on it.
    config_changed: Signal,
    /// Fired every quarter of the idle timeout: relays count quiet ticks on it instead of each
    /// keeping a timer.
    pub(crate) idle_tick: Signal,
    /// Fired when another thread nudged this worker (see `Shared::nudges`).
    nudged: Signal,
}

/// Something that happens now and then on a worker, and the connections waiting for it. Waiting
/// costs one slot (a waker), no timer; the worker fires it from its own loop, on its own thread
/// (monoio tasks are woken from their own thread only).
#[derive(Debug, Default)]
pub struct Signal {
    /// How many times it fired.
    fired: Cell<u64>,
    /// Waiters' wakers, by slot; freed slots are reused.
    slots: RefCell<Vec<Option<Waker>>>,
    /// Free slots.
    free: RefCell<Vec<u32>>,
}

impl Signal {
    /// Resolves the next time the signal fires.
    pub(crate) fn next(&self) -> Fired<'_> {
        Fired {
            s: self,
            at: self.fired.get(),
            slot: None,
        }
    }

    fn fire(&self) {
        self.fired.set(self.fired.get() + 1);
        for w in self.slots.borrow_mut().iter_mut() {
            if let Some(w) = w.take() {
                w.wake();
            }
        }
    }
}

/// What the relays tell the worker's idle spin ([`crate::decide::spin`]): bytes moved. One per
/// worker thread, so that no connection carries a pointer to it. Touching it costs a counter
/// increment, and a wake-up only when the spinner is parked.
struct Spin {
    touched: Cell<u64>,
    parked: Cell<Option<Waker>>,
}

thread_local! {
    static SPIN: Spin = const {
        Spin {
            touched: Cell::new(0),
            parked: Cell::new(None),
        }
    };
}

/// Bytes moved on this worker just now (for the idle spin).
#[inline]
pub(crate) fn touch() {
    SPIN.with(|s| {
        s.touched.set(s.touched.get().wrapping_add(1));
        if let Some(w) = s.parked.take() {
            w.wake();
        }
    })
}

/// The traffic counter of this worker.
fn touched_count() -> u64 {
    SPIN.with(|s| s.touched.get())
}

/// Resolves when a relay of this worker next moves bytes.
async fn touched() {
    let seen = touched_count();
    std::future::poll_fn(|cx| {
        SPIN.with(|s| {
            if s.touched.get() != seen {
                Poll::Ready(())
            } else {
                s.parked.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
    })
    .await
}

/// The kernel's total CPU stall time (`/proc/pressure/cpu`), `None` where it does not tell. The
/// file is opened for each sample (ten a second at most, while spinning): no descriptor is held.
fn cpu_pressure() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    crate::decide::spin::parse_cpu_pressure(&text)
}

/// The idle spin, parked: waits for traffic, then spins while the policy says so.
async fn spin_parked(mut policy: IdleSpin) {
    loop {
        touched().await;
        let now = Instant::now();
        sample_pressure(&mut policy, now);
        if policy.start(now, touched_count()) {
            spin_turn(policy);
            return;
        }
    }
}

/// Read the worker's end of its nudge socket, firing `nudged` for each read (however many
/// nudges it took in). Ends when the proxy drops the other end.
async fn read_nudges(w: Rc<Worker>, mut nudges: UnixStream) {
    use monoio::io::AsyncReadRent;
    let mut buf = vec![0u8; 64];
    loop {
        let (r, b) = nudges.read(buf).await;
        buf = b;
        match r {
            Ok(n) if n > 0 => w.nudged.fire(),
            _ => return,
        }
    }
}

/// Give the policy a CPU pressure sample when it wants one.
fn sample_pressure(policy: &mut IdleSpin, now: Instant) {
    if policy.wants_pressure(now) {
        policy.pressure(now, cpu_pressure());
    }
}

/// One turn of the idle spin. Each turn is a new task, queued behind the tasks the last look at
/// the ring woke (monoio puts a task that wakes itself at the front of its run queue, where it
/// would starve the connections it spins for); between two turns the runtime looks at the ring
/// without waiting.
fn spin_turn(mut policy: IdleSpin) {
    monoio::spawn(async move {
        let now = Instant::now();
        sample_pressure(&mut policy, now);
        if policy.turn(now, touched_count()) {
            spin_turn(policy);
        } else {
            spin_parked(policy).await;
        }
    });
}

impl Worker {
    pub(crate) fn stats(&self) -> &WorkerStats {
        self.shared.stats.worker(self.id)
    }

    /// The relay settings of this worker.
    pub(crate) fn relay_ctx(&self) -> RelayCtx<'_> {
        RelayCtx {
            pools: &self.pools,
            stats: self.stats(),
            mode: self.shared.config.proxy.copy_mode,
            idle: self
                .shared
                .config
                .proxy
                .idle_timeout
                .map(|_| &self.idle_tick),
        }
    }

    /// Resolves at the next change of the configuration in force (seen by this worker as soon as
    /// it is nudged).
    pub(crate) fn config_change(&self) -> Fired<'_> {
        self.config_changed.next()
    }

    /// Look at the configuration in force; wake the waiters when it changed.
    fn check_config(&self) {
        let now = self.shared.snapshot.load().generation;
        if now != self.config_seen.get() {
            self.config_seen.set(now);
            self.config_changed.fire();
        }
    }

    /// A connection ended on this worker.
    pub(crate) fn finish(&self, inbound: bool) {
        self.stats().downstream_cx_closed.inc();
        self.active.set(self.active.get() - 1);
        self.shared.release(inbound);
    }

    /// A connection left this worker for the L7 path; the proxy's open-connection count keeps it
    /// until the L7 path closes it (`handed: false`: it could not be handed over and is gone).
    pub(crate) fn left(&self, handed: bool, inbound: bool) {
        self.stats().downstream_cx_closed.inc();
        self.active.set(self.active.get() - 1);
        if !handed {
            self.shared.release(inbound);
        }
    }
}

/// See [`Signal::next`].
#[derive(Debug)]
pub struct Fired<'a> {
    s: &'a Signal,
    at: u64,
    slot: Option<u32>,
}

impl<'a> Fired<'a> {
    /// Wait for the next firing, reusing this waiter's slot.
    pub(crate) fn again(&mut self) -> Fired<'a> {
        Fired {
            s: self.s,
            at: self.s.fired.get(),
            slot: self.slot.take(),
        }
    }
}

impl Future for Fired<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.s.fired.get() != self.at {
            return Poll::Ready(());
        }
        // Polled with every wake-up of the connection it belongs to: store the waker only when
        // it is not the one already there.
        let mut slots = self.s.slots.borrow_mut();
        let k = match self.slot {
            Some(k) => k as usize,
            None => {
                let k = self.s.free.borrow_mut().pop().map_or_else(
                    || {
                        slots.push(None);
                        slots.len() - 1
                    },
                    |k| k as usize,
                );
                drop(slots);
                self.slot = Some(k as u32);
                slots = self.s.slots.borrow_mut();
                k
            }
        };
        match &slots[k] {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => slots[k] = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for Fired<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.slot {
            self.s.slots.borrow_mut()[k as usize] = None;
            self.s.free.borrow_mut().push(k);
        }
    }
}

/// Run worker `id` on the calling thread until the proxy drains; `serve` serves one accepted
/// connection (client, its address, the listener's index) to its end.
pub(crate) fn run<F, Fut>(
    id: usize,
    shared: Arc<Shared>,
    listeners: Vec<(usize, std::net::TcpListener)>,
    driver: DriverKind,
    serve: F,
) -> io::Result<()>
where
    F: Fn(Rc<Worker>, TcpStream, SocketAddr, usize, u64) -> Fut + Copy + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let settings = &shared.config.proxy;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // Pin only when the workers cover every core. A sidecar with fewer workers than cores shares
    // the node with other sidecars: pinning every pod's worker 0 to core 0 would stack them all on
    // one core (measured: two 1-worker sidecars on one core doubled the pod-to-pod RTT).
    if settings.pin_workers && settings.workers == cores {
        if let Err(e) = monoio::utils::bind_to_cpu_set([id % cores]) {
            debug!(worker = id, error = ?e, "cannot pin worker to a core");
        }
    }
    let pools = Pools::new(settings.pipe_size, settings.buffer_size, POOL_IDLE);
    let spin = idle_spin(settings);
    let spinning = spin.enabled();
    let first_generation = shared.snapshot.load().generation;
    let main = async move {
        let w = Rc::new(Worker {
            id,
            shared,
            pools,
            active: Cell::new(0),
            next_id: Cell::new(0),
            config_seen: Cell::new(first_generation),
            config_changed: Signal::default(),
            idle_tick: Signal::default(),
            nudged: Signal::default(),
        });
        if spin.enabled() {
            monoio::spawn(spin_parked(spin));
        }
        for (index, std_listener) in listeners {
            let listener = TcpListener::from_std(std_listener)?;
            monoio::spawn(accept_loop(w.clone(), listener, index, serve));
        }
        // Sleep until nudged (a new snapshot, a drain, a forced close: `Shared::nudge_workers`)
        // or until the idle clock's next tick; while draining, look every `DRAIN_POLL` for the
        // last connection to end. An idle worker does not wake on its own otherwise.
        let (nudge_rx, nudge_tx) = std::os::unix::net::UnixStream::pair()?;
        // The epoll driver reads when the socket is ready: a blocking socket would block the
        // worker's thread on the read after the last nudge.
        nudge_rx.set_nonblocking(true)?;
        w.shared
            .nudges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(nudge_tx);
        monoio::spawn(read_nudges(w.clone(), UnixStream::from_std(nudge_rx)?));
        let idle_tick = w.shared.config.proxy.idle_timeout.map(|t| t / IDLE_TICKS);
        let mut next_tick = idle_tick.map(|t| Instant::now() + t);
        loop {
            w.check_config();
            let now = Instant::now();
            if let (Some(tick), Some(at)) = (idle_tick, next_tick) {
                if now >= at {
                    next_tick = Some(now + tick);
                    w.idle_tick.fire();
                }
            }
            let draining = w.shared.draining.load(Relaxed);
            if draining {
                if w.active.get() == 0 {
                    break;
                }
                if w.shared.force_close.load(Relaxed) {
                    let left = w.active.get() as u64;
                    w.stats().failures[Reason::DrainTimeout.index()].add(left);
                    w.stats().downstream_cx_closed.add(left);
                    w.shared.active.fetch_sub(left as usize, SeqCst);
                    break;
                }
            }
            let wait = if draining {
                Some(DRAIN_POLL)
            } else {
                next_tick.map(|at| at.saturating_duration_since(now))
            };
            let nudged = w.nudged.next();
            match wait {
                Some(d) => {
                    monoio::select! {
                        _ = nudged => {},
                        _ = monoio::time::sleep(d) => {},
                    }
                }
                None => nudged.await,
            }
        }
        Ok::<(), io::Error>(())
    };
    match driver {
        DriverKind::Epoll => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()?
            .block_on(main),
        DriverKind::Uring | DriverKind::Auto => {
            // COOP_TASKRUN: completions are handed over when the worker next enters the kernel
            // instead of interrupting it with an IPI; SINGLE_ISSUER: only this thread submits;
            // DEFER_TASKRUN: the kernel's completion work runs when the worker waits for events
            // (monoio waits whenever its run queue is empty), not in whatever context the
            // socket became ready in. Measured with one 64-byte ping-pong connection through one
            // worker (sockperf, 3 interleaved runs of 5 x 3 s): added p50 24.2/35.2/26.3 µs with
            // DEFER_TASKRUN against 24.7/36.4/33.5 µs without, p99 lower in every run.
            // Kernels before 6.1 refuse DEFER_TASKRUN, before 6.0 the other two: the ring is
            // then built with fewer flags.
            // A spinning worker looks at the ring without waiting, and DEFER_TASKRUN completes
            // nothing then (its completions are posted only to a waiting worker): with the idle
            // spin on, the ring is built without it.
            let skip = usize::from(spinning);
            let flags: [fn(&mut io_uring::Builder); 3] = [
                |b| {
                    b.setup_coop_taskrun()
                        .setup_single_issuer()
                        .setup_defer_taskrun();
                },
                |b| {
                    b.setup_coop_taskrun().setup_single_issuer();
                },
                |_| {},
            ];
            let mut built = None;
            for (i, set) in flags.iter().enumerate().skip(skip) {
                let mut ring = io_uring::IoUring::builder();
                set(&mut ring);
                match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                    .uring_builder(ring)
                    .enable_timer()
                    .build()
                {
                    Ok(rt) => {
                        built = Some(rt);
                        break;
                    }
                    Err(e) if i + 1 < flags.len() => {
                        debug!(worker = id, error = %e, flags = i, "io_uring set-up refused; trying fewer flags")
                    }
                    Err(e) => return Err(e),
                }
            }
            let rt = built.expect("the last set-up returns or fails");
            let mut rt = rt;
            rt.block_on(main)
        }
    }
}

async fn accept_loop<F, Fut>(w: Rc<Worker>, listener: TcpListener, index: usize, serve: F)
where
    F: Fn(Rc<Worker>, TcpStream, SocketAddr, usize, u64) -> Fut + Copy + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let mut last_warn: Option<Instant> = None;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(_) if w.shared.draining.load(Relaxed) => return,
            Err(e) => {
                match e.raw_os_error() {
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        // Out of descriptors: the pending connection stays in the backlog; retry
                        // after a pause instead of spinning on the same error.
                        w.stats().downstream_cx_accept_fd_exhausted.inc();
                        if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                            warn!(worker = w.id, error = %e, "accept failed: out of file descriptors or memory; backing off");
                            last_warn = Some(Instant::now());
                        }
                        monoio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    Some(libc::ECONNABORTED | libc::EINTR | libc::EAGAIN | libc::EPROTO) => {}
                    _ => {
                        warn!(worker = w.id, error = %e, "accept failed");
                        monoio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                continue;
            }
        };
        let shared = &w.shared;
        let inbound = shared.config.listeners[index].kind == ListenerKind::Inbound;
        let over = if shared.active.fetch_add(1, SeqCst) >= shared.config.proxy.max_connections {
            shared.active.fetch_sub(1, SeqCst);
            true
        } else if inbound
            && shared.active_inbound.fetch_add(1, SeqCst)
                >= shared
                    .snapshot
                    .load()
                    .max_inbound
                    .map_or(shared.config.proxy.max_inbound_connections, |m| {
                        m.min(shared.config.proxy.max_inbound_connections)
                    })
        {
            shared.active_inbound.fetch_sub(1, SeqCst);
            shared.active.fetch_sub(1, SeqCst);
            true
        } else {
            false
        };
        if over {
            w.stats().fail(Reason::Overloaded);
            debug!(client = %peer, reason = Reason::Overloaded.as_str(), inbound, "connection refused");
            drop(stream);
            continue;
        }
        w.stats().downstream_cx_total.inc();
        w.active.set(w.active.get() + 1);
        let id = ((w.id as u64) << 48) | w.next_id.replace(w.next_id.get() + 1);
        let listener_cfg = &shared.config.listeners[index];
        // The connection's span, for its whole life at debug. At info and above the lines a
        // connection logs are made inside the same span on the spot (`conn::span`): a span held
        // by every idle connection costs memory. The access log carries the same id (`conn_id`).
        let span = tracing::debug_span!("conn", id, client = %peer, listener = %listener_cfg.name);
        let fut = serve(w.clone(), stream, peer, index, id);
        // The span is only carried when it records something: a disabled one would still take
        // its place in every connection's task.
        if span.is_disabled() {
            monoio::spawn(fut);
        } else {
            monoio::spawn(fut.instrument(span));
        }
    }
}

/// The idle spin policy of `settings`.
fn idle_spin(settings: &crate::config::ProxySettings) -> IdleSpin {
    IdleSpin::new(
        settings.idle_spin,
        f64::from(settings.idle_spin_budget) / 100.0,
    )
}
