//! TLS 1.3 record protection for an established mesh connection, in place in the relay's own
//! buffers (sans-IO: bytes in, bytes out, no sockets).
//!
//! rustls does the handshake; once it is done, the relay takes the traffic secrets and rustls's
//! [`KernelConnection`] (the interface rustls gives kernel TLS) and protects records itself: a
//! record is decrypted where it was received and its plaintext sent from there, and plaintext is
//! received straight into the slots of the records it will travel in and encrypted there. With
//! rustls's buffered connection each received record was copied into its deframer and the
//! plaintext into its queue, and each sent record was built in a fresh allocation (ARCHITECTURE.md,
//! "Mesh TLS"). This is the layer kernel TLS replaces where the kernel has it: the same secrets,
//! the same [`KernelConnection`] for tickets and key updates.
//!
//! What this layer owns (RFC 8446 §5 and §4.6): record framing and the nonce (the IV XOR the
//! sequence number); the inner content type and its padding; `close_notify` and fatal alerts;
//! session tickets (handed to rustls, which stores them for resumption); key updates both ways
//! (answering the peer's request before the next application data, and updating its own keys
//! before the cipher's confidentiality limit). Everything else a peer could send after the
//! handshake is refused with the alert RFC 8446 names.

use std::ops::Range;

use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{
    AlertDescription, ConnectionTrafficSecrets, Error, ExtractedSecrets, InvalidMessage,
    PeerMisbehaved,
};

use crate::tls::provider::aead;

/// Record header: content type, legacy version, length.
pub const HEADER: usize = 5;
/// AEAD tag (every TLS 1.3 suite has a 16-byte tag).
pub const TAG: usize = 16;
/// Most plaintext one record carries.
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// What a sealed record adds to its plaintext: the header, the inner content type, the tag.
pub const OVERHEAD: usize = HEADER + 1 + TAG;
/// The largest record this layer sends.
pub const MAX_SEALED: usize = MAX_PLAINTEXT + OVERHEAD;
/// The largest record a peer may send (RFC 8446 §5.2: 2^14 + 256 bytes of ciphertext).
pub const MAX_RECEIVED: usize = HEADER + MAX_PLAINTEXT + 256;

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;

const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

/// Key updates a peer may ask for in a row without sending data in between.
const MAX_KEY_UPDATES_IN_A_ROW: u32 = 32;
/// Empty application data records a peer may send in a row.
const MAX_EMPTY_IN_A_ROW: u32 = 32;
/// Largest post-handshake message accepted (a session ticket is far smaller).
const MAX_HANDSHAKE_MESSAGE: usize = 64 * 1024;

/// One direction's key: the AEAD key, its IV and the next record's sequence number.
struct Keys {
    key: aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("seq", &self.seq).finish()
    }
}

impl Keys {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Keys, Error> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            #[allow(unreachable_patterns)]
            _ => return Err(Error::General("unsupported cipher for mesh records".into())),
        };
        let key = aead::UnboundKey::new(alg, key.as_ref())
            .map_err(|_| Error::General("bad traffic key".into()))?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| Error::General("bad traffic IV".into()))?;
        Ok(Keys {
            key: aead::LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The next record's nonce (RFC 8446 §5.3); the sequence number moves on, so no nonce is
    /// ever used twice with one key.
    fn next_nonce(&mut self) -> Result<aead::Nonce, Error> {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq = self.seq.checked_add(1).ok_or(Error::EncryptError)?;
        Ok(aead::Nonce::assume_unique_for_key(n))
    }
}

/// rustls's side of an established connection: it derives the next keys and (on a client)
/// stores session tickets.
pub enum Kernel {
    /// We are the client.
    Client(KernelConnection<ClientConnectionData>),
    /// We are the server.
    Server(KernelConnection<ServerConnectionData>),
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kernel::Client(_) => "Kernel::Client",
            Kernel::Server(_) => "Kernel::Server",
        })
    }
}

