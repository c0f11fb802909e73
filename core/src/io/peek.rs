//! Feeding the detector: the client's first bytes are peeked (never consumed) and the socket's
//! receive low-water mark is set to what the detector still needs, so a waiting connection costs
//! no wake-up and no buffer until its bytes are there or its deadline passes.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

use crate::decide::detect::{Detection, Detector, Want};
use crate::io::sys;

/// The client went away (or its socket failed) before its bytes said anything.
#[derive(Debug)]
pub struct Gone;

/// Wait for enough of the client's first bytes to tell `want`, for at most `wait`.
pub async fn detect(client: &TcpStream, want: Want, wait: Duration) -> Result<Detection, Gone> {
    let fd = client.as_raw_fd();
    let det = Detector::new(want, Instant::now(), wait);
    let mut small = [0u8; 64];
    let mut big: Vec<u8> = Vec::new();
    let mut lowat = 1usize;
    let mut woken = false;
    let result = loop {
        // What is there now, and what the detector makes of it.
        let buf: &mut [u8] = if lowat <= small.len() {
            &mut small
        } else {
            big.resize(lowat, 0);
            &mut big
        };
        let have = match sys::peek(fd, buf) {
            Ok(0) => break Err(Gone),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => break Err(Gone),
        };
        // Woken with fewer bytes than the low-water mark: the peer shut its side (or the wake
        // was spurious, then wait again).
        let eof = woken && have < lowat && sys::peer_closed(fd);
        match det.feed(&buf[..have], Instant::now(), eof) {
            Detection::NeedMore(n) => {
                if n != lowat {
                    if sys::set_rcvlowat(fd, n).is_err() {
                        break Err(Gone);
                    }
                    lowat = n;
                }
            }
            d => break Ok(d),
        }
        let left = det.deadline().saturating_duration_since(Instant::now());
        match monoio::time::timeout(left, client.readable(false)).await {
            Err(_) => break Ok(Detection::Timeout),
            Ok(Err(_)) => break Err(Gone),
            Ok(Ok(())) => woken = true,
        }
    };
    if lowat != 1 {
        let _ = sys::set_rcvlowat(fd, 1);
    }
    result
}
