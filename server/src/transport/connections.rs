//! A cap on open client connections: each accepted connection holds a slot until it closes;
//! one that arrives with every slot taken is closed at once (counted, logged at most once a
//! second), so a connection flood costs a socket for a moment, not the memory of an HTTP/2
//! connection per attacker.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

use crate::telemetry;

/// A connection holding one of the slots (given back, and counted, when it closes).
pub struct Counted<T> {
    inner: T,
    _slot: OwnedSemaphorePermit,
}

impl<T> Drop for Counted<T> {
    fn drop(&mut self) {
        telemetry::connections_open(-1.0);
    }
}

/// `incoming` with at most `max` connections open at once.
pub fn limit<S, T, E>(incoming: S, max: usize) -> impl Stream<Item = Result<Counted<T>, E>>
where
    S: Stream<Item = Result<T, E>>,
{
    let slots = Arc::new(Semaphore::new(max));
    let mut last_warned: Option<Instant> = None;
    incoming.filter_map(move |accepted| {
        let outcome = match accepted {
            Err(e) => Some(Err(e)),
            Ok(io) => match Arc::clone(&slots).try_acquire_owned() {
                Ok(permit) => {
                    telemetry::connections_open(1.0);
                    Some(Ok(Counted {
                        inner: io,
                        _slot: permit,
                    }))
                }
                Err(_) => {
                    // Dropping the socket closes it: the client fails fast and retries elsewhere.
                    telemetry::connection_refused();
                    if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        last_warned = Some(Instant::now());
                        tracing::warn!(
                            max_connections = max,
                            "connection refused: --max-connections are open"
                        );
                    }
                    None
                }
            },
        };
        std::future::ready(outcome)
    })
}

impl<T: Connected> Connected for Counted<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake;
    impl Connected for Fake {
        type ConnectInfo = ();
        fn connect_info(&self) {}
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_and_slots_come_back() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Fake, ()>>();
        let mut limited = Box::pin(limit(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            2,
        ));
        for _ in 0..3 {
            tx.send(Ok(Fake)).unwrap();
        }
        let first = limited.next().await.unwrap().unwrap();
        let _second = limited.next().await.unwrap().unwrap();
        // The third was refused (dropped): the next item is only the one sent after a close.
        drop(first);
        tx.send(Ok(Fake)).unwrap();
        let _fourth = limited.next().await.unwrap().unwrap();
        tx.send(Ok(Fake)).unwrap();
        drop(tx);
        assert!(
            limited.next().await.is_none(),
            "full again: the fifth is refused"
        );
    }
}
