//! Accepting connections when the process runs out of something.
//!
//! tonic's accept loop goes straight back to `accept` after an error, and
//! logs it only at trace level. A listener whose process is out of file
//! descriptors (`EMFILE`) stays readable, so every retry fails at once: one
//! worker spins at full speed, taking CPU from decisions on connections
//! already open, and nothing says why new clients cannot connect. Here a
//! resource error is logged at warn (once per streak) and accepting pauses
//! briefly; a failure of one connection (reset before it was accepted) is
//! skipped, as it says nothing about the next.
//!
//! A listener open to the network (the health listener, on the pod IP) is
//! also [`capped`]: it holds at most so many connections at once, each for
//! a bounded time, so peers that open connections and keep them cannot
//! take the process's file descriptors and memory (which the decision
//! listener and the audit trail need too).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tracing::{info, warn};

/// Pause after an accept error that is not one connection's own.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// `incoming` with accept errors handled as the module says; it yields
/// only connections. `listener` names it in the log.
pub fn pausing_on_errors<S, T>(incoming: S, listener: String) -> PausingOnErrors<S>
where
    S: Stream<Item = io::Result<T>> + Unpin,
{
    PausingOnErrors {
        incoming,
        listener,
        pause: None,
        failed: 0,
    }
}

/// See [`pausing_on_errors`].
pub struct PausingOnErrors<S> {
    incoming: S,
    listener: String,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Accept errors in the current streak.
    failed: u64,
}

/// Errors that belong to one connection (it went away before it was
/// accepted), not to the listener or the process.
fn one_connections(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

impl<S, T> Stream for PausingOnErrors<S>
where
    S: Stream<Item = io::Result<T>> + Unpin,
{
    type Item = io::Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(pause) = this.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            match ready!(Pin::new(&mut this.incoming).poll_next(cx)) {
                Some(Err(e)) if one_connections(&e) => {}
                Some(Err(e)) => {
                    if this.failed == 0 {
                        warn!(
                            listener = %this.listener,
                            error = %e,
                            pause_ms = ACCEPT_PAUSE.as_millis() as u64,
                            "cannot accept connections (out of file descriptors?); \
                             retrying after a pause until it works"
                        );
                    }
                    this.failed += 1;
                    this.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_PAUSE)));
                }
                Some(Ok(conn)) => {
                    if this.failed > 0 {
                        info!(
                            listener = %this.listener,
                            failed_accepts = this.failed,
                            "accepting connections again"
                        );
                        this.failed = 0;
                    }
                    return Poll::Ready(Some(Ok(conn)));
                }
                None => return Poll::Ready(None),
            }
        }
    }
}

/// `incoming` holding at most `max` connections at once, each closed
/// `lifetime` after it was accepted: at the cap, accepting waits (new
/// connections wait in the kernel's backlog) until one closes. The wait is
/// logged at warn once per streak. `listener` names it in the log.
pub fn capped<S, T>(incoming: S, max: usize, lifetime: Duration, listener: String) -> Capped<S>
where
    S: Stream<Item = io::Result<T>> + Unpin,
{
    Capped {
        incoming,
        slots: Arc::new(Semaphore::new(max)),
        max,
        lifetime,
        listener,
        slot: None,
        waiting: None,
        full: false,
    }
}

type Acquiring = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// See [`capped`].
pub struct Capped<S> {
    incoming: S,
    slots: Arc<Semaphore>,
    max: usize,
    lifetime: Duration,
    listener: String,
    /// The slot the next connection takes.
    slot: Option<OwnedSemaphorePermit>,
    waiting: Option<Acquiring>,
    /// At the cap since the last connection accepted.
    full: bool,
}

impl<S, T> Stream for Capped<S>
where
    S: Stream<Item = io::Result<T>> + Unpin,
{
    type Item = io::Result<Limited<T>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.slot.is_none() {
            match this.slots.clone().try_acquire_owned() {
                Ok(slot) => this.slot = Some(slot),
                Err(_) => {
                    if !this.full {
                        this.full = true;
                        warn!(
                            listener = %this.listener,
                            max_connections = this.max,
                            "connection cap reached; new connections wait until one closes"
                        );
                    }
                    let slots = this.slots.clone();
                    let waiting = this
                        .waiting
                        .get_or_insert_with(|| Box::pin(slots.acquire_owned()));
                    match ready!(waiting.as_mut().poll(cx)) {
                        Ok(slot) => this.slot = Some(slot),
                        // The semaphore is never closed; were it, the
                        // listener would stop rather than go uncapped.
                        Err(_) => return Poll::Ready(None),
                    }
                    this.waiting = None;
                }
            }
        }
        match ready!(Pin::new(&mut this.incoming).poll_next(cx)) {
            Some(Ok(io)) => {
                if this.full {
                    this.full = false;
                    info!(listener = %this.listener, "below the connection cap again");
                }
                let slot = this.slot.take();
                Poll::Ready(Some(Ok(Limited {
                    io,
                    _slot: slot,
                    closes: Box::pin(tokio::time::sleep(this.lifetime)),
                })))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            None => Poll::Ready(None),
        }
    }
}

