//! Whether a worker keeps looking for events instead of sleeping in the kernel (the idle spin).
//!
//! A request crossing the proxy is followed, a few tens of microseconds later, by its answer: a
//! worker that sleeps in between is woken for the answer, and on a shared or virtual machine the
//! wake-up costs more than the proxy's own work on the message. After bytes move, a worker keeps
//! taking turns through its run queue and the ring (no waiting) for a short window; each byte
//! moved renews the window. A budget bounds what spinning may cost: at most a share of each
//! period is spent spinning, so a busy worker with short gaps between messages does not turn
//! into a core burnt for nothing. And spinning only uses a core nobody else wants: the worker
//! samples the kernel's CPU pressure (the time some runnable task waited for a CPU,
//! `/proc/pressure/cpu`) once per period, and when tasks waited for more than a tenth of it the
//! spin stays off for a second (measured on 2 cores: a 64-byte ping-pong through the proxy
//! leaves 2-3 % pressure, a PostgreSQL `pgbench -S` 97 %, an iperf3 stream 45 %; spinning
//! during the last two took CPU from PostgreSQL and iperf3). The clock is passed in; the worker
//! does the turns and the sampling.

use std::time::{Duration, Instant};

/// The period the budget is counted over, and CPU pressure sampled at.
pub const PERIOD: Duration = Duration::from_millis(100);

/// CPU pressure above which the machine is busy: tasks waited for a CPU this share of the time.
pub const BUSY_PRESSURE: f64 = 0.10;

/// How long the spin stays off after the machine was found busy.
pub const BUSY_BACKOFF: Duration = Duration::from_secs(1);

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
    /// The last CPU pressure sample (when, total stall time), and the end of a busy back-off.
    sample: Option<(Instant, Duration)>,
    quiet_until: Option<Instant>,
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
            sample: None,
            quiet_until: None,
        }
    }

    /// Whether the worker should sample the CPU pressure now (a new period begins, outside a
    /// back-off).
    pub fn wants_pressure(&self, now: Instant) -> bool {
        self.enabled()
            && !self.quiet(now)
            && self
                .period_start
                .is_none_or(|start| now.saturating_duration_since(start) >= PERIOD)
    }

    /// A CPU pressure sample: `stalled` is the kernel's total time some task waited for a CPU
    /// (`some ... total=`), `None` where the kernel does not tell. Above [`BUSY_PRESSURE`] since
    /// the last sample, the spin stays off for [`BUSY_BACKOFF`].
    pub fn pressure(&mut self, now: Instant, stalled: Option<Duration>) {
        let Some(stalled) = stalled else {
            return;
        };
        if let Some((then, before)) = self.sample {
            let elapsed = now.saturating_duration_since(then);
            let waited = stalled.saturating_sub(before);
            if !elapsed.is_zero() && waited.as_secs_f64() > BUSY_PRESSURE * elapsed.as_secs_f64() {
                self.quiet_until = Some(now + BUSY_BACKOFF);
            }
        }
        self.sample = Some((now, stalled));
    }

    /// Within a back-off after the machine was found busy.
    fn quiet(&self, now: Instant) -> bool {
        self.quiet_until.is_some_and(|until| now < until)
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
        self.enabled() && self.spent < self.budget && !self.quiet(now)
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
            && !self.quiet(now)
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

/// The total stall time of the `some` line of `/proc/pressure/cpu`
/// (`some avg10=0.00 avg60=0.00 avg300=0.00 total=12345`, microseconds).
pub fn parse_cpu_pressure(text: &str) -> Option<Duration> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let total = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("total="))?;
    total.parse().ok().map(Duration::from_micros)
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

    #[test]
    fn a_busy_machine_turns_the_spin_off_for_a_while() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = IdleSpin::new(50 * US, 0.5);
        assert!(s.wants_pressure(t0), "the first period samples");
        s.pressure(t0, Some(ms(1_000)));
        assert!(s.start(t0, 1), "no second sample yet: spin");
        assert!(!s.wants_pressure(t0 + ms(50)), "once per period");
        // 100 ms later tasks had waited 5 ms: not busy.
        let t1 = t0 + ms(100);
        assert!(s.wants_pressure(t1));
        s.pressure(t1, Some(ms(1_005)));
        assert!(s.start(t1, 2));
        // 100 ms later they had waited 60 ms: busy, no spinning for a second.
        let t2 = t1 + ms(100);
        s.pressure(t2, Some(ms(1_065)));
        assert!(!s.start(t2, 3));
        assert!(
            !s.wants_pressure(t2 + ms(500)),
            "no sampling during the back-off"
        );
        assert!(!s.start(t2 + ms(999), 4));
        assert!(s.start(t2 + BUSY_BACKOFF, 5), "back after the back-off");
        // No pressure information: spinning goes by the budget alone.
        let mut blind = IdleSpin::new(50 * US, 0.5);
        blind.pressure(t0, None);
        blind.pressure(t1, None);
        assert!(blind.start(t1, 1));
    }

    #[test]
    fn parses_the_kernels_cpu_pressure() {
        let text = "some avg10=29.18 avg60=27.34 avg300=14.78 total=7549111643\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(
            parse_cpu_pressure(text),
            Some(Duration::from_micros(7_549_111_643))
        );
        assert_eq!(parse_cpu_pressure("full avg10=0.00 total=5\n"), None);
        assert_eq!(parse_cpu_pressure("some avg10=1.0 total=x\n"), None);
        assert_eq!(parse_cpu_pressure(""), None);
    }
}
