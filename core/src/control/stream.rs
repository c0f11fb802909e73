//! The proxy stream: one connection per proxy to its daemon, held open. The proxy asks for it
//! with `GET /v1/proxy/stream` (its token, the index it has and the digest of its catalog) and
//! `Upgrade: ringside-proxy/1`; the daemon answers `101 Switching Protocols` and from then on
//! both sides send frames on the connection, as xDS carries acknowledgements on its stream:
//!
//! - daemon to proxy: `config` (a [`ProxyConfig`], whenever the index passes what the proxy
//!   has; without the catalog while the proxy has it), `ping` (`{}`, when nothing else was sent
//!   for a heartbeat: the proxy answers with a report), `ack` (a [`ReportAck`], one per report),
//!   `error` (an [`ErrorBody`], then the daemon closes: token revoked or expired, report
//!   refused);
//! - proxy to daemon: `report` (a [`ProxyReport`]: the version it applied, or a heartbeat).
//!
//! A frame is one line: its kind, a space, compact JSON (which has no raw newline), `\n`.
//!
//! A waiting proxy costs its daemon a socket and a small task instead of an HTTP connection with
//! its buffers, and an acknowledgement is a line on a connection already authenticated, not a
//! request with its own token check.
//!
//! [`ProxyConfig`]: super::api::ProxyConfig
//! [`ReportAck`]: super::api::ReportAck
//! [`ErrorBody`]: super::api::ErrorBody
//! [`ProxyReport`]: super::api::ProxyReport

use std::io;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

use super::api::{ErrorBody, ProxyReport};

/// The path of the stream.
pub const PATH: &str = "/v1/proxy/stream";
/// The protocol named in `Upgrade`.
pub const PROTOCOL: &str = "ringside-proxy/1";
/// The longest frame a daemon sends (a configuration with a large catalog).
pub const MAX_DAEMON_FRAME: usize = 16 << 20;
/// The longest frame a proxy sends (a report with its recent failures).
pub const MAX_PROXY_FRAME: usize = 256 << 10;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Daemon: a configuration.
    Config,
    /// Daemon: nothing changed; report.
    Ping,
    /// Daemon: the report was taken.
    Ack,
    /// Daemon: why it closes the stream.
    Error,
    /// Proxy: a report.
    Report,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Config,
        Kind::Ping,
        Kind::Ack,
        Kind::Error,
        Kind::Report,
    ];

    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Config => "config",
            Kind::Ping => "ping",
            Kind::Ack => "ack",
            Kind::Error => "error",
            Kind::Report => "report",
        }
    }
}

/// A frame's kind and JSON, from one line (with or without its `\n`).
pub fn parse(line: &[u8]) -> Result<(Kind, &[u8]), String> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let (name, json) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &b""[..]),
    };
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.as_str().as_bytes() == name)
        .ok_or_else(|| {
            format!(
                "unknown frame '{}' (expected one of config, ping, ack, error, report)",
                String::from_utf8_lossy(&name[..name.len().min(32)])
            )
        })?;
    if json.is_empty() {
        return Err(format!("frame '{}' without its JSON", kind.as_str()));
    }
    Ok((kind, json))
}

/// Write one frame: `kind`, a space, `json` (compact, no newline), `\n`, in one vectored write
/// where the socket takes it.
pub async fn write<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: Kind,
    json: impl hyper::body::Buf,
) -> io::Result<()> {
    use hyper::body::Buf;
    let head = Bytes::from(format!("{} ", kind.as_str()));
    let mut frame = head.chain(json).chain(Bytes::from_static(b"\n"));
    w.write_all_buf(&mut frame).await?;
    w.flush().await
}

/// Read one line into `line` (appended; the caller clears it after use): `Ok(true)` when a whole
/// line is there, `Ok(false)` at the end of the stream before any byte of a line. A line longer
/// than `limit` is an error. Safe to cancel (in `select!`): what was read stays in `line` and the
/// next call goes on from there.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
    limit: usize,
) -> io::Result<bool> {
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            if line.is_empty() {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream ended inside a frame",
            ));
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        if line.len() + take > limit + 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a frame longer than {limit} bytes"),
            ));
        }
        line.extend_from_slice(&avail[..take]);
        r.consume(take);
        if done {
            return Ok(true);
        }
    }
}

type Io = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

/// A proxy's end of the stream.
pub struct ProxyStream {
    rd: tokio::io::BufReader<tokio::io::ReadHalf<Io>>,
    wr: tokio::io::WriteHalf<Io>,
    line: Vec<u8>,
}

impl std::fmt::Debug for ProxyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyStream").finish_non_exhaustive()
    }
}

