//! Reads in small steps, so hyper's request-head limit holds to within one step.
//!
//! hyper refuses a head when its read buffer reaches `max_buf_size` before the head is complete,
//! checking before each read; one read may fill whatever the buffer has room for (up to about as
//! much again when the client sent it all at once, as a client of a Unix socket does: a 112 KiB
//! head passed a 64 KiB limit). Reads of at most [`STEP`] bytes bound the overshoot to less than
//! one step. Only the control daemon uses it: its requests are small and few.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most one read returns.
pub const STEP: usize = 1024;

/// A stream whose reads return at most [`STEP`] bytes.
pub struct SmallReads<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for SmallReads<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let room = buf.remaining().min(STEP);
        let mut step = buf.take(room);
        let r = Pin::new(&mut self.0).poll_read(cx, &mut step);
        let n = step.filled().len();
        // SAFETY: the first `n` bytes of the unfilled part were initialized by the inner read
        // (through `step`, which borrows that part of `buf`).
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SmallReads<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn reads_return_at_most_a_step_and_lose_nothing() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut r = SmallReads(&data[..]);
        let mut buf = vec![0u8; 8192];
        let n = r.read(&mut buf).await.unwrap();
        assert_eq!(n, STEP);
        let mut all = buf[..n].to_vec();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, data);
    }
}
