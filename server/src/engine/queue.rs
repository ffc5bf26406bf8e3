//! The two queues between admission and the model workers, and batch formation.
//!
//! - **Two queues**, embed and complete, because their images cost differently. When both
//!   have work, the kind that has consumed less (cost-weighted) worker time goes next.
//! - **Work-conserving and formed at the last moment**: a worker that is free takes a batch
//!   of whatever is waiting, up to `max_batch_size` images, so requests arriving while every
//!   worker is busy still join the next batch; `max_batch_delay` optionally waits for more.
//! - **Online before bulk**: within a kind, online images (unary calls) form the next batch
//!   ahead of bulk ones (streams). While both wait, bulk gets a batch after at most
//!   [`ONLINE_STREAK`] online batches in a row, so online load never starves a stream. A
//!   batch holds one priority: an online image never waits for bulk images computed beside
//!   it. Batches cannot be preempted, so while online calls are arriving (one in the last
//!   [`ONLINE_WINDOW`]) bulk runs one batch at a time, of a few images per compute
//!   thread ([`BULK_IMAGES_PER_THREAD`]): an interactive call waits for at most that much bulk
//!   work, and the stream still has every core. With no online traffic bulk batches are full and parallel.
//! - Items whose deadline passed or whose client went away are dropped before compute.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::engine::admission::Permit;
use crate::engine::types::{CompletedPixels, Embedding, Priority, Task, Timing};
use crate::error::ServeError;
use crate::imaging::SharedPixels;
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

    pub fn index(self) -> usize {
        self as usize
    }
}

