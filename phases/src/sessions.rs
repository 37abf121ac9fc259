//! Work that callers hold open on the node (debug sessions): each runs as a task the node can
//! end, so that a shutdown does not leave a container holding EPHEMERAL.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The open sessions.
#[derive(Default)]
pub struct Sessions {
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// The node is going down: no new session starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the node is going down: no new session starts")]
pub struct Stopping;

impl Sessions {
    /// Runs `session` (given the token that asks it to end) as a task of its own.
    pub fn spawn<F, Fut>(&self, session: F) -> Result<(), Stopping>
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if self.stop.is_cancelled() {
            return Err(Stopping);
        }
        self.tracker.spawn(session(self.stop.child_token()));
        Ok(())
    }

    /// How many run now.
    pub fn open(&self) -> usize {
        self.tracker.len()
    }

    /// Asks every session to end and waits for them (at most `within`); refuses new ones from
    /// now on.
    pub async fn end_all(&self, within: Duration) {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(within, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "{} sessions did not end within {}s",
                self.tracker.len(),
                within.as_secs()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ending_all_cancels_each_session_waits_for_it_and_refuses_new_ones() {
        let s = Sessions::default();
        let (tx, rx) = tokio::sync::oneshot::channel();
        s.spawn(|stop| async move {
            stop.cancelled().await;
            let _ = tx.send("cleaned up");
        })
        .expect("spawns");
        assert_eq!(s.open(), 1);
        s.end_all(Duration::from_secs(5)).await;
        assert_eq!(rx.await, Ok("cleaned up"));
        assert_eq!(s.open(), 0);
        assert_eq!(s.spawn(|_| async {}), Err(Stopping));
    }
}