impl Kernel {
    fn next_tx(&mut self) -> Result<ConnectionTrafficSecrets, Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret().map(|(_, s)| s),
            Kernel::Server(k) => k.update_tx_secret().map(|(_, s)| s),
        }
    }

    fn next_rx(&mut self) -> Result<ConnectionTrafficSecrets, Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret().map(|(_, s)| s),
            Kernel::Server(k) => k.update_rx_secret().map(|(_, s)| s),
        }
    }

    fn confidentiality_limit(&self) -> u64 {
        let suite = match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        };
        suite
            .tls13()
            .map_or(u64::MAX, |s| s.common.confidentiality_limit)
    }
}

/// What one received record held.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data: this range of the record buffer (possibly empty).
    Data(Range<usize>),
    /// A message for the TLS layer itself (a ticket, a key update), handled.
    Control,
    /// The peer's `close_notify`: nothing more comes.
    Closed,
}

/// The length of the record at the start of `buf` (header included) once its header is there,
/// or `None` while fewer than [`HEADER`] bytes are. After the handshake every record is
/// encrypted application data (outer type 23, version 0x0303) of at most [`MAX_RECEIVED`] bytes.
pub fn record_len(buf: &[u8]) -> Result<Option<usize>, Error> {
    let Some(h) = buf.get(..HEADER) else {
        return Ok(None);
    };
    if h[0] != APPLICATION_DATA {
        return Err(Error::InvalidMessage(InvalidMessage::InvalidContentType));
    }
    if h[1..3] != [3, 3] {
        return Err(Error::InvalidMessage(
            InvalidMessage::UnknownProtocolVersion,
        ));
    }
    let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
    if HEADER + len > MAX_RECEIVED {
        return Err(Error::PeerSentOversizedRecord);
    }
    if len < 1 + TAG {
        return Err(Error::InvalidMessage(InvalidMessage::MessageTooShort));
    }
    Ok(Some(HEADER + len))
}

/// The alert that tells the peer why `e` ends the connection (none for an alert it sent).
pub fn alert_for(e: &Error) -> Option<AlertDescription> {
    Some(match e {
        Error::AlertReceived(_) => return None,
        Error::DecryptError => AlertDescription::BadRecordMac,
        Error::PeerSentOversizedRecord => AlertDescription::RecordOverflow,
        Error::InvalidMessage(_) => AlertDescription::DecodeError,
        Error::InappropriateMessage { .. } | Error::InappropriateHandshakeMessage { .. } => {
            AlertDescription::UnexpectedMessage
        }
        Error::PeerMisbehaved(_) => AlertDescription::UnexpectedMessage,
        _ => AlertDescription::InternalError,
    })
}

/// Record protection for one established connection, both directions.
#[derive(Debug)]
pub struct Records {
    tx: Keys,
    rx: Keys,
    kernel: Kernel,
    /// Records this side seals before updating its own keys (the cipher's confidentiality limit,
    /// less the key update record itself).
    tx_limit: u64,
    /// The peer asked for a key update: ours goes out before our next application data.
    answer_key_update: bool,
    /// A post-handshake message split across records.
    partial: Vec<u8>,
    key_updates_in_a_row: u32,
    empty_in_a_row: u32,
    peer_closed: bool,
}

impl Records {
    /// Take over from rustls once the handshake is done.
    pub fn new(secrets: ExtractedSecrets, kernel: Kernel) -> Result<Records, Error> {
        let tx_limit = kernel.confidentiality_limit().saturating_sub(1);
        Ok(Records {
            tx: Keys::new(secrets.tx.0, secrets.tx.1)?,
            rx: Keys::new(secrets.rx.0, secrets.rx.1)?,
            kernel,
            tx_limit,
            answer_key_update: false,
            partial: Vec::new(),
            key_updates_in_a_row: 0,
            empty_in_a_row: 0,
            peer_closed: false,
        })
    }

    /// Update the sending key after `records` more records instead of at the cipher's limit.
    #[cfg(test)]
    pub(super) fn set_tx_limit(&mut self, records: u64) {
        self.tx_limit = self.tx.seq + records;
    }

    /// Move to the next sending key without telling the peer (a test's peer that sent its own
    /// key update record by hand).
    #[cfg(test)]
    pub(super) fn rotate_tx_for_test(&mut self) {
        self.tx = Keys::new(0, self.kernel.next_tx().unwrap()).unwrap();
    }

