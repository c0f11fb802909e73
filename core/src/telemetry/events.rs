//! The ring of recent failures shown at `/events` (and reported to the control daemon).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::reason::Reason;

/// Failures kept for `/events`.
const EVENTS_KEPT: usize = 256;

/// A failure, for `/events`.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// Reason code.
    pub reason: &'static str,
    /// Who connected (address or identity).
    pub source: String,
    /// Where it was going (service or address).
    pub destination: String,
    /// What happened, the deciding rule or the hint.
    pub detail: String,
}

/// Recent failures (a bounded ring; the oldest go first).
#[derive(Debug, Default)]
pub struct Events(Mutex<VecDeque<Event>>);

impl Events {
    /// Record a failure.
    pub fn push(&self, reason: Reason, source: String, destination: String, detail: String) {
        let time_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= EVENTS_KEPT {
            q.pop_front();
        }
        q.push_back(Event {
            time_ms,
            reason: reason.as_str(),
            source,
            destination,
            detail,
        });
    }

    /// The events kept, oldest first.
    pub fn list(&self) -> Vec<Event> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}
