//! `grpc.health.v1` whose `Watch` streams end when leash drains.
//!
//! A `Watch` stream of the stock service ends only when its status channel
//! closes, and hyper's graceful shutdown waits for every open stream: one
//! client-side health watcher (gRPC's client health checking keeps a
//! `Watch` open on each connection, and opens it again at once when it
//! ends) would hold the drain to its timeout, and the health listener open
//! for good. Here a stream delivers every status set before the drain began
//! (NOT_SERVING included), then ends; one opened while draining gives the
//! current status and ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream as FlagStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::HealthService;

/// The stock service, with `Watch` streams that end at the drain.
pub struct DrainingHealth {
    inner: HealthService,
    draining: watch::Receiver<bool>,
}

impl DrainingHealth {
    /// `draining` turns true when the drain begins, after health was set
    /// NOT_SERVING.
    pub fn new(inner: HealthService, draining: watch::Receiver<bool>) -> Self {
        Self { inner, draining }
    }
}

#[tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = UntilDrained;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        Ok(Response::new(UntilDrained {
            statuses,
            draining: FlagStream::new(self.draining.clone()),
        }))
    }
}

/// A `Watch` stream that ends once leash drains.
pub struct UntilDrained {
    statuses: tonic_health::server::WatchStream,
    draining: FlagStream<bool>,
}

impl Stream for UntilDrained {
    type Item = Result<HealthCheckResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Statuses first: the NOT_SERVING set before the drain began is
        // ready by the time the drain is, and is delivered before the end.
        if let Poll::Ready(status) = Pin::new(&mut self.statuses).poll_next(cx) {
            return Poll::Ready(status);
        }
        loop {
            match Pin::new(&mut self.draining).poll_next(cx) {
                Poll::Ready(Some(true) | None) => return Poll::Ready(None),
                Poll::Ready(Some(false)) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio_stream::StreamExt as _;
    use tonic_health::server::HealthReporter;
    use tonic_health::ServingStatus;

    const SERVING: i32 = 1;
    const NOT_SERVING: i32 = 2;

    async fn watch(health: &DrainingHealth) -> UntilDrained {
        health
            .watch(Request::new(HealthCheckRequest {
                service: String::new(),
            }))
            .await
            .expect("watches")
            .into_inner()
    }

    /// The next status, or `None` at the end; bounded, so a stream that
    /// never ends fails the test instead of hanging it.
    async fn next(stream: &mut UntilDrained) -> Option<i32> {
        tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("a status or the end within a minute")
            .map(|r| r.expect("a status").status)
    }

    #[tokio::test]
    async fn watches_get_the_last_status_then_end_when_leash_drains() {
        let reporter = HealthReporter::new();
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        let (drain, draining) = watch::channel(false);
        let health = DrainingHealth::new(
            HealthService::from_health_reporter(reporter.clone()),
            draining,
        );
        let mut before = watch(&health).await;
        assert_eq!(next(&mut before).await, Some(SERVING));
        // As `Server::run` drains: NOT_SERVING first, then the signal.
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        drain.send_replace(true);
        assert_eq!(next(&mut before).await, Some(NOT_SERVING));
        assert_eq!(next(&mut before).await, None);
        // Opened while draining (a client watching again at once): the
        // current status, then the end.
        let mut during = watch(&health).await;
        assert_eq!(next(&mut during).await, Some(NOT_SERVING));
        assert_eq!(next(&mut during).await, None);
    }
}
