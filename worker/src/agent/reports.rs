//! The agent's outgoing report queue: ranks' progress, checkpoints, results and log lines wait
//! here until a `Report` call carries them. Bounded: while the coordinator is down the oldest
//! progress and log reports are dropped (counted), so a long outage never grows the agent's
//! memory; checkpoints and results are never dropped: they are retried until a `Report` call
//! is acknowledged (they are few, one per checkpoint). Every call has a deadline, so a stalled
//! coordinator (SIGSTOP) holds nothing up for ever: the batch goes back and is sent again.
//! Reports are ordered with exits: the agent [`ReportQueue::flush`]es the queue before a
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
/// Deadline of one `Report` call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a report must reach the coordinator (a committed checkpoint, a result), as opposed
/// to progress and log lines, which later ones supersede.
fn essential(report: &v1::RankReport) -> bool {
    matches!(
        report.report,
        Some(v1::rank_report::Report::Checkpoint(_)) | Some(v1::rank_report::Report::Result(_))
    )
}

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

    /// Drops the oldest reports that may be dropped until the queue fits its capacity.
    fn shrink(&self, items: &mut VecDeque<v1::RankReport>) {
        while items.len() > self.capacity {
            let Some(i) = items.iter().position(|r| !essential(r)) else {
                return; // only checkpoints and results: kept whatever the bound
            };
            items.remove(i);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues one report, dropping the oldest progress or log report when full.
    pub fn push(&self, report: v1::RankReport) {
        let mut items = self.lock();
        items.push_back(report);
        self.shrink(&mut items);
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
        self.shrink(&mut items);
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
            let status = match tokio::time::timeout(CALL_TIMEOUT, client.report(req)).await {
                Ok(Ok(_)) => continue,
                Ok(Err(s)) => s,
                Err(_) => tonic::Status::deadline_exceeded(format!(
                    "no answer within {} s",
                    CALL_TIMEOUT.as_secs()
                )),
            };
            self.requeue(batch);
            return Err(status);
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

    /// Issue 11 item 9: a checkpoint report survives any number of progress and log lines
    /// queued while the coordinator does not answer.
    #[test]
    fn checkpoints_and_results_are_never_dropped() {
        let checkpoint = v1::RankReport {
            rank: None,
            report: Some(v1::rank_report::Report::Checkpoint(v1::CheckpointRef {
                step: 6,
                uri: "/out/checkpoints/step-000000006".into(),
                generation: 1,
            })),
        };
        let q = ReportQueue::new(3);
        q.push(log(0));
        q.push(checkpoint.clone());
        for n in 1..100 {
            q.push(log(n));
        }
        let batch = q.take(10);
        assert_eq!(batch.len(), 3);
        assert_eq!(batch[0], checkpoint, "the checkpoint stays, in order");
        assert_eq!(ids(&batch[1..]), [98, 99]);
        // Put back after a failed call: still there, still first.
        q.push(log(100));
        q.push(log(101));
        q.requeue(batch);
        let again = q.take(10);
        assert_eq!(again[0], checkpoint);
        assert_eq!(again.len(), 3);
    }
}
