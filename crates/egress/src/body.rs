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
