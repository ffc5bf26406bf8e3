//! Admission, counted in images: every admitted image holds one permit until it is answered
//! or dropped, so the images queued or running never exceed the limit.
//!
//! Online calls try (refused at once with a retryable RESOURCE_EXHAUSTED: the client or its
//! load balancer should try another replica); bulk streams wait for room within their
//! deadline, and may hold at most [`BULK_ADMISSION_SHARE`] of the slots (or one largest
//! request, if that is more), so a stream that keeps the server full never locks unary calls
//! out.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::engine::types::Priority;
use crate::error::ServeError;
use crate::telemetry;

/// Share of `max_queue_images` bulk work may hold (at least one largest request), so a stream
/// never fills admission and unary calls still find room.
pub const BULK_ADMISSION_SHARE: f64 = 0.75;

#[derive(Debug)]
pub struct Admission {
    permits: Arc<Semaphore>,
    /// The bulk share: a bulk image holds one of these as well.
    bulk: Arc<Semaphore>,
    capacity: usize,
    bulk_capacity: usize,
}

/// One admitted image; dropping it gives the slot back.
#[derive(Debug)]
pub struct Permit {
    _slot: OwnedSemaphorePermit,
    _bulk: Option<OwnedSemaphorePermit>,
}

impl Admission {
    pub fn new(capacity: usize) -> Self {
        let bulk_capacity = ((capacity as f64 * BULK_ADMISSION_SHARE) as usize).max(1);
        Self {
            permits: Arc::new(Semaphore::new(capacity)),
            bulk: Arc::new(Semaphore::new(bulk_capacity)),
            capacity,
            bulk_capacity,
        }
    }

    /// Raises the bulk share, if needed, so one stream message of `images` (the largest a
    /// request may be) always fits.
    pub fn fitting_requests_of(self, images: usize) -> Self {
        let bulk_capacity = self.bulk_capacity.max(images.min(self.capacity));
        Self {
            bulk: Arc::new(Semaphore::new(bulk_capacity)),
            bulk_capacity,
            ..self
        }
    }

    /// Admits `n` images at once or none, one permit each.
    pub async fn admit(
        &self,
        n: usize,
        how: Priority,
        deadline: Option<Instant>,
    ) -> Result<Vec<Permit>, ServeError> {
        let limit = match how {
            Priority::Online => self.capacity,
            Priority::Bulk => self.bulk_capacity,
        };
        if n > limit {
            return Err(ServeError::ResourceExhausted(format!(
                "{n} images can never fit: the server admits at most {limit} at once{}",
                if how == Priority::Bulk {
                    " from streams"
                } else {
                    ""
                }
            )));
        }
        match how {
            Priority::Online => {
                let all = Arc::clone(&self.permits)
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
                    })?;
                Ok(split(all, None, n))
            }
            Priority::Bulk => {
                let wait = async {
                    // The bulk share first, so waiting streams hold no general slots.
                    let share = Arc::clone(&self.bulk).acquire_many_owned(n as u32).await;
                    let slots = Arc::clone(&self.permits).acquire_many_owned(n as u32).await;
                    match (share, slots) {
                        (Ok(share), Ok(slots)) => Ok(split(slots, Some(share), n)),
                        _ => Err(shutting_down()),
                    }
                };
                match deadline {
                    None => wait.await,
                    Some(d) => tokio::time::timeout_at(d.into(), wait).await.map_err(|_| {
                        ServeError::DeadlineExceeded(
                            "deadline passed while waiting for room in the queue".into(),
                        )
                    })?,
                }
            }
        }
    }

    /// Images admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }

    /// Refuses everyone still waiting (shutdown).
    pub fn close(&self) {
        self.permits.close();
        self.bulk.close();
    }
}

fn shutting_down() -> ServeError {
    ServeError::Unavailable("server is shutting down".into())
}

/// One permit per image, so each image releases its slot when it is done.
fn split(
    mut slots: OwnedSemaphorePermit,
    mut share: Option<OwnedSemaphorePermit>,
    n: usize,
) -> Vec<Permit> {
    let mut permits = Vec::with_capacity(n);
    for _ in 1..n {
        permits.push(Permit {
            _slot: slots.split(1).expect("n permits were acquired"),
            _bulk: share
                .as_mut()
                .map(|s| s.split(1).expect("n permits were acquired")),
        });
    }
    permits.push(Permit {
        _slot: slots,
        _bulk: share,
    });
    permits
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn unary_admission_is_all_or_nothing_and_released_per_image() {
        let a = Admission::new(4);
        let mut three = a.admit(3, Priority::Online, None).await.unwrap();
        assert!(matches!(
            a.admit(2, Priority::Online, None).await,
            Err(ServeError::QueueFull(_))
        ));
        assert_eq!(a.in_flight(), 3);
        three.pop();
        assert_eq!(a.in_flight(), 2, "one finished image frees one slot");
        drop(three);
        assert_eq!(a.admit(4, Priority::Online, None).await.unwrap().len(), 4);
        assert!(matches!(
            a.admit(5, Priority::Bulk, None).await,
            Err(ServeError::ResourceExhausted(_))
        ));
    }

    #[tokio::test]
    async fn streams_wait_for_room_until_their_deadline() {
        let a = Arc::new(Admission::new(4));
        let held = a.admit(4, Priority::Online, None).await.unwrap();
        let waiter = {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.admit(2, Priority::Bulk, None).await.map(|p| p.len()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "must wait, not fail");
        drop(held);
        assert_eq!(waiter.await.unwrap().unwrap(), 2);

        let _full = a.admit(2, Priority::Online, None).await.unwrap();
        let _rest = a.admit(2, Priority::Online, None).await;
        let soon = Instant::now() + Duration::from_millis(30);
        assert!(matches!(
            a.admit(1, Priority::Bulk, Some(soon)).await,
            Err(ServeError::DeadlineExceeded(_))
        ));
        a.close();
        assert!(matches!(
            a.admit(1, Priority::Bulk, None).await,
            Err(ServeError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn bulk_work_leaves_a_quarter_of_the_slots_to_online_calls() {
        let a = Arc::new(Admission::new(8));
        let bulk = a.admit(6, Priority::Bulk, None).await.unwrap();
        let more_bulk = {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.admit(1, Priority::Bulk, None).await.map(|p| p.len()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !more_bulk.is_finished(),
            "the bulk share (6 of 8) is used up"
        );
        let online = a.admit(2, Priority::Online, None).await.unwrap();
        assert_eq!(
            a.in_flight(),
            8,
            "online calls still got the last two slots"
        );
        drop(online);
        assert!(
            !more_bulk.is_finished(),
            "free general slots do not raise the bulk share"
        );
        drop(bulk);
        assert_eq!(more_bulk.await.unwrap().unwrap(), 1);
        assert!(matches!(
            a.admit(7, Priority::Bulk, None).await,
            Err(ServeError::ResourceExhausted(_))
        ));
        // A stream message as large as a request may be always fits.
        let small = Admission::new(8).fitting_requests_of(8);
        assert_eq!(small.admit(8, Priority::Bulk, None).await.unwrap().len(), 8);
    }
}
