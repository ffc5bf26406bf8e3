//! Admission, queues and batch formation: the part between the gRPC handlers and the model
//! thread.
//!
//! - **Admission** is counted in images: a request is refused at once (RESOURCE_EXHAUSTED)
//!   when its images would take the number admitted-but-unfinished past the limit.
//! - **Two queues**, embed and complete, because their images cost differently. When both
//!   have work, the kind that has consumed less (cost-weighted) worker time goes next.
//! - **Work-conserving**: a batch is formed as soon as the worker can take one, from whatever
//!   is waiting, up to `max_batch_size` images; `max_batch_delay` optionally waits for more.
//! - **Prefetch, but never a thin batch**: a batcher thread forms and uploads the next batch
//!   while the model thread runs the current one, but only once it is full; a partial batch
//!   is formed at the last moment, when the model thread asks for work ("demand"), so the
//!   requests that arrive meanwhile still join it.
//! - Items whose deadline passed or whose client went away are dropped before compute.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate_mae::{Mask, Pooling};
use tokio::sync::oneshot;

use crate::error::ServeError;
use crate::imaging::Pixels;
use crate::telemetry;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Embed,
    Complete,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Embed, Kind::Complete];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Embed => "embed",
            Kind::Complete => "complete",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone)]
pub struct EmbedParams {
    pub pooling: Pooling,
    pub layer: Option<usize>,
    pub normalize: bool,
    pub patch_tokens: bool,
    pub diagnostics: bool,
    pub attention_layer: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct CompleteParams {
    /// One row: this image's mask.
    pub mask: Mask,
    pub diagnostics: bool,
}

#[derive(Debug, Clone)]
pub enum Task {
    Embed(EmbedParams),
    Complete(CompleteParams),
}

impl Task {
    pub fn embed_params(&self) -> Option<&EmbedParams> {
        match self {
            Task::Embed(p) => Some(p),
            Task::Complete(_) => None,
        }
    }

    pub fn complete_params(&self) -> Option<&CompleteParams> {
        match self {
            Task::Complete(p) => Some(p),
            Task::Embed(_) => None,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Task::Embed(_) => Kind::Embed,
            Task::Complete(_) => Kind::Complete,
        }
    }
}

/// Per-layer diagnostics of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageDiagnostics {
    pub layer: usize,
    pub coding_rate: f64,
    pub expansion_rate: f64,
    pub sparsity: f64,
}

#[derive(Debug, Clone, Default)]
pub struct EmbedOutput {
    pub values: Vec<f32>,
    pub patch_tokens: Vec<f32>,
    pub diagnostics: Vec<ImageDiagnostics>,
    /// `[heads, L]` cls → patch attention.
    pub attention: Option<(usize, Vec<f32>)>,
}

#[derive(Debug, Clone, Default)]
pub struct CompleteOutput {
    /// `[3, S, S]` normalised prediction for every patch.
    pub reconstruction: Vec<f32>,
    /// `[3, S, S]` visible input + predicted masked patches.
    pub composite: Vec<f32>,
    pub masked_patch_mse: f32,
    pub diagnostics: Vec<ImageDiagnostics>,
}

#[derive(Debug, Clone)]
pub enum Output {
    Embed(EmbedOutput),
    Complete(CompleteOutput),
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    pub queue: Duration,
    pub inference: Duration,
    pub batch_size: usize,
}

pub type ItemResult = Result<(Output, Timing), ServeError>;

/// One image's worth of work.
pub struct Item {
    pub pixels: Pixels,
    pub task: Task,
    pub deadline: Option<Instant>,
    pub admitted_at: Instant,
    pub reply: oneshot::Sender<ItemResult>,
    /// Released when the item is finished or dropped.
    pub permit: Permit,
}

