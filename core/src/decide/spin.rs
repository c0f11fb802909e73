//! Whether a worker keeps looking for events instead of sleeping in the kernel (the idle spin).
//!
//! A request crossing the proxy is followed, a few tens of microseconds later, by its answer: a
//! worker that sleeps in between is woken for the answer, and on a shared or virtual machine the
//! wake-up costs more than the proxy's own work on the message. After bytes move, a worker keeps
//! taking turns through its run queue and the ring (no waiting) for a short window; each byte
//! moved renews the window. A budget bounds what spinning may cost: at most a share of each
//! period is spent spinning, so a busy worker with short gaps between messages does not turn
//! into a core burnt for nothing. The clock is passed in; the worker does the turns.

use std::time::{Duration, Instant};

/// The period the budget is counted over.
pub const PERIOD: Duration = Duration::from_millis(100);

/// The idle spin of one worker.
#[derive(Debug, Clone)]
pub struct IdleSpin {
    /// How long after the last traffic the worker keeps spinning.
    window: Duration,
    /// Spinning allowed per [`PERIOD`].
    budget: Duration,
    /// Start of the current period, and what was spent spinning in it.
    period_start: Option<Instant>,
    spent: Duration,
    /// The last turn (while spinning), to count the time spent since.
    last_turn: Option<Instant>,
    /// The traffic counter at the last turn, and the end of the window.
    seen: u64,
    until: Option<Instant>,
}

impl IdleSpin {
    /// A spin of `window` after each traffic, using at most `share` (0 to 1) of every period.
    pub fn new(window: Duration, share: f64) -> Self {
        IdleSpin {
            window,
            budget: PERIOD.mul_f64(share.clamp(0.0, 1.0)),
            period_start: None,
            spent: Duration::ZERO,
            last_turn: None,
            seen: 0,
            until: None,
        }
    }

    /// Whether spinning is on at all.
    pub fn enabled(&self) -> bool {
        !self.window.is_zero() && !self.budget.is_zero()
    }

    /// Traffic was seen (the counter is `touched`) while the worker was parked: start spinning.
    /// Returns whether to spin (false while this period's budget is spent).
    pub fn start(&mut self, now: Instant, touched: u64) -> bool {
        self.seen = touched;
        self.last_turn = Some(now);
        self.until = Some(now + self.window);
        self.roll(now);
        self.enabled() && self.spent < self.budget
    }

    /// One turn of spinning at `now`, the traffic counter being `touched`: whether to go on.
    /// Traffic since the last turn renews the window (and the time since the last turn was the
    /// relays' work); otherwise the time since the last turn was spent spinning and counts
    /// against the budget.
    pub fn turn(&mut self, now: Instant, touched: u64) -> bool {
        if touched != self.seen {
            // Bytes moved since the last turn: the time in between was the relays' work, not
            // spinning.
            self.seen = touched;
            self.until = Some(now + self.window);
        } else if let Some(last) = self.last_turn {
            self.spent += now.saturating_duration_since(last);
        }
        self.last_turn = Some(now);
        self.roll(now);
        let go_on = self.enabled()
            && self.spent < self.budget
            && self.until.is_some_and(|until| now < until);
        if !go_on {
            self.last_turn = None;
            self.until = None;
        }
        go_on
    }

    /// Start a new period when the current one is over.
    fn roll(&mut self, now: Instant) {
        match self.period_start {
            Some(start) if now.saturating_duration_since(start) < PERIOD => {}
            _ => {
                self.period_start = Some(now);
                self.spent = Duration::ZERO;
            }
        }
    }

    /// Time spent spinning in the current period (for tests and counters).
    pub fn spent(&self) -> Duration {
        self.spent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn spins_for_the_window_after_traffic_then_parks() {
        let t0 = Instant::now();
        let mut s = IdleSpin::new(50 * US, 0.25);
        assert!(s.start(t0, 1));
        assert!(s.turn(t0 + 10 * US, 1));
        assert!(s.turn(t0 + 49 * US, 1));
        assert!(!s.turn(t0 + 50 * US, 1), "the window is over");
    }

    #[test]
    fn traffic_renews_the_window() {
        let t0 = Instant::now();
        let mut s = IdleSpin::new(50 * US, 0.25);
        assert!(s.start(t0, 1));
        assert!(s.turn(t0 + 40 * US, 2), "bytes moved at 40 µs");
        assert!(s.turn(t0 + 80 * US, 2), "within 50 µs of them");
        assert!(!s.turn(t0 + 91 * US, 2));
    }

    #[test]
    fn the_budget_bounds_spinning_in_a_period_and_comes_back_in_the_next() {
        let t0 = Instant::now();
        // 10 % of 100 ms: 10 ms of spinning per period.
        let mut s = IdleSpin::new(50 * US, 0.1);
        let mut now = t0;
        let mut touched = 0;
        assert!(s.start(now, touched));
        // Traffic every 40 µs, with turns every 10 µs in between: the window never ends, and the
        // turns without traffic are spinning (30 µs of every 40) until 10 ms are spent.
        let mut turns = 0;
        while s.turn(now, touched) {
            now += 10 * US;
            turns += 1;
            if turns % 4 == 0 {
                touched += 1;
            }
            assert!(turns < 10_000, "the budget never ran out");
        }
        assert!(s.spent() >= Duration::from_millis(10));
        assert!(s.spent() < Duration::from_millis(10) + 10 * US);
        assert!(
            now - t0 > Duration::from_millis(13),
            "the relays' work is not spinning"
        );
        // Still within the period: traffic does not start it again.
        assert!(!s.start(t0 + Duration::from_millis(50), touched + 1));
        // The next period does.
        assert!(s.start(t0 + PERIOD, touched + 2));
        assert_eq!(s.spent(), Duration::ZERO);
    }

    #[test]
    fn parked_time_is_not_counted() {
        let t0 = Instant::now();
        let mut s = IdleSpin::new(50 * US, 0.25);
        assert!(s.start(t0, 1));
        assert!(!s.turn(t0 + 60 * US, 1));
        // Parked 30 ms, then traffic: only the 60 µs spun count.
        assert!(s.start(t0 + Duration::from_millis(30), 2));
        assert_eq!(s.spent(), 60 * US);
    }

    #[test]
    fn off_when_the_window_or_the_share_is_zero() {
        let t0 = Instant::now();
        assert!(!IdleSpin::new(Duration::ZERO, 0.25).start(t0, 1));
        assert!(!IdleSpin::new(50 * US, 0.0).start(t0, 1));
        assert!(!IdleSpin::new(50 * US, 0.0).enabled());
    }
}