/// A connection of a [`capped`] listener: it frees its slot when dropped,
/// and reads and writes fail once its lifetime is over, which makes the
/// server close it whatever the peer is doing (sending nothing at all, or
/// holding a stream open).
pub struct Limited<T> {
    io: T,
    _slot: Option<OwnedSemaphorePermit>,
    closes: Pin<Box<tokio::time::Sleep>>,
}

impl<T> Limited<T> {
    fn expired(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.closes.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection reached its lifetime on this listener",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Limited<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.expired(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Limited<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.expired(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt as _;

    #[tokio::test]
    async fn resource_errors_pause_and_one_connections_errors_do_not() {
        let items = vec![
            Err(io::Error::from(io::ErrorKind::ConnectionAborted)),
            Ok(1),
            Err(io::Error::other("Too many open files")),
            Err(io::Error::other("Too many open files")),
            Ok(2),
        ];
        let mut stream = pausing_on_errors(tokio_stream::iter(items), "test".to_owned());
        assert_eq!(stream.next().await.map(Result::ok), Some(Some(1)));
        assert!(
            stream.pause.is_none(),
            "no pause for one connection's error"
        );
        assert_eq!(stream.failed, 0);
        let start = std::time::Instant::now();
        assert_eq!(stream.next().await.map(Result::ok), Some(Some(2)));
        assert!(start.elapsed() >= ACCEPT_PAUSE * 2, "a pause after each");
        assert_eq!(stream.failed, 0, "the streak ended");
        assert!(stream.next().await.is_none());
    }

    /// At the cap the listener is not even asked for a connection; a slot
    /// freed lets the next one in; a connection past its lifetime fails
    /// its reads though its peer is still there.
    #[tokio::test]
    async fn a_capped_listener_holds_its_cap_and_closes_connections_at_their_lifetime() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        // Long enough for the steps before it on a loaded machine.
        let lifetime = Duration::from_secs(2);
        let mut stream = capped(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            1,
            lifetime,
            "test".to_owned(),
        );
        let bound = Duration::from_secs(10);
        let mut first_peer = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut first = tokio::time::timeout(bound, stream.next())
            .await
            .expect("accepted in time")
            .expect("a connection")
            .expect("accepted");
        let _second_peer = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // One poll (a zero timeout polls once): no slot, so it waits
        // without taking the second connection from the backlog.
        assert!(tokio::time::timeout(Duration::ZERO, stream.next())
            .await
            .is_err());
        assert!(stream.full && stream.slot.is_none() && stream.waiting.is_some());

        // Before its lifetime the connection works both ways.
        first_peer.write_all(b"x").await.expect("write");
        let mut byte = [0u8; 1];
        first.read_exact(&mut byte).await.expect("read");
        assert_eq!(&byte, b"x");
        first.write_all(b"y").await.expect("write");
        first_peer.read_exact(&mut byte).await.expect("read");
        assert_eq!(&byte, b"y");
        // Then a read that waits fails at its lifetime, though the peer
        // is connected and silent.
        let expired = tokio::time::timeout(bound, first.read(&mut byte))
            .await
            .expect("the read ends at the lifetime")
            .expect_err("a read past the lifetime fails");
        assert_eq!(expired.kind(), io::ErrorKind::TimedOut);
        let expired = first.write(b"z").await.expect_err("so does a write");
        assert_eq!(expired.kind(), io::ErrorKind::TimedOut);

        // Its slot frees when it is dropped; the second gets in.
        drop(first);
        tokio::time::timeout(bound, stream.next())
            .await
            .expect("the second is accepted once a slot is free")
            .expect("a connection")
            .expect("accepted");
        assert!(!stream.full);
    }
}
