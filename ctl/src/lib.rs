//! The part of `ringctl` that needs no runtime, as a library: what `ringctl apply` reads and checks
//! (the Consul documents, [`consul`]) and the mesh CA that signs proxies' CSRs ([`ca`]). The binary
//! (`src/main.rs`: the CLI and the daemon) uses both from here; the fuzz targets in `core/fuzz`
//! (`consul`, `csr`) reach them without building the daemon's dependencies (built with
//! `default-features = false`, which leaves out the `cli` feature).

pub mod ca;
pub mod consul;
