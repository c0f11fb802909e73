//! The access log: one JSON line per connection (L4) and per request (L7), with the reason code
//! when it failed. Off unless `proxy.access_log` (or `--access-log`) names a file (`-` is stderr).
//! Lines are written whole under a lock, so lines from different threads never interleave.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

/// An open access log.
pub struct AccessLog {
    out: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessLog")
    }
}

impl AccessLog {
    /// Open (append to) `path`, or stderr for `-`.
    pub fn open(path: &Path) -> std::io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = if path == Path::new("-") {
            Box::new(std::io::stderr())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )
        };
        Ok(AccessLog {
            out: Mutex::new(out),
        })
    }

    /// Write one entry (a JSON object) as a line; `time_ms` is added.
    pub fn write(&self, mut entry: serde_json::Value) {
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        entry["time_ms"] = serde_json::json!(time_ms);
        let mut line = entry.to_string();
        line.push('\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = out.write_all(line.as_bytes());
    }
}
