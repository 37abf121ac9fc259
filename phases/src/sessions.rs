//! Work that callers hold open on the node (debug sessions): each runs as a task the node
//! tracks, from before it starts anything to after it has removed what it made, so that a
//! shutdown ends every one of them before containerd stops, and their number is bounded here
//! whatever the API server lets through.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The open sessions.
pub struct Sessions {
    stop: CancellationToken,
    tracker: TaskTracker,
    room: Arc<Semaphore>,
}

/// Sessions at most open at once (each holds a container and its shim).
pub const MAX_SESSIONS: usize = 4;

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
            room: Arc::new(Semaphore::new(MAX_SESSIONS)),
        }
    }
}

/// Why a session did not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The node is going down.
    #[error("the node is going down: no new session starts")]
    Stopping,
    /// As many as the node holds are open.
    #[error("{MAX_SESSIONS} sessions are open on this node: try again when one ends")]
    Full,
}

impl Sessions {
    /// Runs `session` (given the token that asks it to end) as a task of its own, counted
    /// until it returns.
    pub fn spawn<F, Fut>(&self, session: F) -> Result<(), Refused>
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if self.stop.is_cancelled() {
            return Err(Refused::Stopping);
        }
        let permit = self
            .room
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Full)?;
        let run = session(self.stop.child_token());
        self.tracker.spawn(async move {
            run.await;
            drop(permit);
        });
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
        assert_eq!(s.spawn(|_| async {}), Err(Refused::Stopping));
    }

    #[tokio::test]
    async fn no_more_than_the_cap_run_at_once() {
        let s = Sessions::default();
        let stop = CancellationToken::new();
        for _ in 0..MAX_SESSIONS {
            let stop = stop.clone();
            s.spawn(|_| async move { stop.cancelled().await })
                .expect("room");
        }
        assert_eq!(s.spawn(|_| async {}), Err(Refused::Full));
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), async {
            while s.open() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("they end");
        assert!(s.spawn(|_| async {}).is_ok());
    }
}
