//! Loom models of the TLS output's "one flusher at a time" ([`FlushGate`], used by the TLS relay):
//! the sealing pump flushes (waiting for the turn), the decrypting pump writes only when no one
//! flushes and otherwise kicks the drainer, which flushes on its behalf. Every interleaving is
//! explored: never two flushers at once, no record left when the pumps and the drainer are done,
//! and no lost wake-up (a waiter that is never woken leaves its thread blocked: loom reports the
//! deadlock). Run with `RUSTFLAGS="--cfg ringside_loom" cargo test -p ringside-core --test
//! loom_flush` (scripts/test.sh does).
#![cfg(ringside_loom)]

use loom::future::block_on;
use loom::sync::atomic::AtomicUsize;
use loom::sync::atomic::Ordering::SeqCst;
use loom::sync::Arc;
use loom::thread;
use ringside_core::io::flush_gate::FlushGate;

/// The TLS connection's pending records and the socket they go to.
#[derive(Default)]
struct Conn {
    /// Records produced, not yet written.
    pending: AtomicUsize,
    /// Flushers writing now.
    writing: AtomicUsize,
    /// Records written.
    written: AtomicUsize,
}

impl Conn {
    fn produce(&self) {
        self.pending.fetch_add(1, SeqCst);
    }

    /// Write one record if there is one (`write_tls`).
    fn write_one(&self) -> bool {
        let took = self
            .pending
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if took {
            self.written.fetch_add(1, SeqCst);
        }
        took
    }

    /// A flush with the turn held: every pending record (each write a point where another
    /// thread may run, as at the relay's `writable().await`).
    fn flush_all(&self) {
        assert_eq!(self.writing.fetch_add(1, SeqCst), 0, "two flushers at once");
        while self.write_one() {}
        self.writing.fetch_sub(1, SeqCst);
    }
}

/// `TlsOut::flush`: wait for the turn, flush everything.
async fn flush(gate: &FlushGate, conn: &Conn) {
    let _turn = gate.turn().await;
    conn.flush_all();
}

/// `TlsOut::try_flush`: write while no one holds the turn; kick the drainer if records remain.
fn try_flush(gate: &FlushGate, conn: &Conn) {
    while !gate.is_busy() && conn.write_one() {}
    if conn.pending.load(SeqCst) > 0 {
        gate.kick();
    }
}

/// `TlsOut::drain`: flush on every kick until closed.
async fn drain(gate: &FlushGate, conn: &Conn) {
    while gate.kicked().await {
        flush(gate, conn).await;
    }
}

/// Both pumps produce a record at once; the sealing one flushes, the decrypting one writes or
/// kicks. When both pumps and the drainer are done every record is written, by one flusher at a
/// time.
#[test]
fn every_record_is_flushed_by_one_flusher_at_a_time() {
    // Four threads: bounded preemptions (loom's advice for models this size) keep it to seconds.
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let gate = Arc::new(FlushGate::default());
        let conn = Arc::new(Conn::default());
        let drainer = {
            let (gate, conn) = (gate.clone(), conn.clone());
            thread::spawn(move || block_on(drain(&gate, &conn)))
        };
        let sealer = {
            let (gate, conn) = (gate.clone(), conn.clone());
            thread::spawn(move || {
                conn.produce();
                block_on(flush(&gate, &conn));
            })
        };
        let (g, c) = (gate.clone(), conn.clone());
        let opener = thread::spawn(move || {
            c.produce();
            try_flush(&g, &c);
        });
        sealer.join().unwrap();
        opener.join().unwrap();
        gate.close();
        drainer.join().unwrap();
        assert_eq!(conn.pending.load(SeqCst), 0, "a record left unflushed");
        assert_eq!(conn.written.load(SeqCst), 2);
    });
}

/// Two flushers at once (the sealing pump and the drainer): one waits for the other, is woken and
/// flushes what is left; neither waits forever.
#[test]
fn a_waiting_flusher_is_woken_and_flushes_what_is_left() {
    loom::model(|| {
        let gate = Arc::new(FlushGate::default());
        let conn = Arc::new(Conn::default());
        let ts: Vec<_> = (0..2)
            .map(|_| {
                let (gate, conn) = (gate.clone(), conn.clone());
                thread::spawn(move || {
                    conn.produce();
                    block_on(flush(&gate, &conn));
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        assert_eq!(conn.pending.load(SeqCst), 0, "a record left unflushed");
        assert!(!gate.is_busy(), "the turn was not handed back");
    });
}

/// The decrypting pump finds a flusher at work and kicks the drainer: the drainer, waiting for a
/// kick, is woken (it is never closed here, so a lost wake-up blocks it for ever and loom reports
/// the deadlock), waits for the turn and is woken again when the flusher is done.
#[test]
fn a_kick_wakes_the_drainer() {
    loom::model(|| {
        let gate = Arc::new(FlushGate::default());
        let conn = Arc::new(Conn::default());
        let drainer = {
            let (gate, conn) = (gate.clone(), conn.clone());
            thread::spawn(move || {
                assert!(block_on(gate.kicked()));
                block_on(flush(&gate, &conn));
            })
        };
        // The sealing pump holds the turn while the decrypting pump produces a record.
        let turn = block_on(gate.turn());
        conn.produce();
        try_flush(&gate, &conn);
        assert_eq!(
            conn.pending.load(SeqCst),
            1,
            "written while another flusher held the turn"
        );
        conn.flush_all();
        drop(turn);
        drainer.join().unwrap();
        assert_eq!(conn.pending.load(SeqCst), 0, "a record left unflushed");
    });
}
