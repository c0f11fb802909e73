//! What mesh TLS costs on the library this build uses (ring, or AWS-LC with `--features
//! aws-lc-rs`): an in-memory client and server (no sockets) built with ringside's own mesh configs
//! (`tls::client_config`, `tls::server_config`: TLS 1.3, AES-128-GCM, X25519, mutual ECDSA P-256
//! certificates with SPIFFE IDs). Measured: one 16 KiB record encrypted by one side and decrypted
//! by the other, through rustls's buffered connection (the L7 path's tokio-rustls) and through the
//! fast path's own record layer (`tls::record`, in place: the plaintext received into the record,
//! sealed there, opened where it arrived); a full handshake (both sides, certificates verified, no resumption); a resumed
//! one (a session ticket from the previous connection). The ids carry the library's name.
//!
//! `cargo bench -p ringside-core --bench tls_records [--features aws-lc-rs]`; ARCHITECTURE.md
//! ("Mesh TLS") has the figures and the choice they made.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rcgen::{CertificateParams, IsCa, Issuer, KeyPair, SanType};
use ringside_core::identity::SpiffeId;
use ringside_core::tls::record::{self, Opened, Records};
use ringside_core::tls::session::{self, Handshake, Next};
use ringside_core::tls::{self, AllowList, Expect, Material, TlsFiles};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, Connection, HandshakeKind, ServerConfig};

const TD: &str = "bench.mesh";
const RECORD: usize = 16 * 1024;

/// A mesh CA and two sidecars' material (`web` calls `products`), as files in a directory.
fn material(dir: &std::path::Path) -> (Material, Material) {
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |service: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        let id = format!("spiffe://{TD}/ns/default/sa/{service}");
        p.subject_alt_names = vec![SanType::URI(id.as_str().try_into().unwrap())];
        let files = TlsFiles {
            cert: dir.join(format!("{service}.crt")),
            key: dir.join(format!("{service}.key")),
            ca: dir.join("ca.crt"),
        };
        std::fs::write(&files.cert, p.signed_by(&key, &issuer).unwrap().pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::write(&files.ca, &ca_pem).unwrap();
        Material::load(&files).unwrap()
    };
    (leaf("web"), leaf("products"))
}

/// The sidecars' configs: `web`'s outbound side (with or without resumption) and `products`'
/// inbound side, which lets `web` in.
fn configs(resumption: bool) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("ringside-bench-tls-{}", std::process::id()));
    let (web, products) = material(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let expect = Expect::ByServerName {
        trust_domain: TD.into(),
        namespace: "default".into(),
    };
    let web_id: SpiffeId = format!("spiffe://{TD}/ns/default/sa/web").parse().unwrap();
    (
        tls::client_config(&web, expect, resumption).unwrap(),
        tls::server_config(&products, Arc::new(AllowList(vec![web_id]))).unwrap(),
    )
}

fn connect(c: &Arc<ClientConfig>, s: &Arc<ServerConfig>) -> (Connection, Connection) {
    let name = ServerName::try_from("products").unwrap();
    (
        rustls::ClientConnection::new(c.clone(), name)
            .unwrap()
            .into(),
        rustls::ServerConnection::new(s.clone()).unwrap().into(),
    )
}

/// Move what each side has to send to the other until both are quiet (the handshake, and after
/// it the server's session tickets).
fn drive(client: &mut Connection, server: &mut Connection, wire: &mut Vec<u8>) {
    while flight(client, server, wire) | flight(server, client, wire) {}
}

/// What `from` has to send, through `wire`, to `to`; whether anything moved.
fn flight(from: &mut Connection, to: &mut Connection, wire: &mut Vec<u8>) -> bool {
    wire.clear();
    while from.wants_write() {
        from.write_tls(wire).unwrap();
    }
    let mut rd = &wire[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets().unwrap();
    }
    !wire.is_empty()
}

