//! Admission, counted in images: every admitted image holds one permit until it is answered
//! or dropped, so the images queued or running never exceed the limit.
//!
//! Unary calls `try` (refused at once with a retryable RESOURCE_EXHAUSTED: the client or its
//! load balancer should try another replica); streams `wait` for room within their deadline.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::engine::types::Admit;
use crate::error::ServeError;
use crate::telemetry;

#[derive(Debug)]
pub struct Admission {
    permits: Arc<Semaphore>,
    capacity: usize,
}

/// One admitted image; dropping it gives the slot back.
pub type Permit = OwnedSemaphorePermit;

impl Admission {
    pub fn new(capacity: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
        }
    }

    /// Admits `n` images at once or none, one permit each.
    pub async fn admit(
        &self,
        n: usize,
        how: Admit,
        deadline: Option<Instant>,
    ) -> Result<Vec<Permit>, ServeError> {
        if n > self.capacity {
            return Err(ServeError::ResourceExhausted(format!(
                "{n} images can never fit: the server admits at most {} at once",
                self.capacity
            )));
        }
        let all = match how {
            Admit::Try => Arc::clone(&self.permits)
                .try_acquire_many_owned(n as u32)
                .map_err(|e| match e {
                    tokio::sync::TryAcquireError::Closed => shutting_down(),
                    tokio::sync::TryAcquireError::NoPermits => {
                        telemetry::dropped("queue_full");
                        ServeError::QueueFull(format!(
                            "server is at capacity ({} of {} images queued or running); retry with backoff",
                            self.in_flight(),
                            self.capacity
                        ))
                    }
                })?,
            Admit::Wait => {
                let acquire = Arc::clone(&self.permits).acquire_many_owned(n as u32);
                match deadline {
                    None => acquire.await.map_err(|_| shutting_down())?,
                    Some(d) => tokio::time::timeout_at(d.into(), acquire)
                        .await
                        .map_err(|_| {
                            ServeError::DeadlineExceeded(
                                "deadline passed while waiting for room in the queue".into(),
                            )
                        })?
                        .map_err(|_| shutting_down())?,
                }
            }
        };
        Ok(split(all, n))
    }

    /// Images admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }

    /// Refuses everyone still waiting (shutdown).
    pub fn close(&self) {
        self.permits.close();
    }
}

fn shutting_down() -> ServeError {
    ServeError::Unavailable("server is shutting down".into())
}

/// One permit per image, so each image releases its slot when it is done.
fn split(mut all: OwnedSemaphorePermit, n: usize) -> Vec<Permit> {
    let mut permits = Vec::with_capacity(n);
    for _ in 1..n {
        permits.push(all.split(1).expect("n permits were acquired"));
    }
    permits.push(all);
    permits
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn unary_admission_is_all_or_nothing_and_released_per_image() {
        let a = Admission::new(4);
        let mut three = a.admit(3, Admit::Try, None).await.unwrap();
        assert!(matches!(
            a.admit(2, Admit::Try, None).await,
            Err(ServeError::QueueFull(_))
        ));
        assert_eq!(a.in_flight(), 3);
        three.pop();
        assert_eq!(a.in_flight(), 2, "one finished image frees one slot");
        drop(three);
        assert_eq!(a.admit(4, Admit::Try, None).await.unwrap().len(), 4);
        assert!(matches!(
            a.admit(5, Admit::Wait, None).await,
            Err(ServeError::ResourceExhausted(_))
        ));
    }

    #[tokio::test]
    async fn streams_wait_for_room_until_their_deadline() {
        let a = Arc::new(Admission::new(2));
        let held = a.admit(2, Admit::Try, None).await.unwrap();
        let waiter = {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.admit(2, Admit::Wait, None).await.map(|p| p.len()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "must wait, not fail");
        drop(held);
        assert_eq!(waiter.await.unwrap().unwrap(), 2);

        let _full = a.admit(2, Admit::Try, None).await.unwrap();
        let soon = Instant::now() + Duration::from_millis(30);
        assert!(matches!(
            a.admit(1, Admit::Wait, Some(soon)).await,
            Err(ServeError::DeadlineExceeded(_))
        ));
        a.close();
        assert!(matches!(
            a.admit(1, Admit::Wait, None).await,
            Err(ServeError::Unavailable(_))
        ));
    }
}