impl Task {
    /// Whether the image needs the model's traced pass (per-layer intermediates).
    pub fn needs_trace(&self) -> bool {
        match self {
            Task::Embed(e) => e.diagnostics || e.attention_layer.is_some(),
            Task::Complete(c) => c.diagnostics,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Task::Embed(_) => Kind::Embed,
            Task::Complete(_) => Kind::Complete,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Output {
    Embed(Embedding),
    Complete(CompletedPixels),
}

pub type ItemResult = Result<(Output, Timing), ServeError>;

/// One image's worth of work.
pub struct Item {
    pub pixels: SharedPixels,
    pub task: Task,
    pub priority: Priority,
    pub deadline: Option<Instant>,
    pub admitted_at: Instant,
    pub reply: oneshot::Sender<ItemResult>,
    /// Released when the item is finished or dropped.
    pub permit: Permit,
    /// The request's span: the worker's spans for this image are its children.
    pub span: tracing::Span,
    /// Open while the image waits; closed when its batch starts.
    pub waiting: tracing::Span,
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

    /// Answers a dropped item (if anyone still listens). The request-level guard in the
    /// transport counts it, once per request.
    fn reject(self, reason: &'static str) {
        let err = match reason {
            "deadline" => {
                ServeError::DeadlineExceeded("deadline passed while queued; not computed".into())
            }
            _ => ServeError::Cancelled("client cancelled; not computed".into()),
        };
        let _ = self.reply.send(Err(err));
    }
}

/// Online batches in a row a waiting bulk batch may be passed over for.
pub const ONLINE_STREAK: u32 = 3;

/// Images per compute thread in a bulk batch while online calls arrive: two keep the stream
/// at more than half its solo rate beside interactive traffic, and an interactive call waits
/// at most two images' worth (BENCHMARKS.md, "Online before bulk").
pub const BULK_IMAGES_PER_THREAD: usize = 2;

/// How long after an online call bulk work stays throttled (see the module's rule).
pub const ONLINE_WINDOW: Duration = Duration::from_millis(50);

/// A formed batch, for one worker.
pub struct Batch {
    pub kind: Kind,
    pub priority: Priority,
    /// No other batch was running when this one was formed (it may spread over every core).
    pub alone: bool,
    pub items: Vec<Item>,
}

impl Batch {
    /// Drops, just before compute, items that went stale while the batch waited; `true` if
    /// anything is left to compute.
    pub fn prune(&mut self) -> bool {
        let now = Instant::now();
        let (keep, stale): (Vec<Item>, Vec<Item>) = std::mem::take(&mut self.items)
            .into_iter()
            .partition(|item| item.drop_reason(now).is_none());
        for item in stale {
            let reason = item.drop_reason(now).unwrap_or("cancelled");
            item.reject(reason);
        }
        self.items = keep;
        !self.items.is_empty()
    }
}

/// One kind's waiting images, online and bulk.
#[derive(Default)]
struct Lanes {
    online: VecDeque<Item>,
    bulk: VecDeque<Item>,
    /// Online batches formed in a row while bulk waited.
    streak: u32,
}

impl Lanes {
    fn is_empty(&self) -> bool {
        self.online.is_empty() && self.bulk.is_empty()
    }

    fn len(&self) -> usize {
        self.online.len() + self.bulk.len()
    }

    /// Whether a batch can be formed here now (`bulk_ok`: bulk may start a batch).
    fn ready(&self, bulk_ok: bool) -> bool {
        !self.online.is_empty() || (bulk_ok && !self.bulk.is_empty())
    }

    /// The lane the next batch comes from (see the module's rule), and counts it.
    fn next_lane(&mut self, bulk_ok: bool) -> (Priority, &mut VecDeque<Item>) {
        let bulk_turn = self.online.is_empty() || self.streak >= ONLINE_STREAK;
        if bulk_ok && bulk_turn && !self.bulk.is_empty() {
            self.streak = 0;
            (Priority::Bulk, &mut self.bulk)
        } else {
            if !self.bulk.is_empty() {
                self.streak += 1;
            }
            (Priority::Online, &mut self.online)
        }
    }

    fn drain(&mut self) -> impl Iterator<Item = Item> + '_ {
        self.online.drain(..).chain(self.bulk.drain(..))
    }
}

#[derive(Default)]
struct State {
    queues: [Lanes; 2],
    /// Cost-weighted images served per kind (for fair sharing).
    served: [f64; 2],
    /// Batches being computed, and how many of them are bulk.
    running: usize,
    bulk_running: usize,
    /// When the last online image arrived.
    online_seen: Option<Instant>,
    closed: bool,
}

impl State {
    fn online_active(&self, now: Instant) -> bool {
        self.online_seen
            .is_some_and(|t| now.saturating_duration_since(t) < ONLINE_WINDOW)
    }

    /// Whether bulk work may start a batch now.
    fn bulk_ok(&self, now: Instant) -> bool {
        self.bulk_running == 0 || !self.online_active(now)
    }
}

pub struct Queues {
    state: Mutex<State>,
    wake: Condvar,
    max_batch_size: usize,
    max_batch_delay: Duration,
    cost: [f64; 2],
    /// The largest bulk batch while online calls arrive.
    bulk_slice: AtomicUsize,
}

impl Queues {
    pub fn new(max_batch_size: usize, max_batch_delay: Duration, complete_cost: f64) -> Self {
        Self {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            max_batch_size,
            max_batch_delay,
            cost: [1.0, complete_cost],
            bulk_slice: AtomicUsize::new(1),
        }
    }

    /// Sets the compute threads a batch spreads over (known once the threading is chosen).
    pub fn set_compute_threads(&self, threads: usize) {
        self.bulk_slice
            .store(BULK_IMAGES_PER_THREAD * threads.max(1), Ordering::Relaxed);
    }

    /// A worker finished a batch of this priority.
    pub fn batch_done(&self, priority: Priority) {
        let mut state = self.lock();
        state.running = state.running.saturating_sub(1);
        if priority == Priority::Bulk {
            state.bulk_running = state.bulk_running.saturating_sub(1);
            drop(state);
            // A bulk batch held back for this one may start now.
            self.wake.notify_all();
        }
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
        if items.iter().any(|i| i.priority == Priority::Online) {
            state.online_seen = Some(Instant::now());
        }
        for item in items {
            let k = item.task.kind().index();
            if state.queues[k].is_empty() {
                // A kind that was idle does not get to bank credit for the idle time.
                let other = state.served[1 - k];
                state.served[k] = state.served[k].max(other);
            }
            let lanes = &mut state.queues[k];
            match item.priority {
                Priority::Online => lanes.online.push_back(item),
                Priority::Bulk => lanes.bulk.push_back(item),
            }
        }
        report_depth(&state);
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    /// Stops accepting; workers drain what is queued, then end.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    /// Fails everything still queued (the device is gone: nothing will compute it).
    pub fn fail_all(&self, error: &ServeError) {
        let mut state = self.lock();
        for lanes in &mut state.queues {
            for item in lanes.drain() {
                let _ = item.reply.send(Err(error.clone()));
            }
        }
        report_depth(&state);
    }

    /// Blocks until there is work, then forms a batch of it. `None` once closed and empty.
    pub fn next_batch(&self) -> Option<Batch> {
        let mut state = self.lock();
        loop {
            let kind = loop {
                let bulk_ok = state.bulk_ok(Instant::now());
                if let Some(kind) = self.pick(&state, bulk_ok) {
                    break kind;
                }
                let idle = state.queues.iter().all(Lanes::is_empty);
                if state.closed && idle {
                    return None;
                }
                state = if idle || state.closed {
                    self.wake.wait(state).unwrap_or_else(|p| p.into_inner())
                } else {
                    // Bulk is held back while online calls arrive: look again when the
                    // window closes (or a batch finishes first).
                    self.wake
                        .wait_timeout(state, ONLINE_WINDOW)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                };
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
            let (bulk_ok, online_active) = (state.bulk_ok(now), state.online_active(now));
            let (priority, lane) = state.queues[k].next_lane(bulk_ok);
            let limit = match priority {
                Priority::Bulk if online_active => self
                    .bulk_slice
                    .load(Ordering::Relaxed)
                    .min(self.max_batch_size),
                _ => self.max_batch_size,
            };
            let mut items = Vec::with_capacity(limit);
            while items.len() < limit {
                let Some(item) = lane.pop_front() else {
                    break;
                };
                match item.drop_reason(now) {
                    Some(reason) => item.reject(reason),
                    None => items.push(item),
                }
            }
            report_depth(&state);
            if items.is_empty() {
                continue; // everything picked was stale; look again
            }
            state.served[k] += items.len() as f64 * self.cost[k];
            let alone = state.running == 0;
            state.running += 1;
            if priority == Priority::Bulk {
                state.bulk_running += 1;
            }
            let more = state.queues.iter().any(|q| !q.is_empty());
            drop(state);
            if more {
                // Another free worker may take the rest.
                self.wake.notify_one();
            }
            return Some(Batch {
                kind,
                priority,
                alone,
                items,
            });
        }
    }

    /// The kind that has been served least among those with work that can start now.
    fn pick(&self, state: &State, bulk_ok: bool) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| state.queues[k.index()].ready(bulk_ok))
            .min_by(|a, b| state.served[a.index()].total_cmp(&state.served[b.index()]))
    }
}

fn report_depth(state: &State) {
    for kind in Kind::ALL {
        telemetry::queue_depth(kind.label(), state.queues[kind.index()].len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::admission::Admission;
    use crate::engine::types::{CompleteTask, EmbedTask, Priority};
    use crate_mae::{Mask, Pooling};
    use std::sync::Arc;

    async fn item(kind: Kind, admission: &Admission) -> (Item, oneshot::Receiver<ItemResult>) {
        prioritised(kind, Priority::Online, admission).await
    }

    /// Embed items of these priorities, with their reply receivers (kept open).
    async fn embeds(
        priorities: impl IntoIterator<Item = Priority>,
        admission: &Admission,
    ) -> (Vec<Item>, Vec<oneshot::Receiver<ItemResult>>) {
        let mut items = vec![];
        let mut receivers = vec![];
        for priority in priorities {
            let (i, rx) = prioritised(Kind::Embed, priority, admission).await;
            items.push(i);
            receivers.push(rx);
        }
        (items, receivers)
    }

    async fn prioritised(
        kind: Kind,
        priority: Priority,
        admission: &Admission,
    ) -> (Item, oneshot::Receiver<ItemResult>) {
        let (tx, rx) = oneshot::channel();
        let task = match kind {
            Kind::Embed => Task::Embed(Arc::new(EmbedTask {
                pooling: Pooling::Cls,
                layer: None,
                pooled_from: None,
                normalize: false,
                patch_tokens: false,
                diagnostics: false,
                attention_layer: None,
            })),
            Kind::Complete => Task::Complete(CompleteTask {
                mask: Mask::none(1, 4),
                diagnostics: false,
            }),
        };
        let permit = admission
            .admit(1, priority, None)
            .await
            .unwrap()
            .pop()
            .unwrap();
        (
            Item {
                pixels: Default::default(),
                task,
                priority,
                deadline: None,
                admitted_at: Instant::now(),
                reply: tx,
                permit,
                span: tracing::Span::none(),
                waiting: tracing::Span::none(),
            },
            rx,
        )
    }

    #[tokio::test]
    async fn batches_take_what_is_waiting_up_to_the_limit_and_alternate_fairly() {
        let a = Admission::new(100);
        let q = Queues::new(3, Duration::ZERO, 2.0);
        let mut receivers = vec![];
        let mut items = vec![];
        for kind in [Kind::Embed; 7].into_iter().chain([Kind::Complete; 4]) {
            let (i, rx) = item(kind, &a).await;
            items.push(i);
            receivers.push(rx);
        }
        q.push(items).unwrap();
        let sizes: Vec<(Kind, usize)> = (0..5)
            .map(|_| {
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

    #[tokio::test]
    async fn online_images_go_first_and_bulk_gets_every_fourth_batch() {
        let a = Admission::new(100);
        let q = Queues::new(2, Duration::ZERO, 2.0);
        let (items, _keep) = embeds(
            [Priority::Bulk; 4]
                .into_iter()
                .chain([Priority::Online; 10]),
            &a,
        )
        .await;
        q.set_compute_threads(2);
        q.push(items).unwrap();
        let order: Vec<(Priority, usize)> = (0..7)
            .map(|_| {
                let b = q.next_batch().unwrap();
                let p = b.items[0].priority;
                assert!(
                    b.items.iter().all(|i| i.priority == p),
                    "one priority a batch"
                );
                assert_eq!(b.priority, p);
                q.batch_done(p);
                (p, b.items.len())
            })
            .collect();
        use Priority::{Bulk, Online};
        assert_eq!(
            order,
            vec![
                (Online, 2),
                (Online, 2),
                (Online, 2),
                (Bulk, 2),
                (Online, 2),
                (Online, 2),
                (Bulk, 2)
            ],
            "bulk queued first still waits for online, but never more than three batches"
        );
    }

    #[tokio::test]
    async fn while_online_calls_arrive_bulk_runs_one_thin_batch_at_a_time() {
        let a = Admission::new(100);
        let q = Queues::new(8, Duration::ZERO, 2.0);
        q.set_compute_threads(2);
        let (bulk, _keep) = embeds([Priority::Bulk; 24], &a).await;
        // Bulk alone: full batches, several at once.
        q.push(bulk).unwrap();
        let (one, two) = (q.next_batch().unwrap(), q.next_batch().unwrap());
        assert_eq!((one.items.len(), two.items.len()), (8, 8));
        q.batch_done(Priority::Bulk);
        q.batch_done(Priority::Bulk);
        // An online call arrives: it goes first, then bulk runs one batch of
        // BULK_IMAGES_PER_THREAD images per compute thread, and a second bulk batch waits for
        // the first to finish.
        let (online, _rx) = prioritised(Kind::Embed, Priority::Online, &a).await;
        q.push(vec![online]).unwrap();
        let first = q.next_batch().unwrap();
        assert_eq!((first.priority, first.items.len()), (Priority::Online, 1));
        q.batch_done(Priority::Online);
        let thin = q.next_batch().unwrap();
        assert_eq!((thin.priority, thin.items.len()), (Priority::Bulk, 4));
        std::thread::scope(|s| {
            let waiting = s.spawn(|| q.next_batch().map(|b| b.items.len()));
            std::thread::sleep(Duration::from_millis(10));
            assert!(
                !waiting.is_finished(),
                "one bulk batch at a time while online is active"
            );
            q.batch_done(Priority::Bulk);
            assert_eq!(waiting.join().unwrap(), Some(4));
        });
    }

    #[tokio::test]
    async fn cancelled_items_are_dropped_before_compute() {
        let a = Admission::new(10);
        let q = Queues::new(8, Duration::ZERO, 2.0);
        let (gone, rx_gone) = item(Kind::Embed, &a).await;
        let (kept, _rx_kept) = item(Kind::Embed, &a).await;
        drop(rx_gone);
        q.push(vec![gone, kept]).unwrap();
        let batch = q.next_batch().unwrap();
        assert_eq!(batch.items.len(), 1);
        assert_eq!(a.in_flight(), 1, "the dropped item's slot is released");
    }

    #[tokio::test]
    async fn a_batch_delay_waits_for_a_fuller_batch() {
        let a = Admission::new(10);
        let q = Queues::new(2, Duration::from_millis(200), 2.0);
        let (one, _r1) = item(Kind::Embed, &a).await;
        let (two, _r2) = item(Kind::Embed, &a).await;
        q.push(vec![one]).unwrap();
        std::thread::scope(|s| {
            let worker = s.spawn(|| q.next_batch().map(|b| b.items.len()));
            std::thread::sleep(Duration::from_millis(30));
            assert!(!worker.is_finished(), "still within the batch delay");
            q.push(vec![two]).unwrap();
            assert_eq!(worker.join().unwrap(), Some(2), "full: formed at once");
        });
    }

    #[tokio::test]
    async fn closed_queues_refuse_work_and_end_after_draining() {
        let a = Admission::new(10);
        let q = Queues::new(8, Duration::ZERO, 2.0);
        let (i, _rx) = item(Kind::Embed, &a).await;
        q.push(vec![i]).unwrap();
        q.close();
        let (late, _rx2) = item(Kind::Embed, &a).await;
        assert!(matches!(
            q.push(vec![late]),
            Err(ServeError::Unavailable(_))
        ));
        assert!(q.next_batch().is_some());
        assert!(q.next_batch().is_none());
    }
}
