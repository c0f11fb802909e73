//! What touches the kernel: worker threads and their runtimes, connects, the splice/copy relay,
//! the TLS relay, the certificate watcher, raw syscalls (the only `unsafe` code of the data plane) and `/proc` readers.

pub mod cert_watch;
pub mod connect;
pub mod listening;
pub mod peek;
pub mod relay;
pub mod sys;
pub mod tls_relay;
pub(crate) mod worker;