impl Item {
    /// Why this item should not be computed, if it should not.
    /// A passed deadline wins over a closed reply: a client whose own deadline fired also
    /// resets the stream, and "deadline" is the more useful reason.
    fn drop_reason(&self, now: Instant) -> Option<&'static str> {
        if self.deadline.is_some_and(|d| d <= now) {
            Some("deadline")
        } else if self.reply.is_closed() {
            Some("cancelled")
        } else {
            None
        }
    }
}

/// Counts admitted-but-unfinished images.
#[derive(Debug)]
pub struct Admission {
    in_flight: AtomicUsize,
    capacity: usize,
}

/// One admitted image; dropping it gives the slot back.
#[derive(Debug)]
pub struct Permit(Arc<Admission>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            capacity,
        })
    }

    /// Admits `n` images at once or none.
    pub fn try_admit(self: &Arc<Self>, n: usize) -> Result<Vec<Permit>, ServeError> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur + n <= self.capacity).then_some(cur + n)
            })
            .map_err(|cur| {
                telemetry::dropped("queue_full");
                ServeError::QueueFull(format!(
                    "server is at capacity ({cur} of {} images queued or running); retry with backoff",
                    self.capacity
                ))
            })?;
        Ok((0..n).map(|_| Permit(Arc::clone(self))).collect())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// A formed batch, ready for the model thread.
pub struct Batch {
    pub kind: Kind,
    pub items: Vec<Item>,
    pub formed_at: Instant,
}

#[derive(Default)]
struct State {
    queues: [VecDeque<Item>; 2],
    /// Cost-weighted images served per kind (for fair sharing).
    served: [f64; 2],
    closed: bool,
}

pub struct Queues {
    state: Mutex<State>,
    wake: Condvar,
    /// The model thread is idle and waiting for a batch.
    demand: AtomicBool,
    max_batch_size: usize,
    max_batch_delay: Duration,
    cost: [f64; 2],
}