impl ProxyStream {
    /// Open the stream on the daemon's proxy socket, for a proxy that has the configuration of
    /// `index` and the catalog of `digest` (empty: none). A refusal is an error with the
    /// daemon's reason.
    pub async fn open(
        socket: &Path,
        token: &str,
        index: u64,
        digest: &str,
    ) -> anyhow::Result<ProxyStream> {
        let conn = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
            anyhow!(
                "cannot reach the daemon at {}: {e} (is `ringctl daemon` running?)",
                socket.display()
            )
        })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(conn)).await?;
        tokio::spawn(conn.with_upgrades());
        let digest = if digest.chars().all(|c| c.is_ascii_hexdigit()) {
            digest
        } else {
            ""
        };
        let req = hyper::Request::builder()
            .method("GET")
            .uri(format!("{PATH}?index={index}&catalog={digest}"))
            .header(hyper::header::HOST, "ringctl")
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(hyper::header::CONNECTION, "upgrade")
            .header(hyper::header::UPGRADE, PROTOCOL)
            .body(Full::new(Bytes::new()))?;
        let mut resp = sender.send_request(req).await?;
        if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            let why = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            bail!("the daemon refused the proxy stream ({status}): {why}");
        }
        let upgraded = hyper::upgrade::on(&mut resp)
            .await
            .context("the daemon's stream upgrade")?;
        let (rd, wr) = tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
        Ok(ProxyStream {
            rd: tokio::io::BufReader::with_capacity(16 * 1024, rd),
            wr,
            line: Vec::new(),
        })
    }

    /// The next frame from the daemon: its kind and JSON. The end of the stream is an error.
    /// Safe to cancel (a timeout around it loses nothing).
    pub async fn next(&mut self) -> anyhow::Result<(Kind, Vec<u8>)> {
        if !read_line(&mut self.rd, &mut self.line, MAX_DAEMON_FRAME).await? {
            bail!("the daemon closed the proxy stream");
        }
        let line = std::mem::take(&mut self.line);
        let (kind, json) = parse(&line).map_err(|e| anyhow!("the daemon sent {e}"))?;
        if kind == Kind::Error {
            let why = serde_json::from_slice::<ErrorBody>(json)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(json).into_owned());
            bail!("the daemon closed the proxy stream: {why}");
        }
        let json = json.to_vec();
        Ok((kind, json))
    }

    /// Send a report.
    pub async fn report(&mut self, report: &ProxyReport) -> anyhow::Result<()> {
        let json = Bytes::from(serde_json::to_vec(report)?);
        write(&mut self.wr, Kind::Report, json)
            .await
            .context("cannot send a report on the proxy stream")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_by_kind_and_refuse_the_rest() {
        assert_eq!(parse(b"ping {}\n").unwrap(), (Kind::Ping, &b"{}"[..]));
        assert_eq!(
            parse(b"report {\"a\":1}").unwrap(),
            (Kind::Report, &b"{\"a\":1}"[..])
        );
        for k in Kind::ALL {
            let line = format!("{} {{}}\n", k.as_str());
            assert_eq!(parse(line.as_bytes()).unwrap().0, k);
        }
        assert!(parse(b"configx {}").unwrap_err().contains("unknown frame"));
        assert!(parse(b"GET / HTTP/1.1")
            .unwrap_err()
            .contains("unknown frame"));
        assert!(parse(b"ack").unwrap_err().contains("without its JSON"));
        assert!(parse(b"ack \n").unwrap_err().contains("without its JSON"));
        assert!(parse(b"").is_err());
    }

    #[tokio::test]
    async fn lines_are_read_whole_across_reads_and_bounded() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = tokio::io::BufReader::with_capacity(8, b);
        let writer = tokio::spawn(async move {
            a.write_all(b"ack {\"ok\":true}\nping {}\n").await.unwrap();
            a.write_all(&[b'x'; 40]).await.unwrap();
            a.write_all(b"\n").await.unwrap();
        });
        let mut line = Vec::new();
        assert!(read_line(&mut r, &mut line, 100).await.unwrap());
        assert_eq!(line, b"ack {\"ok\":true}\n");
        line.clear();
        assert!(read_line(&mut r, &mut line, 100).await.unwrap());
        assert_eq!(line, b"ping {}\n");
        line.clear();
        let err = read_line(&mut r, &mut line, 20).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        writer.await.unwrap();

        // The end of the stream: clean between lines, an error inside one.
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = tokio::io::BufReader::new(b);
        a.write_all(b"ping {}\nack").await.unwrap();
        drop(a);
        let mut line = Vec::new();
        assert!(read_line(&mut r, &mut line, 100).await.unwrap());
        line.clear();
        let err = read_line(&mut r, &mut line, 100).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let (a, b) = tokio::io::duplex(64);
        drop(a);
        let mut r = tokio::io::BufReader::new(b);
        assert!(!read_line(&mut r, &mut Vec::new(), 100).await.unwrap());
    }

    #[tokio::test]
    async fn a_line_read_in_parts_under_select_loses_nothing() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = tokio::io::BufReader::with_capacity(4, b);
        let mut line = Vec::new();
        a.write_all(b"report {").await.unwrap();
        // Cancelled while the line is half there: the part read stays.
        let cut = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            read_line(&mut r, &mut line, 100),
        )
        .await;
        assert!(cut.is_err());
        a.write_all(b"\"id\":1}\n").await.unwrap();
        assert!(read_line(&mut r, &mut line, 100).await.unwrap());
        assert_eq!(line, b"report {\"id\":1}\n");
    }

    #[tokio::test]
    async fn a_written_frame_reads_back() {
        let (mut a, b) = tokio::io::duplex(1024);
        write(&mut a, Kind::Config, Bytes::from_static(b"{\"index\":3}"))
            .await
            .unwrap();
        let mut r = tokio::io::BufReader::new(b);
        let mut line = Vec::new();
        assert!(read_line(&mut r, &mut line, 100).await.unwrap());
        assert_eq!(parse(&line).unwrap(), (Kind::Config, &b"{\"index\":3}"[..]));
    }
}
