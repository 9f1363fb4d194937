//! Captured guest stdout and stderr: bounded, never failing the guest.
//!
//! wasmtime-wasi's memory pipe returns an error once full, which makes a
//! chatty Rust guest panic in `println!`. This sink keeps the first bytes up
//! to its cap, silently drops the rest, and hands the text to the host's log
//! (and to a trap message) when the call ends.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// One captured stream. Clones share the buffer.
#[derive(Clone)]
pub(crate) struct CapturedOutput {
    cap: usize,
    buf: Arc<Mutex<Vec<u8>>>,
}

impl CapturedOutput {
    pub(crate) fn new(cap: usize) -> Self {
        CapturedOutput {
            cap,
            buf: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn push(&self, bytes: &[u8]) {
        // A poisoned lock only means another writer panicked mid-push; the
        // bytes are still a valid prefix, so keep going.
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let room = self.cap.saturating_sub(buf.len());
        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// Takes what the guest wrote so far, lossily decoded.
    pub(crate) fn take(&self) -> String {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let text = String::from_utf8_lossy(&buf).into_owned();
        buf.clear();
        text
    }

    /// What the guest wrote, lossily decoded.
    pub(crate) fn text(&self) -> String {
        let buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for CapturedOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for CapturedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

impl tokio::io::AsyncWrite for CapturedOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