impl Queues {
    pub fn new(max_batch_size: usize, max_batch_delay: Duration, complete_cost: f64) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            demand: AtomicBool::new(false),
            max_batch_size,
            max_batch_delay,
            cost: [1.0, complete_cost],
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queues inconsistent (every
        // mutation is a single push/pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enqueues the items of one request; fails (returning nothing queued) after `close`.
    pub fn push(&self, items: Vec<Item>) -> Result<(), ServeError> {
        let mut state = self.lock();
        if state.closed {
            return Err(ServeError::Unavailable("server is shutting down".into()));
        }
        for item in items {
            let k = item.task.kind().index();
            if state.queues[k].is_empty() {
                // A kind that was idle does not get to bank credit for the idle time.
                let other = state.served[1 - k];
                state.served[k] = state.served[k].max(other);
            }
            state.queues[k].push_back(item);
        }
        telemetry::queue_depth(&state.queues);
        drop(state);
        self.wake.notify_all();
        Ok(())
    }

    /// The model thread says whether it is idle. Set under the lock so the batcher cannot
    /// miss the wake-up between checking and waiting.
    pub fn set_demand(&self, waiting: bool) {
        let _state = self.lock();
        self.demand.store(waiting, Ordering::Release);
        self.wake.notify_all();
    }

    /// Stops accepting; the batcher drains what is queued, then ends.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    /// Blocks until a batch should be formed: a full one at any time, a partial one only
    /// when the model thread is idle (or the queues are closing). `None` once closed and empty.
    pub fn next_batch(&self) -> Option<Batch> {
        let mut state = self.lock();
        loop {
            let kind = loop {
                // Without demand only a full batch may be prefetched (of whichever kind has
                // one); with demand, or when draining, the fair choice among waiting kinds.
                let only_full = !state.closed && !self.demand.load(Ordering::Acquire);
                if let Some(kind) = self.pick(&state, only_full) {
                    break kind;
                }
                if state.closed && state.queues.iter().all(VecDeque::is_empty) {
                    return None;
                }
                state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            };
            let k = kind.index();
            if !self.max_batch_delay.is_zero() && !state.closed {
                let until = Instant::now() + self.max_batch_delay;
                while state.queues[k].len() < self.max_batch_size && !state.closed {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    state = self
                        .wake
                        .wait_timeout(state, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            let now = Instant::now();
            let mut items = Vec::with_capacity(self.max_batch_size);
            while items.len() < self.max_batch_size {
                let Some(item) = state.queues[k].pop_front() else {
                    break;
                };
                match item.drop_reason(now) {
                    Some(reason) => reject(item, reason),
                    None => items.push(item),
                }
            }
            telemetry::queue_depth(&state.queues);
            if items.is_empty() {
                continue; // everything picked was stale; look again
            }
            state.served[k] += items.len() as f64 * self.cost[k];
            // One batch answers the model thread's request for work: the next partial batch
            // must wait for its next request, not ride on this one.
            self.demand.store(false, Ordering::Release);
            return Some(Batch {
                kind,
                items,
                formed_at: now,
            });
        }
    }

    /// The kind that has been served least among those with work (with a full batch's
    /// worth, if `only_full`).
    fn pick(&self, state: &State, only_full: bool) -> Option<Kind> {
        let needed = if only_full { self.max_batch_size } else { 1 };
        Kind::ALL
            .into_iter()
            .filter(|k| state.queues[k.index()].len() >= needed)
            .min_by(|a, b| state.served[a.index()].total_cmp(&state.served[b.index()]))
    }
}

/// Answers a dropped item (if anyone still listens). The request-level guard in the
/// service counts it, once per request, whether it was dropped here or before queueing.
pub fn reject(item: Item, reason: &'static str) {
    let err = match reason {
        "deadline" => {
            ServeError::DeadlineExceeded("deadline passed while queued; not computed".into())
        }
        _ => ServeError::Cancelled("client cancelled; not computed".into()),
    };
    let _ = item.reply.send(Err(err));
}

/// Drops, just before compute, items that went stale while their batch waited; `true` if
/// anything is left to compute.
pub fn prune(batch: &mut Batch) -> bool {
    let now = Instant::now();
    let (keep, stale): (Vec<Item>, Vec<Item>) = std::mem::take(&mut batch.items)
        .into_iter()
        .partition(|item| item.drop_reason(now).is_none());
    for item in stale {
        let reason = item.drop_reason(now).unwrap_or("cancelled");
        reject(item, reason);
    }
    batch.items = keep;
    !batch.items.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(kind: Kind, admission: &Arc<Admission>) -> (Item, oneshot::Receiver<ItemResult>) {
        let (tx, rx) = oneshot::channel();
        let task = match kind {
            Kind::Embed => Task::Embed(EmbedParams {
                pooling: Pooling::Cls,
                layer: None,
                normalize: false,
                patch_tokens: false,
                diagnostics: false,
                attention_layer: None,
            }),
            Kind::Complete => Task::Complete(CompleteParams {
                mask: Mask::none(1, 4),
                diagnostics: false,
            }),
        };
        let permit = admission.try_admit(1).unwrap().pop().unwrap();
        (
            Item {
                pixels: vec![],
                task,
                deadline: None,
                admitted_at: Instant::now(),
                reply: tx,
                permit,
            },
            rx,
        )
    }

    #[test]
    fn admission_is_all_or_nothing_and_released_on_drop() {
        let a = Admission::new(4);
        let three = a.try_admit(3).unwrap();
        assert!(matches!(a.try_admit(2), Err(ServeError::QueueFull(_))));
        assert_eq!(a.in_flight(), 3);
        drop(three);
        assert_eq!(a.in_flight(), 0);
        assert_eq!(a.try_admit(4).unwrap().len(), 4);
    }

    #[test]
    fn batches_take_what_is_waiting_up_to_the_limit_and_alternate_fairly() {
        let a = Admission::new(100);
        let q = Queues::new(3, Duration::ZERO, 2.0);
        q.set_demand(true);
        let mut receivers = vec![];
        let mut items = vec![];
        for _ in 0..7 {
            let (i, rx) = item(Kind::Embed, &a);
            items.push(i);
            receivers.push(rx);
        }
        for _ in 0..4 {
            let (i, rx) = item(Kind::Complete, &a);
            items.push(i);
            receivers.push(rx);
        }
        q.push(items).unwrap();
        let sizes: Vec<(Kind, usize)> = (0..5)
            .map(|_| {
                q.set_demand(true); // the model thread asks before each batch
                let b = q.next_batch().unwrap();
                (b.kind, b.items.len())
            })
            .collect();
        // Embed first (tie → first kind), then complete (less served), then embed again ...
        // complete images cost 2, so embed gets two turns for each complete turn.
        assert_eq!(
            sizes,
            vec![
                (Kind::Embed, 3),
                (Kind::Complete, 3),
                (Kind::Embed, 3),
                (Kind::Embed, 1),
                (Kind::Complete, 1)
            ]
        );
    }

    #[test]
    fn cancelled_items_are_dropped_before_compute() {
        let a = Admission::new(10);
        let q = Queues::new(8, Duration::ZERO, 2.0);
        q.set_demand(true);
        let (gone, rx_gone) = item(Kind::Embed, &a);
        let (kept, _rx_kept) = item(Kind::Embed, &a);
        drop(rx_gone);
        q.push(vec![gone, kept]).unwrap();
        let batch = q.next_batch().unwrap();
        assert_eq!(batch.items.len(), 1);
        assert_eq!(a.in_flight(), 1, "the dropped item's slot is released");
    }

    #[test]
    fn a_partial_batch_waits_for_demand_a_full_one_does_not() {
        let a = Admission::new(10);
        let q = Queues::new(2, Duration::ZERO, 2.0);
        let (one, _r1) = item(Kind::Embed, &a);
        q.push(vec![one]).unwrap();
        std::thread::scope(|s| {
            let batcher = s.spawn(|| q.next_batch().map(|b| b.items.len()));
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                !batcher.is_finished(),
                "a partial batch must not be prefetched"
            );
            let (two, _r2) = item(Kind::Embed, &a);
            q.push(vec![two]).unwrap();
            assert_eq!(
                batcher.join().unwrap(),
                Some(2),
                "full: formed without demand"
            );
        });
        let (three, _r3) = item(Kind::Embed, &a);
        q.push(vec![three]).unwrap();
        std::thread::scope(|s| {
            let batcher = s.spawn(|| q.next_batch().map(|b| b.items.len()));
            std::thread::sleep(Duration::from_millis(20));
            q.set_demand(true);
            assert_eq!(
                batcher.join().unwrap(),
                Some(1),
                "partial: formed on demand"
            );
        });
        // That batch used up the demand: the next partial batch waits for a new request.
        let (four, _r4) = item(Kind::Embed, &a);
        q.push(vec![four]).unwrap();
        std::thread::scope(|s| {
            let batcher = s.spawn(|| q.next_batch().map(|b| b.items.len()));
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                !batcher.is_finished(),
                "a stale demand formed a second thin batch"
            );
            q.set_demand(true);
            assert_eq!(batcher.join().unwrap(), Some(1));
        });
    }

    #[test]
    fn closed_queues_refuse_work_and_end_after_draining() {
        let a = Admission::new(10);
        let q = Queues::new(8, Duration::ZERO, 2.0);
        let (i, _rx) = item(Kind::Embed, &a);
        q.push(vec![i]).unwrap();
        q.close();
        let (late, _rx2) = item(Kind::Embed, &a);
        assert!(matches!(
            q.push(vec![late]),
            Err(ServeError::Unavailable(_))
        ));
        assert!(q.next_batch().is_some());
        assert!(q.next_batch().is_none());
    }
}
