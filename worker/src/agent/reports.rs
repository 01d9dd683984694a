//! The agent's outgoing report queue: ranks' progress, checkpoints, results and log lines wait
//! here until a `Report` call carries them. Bounded: while the coordinator is down the oldest
//! reports are dropped (counted), so a long outage never grows the agent's memory. Reports are
//! best effort, but ordered with exits: the agent [`ReportQueue::flush`]es the queue before a
//! heartbeat carries a rank's exit, so a final checkpoint or result is known to the coordinator
//! before the job ends (a dependent job starts from that checkpoint).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use endofm_proto::v1;
use tokio::sync::{Notify, watch};

use super::client::Client;

/// Reports sent per call at most.
const BATCH: usize = 256;

/// The bounded queue.
#[derive(Debug)]
pub struct ReportQueue {
    items: Mutex<VecDeque<v1::RankReport>>,
    capacity: usize,
    dropped: AtomicU64,
    notify: Notify,
    /// Held while a batch is taken and sent, so a flush waits for a batch in flight.
    sending: tokio::sync::Mutex<()>,
}

impl ReportQueue {
    /// A queue holding at most `capacity` reports.
    pub fn new(capacity: usize) -> Self {
        Self {
            items: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
            notify: Notify::new(),
            sending: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<v1::RankReport>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues one report, dropping the oldest when full.
    pub fn push(&self, report: v1::RankReport) {
        let mut items = self.lock();
        if items.len() >= self.capacity {
            items.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        items.push_back(report);
        let full_batch = items.len() >= BATCH;
        drop(items);
        if full_batch {
            self.notify.notify_one();
        }
    }

    /// Takes up to `max` of the oldest reports.
    pub fn take(&self, max: usize) -> Vec<v1::RankReport> {
        let mut items = self.lock();
        let n = items.len().min(max);
        items.drain(..n).collect()
    }

    /// Puts back reports that could not be sent, in front, keeping the bound.
    pub fn requeue(&self, batch: Vec<v1::RankReport>) {
        let mut items = self.lock();
        for r in batch.into_iter().rev() {
            items.push_front(r);
        }
        while items.len() > self.capacity {
            items.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reports dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Reports waiting.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sends every report queued so far, after any batch already in flight; on failure the
    /// unsent reports stay queued (in order) and the call's status is returned.
    pub async fn flush(
        &self,
        client: &mut Client,
        worker_id: &str,
    ) -> std::result::Result<(), tonic::Status> {
        let _sending = self.sending.lock().await;
        loop {
            let batch = self.take(BATCH);
            if batch.is_empty() {
                return Ok(());
            }
            let req = v1::ReportRequest {
                worker_id: worker_id.to_string(),
                reports: batch.clone(),
            };
            if let Err(s) = client.report(req).await {
                self.requeue(batch);
                return Err(s);
            }
        }
    }
}

/// Sends queued reports every `period` (or as soon as a full batch waits) once the worker has an
/// id; on failure keeps them and backs off. Runs until the process ends.
pub async fn send_loop(
    mut client: Client,
    queue: std::sync::Arc<ReportQueue>,
    worker_id: watch::Receiver<String>,
    period: Duration,
) {
    let mut backoff = Duration::ZERO;
    let mut warned_dropped = 0;
    loop {
        tokio::select! {
            _ = queue.notify.notified() => {}
            _ = tokio::time::sleep(period) => {}
        }
        if !backoff.is_zero() {
            tokio::time::sleep(backoff).await;
        }
        let id = worker_id.borrow().clone();
        if id.is_empty() {
            continue;
        }
        match queue.flush(&mut client, &id).await {
            Ok(()) => backoff = Duration::ZERO,
            Err(s) => {
                if backoff.is_zero() {
                    tracing::warn!(code = ?s.code(), status = %s.message(), waiting = queue.len(), "report failed; keeping reports");
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(500), Duration::from_secs(10));
            }
        }
        let dropped = queue.dropped();
        if dropped > warned_dropped {
            tracing::warn!(dropped, "report queue full: oldest reports dropped");
            warned_dropped = dropped;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: usize) -> v1::RankReport {
        v1::RankReport {
            rank: None,
            report: Some(v1::rank_report::Report::Log(v1::LogLine {
                unix_ms: n as i64,
                level: "info".into(),
                message: n.to_string(),
            })),
        }
    }

    fn ids(v: &[v1::RankReport]) -> Vec<i64> {
        v.iter()
            .map(|r| match &r.report {
                Some(v1::rank_report::Report::Log(l)) => l.unix_ms,
                _ => -1,
            })
            .collect()
    }

    #[test]
    fn the_queue_drops_the_oldest_and_requeues_in_front() {
        let q = ReportQueue::new(3);
        for n in 0..5 {
            q.push(log(n));
        }
        assert_eq!(q.dropped(), 2);
        let batch = q.take(2);
        assert_eq!(ids(&batch), [2, 3]);
        q.push(log(5));
        q.requeue(batch);
        assert_eq!(ids(&q.take(10)), [3, 4, 5]);
        assert_eq!(q.dropped(), 3);
        assert!(q.is_empty());
    }
}
