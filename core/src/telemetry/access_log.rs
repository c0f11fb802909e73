//! The access log: one JSON line per connection (L4) and per request (L7), with the reason code
//! when it failed. Off unless `proxy.access_log` (or `--access-log`) names a file (`-` is stderr).
//!
//! Both kinds of line are one [`Line`]: the same field names, a field unknown on a path (bytes of a
//! refused connection, the method of a TCP connection) written as `null`, never left out.
//!
//! Lines are written off the data path: a worker (or an L7 lane) only formats the line and hands
//! it to a bounded queue; a thread of its own writes it, so a slow disk never stalls a connection.
//! When the queue is full the line is dropped and counted (`access_log_dropped`), never waited
//! for. `reopen` (SIGHUP in the binary) reopens the file, for log rotation; `flush` waits until
//! every queued line is written (on shutdown).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// One access-log line: an L4 connection (`kind: tcp`) or an HTTP request (`kind: http`). The
/// fields of the other kind are `null` (docs/reference.md lists them).
#[derive(Debug, Default, Serialize)]
pub struct Line<'a> {
    /// When the line was written: RFC 3339, UTC, milliseconds (set by [`AccessLog::write`]).
    pub time: String,
    /// The same, Unix milliseconds.
    pub time_ms: u64,
    /// `tcp` or `http`.
    pub kind: &'static str,
    /// The connection's id, as in the process log's `conn` span.
    pub conn_id: u64,
    /// `outbound`, `inbound` or `tunnel` (a static listener).
    pub direction: &'static str,
    /// Mesh mTLS on one side.
    pub mesh: bool,
    /// The client's address.
    pub client: Option<SocketAddr>,
    /// Who called: the verified peer inbound, this proxy's own identity outbound.
    pub source_id: Option<&'a str>,
    /// Who was called: this proxy's own identity inbound, the upstream's verified identity outbound.
    pub destination_id: Option<&'a str>,
    /// The address the client dialled, as the kernel reported it (sidecar listeners).
    pub original_destination: Option<SocketAddr>,
    /// The service (or `port N`, or a passthrough address) it went to.
    pub destination: Option<&'a str>,
    /// The endpoint chosen (or the local application's address).
    pub upstream: Option<SocketAddr>,
    /// The verified peer identity (the caller inbound, the server outbound).
    pub peer_id: Option<&'a str>,
    /// Bytes client -> upstream (HTTP: the request body).
    pub bytes_up: Option<u64>,
    /// Bytes upstream -> client (HTTP: the response body).
    pub bytes_down: Option<u64>,
    /// From accept (HTTP: from the request head) to the end.
    pub duration_ms: u64,
    /// The failure reason code; `null` for a clean end (an application's 5xx is no proxy failure).
    pub reason: Option<&'static str>,
    /// What decided the failure.
    pub detail: Option<&'a str>,
    /// HTTP: the service the request went to (after routes and splits).
    pub service: Option<&'a str>,
    /// HTTP: the route that matched.
    pub route: Option<&'a str>,
    /// HTTP: the method.
    pub method: Option<&'a str>,
    /// HTTP: the path, as the client sent it.
    pub path: Option<&'a str>,
    /// HTTP: the response status.
    pub status: Option<u16>,
    /// HTTP: `x-request-id`, the client's or the one this proxy added.
    pub request_id: Option<&'a str>,
    /// HTTP: the trace id of `traceparent`, else of B3 (`x-b3-traceid`, or the single `b3` header).
    pub trace_id: Option<&'a str>,
}

/// Who called and who was called, for the access log: the caller is the verified peer inbound
/// (and at a static listener's terminating TLS end), this proxy otherwise; the called side is the
/// other one.
pub fn identities<'a>(
    caller_is_peer: bool,
    own: Option<&'a str>,
    peer: Option<&'a str>,
) -> (Option<&'a str>, Option<&'a str>) {
    if caller_is_peer {
        (peer, own)
    } else {
        (own, peer)
    }
}

/// Lines the queue holds before new ones are dropped.
const QUEUE: usize = 64 * 1024;

enum Msg {
    Line(String),
    Reopen,
    Flush(std::sync::mpsc::Sender<()>),
}

/// An open access log.
pub struct AccessLog {
    tx: crossbeam_channel::Sender<Msg>,
    /// Lines dropped because the queue was full.
    dropped: AtomicU64,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessLog")
    }
}