    /// Whether the peer's `close_notify` was received.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Note a `close_notify` that rustls read during the handshake.
    pub fn set_peer_closed(&mut self) {
        self.peer_closed = true;
    }

    /// Seal one record in place. `record` holds the plaintext at `HEADER..HEADER + len` and room
    /// for the content type and tag after it; returns the sealed record's length.
    pub(super) fn seal(
        &mut self,
        record: &mut [u8],
        len: usize,
        content_type: u8,
    ) -> Result<usize, Error> {
        debug_assert!(len <= MAX_PLAINTEXT);
        let total = len + OVERHEAD;
        let record = record
            .get_mut(..total)
            .ok_or(Error::General("record buffer too small".into()))?;
        let cipher_len = (len + 1 + TAG) as u16;
        record[..HEADER].copy_from_slice(&[
            APPLICATION_DATA,
            3,
            3,
            (cipher_len >> 8) as u8,
            cipher_len as u8,
        ]);
        record[HEADER + len] = content_type;
        let nonce = self.tx.next_nonce()?;
        let (header, body) = record.split_at_mut(HEADER);
        let (text, tag) = body.split_at_mut(len + 1);
        let t = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, aead::Aad::from(&*header), text)
            .map_err(|_| Error::EncryptError)?;
        tag.copy_from_slice(t.as_ref());
        Ok(total)
    }

    /// Seal application data in place (see [`Records::seal_due`] first).
    pub fn seal_data(&mut self, record: &mut [u8], len: usize) -> Result<usize, Error> {
        self.seal(record, len, APPLICATION_DATA)
    }

    /// The records that must go out before the next application data: a key update, when the
    /// peer asked for one or this side's key nears its limit. Written to `out` (at least
    /// [`MAX_CONTROL`] bytes); returns the length (0: none due).
    pub fn seal_due(&mut self, out: &mut [u8]) -> Result<usize, Error> {
        if !self.answer_key_update && self.tx.seq < self.tx_limit {
            return Ok(0);
        }
        self.answer_key_update = false;
        // KeyUpdate, update_not_requested: we update ours and do not ask the peer to.
        out[HEADER..HEADER + 5].copy_from_slice(&[KEY_UPDATE, 0, 0, 1, 0]);
        let n = self.seal(out, 5, HANDSHAKE)?;
        self.tx = Keys::new(0, self.kernel.next_tx()?)?;
        Ok(n)
    }

    /// Seal a `close_notify` alert into `out`.
    pub fn seal_close_notify(&mut self, out: &mut [u8]) -> Result<usize, Error> {
        self.seal_alert(AlertDescription::CloseNotify, out)
    }

    /// Seal an alert into `out` (`close_notify` is a warning, any other is fatal).
    pub fn seal_alert(&mut self, alert: AlertDescription, out: &mut [u8]) -> Result<usize, Error> {
        let level = if alert == AlertDescription::CloseNotify {
            1
        } else {
            2
        };
        out[HEADER] = level;
        out[HEADER + 1] = u8::from(alert);
        self.seal(out, 2, ALERT)
    }

    /// Open the record that fills `record` (its length as [`record_len`] gave it), in place.
    pub fn open(&mut self, record: &mut [u8]) -> Result<Opened, Error> {
        if self.peer_closed {
            // Nothing counts after close_notify (RFC 8446 §6.1).
            return Ok(Opened::Control);
        }
        let nonce = self.rx.next_nonce()?;
        let (header, body) = record.split_at_mut(HEADER);
        let plain_len = self
            .rx
            .key
            .open_in_place(nonce, aead::Aad::from(&*header), body)
            .map_err(|_| Error::DecryptError)?
            .len();
        // TLSInnerPlaintext: content, content type, zero padding.
        let Some(last) = body[..plain_len].iter().rposition(|&b| b != 0) else {
            return Err(Error::PeerMisbehaved(
                PeerMisbehaved::IllegalTlsInnerPlaintext,
            ));
        };
        if last > MAX_PLAINTEXT {
            return Err(Error::PeerSentOversizedRecord);
        }
        let content = HEADER..HEADER + last;
        match body[last] {
            APPLICATION_DATA => {
                if !self.partial.is_empty() {
                    // Handshake messages are not interleaved with other records (RFC 8446 §5.1).
                    return Err(unexpected("application data inside a handshake message"));
                }
                self.key_updates_in_a_row = 0;
                if content.is_empty() {
                    self.empty_in_a_row += 1;
                    if self.empty_in_a_row > MAX_EMPTY_IN_A_ROW {
                        return Err(Error::PeerMisbehaved(PeerMisbehaved::TooManyEmptyFragments));
                    }
                } else {
                    self.empty_in_a_row = 0;
                }
                Ok(Opened::Data(content))
            }
            ALERT => self.alert(&record[content]),
            HANDSHAKE => {
                if content.is_empty() {
                    return Err(Error::InvalidMessage(InvalidMessage::InvalidEmptyPayload));
                }
                self.handshake(&record[content])
            }
            CHANGE_CIPHER_SPEC => Err(unexpected("change_cipher_spec after the handshake")),
            _ => Err(Error::InvalidMessage(InvalidMessage::InvalidContentType)),
        }
    }

    fn alert(&mut self, body: &[u8]) -> Result<Opened, Error> {
        if !self.partial.is_empty() {
            return Err(unexpected("an alert inside a handshake message"));
        }
        let &[_level, desc] = body else {
            return Err(Error::InvalidMessage(InvalidMessage::MessageTooShort));
        };
        match AlertDescription::from(desc) {
            AlertDescription::CloseNotify => {
                self.peer_closed = true;
                Ok(Opened::Closed)
            }
            // The one other warning TLS 1.3 keeps; a close_notify follows it.
            AlertDescription::UserCanceled => Ok(Opened::Control),
            a => Err(Error::AlertReceived(a)),
        }
    }

    /// Post-handshake messages: session tickets (a client stores them) and key updates.
    fn handshake(&mut self, body: &[u8]) -> Result<Opened, Error> {
        let joined;
        let mut msgs = if self.partial.is_empty() {
            body
        } else {
            self.partial.extend_from_slice(body);
            joined = std::mem::take(&mut self.partial);
            &joined[..]
        };
        while let Some(&[ty, a, b, c]) = msgs.get(..4) {
            let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
            if len > MAX_HANDSHAKE_MESSAGE {
                return Err(Error::InvalidMessage(InvalidMessage::MessageTooLarge));
            }
            let Some(payload) = msgs.get(4..4 + len) else {
                break;
            };
            msgs = &msgs[4 + len..];
            match ty {
                NEW_SESSION_TICKET => match &mut self.kernel {
                    Kernel::Client(k) => k.handle_new_session_ticket(payload)?,
                    Kernel::Server(_) => return Err(unexpected("a session ticket from a client")),
                },
                KEY_UPDATE => {
                    // The keys change after this record: nothing may follow in it.
                    if !msgs.is_empty() {
                        return Err(Error::PeerMisbehaved(
                            PeerMisbehaved::KeyEpochWithPendingFragment,
                        ));
                    }
                    let requested = match payload {
                        [0] => false,
                        [1] => true,
                        _ => return Err(Error::InvalidMessage(InvalidMessage::InvalidKeyUpdate)),
                    };
                    self.key_updates_in_a_row += 1;
                    if self.key_updates_in_a_row > MAX_KEY_UPDATES_IN_A_ROW {
                        return Err(Error::PeerMisbehaved(
                            PeerMisbehaved::TooManyKeyUpdateRequests,
                        ));
                    }
                    self.rx = Keys::new(0, self.kernel.next_rx()?)?;
                    self.answer_key_update |= requested;
                }
                _ => return Err(unexpected("a handshake message after the handshake")),
            }
        }
        if !msgs.is_empty() {
            if msgs.len() > MAX_HANDSHAKE_MESSAGE + 4 {
                return Err(Error::InvalidMessage(InvalidMessage::MessageTooLarge));
            }
            self.partial = msgs.to_vec();
        }
        Ok(Opened::Control)
    }
}

fn unexpected(what: &'static str) -> Error {
    Error::InvalidMessage(InvalidMessage::UnexpectedMessage(what))
}

/// Room [`Records::seal_due`], [`Records::seal_alert`] and [`Records::seal_close_notify`] need.
pub const MAX_CONTROL: usize = OVERHEAD + 8;