fn handshakes(c: &mut Criterion) {
    let name = tls::provider::NAME;
    let mut wire = Vec::with_capacity(64 * 1024);
    let (client, server) = configs(false);
    c.bench_function(&format!("{name}/full handshake"), |b| {
        b.iter(|| {
            let (mut cl, mut sv) = connect(&client, &server);
            drive(&mut cl, &mut sv, &mut wire);
            assert_eq!(cl.handshake_kind(), Some(HandshakeKind::Full));
        })
    });
    let (client, server) = configs(true);
    let (mut cl, mut sv) = connect(&client, &server);
    drive(&mut cl, &mut sv, &mut wire);
    c.bench_function(&format!("{name}/resumed handshake"), |b| {
        b.iter(|| {
            let (mut cl, mut sv) = connect(&client, &server);
            drive(&mut cl, &mut sv, &mut wire);
            // Every connection resumes: each resumed handshake brings fresh tickets.
            assert_eq!(cl.handshake_kind(), Some(HandshakeKind::Resumed));
        })
    });
}

fn records(c: &mut Criterion) {
    let name = tls::provider::NAME;
    let mut wire = Vec::with_capacity(64 * 1024);
    let (client, server) = configs(false);
    let (mut cl, mut sv) = connect(&client, &server);
    drive(&mut cl, &mut sv, &mut wire);
    let plain = vec![0x5au8; RECORD];
    let mut out = vec![0u8; RECORD];
    let mut g = c.benchmark_group(format!("{name}/record"));
    g.throughput(Throughput::Bytes(RECORD as u64));
    g.bench_function("16 KiB encrypt+decrypt", |b| {
        b.iter(|| {
            cl.writer().write_all(&plain).unwrap();
            flight(&mut cl, &mut sv, &mut wire);
            sv.reader().read_exact(&mut out).unwrap();
        })
    });
    g.finish();
    assert_eq!(out, plain);
}

/// Our sessions after an in-memory handshake: the fast path's client and server record layers.
fn our_records(c: &Arc<ClientConfig>, s: &Arc<ServerConfig>) -> (Records, Records) {
    let mut client = session::client(c.clone(), "products").unwrap().start();
    let mut server = session::server(s.clone()).unwrap().start();
    let (mut to_client, mut to_server) = (Vec::new(), Vec::new());
    let step = |hs: &mut Handshake, inbox: &mut Vec<u8>, outbox: &mut Vec<u8>| loop {
        let (used, next) = hs.advance(inbox);
        inbox.drain(..used);
        match next {
            Next::Send => {
                outbox.extend_from_slice(hs.outgoing());
                hs.sent();
            }
            Next::Read => return false,
            Next::Done => return true,
            Next::Failed(e) => panic!("handshake failed: {e}"),
        }
    };
    let (mut c_done, mut s_done) = (false, false);
    while !(c_done && s_done) {
        c_done = c_done || step(&mut client, &mut to_client, &mut to_server);
        s_done = s_done || step(&mut server, &mut to_server, &mut to_client);
    }
    let mut client = client.finish().unwrap().records;
    let server = server.finish().unwrap().records;
    // The server's session tickets, to the client.
    let mut at = 0;
    while let Some(len) = record::record_len(&to_client[at..]).unwrap() {
        client.open(&mut to_client[at..at + len]).unwrap();
        at += len;
    }
    (client, server)
}

fn own_records(c: &mut Criterion) {
    let name = tls::provider::NAME;
    let (client, server) = configs(false);
    let (mut cl, mut sv) = our_records(&client, &server);
    let mut rec = vec![0u8; record::MAX_SEALED];
    let mut g = c.benchmark_group(format!("{name}/record"));
    g.throughput(Throughput::Bytes(RECORD as u64));
    g.bench_function("16 KiB seal+open in place (fast path)", |b| {
        b.iter(|| {
            rec[record::HEADER..record::HEADER + RECORD].fill(0x5a);
            let n = cl.seal_data(&mut rec, RECORD).unwrap();
            match sv.open(&mut rec[..n]).unwrap() {
                Opened::Data(r) => assert_eq!(r.len(), RECORD),
                o => panic!("{o:?}"),
            }
        })
    });
    g.finish();
}

criterion_group!(benches, records, own_records, handshakes);
criterion_main!(benches);
