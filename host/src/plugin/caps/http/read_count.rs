//! What a connection has read, counted as it reads: how much of hyper's read buffer a response's head keeps.
//!
//! hyper reads a response into one buffer and cuts the head and the first
//! part of the body out of it; a part of the body read with the head
//! keeps the whole buffer for as long as the guest keeps the response
//! unread, however small the headers it holds once their values are made
//! their own (`heads.rs`). What the connection had read when the head was
//! in is about that buffer (hyper grows it to what it read, at most
//! twice), so that is what a head is counted as when its headers hold
//! less: a head of 60 KiB of spaces around a one-byte value counts as
//! 60 KiB, not as the value.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream that counts the bytes read from it.
pub(super) struct ReadCount<S> {
    inner: S,
    read: Arc<AtomicUsize>,
}

impl<S> ReadCount<S> {
    /// `inner`, and the count of what has been read from it.
    pub(super) fn new(inner: S) -> (Self, Arc<AtomicUsize>) {
        let read = Arc::new(AtomicUsize::new(0));
        (
            ReadCount {
                inner,
                read: read.clone(),
            },
            read,
        )
    }
}

/// What a response's connection had read once its head was in, carried
/// from the connection to the count of heads in the response's
/// extensions.
#[derive(Clone, Copy, Debug)]
pub(super) struct ReadWithHead(pub(super) usize);

impl ReadWithHead {
    pub(super) fn of(read: &AtomicUsize) -> Self {
        ReadWithHead(read.load(Ordering::Relaxed))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadCount<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = buf.filled().len().saturating_sub(before);
            self.read.fetch_add(read, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadCount<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn what_is_read_is_counted_and_what_is_written_is_not() {
        let (near, mut far) = tokio::io::duplex(1 << 16);
        let (mut counted, read) = ReadCount::new(near);
        far.write_all(&[7u8; 5000]).await.unwrap();
        counted.write_all(b"request").await.unwrap();
        let mut got = vec![0u8; 3000];
        counted.read_exact(&mut got).await.unwrap();
        assert_eq!(read.load(Ordering::Relaxed), 3000);
        let mut rest = vec![0u8; 2000];
        counted.read_exact(&mut rest).await.unwrap();
        assert_eq!(ReadWithHead::of(&read).0, 5000);
    }
}
