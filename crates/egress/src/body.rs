//! A body wrapper that counts data bytes and runs a completion once, when the body
//! ends or is dropped (a client that hangs up mid-download still gets its audit event).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::gateway::BoxError;

pub(crate) struct Metered<B> {
    inner: B,
    counter: Arc<AtomicU64>,
    on_done: Option<Box<dyn FnOnce() + Send>>,
}

impl<B> Metered<B> {
    pub(crate) fn new(
        inner: B,
        counter: Arc<AtomicU64>,
        on_done: impl FnOnce() + Send + 'static,
    ) -> Self {
        Metered {
            inner,
            counter,
            on_done: Some(Box::new(on_done)),
        }
    }

    /// Counts only; nothing runs at the end.
    pub(crate) fn counting(inner: B, counter: Arc<AtomicU64>) -> Self {
        Metered {
            inner,
            counter,
            on_done: None,
        }
    }

    fn done(&mut self) {
        if let Some(on_done) = self.on_done.take() {
            on_done();
        }
    }
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        self.done();
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                self.done();
                Poll::Ready(Some(Err(err.into())))
            }
            Poll::Ready(None) => {
                self.done();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body already partly read (the scanned prefix), followed by the rest of the stream.
pub(crate) struct Prefixed<B> {
    prefix: Option<Bytes>,
    rest: B,
}

impl<B> Prefixed<B> {
    pub(crate) fn new(prefix: Bytes, rest: B) -> Self {
        Prefixed {
            prefix: Some(prefix),
            rest,
        }
    }
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        Pin::new(&mut self.rest)
            .poll_frame(cx)
            .map(|frame| frame.map(|result| result.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }
}

/// Copies both ways between two streams until both directions end, and returns the
/// bytes sent from `client` to `upstream` and back. Unlike `copy_bidirectional` the
/// counts survive an abrupt close (a TLS peer that hangs up without `close_notify`),
/// and once one direction ends the other gets `grace` to finish.
pub(crate) async fn splice<A, B>(client: A, upstream: B, grace: std::time::Duration) -> (u64, u64)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pump<R, W>(mut from: R, mut to: W, count: &AtomicU64)
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        // 64 KiB: four full TLS records per read, so a bulk transfer costs a quarter of
        // the syscalls a 16 KiB buffer would.
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        let _ = to.shutdown().await;
    }

    let (client_read, client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    {
        let mut to_upstream = std::pin::pin!(pump(client_read, upstream_write, &up));
        let mut to_client = std::pin::pin!(pump(upstream_read, client_write, &down));
        tokio::select! {
            () = &mut to_upstream => {
                let _ = tokio::time::timeout(grace, to_client).await;
            }
            () = &mut to_client => {
                let _ = tokio::time::timeout(grace, to_upstream).await;
            }
        }
    }
    (up.into_inner(), down.into_inner())
}
