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

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

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
}
