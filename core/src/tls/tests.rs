//! The mesh configs against each other in memory (no sockets): a full handshake, a resumed one,
//! and the refusals. scripts/test.sh runs these on ring and on AWS-LC (`--features aws-lc-rs`).

use std::io::{Read, Write};

use super::*;
use rcgen::{CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::{CipherSuite, Connection, HandshakeKind, NamedGroup};

const TD: &str = "mesh.test";

/// A CA, and leaves it signs, written as the files a sidecar is given.
struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl Pki {
    /// A CA named `CA <tag>`.
    fn new(tag: &str) -> Pki {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("ringside-tls-test-{pid}-{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("CA {tag}"));
        let ca_pem = p.self_signed(&key).unwrap().pem();
        Pki {
            dir,
            issuer: Issuer::new(p, key),
            ca_pem,
        }
    }

    /// A leaf for `spiffe://mesh.test/ns/default/sa/<service>`, trusting `trust`'s CA.
    fn leaf(&self, service: &str, trust: &Pki) -> Material {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        let id = format!("spiffe://{TD}/ns/default/sa/{service}");
        p.subject_alt_names = vec![SanType::URI(id.as_str().try_into().unwrap())];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let files = TlsFiles {
            cert: self.dir.join(format!("{service}.crt")),
            key: self.dir.join(format!("{service}.key")),
            ca: self.dir.join(format!("{service}.ca")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::write(&files.ca, &trust.ca_pem).unwrap();
        Material::load(&files).unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sid(service: &str) -> SpiffeId {
    format!("spiffe://{TD}/ns/default/sa/{service}")
        .parse()
        .unwrap()
}

/// The outbound side's config: the expected service is the server name.
fn origin(m: &Material) -> Arc<ClientConfig> {
    let expect = Expect::ByServerName {
        trust_domain: TD.into(),
        namespace: "default".into(),
    };
    client_config(m, expect, true).unwrap()
}

/// A handshake that failed: the side that refused, why, and what the other side made of the
/// alert it was sent.
#[derive(Debug, PartialEq)]
struct Refused {
    by: &'static str,
    reason: Reason,
    peer_saw: Option<Reason>,
}

/// Move bytes both ways until neither side has anything to send.
fn drive(client: &mut Connection, server: &mut Connection) -> Result<(), Refused> {
    while flight(client, server, "server")? | flight(server, client, "client")? {}
    Ok(())
}

/// What `from` has to send, to `to` (`by` names `to`); whether anything moved.
fn flight(from: &mut Connection, to: &mut Connection, by: &'static str) -> Result<bool, Refused> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        if let Err(e) = to.process_new_packets() {
            // The alert the refusing side queued, to the other side.
            let mut alert = Vec::new();
            while to.wants_write() {
                to.write_tls(&mut alert).unwrap();
            }
            from.read_tls(&mut &alert[..]).unwrap();
            return Err(Refused {
                by,
                reason: reason_for(&e),
                peer_saw: from.process_new_packets().err().map(|e| reason_for(&e)),
            });
        }
    }
    Ok(!buf.is_empty())
}

fn pair(c: Arc<ClientConfig>, s: Arc<ServerConfig>, service: &str) -> (Connection, Connection) {
    let name = ServerName::try_from(service.to_string()).unwrap();
    (
        Connection::Client(rustls::ClientConnection::new(c, name).unwrap()),
        Connection::Server(rustls::ServerConnection::new(s).unwrap()),
    )
}

#[test]
fn a_full_handshake_then_a_resumed_one_with_aes_128_gcm_and_x25519() {
    let pki = Pki::new("ok");
    let c = origin(&pki.leaf("web", &pki));
    let s = server_config(
        &pki.leaf("products", &pki),
        Arc::new(AllowList(vec![sid("web")])),
    )
    .unwrap();
    for (n, kind) in [(1, HandshakeKind::Full), (2, HandshakeKind::Resumed)] {
        let (mut client, mut server) = pair(c.clone(), s.clone(), "products");
        drive(&mut client, &mut server).unwrap();
        assert_eq!(client.handshake_kind(), Some(kind), "connection {n}");
        assert_eq!(
            client.negotiated_cipher_suite().map(|s| s.suite()),
            Some(CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        assert_eq!(
            client.negotiated_key_exchange_group().map(|g| g.name()),
            Some(NamedGroup::X25519)
        );
        assert_eq!(client.alpn_protocol(), Some(ALPN_TCP));
        assert_eq!(
            session::peer_id(&server),
            Some(sid("web")),
            "connection {n}"
        );
        // Bytes through, both ways.
        client.writer().write_all(&[7u8; 10_000]).unwrap();
        server.writer().write_all(b"pong").unwrap();
        drive(&mut client, &mut server).unwrap();
        let mut got = Vec::new();
        let _ = server.reader().read_to_end(&mut got);
        assert_eq!(got, vec![7u8; 10_000]);
        let mut got = Vec::new();
        let _ = client.reader().read_to_end(&mut got);
        assert_eq!(got, b"pong");
    }
}

#[test]
fn a_client_the_intentions_do_not_allow_is_refused_with_access_denied() {
    let pki = Pki::new("denied");
    let c = origin(&pki.leaf("intruder", &pki));
    let s = server_config(
        &pki.leaf("products", &pki),
        Arc::new(AllowList(vec![sid("web")])),
    )
    .unwrap();
    let (mut client, mut server) = pair(c, s, "products");
    // The source reads the alert as the destination's refusal.
    assert_eq!(
        drive(&mut client, &mut server),
        Err(Refused {
            by: "server",
            reason: Reason::IntentionDenied,
            peer_saw: Some(Reason::DeniedByDestination),
        })
    );
}

#[test]
fn a_server_with_another_services_identity_is_refused() {
    let pki = Pki::new("mismatch");
    let c = origin(&pki.leaf("web", &pki));
    // A valid certificate of the same mesh, but for another service than the one dialled.
    let s = server_config(&pki.leaf("billing", &pki), Arc::new(AllowList(vec![]))).unwrap();
    let (mut client, mut server) = pair(c, s, "products");
    assert_eq!(
        drive(&mut client, &mut server),
        Err(Refused {
            by: "client",
            reason: Reason::TlsIdentityMismatch,
            peer_saw: Some(Reason::TlsIdentityMismatch),
        })
    );
}

#[test]
fn certificates_from_another_ca_are_refused_on_both_sides() {
    let mesh = Pki::new("mesh");
    let rogue = Pki::new("rogue");
    // A server whose certificate another CA signed, under the right name.
    let c = origin(&mesh.leaf("web", &mesh));
    let s = server_config(&rogue.leaf("products", &mesh), Arc::new(AllowList(vec![]))).unwrap();
    let (mut client, mut server) = pair(c, s, "products");
    assert_eq!(
        drive(&mut client, &mut server),
        Err(Refused {
            by: "client",
            reason: Reason::TlsUnknownCa,
            peer_saw: Some(Reason::TlsUnknownCa),
        })
    );
    // A client whose certificate another CA signed, under an allowed name.
    let c = origin(&rogue.leaf("web", &mesh));
    let s = server_config(
        &mesh.leaf("products", &mesh),
        Arc::new(AllowList(vec![sid("web")])),
    )
    .unwrap();
    let (mut client, mut server) = pair(c, s, "products");
    assert_eq!(
        drive(&mut client, &mut server),
        Err(Refused {
            by: "server",
            reason: Reason::TlsUnknownCa,
            peer_saw: Some(Reason::TlsUnknownCa),
        })
    );
    // A CA that takes the mesh CA's name, with a key of its own: the chain is found by name and
    // its signature does not verify (answered with the `decrypt_error` alert).
    let impostor = Pki::new("mesh");
    let c = origin(&mesh.leaf("web", &mesh));
    let s = server_config(
        &impostor.leaf("products", &mesh),
        Arc::new(AllowList(vec![])),
    )
    .unwrap();
    let (mut client, mut server) = pair(c, s, "products");
    assert_eq!(
        drive(&mut client, &mut server),
        Err(Refused {
            by: "client",
            reason: Reason::TlsUnknownCa,
            peer_saw: Some(Reason::TlsHandshakeFailed),
        })
    );
}

// --- The fast path's own record layer (`tls::record`), after rustls's handshake ---

use crate::tls::record::{self, Opened, Records};
use crate::tls::session::{Finished, Handshake, Next};

/// Advance one of our handshakes over what it was sent; what it sends goes to `outbox`.
/// `Ok(true)` once done.
fn step_ours(
    hs: &mut Handshake,
    inbox: &mut Vec<u8>,
    outbox: &mut Vec<u8>,
) -> Result<bool, rustls::Error> {
    loop {
        let (used, next) = hs.advance(inbox);
        inbox.drain(..used);
        match next {
            Next::Send => {
                outbox.extend_from_slice(hs.outgoing());
                hs.sent();
            }
            Next::Read => return Ok(false),
            Next::Done => return Ok(true),
            Next::Failed(e) => {
                outbox.extend_from_slice(hs.outgoing());
                return Err(e);
            }
        }
    }
}

/// Feed a buffered rustls connection what it was sent; what it sends goes to `outbox`.
fn step_buffered(
    conn: &mut Connection,
    inbox: &mut Vec<u8>,
    outbox: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    let mut rd = &inbox[..];
    while !rd.is_empty() {
        conn.read_tls(&mut rd).unwrap();
        conn.process_new_packets()?;
    }
    inbox.clear();
    while conn.wants_write() {
        conn.write_tls(outbox).unwrap();
    }
    Ok(())
}

/// Our client against our server, in memory: each side's session and the bytes it was sent that
/// its handshake did not take.
type Ends = ((Finished, Vec<u8>), (Finished, Vec<u8>));

fn ours_pair(c: Arc<ClientConfig>, s: Arc<ServerConfig>) -> Ends {
    let mut client = session::client(c, "products").unwrap().start();
    let mut server = session::server(s).unwrap().start();
    let (mut to_client, mut to_server) = (Vec::new(), Vec::new());
    let (mut c_done, mut s_done) = (false, false);
    for _ in 0..16 {
        if !c_done {
            c_done = step_ours(&mut client, &mut to_client, &mut to_server).unwrap();
        }
        if !s_done {
            s_done = step_ours(&mut server, &mut to_server, &mut to_client).unwrap();
        }
        if c_done && s_done {
            return (
                (client.finish().unwrap(), to_client),
                (server.finish().unwrap(), to_server),
            );
        }
    }
    panic!("the handshake did not finish");
}

/// Our client's and our server's records once the handshake is done and the tickets are taken.
fn settled_pair(c: &Arc<ClientConfig>, s: &Arc<ServerConfig>) -> (Records, Records) {
    let ((mut client, mut to_client), (mut server, mut to_server)) =
        ours_pair(c.clone(), s.clone());
    open_all(&mut client.records, &mut to_client).unwrap();
    open_all(&mut server.records, &mut to_server).unwrap();
    (client.records, server.records)
}

fn mesh_configs(pki: &Pki) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let c = origin(&pki.leaf("web", pki));
    let s = server_config(
        &pki.leaf("products", pki),
        Arc::new(AllowList(vec![sid("web")])),
    )
    .unwrap();
    (c, s)
}

/// Seal `data` as our relay does (any record due first, then records of at most 16 KiB).
fn seal_all(r: &mut Records, data: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    let mut control = [0u8; record::MAX_CONTROL];
    let n = r.seal_due(&mut control).unwrap();
    wire.extend_from_slice(&control[..n]);
    for chunk in data.chunks(record::MAX_PLAINTEXT) {
        let mut rec = vec![0u8; record::MAX_SEALED];
        rec[record::HEADER..record::HEADER + chunk.len()].copy_from_slice(chunk);
        let n = r.seal_data(&mut rec, chunk.len()).unwrap();
        wire.extend_from_slice(&rec[..n]);
    }
    wire
}

/// A record with any inner content (`inner` then the content type, as the peer would seal it).
fn craft(r: &mut Records, inner: &[u8], content_type: u8) -> Vec<u8> {
    let mut rec = vec![0u8; inner.len() + record::OVERHEAD];
    rec[record::HEADER..record::HEADER + inner.len()].copy_from_slice(inner);
    let n = r.seal(&mut rec, inner.len(), content_type).unwrap();
    rec.truncate(n);
    rec
}

/// Open every complete record in `wire` (leaving an incomplete one): the data, and whether
/// close_notify came.
fn open_all(r: &mut Records, wire: &mut Vec<u8>) -> Result<(Vec<u8>, bool), rustls::Error> {
    let mut data = Vec::new();
    let mut at = 0;
    while let Some(len) = record::record_len(&wire[at..])? {
        if at + len > wire.len() {
            break;
        }
        match r.open(&mut wire[at..at + len])? {
            Opened::Data(span) => data.extend_from_slice(&wire[at + span.start..at + span.end]),
            Opened::Control => {}
            Opened::Closed => return Ok((data, true)),
        }
        at += len;
    }
    wire.drain(..at);
    Ok((data, false))
}

#[test]
fn our_records_carry_bytes_both_ways_and_the_tickets_they_carry_resume() {
    let pki = Pki::new("records");
    let (c, s) = mesh_configs(&pki);
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    for (n, kind) in [(1, HandshakeKind::Full), (2, HandshakeKind::Resumed)] {
        // Our client against rustls's own server (as the L7 path's or another build's end).
        let mut client = session::client(c.clone(), "products").unwrap().start();
        let mut server = Connection::Server(rustls::ServerConnection::new(s.clone()).unwrap());
        let (mut to_client, mut to_server) = (Vec::new(), Vec::new());
        let mut done = false;
        for _ in 0..16 {
            done = step_ours(&mut client, &mut to_client, &mut to_server).unwrap();
            step_buffered(&mut server, &mut to_server, &mut to_client).unwrap();
            if done && !server.is_handshaking() {
                break;
            }
        }
        assert!(done && !server.is_handshaking(), "connection {n}");
        assert_eq!(server.handshake_kind(), Some(kind), "connection {n}");
        let mut ours = client.finish().unwrap();
        assert_eq!(ours.peer, Some(sid("products")));
        // The server's session tickets arrive behind the handshake: our records hand them to
        // rustls (the second connection resumes with one).
        let (data, closed) = open_all(&mut ours.records, &mut to_client).unwrap();
        assert!(data.is_empty() && !closed && to_client.is_empty());
        // Both ways, in records of every size up to the largest, split at odd places.
        let mut wire = seal_all(&mut ours.records, &payload);
        let mut rd = &wire[..];
        let mut got = Vec::new();
        while !rd.is_empty() {
            let mut piece = &rd[..rd.len().min(7_001)];
            rd = &rd[piece.len()..];
            while !piece.is_empty() {
                server.read_tls(&mut piece).unwrap();
                server.process_new_packets().unwrap();
                let _ = server.reader().read_to_end(&mut got);
            }
        }
        assert_eq!(got, payload, "connection {n}");
        server.writer().write_all(&payload[..40_000]).unwrap();
        server.writer().write_all(b"").unwrap();
        wire.clear();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        let mut got = Vec::new();
        let mut fed = Vec::new();
        for piece in wire.chunks(3_333) {
            fed.extend_from_slice(piece);
            got.extend(open_all(&mut ours.records, &mut fed).unwrap().0);
        }
        assert_eq!(got, &payload[..40_000], "connection {n}");
        // close_notify both ways.
        server.send_close_notify();
        wire.clear();
        server.write_tls(&mut wire).unwrap();
        assert_eq!(
            open_all(&mut ours.records, &mut wire).unwrap(),
            (vec![], true)
        );
        assert!(ours.records.peer_closed());
        let mut out = [0u8; record::MAX_CONTROL];
        let k = ours.records.seal_close_notify(&mut out).unwrap();
        server.read_tls(&mut &out[..k]).unwrap();
        let state = server.process_new_packets().unwrap();
        assert!(state.peer_has_closed());
    }
}

#[test]
fn our_server_takes_data_behind_the_finished_and_answers_a_key_update_request() {
    let pki = Pki::new("records-server");
    let (c, s) = mesh_configs(&pki);
    let name = ServerName::try_from("products").unwrap();
    let mut client = Connection::Client(rustls::ClientConnection::new(c, name).unwrap());
    let mut server = session::server(s).unwrap().start();
    let (mut to_client, mut to_server) = (Vec::new(), Vec::new());
    // The client writes before the handshake ends: its first bytes travel with its Finished.
    client
        .writer()
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .unwrap();
    let mut done = false;
    for _ in 0..16 {
        step_buffered(&mut client, &mut to_client, &mut to_server).unwrap();
        done = step_ours(&mut server, &mut to_server, &mut to_client).unwrap();
        if done {
            break;
        }
    }
    assert!(done);
    let mut ours = server.finish().unwrap();
    assert_eq!(ours.peer, Some(sid("web")));
    assert_eq!(ours.early, b"GET / HTTP/1.1\r\n\r\n");
    // Session tickets, to the client.
    step_buffered(&mut client, &mut to_client, &mut to_server).unwrap();
    // The client updates its key and asks us to update ours.
    client.refresh_traffic_keys().unwrap();
    client.writer().write_all(b"after the update").unwrap();
    step_buffered(&mut client, &mut to_client, &mut to_server).unwrap();
    let (data, _) = open_all(&mut ours.records, &mut to_server).unwrap();
    assert_eq!(data, b"after the update");
    // Our key update goes out before our next data, and the client reads both.
    let wire = seal_all(&mut ours.records, b"answer");
    assert!(wire.len() > record::MAX_CONTROL, "a key update went first");
    to_client.extend_from_slice(&wire);
    step_buffered(&mut client, &mut to_client, &mut to_server).unwrap();
    let mut got = Vec::new();
    let _ = client.reader().read_to_end(&mut got);
    assert_eq!(got, b"answer");
    // And the next data needs no update.
    let wire = seal_all(&mut ours.records, b"again");
    assert_eq!(wire.len(), 5 + record::OVERHEAD);
}

#[test]
fn the_sending_key_is_updated_before_its_limit() {
    let pki = Pki::new("records-limit");
    let (c, s) = mesh_configs(&pki);
    let (mut client, mut server) = settled_pair(&c, &s);
    client.set_tx_limit(3);
    let mut got = Vec::new();
    for i in 0..20u8 {
        let mut wire = seal_all(&mut client, &[i; 100]);
        got.extend(open_all(&mut server, &mut wire).unwrap().0);
        assert!(wire.is_empty());
    }
    let want: Vec<u8> = (0..20u8).flat_map(|i| [i; 100]).collect();
    assert_eq!(got, want);
}

#[test]
fn records_tampered_with_replayed_reordered_or_dropped_are_refused() {
    let pki = Pki::new("records-tamper");
    let (c, s) = mesh_configs(&pki);
    let fresh = || {
        let (mut client, server) = settled_pair(&c, &s);
        let recs: Vec<Vec<u8>> = (0..3u8).map(|i| seal_all(&mut client, &[i; 300])).collect();
        (server, recs)
    };
    let open = |r: &mut Records, rec: &[u8]| {
        let mut rec = rec.to_vec();
        let len = record::record_len(&rec)?.unwrap();
        assert_eq!(len, rec.len());
        r.open(&mut rec)
    };
    // One bit flipped in the ciphertext, in the tag; the header (the additional data) made to
    // say one byte less, and the record cut to match.
    for at in [10, 320, 0] {
        let (mut r, mut recs) = fresh();
        if at == 0 {
            recs[0][4] -= 1;
            recs[0].pop();
        } else {
            recs[0][at] ^= 1;
        }
        let e = open(&mut r, &recs[0]);
        assert_eq!(e, Err(rustls::Error::DecryptError), "bit flipped at {at}");
        // The relay answers with bad_record_mac and reports a TLS failure.
        assert_eq!(
            record::alert_for(&e.unwrap_err()),
            Some(AlertDescription::BadRecordMac)
        );
    }
    // Replayed.
    let (mut r, recs) = fresh();
    assert!(matches!(open(&mut r, &recs[0]), Ok(Opened::Data(_))));
    assert_eq!(open(&mut r, &recs[0]), Err(rustls::Error::DecryptError));
    // Reordered, or one dropped.
    let (mut r, recs) = fresh();
    assert_eq!(open(&mut r, &recs[1]), Err(rustls::Error::DecryptError));
    let (mut r, recs) = fresh();
    assert!(matches!(open(&mut r, &recs[0]), Ok(Opened::Data(_))));
    assert_eq!(open(&mut r, &recs[2]), Err(rustls::Error::DecryptError));
    // Plaintext records after the handshake (a forged alert or close), an unknown version, a
    // length beyond what TLS allows, a record too short to hold a tag.
    for (header, want) in [
        (
            [21, 3, 3, 0, 2],
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
        ),
        (
            [22, 3, 3, 0, 40],
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
        ),
        (
            [23, 3, 1, 0, 40],
            rustls::Error::InvalidMessage(rustls::InvalidMessage::UnknownProtocolVersion),
        ),
        (
            [23, 3, 3, 0x41, 0x01],
            rustls::Error::PeerSentOversizedRecord,
        ),
        (
            [23, 3, 3, 0, 16],
            rustls::Error::InvalidMessage(rustls::InvalidMessage::MessageTooShort),
        ),
    ] {
        assert_eq!(record::record_len(&header), Err(want), "{header:?}");
    }
    assert_eq!(record::record_len(&[23, 3, 3, 0]), Ok(None));
}

#[test]
fn what_a_peer_may_not_send_after_the_handshake_is_refused() {
    let pki = Pki::new("records-misbehave");
    let (c, s) = mesh_configs(&pki);
    // Our client (the peer, misbehaving) and our server (judging).
    let fresh = || settled_pair(&c, &s);
    let judge = |records: &[(&[u8], u8)]| -> Result<Vec<u8>, rustls::Error> {
        let (mut peer, mut ours) = fresh();
        let mut wire = Vec::new();
        for (inner, ty) in records {
            wire.extend(craft(&mut peer, inner, *ty));
        }
        let (data, _) = open_all(&mut ours, &mut wire)?;
        Ok(data)
    };
    use rustls::{InvalidMessage, PeerMisbehaved};
    let unexpected = |e: &rustls::Error| {
        matches!(
            e,
            rustls::Error::InvalidMessage(InvalidMessage::UnexpectedMessage(_))
        )
    };
    // A session ticket, sent by a client.
    let ticket: &[u8] = &[4, 0, 0, 1, 0];
    assert!(unexpected(&judge(&[(ticket, 22)]).unwrap_err()));
    // A key update with data behind it in the same record (it must end its record).
    let e = judge(&[(&[24, 0, 0, 1, 0, 4, 0, 0, 1, 0], 22)]).unwrap_err();
    assert_eq!(
        e,
        rustls::Error::PeerMisbehaved(PeerMisbehaved::KeyEpochWithPendingFragment)
    );
    // A key update neither requested nor not.
    let e = judge(&[(&[24, 0, 0, 1, 2], 22)]).unwrap_err();
    assert_eq!(
        e,
        rustls::Error::InvalidMessage(InvalidMessage::InvalidKeyUpdate)
    );
    // Another handshake (a certificate request: post-handshake authentication is not offered).
    assert!(unexpected(
        &judge(&[(&[13, 0, 0, 4, 0, 0, 0, 0], 22)]).unwrap_err()
    ));
    // change_cipher_spec, an unknown content type, nothing but padding, an empty handshake.
    assert!(unexpected(&judge(&[(&[1], 20)]).unwrap_err()));
    assert_eq!(
        judge(&[(b"x", 99)]).unwrap_err(),
        rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType)
    );
    assert_eq!(
        judge(&[(&[0, 0, 0], 0)]).unwrap_err(),
        rustls::Error::PeerMisbehaved(PeerMisbehaved::IllegalTlsInnerPlaintext)
    );
    assert_eq!(
        judge(&[(&[], 22)]).unwrap_err(),
        rustls::Error::InvalidMessage(InvalidMessage::InvalidEmptyPayload)
    );
    // Application data between the halves of a handshake message.
    assert!(unexpected(
        &judge(&[(&[24, 0], 22), (b"data", 23), (&[0, 1, 0], 22)]).unwrap_err()
    ));
    // Endless key updates, endless empty records: each costs us work and carries nothing.
    let updates: Vec<(&[u8], u8)> = vec![(&[24, 0, 0, 1, 0], 22); 33];
    // (each one changes the key: the peer side updates too, as it would)
    let (mut peer, mut ours) = fresh();
    let mut wire = Vec::new();
    for (inner, ty) in &updates {
        wire.extend(craft(&mut peer, inner, *ty));
        peer.rotate_tx_for_test();
    }
    assert_eq!(
        open_all(&mut ours, &mut wire).unwrap_err(),
        rustls::Error::PeerMisbehaved(PeerMisbehaved::TooManyKeyUpdateRequests)
    );
    let empties: Vec<(&[u8], u8)> = vec![(&[], 23); 33];
    assert_eq!(
        judge(&empties).unwrap_err(),
        rustls::Error::PeerMisbehaved(PeerMisbehaved::TooManyEmptyFragments)
    );
    // A fatal alert says why, for the reason code; after close_notify nothing counts.
    let e = judge(&[(&[2, 49], 21)]).unwrap_err();
    assert_eq!(
        e,
        rustls::Error::AlertReceived(AlertDescription::AccessDenied)
    );
    assert_eq!(reason_for(&e), Reason::DeniedByDestination);
    assert_eq!(
        judge(&[(b"kept", 23), (&[1, 0], 21), (b"dropped", 23)]),
        Ok(b"kept".to_vec())
    );
    // What is allowed: padding after the content type, a key update split across records,
    // user_canceled before a close.
    assert_eq!(
        judge(&[(&[b'o', b'k', 23, 0, 0, 0], 0)]),
        Ok(b"ok".to_vec())
    );
    let (mut peer, mut ours) = fresh();
    let mut wire = craft(&mut peer, &[24, 0], 22);
    wire.extend(craft(&mut peer, &[0, 1, 0], 22));
    peer.rotate_tx_for_test();
    wire.extend(craft(&mut peer, b"new key", 23));
    assert_eq!(
        open_all(&mut ours, &mut wire),
        Ok((b"new key".to_vec(), false))
    );
    assert_eq!(
        judge(&[(&[1, 90], 21), (b"more", 23)]),
        Ok(b"more".to_vec())
    );
}

mod arbitrary_records {
    use super::*;
    use proptest::prelude::*;

    fn content_type() -> impl Strategy<Value = u8> {
        prop_oneof![
            Just(20u8),
            Just(21),
            Just(22),
            Just(23),
            Just(0),
            any::<u8>()
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Whatever a peer seals (any content type, any inner bytes, records split anywhere, a
        /// byte flipped on the way), opening it never panics; data records alone arrive whole.
        #[test]
        fn whatever_a_peer_seals_is_opened_or_refused(
            records in proptest::collection::vec(
                (content_type(), proptest::collection::vec(any::<u8>(), 0..48)), 1..8),
            cut in any::<prop::sample::Index>(),
            flip in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let pki = Pki::new("records-prop");
            let (c, s) = mesh_configs(&pki);
            let (mut peer, mut ours) = settled_pair(&c, &s);
            let mut wire = Vec::new();
            for (ty, inner) in &records {
                wire.extend(craft(&mut peer, inner, *ty));
            }
            if let Some(at) = flip {
                let at = at.index(wire.len());
                wire[at] ^= 0x20;
            }
            let at = cut.index(wire.len());
            let mut second = wire.split_off(at);
            let first = open_all(&mut ours, &mut wire);
            let got = first.and_then(|(mut data, closed)| {
                if closed {
                    return Ok(data);
                }
                wire.append(&mut second);
                let (more, _) = open_all(&mut ours, &mut wire)?;
                data.extend(more);
                Ok(data)
            });
            let all_data = records.iter().all(|(ty, _)| *ty == 23);
            if all_data && flip.is_none() {
                let want: Vec<u8> = records.iter().flat_map(|(_, i)| i.clone()).collect();
                prop_assert_eq!(got, Ok(want));
            }
        }
    }
}
