//! `/proc/sys` settings by their dotted names (`net.core.somaxconn`).

use std::io;
use std::path::PathBuf;

/// An error reading or writing a sysctl.
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    /// The setting exists but could not be read or written.
    #[error("sysctl {name}: {source}")]
    Io {
        /// Dotted name.
        name: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The value is not what was expected.
    #[error("sysctl {name}: cannot parse {value:?} as a number")]
    Parse {
        /// Dotted name.
        name: String,
        /// The raw value.
        value: String,
    },
}

/// Path of a dotted sysctl name.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(name.replace('.', "/"))
}

/// Read a setting as text (trimmed). `Ok(None)` when this kernel does not have it.
pub fn read(name: &str) -> Result<Option<String>, SysctlError> {
    match std::fs::read_to_string(path(name)) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SysctlError::Io {
            name: name.into(),
            source,
        }),
    }
}

/// Read a numeric setting. `Ok(None)` when this kernel does not have it.
pub fn read_u64(name: &str) -> Result<Option<u64>, SysctlError> {
    match read(name)? {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| SysctlError::Parse {
            name: name.into(),
            value: v,
        }),
    }
}

/// Write a setting (needs root in the network namespace that owns it).
pub fn write(name: &str, value: &str) -> Result<(), SysctlError> {
    std::fs::write(path(name), value).map_err(|source| SysctlError::Io {
        name: name.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_known_and_unknown_settings() {
        assert_eq!(
            path("net.core.somaxconn"),
            PathBuf::from("/proc/sys/net/core/somaxconn")
        );
        let max = read_u64("fs.pipe-max-size")
            .unwrap()
            .expect("fs.pipe-max-size exists on Linux");
        assert!(max >= 4096);
        assert_eq!(read("net.core.no_such_setting_here").unwrap(), None);
        let e = read_u64("kernel.ostype").unwrap_err();
        assert!(e.to_string().contains("kernel.ostype"), "{e}");
    }
}