fn open_out(path: &Path) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(if path == Path::new("-") {
        Box::new(std::io::stderr())
    } else {
        Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        )
    })
}

impl AccessLog {
    /// Open (append to) `path`, or stderr for `-`, and start the writer thread.
    pub fn open(path: &Path) -> std::io::Result<AccessLog> {
        let mut out = std::io::BufWriter::new(open_out(path)?);
        let (tx, rx) = crossbeam_channel::bounded::<Msg>(QUEUE);
        let path: PathBuf = path.to_path_buf();
        std::thread::Builder::new()
            .name("ringside-accesslog".into())
            .spawn(move || {
                while let Ok(msg) = rx.recv() {
                    let mut next = Some(msg);
                    // Write what is queued, then flush once.
                    while let Some(m) = next.take() {
                        match m {
                            Msg::Line(l) => {
                                let _ = out.write_all(l.as_bytes());
                            }
                            Msg::Reopen => {
                                let _ = out.flush();
                                match open_out(&path) {
                                    Ok(o) => out = std::io::BufWriter::new(o),
                                    Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot reopen the access log; writing to the old file"),
                                }
                            }
                            Msg::Flush(done) => {
                                let _ = out.flush();
                                let _ = done.send(());
                            }
                        }
                        next = rx.try_recv().ok();
                    }
                    let _ = out.flush();
                }
                let _ = out.flush();
            })?;
        Ok(AccessLog {
            tx,
            dropped: AtomicU64::new(0),
        })
    }

    /// Queue one line; its `time` (RFC 3339, UTC, milliseconds) and `time_ms` (Unix
    /// milliseconds) are set here.
    pub fn write(&self, mut entry: Line<'_>) {
        let now = std::time::SystemTime::now();
        entry.time_ms = now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        entry.time = humantime::format_rfc3339_millis(now).to_string();
        let Ok(mut line) = serde_json::to_string(&entry) else {
            return;
        };
        line.push('\n');
        if self.tx.try_send(Msg::Line(line)).is_err() {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Reopen the file (after it was rotated away).
    pub fn reopen(&self) {
        let _ = self.tx.send(Msg::Reopen);
    }

    /// Wait (up to `within`) until every queued line is written.
    pub fn flush(&self, within: std::time::Duration) {
        let (done, wait) = std::sync::mpsc::channel();
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(within);
        }
    }

    /// Lines dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that cannot keep up (a pipe nobody reads): once the queue is full, lines are
    /// dropped and counted, and `write` never waits.
    #[test]
    fn a_full_queue_drops_and_counts_lines_without_waiting() {
        use std::os::unix::fs::OpenOptionsExt;
        let fifo = std::env::temp_dir().join(format!("ringside-alog-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // A reader that never reads, so that the writer can open the pipe and then blocks.
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let log = AccessLog::open(&fifo).unwrap();
        let n = QUEUE as u64 + 10_000;
        let t0 = std::time::Instant::now();
        for _ in 0..n {
            log.write(Line {
                kind: "tcp",
                ..Line::default()
            });
        }
        let took = t0.elapsed();
        // The pipe holds 64 KiB and the writer's buffer 8 KiB: a few hundred lines at most are
        // out of the queue; the rest beyond the queue's size are dropped.
        let dropped = log.dropped();
        assert!(
            (n - QUEUE as u64 - 1_000..=n - QUEUE as u64).contains(&dropped),
            "{dropped} of {n} dropped"
        );
        assert!(
            took < std::time::Duration::from_secs(10),
            "writing took {took:?}"
        );
        let _ = std::fs::remove_file(&fifo);
    }

    /// Both kinds of line have every field, `null` where unknown.
    #[test]
    fn every_field_is_present() {
        let v = serde_json::to_value(Line {
            kind: "tcp",
            ..Line::default()
        })
        .unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in [
            "time",
            "time_ms",
            "kind",
            "conn_id",
            "direction",
            "mesh",
            "client",
            "source_id",
            "destination_id",
            "original_destination",
            "destination",
            "upstream",
            "peer_id",
            "bytes_up",
            "bytes_down",
            "duration_ms",
            "reason",
            "detail",
            "service",
            "route",
            "method",
            "path",
            "status",
            "request_id",
            "trace_id",
        ] {
            assert!(keys.contains(&k), "{k} missing: {keys:?}");
        }
        assert_eq!(keys.len(), 25);
        assert!(v["trace_id"].is_null() && v["source_id"].is_null());
    }
}
