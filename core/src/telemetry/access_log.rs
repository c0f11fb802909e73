//! The access log: one JSON line per connection (L4) and per request (L7), with the reason code
//! when it failed. Off unless `proxy.access_log` (or `--access-log`) names a file (`-` is stderr).
//!
//! Lines are written off the data path: a worker (or an L7 lane) only formats the line and hands
//! it to a bounded queue; a thread of its own writes it, so a slow disk never stalls a connection.
//! When the queue is full the line is dropped and counted (`access_log_dropped`), never waited
//! for. `reopen` (SIGHUP in the binary) reopens the file, for log rotation; `flush` waits until
//! every queued line is written (on shutdown).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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

    /// Queue one entry (a JSON object) as a line; `time` (RFC 3339, UTC, milliseconds) and
    /// `time_ms` (Unix milliseconds) are added.
    pub fn write(&self, mut entry: serde_json::Value) {
        let now = std::time::SystemTime::now();
        let time_ms = now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        entry["time"] = serde_json::json!(humantime::format_rfc3339_millis(now).to_string());
        entry["time_ms"] = serde_json::json!(time_ms);
        let mut line = entry.to_string();
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
