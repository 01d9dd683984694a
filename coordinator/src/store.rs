//! The durable embedded store: one redb file (`state.redb`) in the state directory holding every
//! job record, every job's event log, and the job counter. Writes come in batches (group
//! commit): one fsync'd transaction per batch, so a `kill -9` at any moment leaves either the
//! whole batch or none of it, and nothing a caller was told is stored is ever lost.
//!
//! Invariants: a job record and the events it counts (`JobRec::events`) are written in the same
//! transaction; records are JSON (serde), so the file stays readable across versions that only
//! add fields.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::records::{EventRec, JobRec};
use crate::{Error, Result};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_JOB: &str = "next_job";

/// Everything read back at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Every job.
    pub jobs: Vec<JobRec>,
    /// Every job's events, in order.
    pub events: HashMap<String, Vec<EventRec>>,
    /// Number for the next job id.
    pub next_job: u64,
}

/// Changes committed together.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Job records to (over)write.
    pub jobs: Vec<JobRec>,
    /// Events to append.
    pub events: Vec<(String, EventRec)>,
    /// New value of the job counter.
    pub next_job: Option<u64>,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.events.is_empty() && self.next_job.is_none()
    }
}

/// The store.
#[derive(Debug)]
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) `dir/state.redb`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            action: format!("creating the state directory {}", dir.display()),
            source,
        })?;
        let path = dir.join("state.redb");
        let db = Database::create(&path).map_err(|e| Error::store(&path, "opening", e))?;
        let store = Self { db, path };
        // Make sure every table exists so that read transactions never meet a missing one.
        store.commit(&Batch::default())?;
        Ok(store)
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads everything.
    pub fn load(&self) -> Result<Loaded> {
        let err = |action: &'static str| {
            let path = self.path.clone();
            move |e: redb::Error| Error::store(&path, action, e)
        };
        let txn = self.db.begin_read().map_err(|e| err("reading")(e.into()))?;
        let mut loaded = Loaded::default();
        let jobs = txn
            .open_table(JOBS)
            .map_err(|e| err("opening jobs")(e.into()))?;
        for item in jobs.iter().map_err(|e| err("reading jobs")(e.into()))? {
            let (key, value) = item.map_err(|e| err("reading jobs")(e.into()))?;
            let job: JobRec =
                serde_json::from_slice(value.value()).map_err(|e| Error::Corrupt {
                    key: format!("jobs/{}", key.value()),
                    message: e.to_string(),
                })?;
            loaded.jobs.push(job);
        }
        let events = txn
            .open_table(EVENTS)
            .map_err(|e| err("opening events")(e.into()))?;
        for item in events.iter().map_err(|e| err("reading events")(e.into()))? {
            let (key, value) = item.map_err(|e| err("reading events")(e.into()))?;
            let (job, seq) = key.value();
            let event: EventRec =
                serde_json::from_slice(value.value()).map_err(|e| Error::Corrupt {
                    key: format!("events/{job}/{seq}"),
                    message: e.to_string(),
                })?;
            loaded
                .events
                .entry(job.to_string())
                .or_default()
                .push(event);
        }
        let meta = txn
            .open_table(META)
            .map_err(|e| err("opening meta")(e.into()))?;
        loaded.next_job = meta
            .get(NEXT_JOB)
            .map_err(|e| err("reading meta")(e.into()))?
            .map_or(1, |v| v.value());
        loaded.jobs.sort_by_key(|j| j.seq);
        Ok(loaded)
    }

    /// Writes a batch in one durable transaction.
    pub fn commit(&self, batch: &Batch) -> Result<()> {
        let err = |action: &'static str| {
            let path = self.path.clone();
            move |e: redb::Error| Error::store(&path, action, e)
        };
        let txn = self
            .db
            .begin_write()
            .map_err(|e| err("starting a write")(e.into()))?;
        {
            let mut jobs = txn
                .open_table(JOBS)
                .map_err(|e| err("opening jobs")(e.into()))?;
            for job in &batch.jobs {
                let bytes = serde_json::to_vec(job).map_err(|e| Error::Corrupt {
                    key: format!("jobs/{}", job.id),
                    message: e.to_string(),
                })?;
                jobs.insert(job.id.as_str(), bytes.as_slice())
                    .map_err(|e| err("writing a job")(e.into()))?;
            }
            let mut events = txn
                .open_table(EVENTS)
                .map_err(|e| err("opening events")(e.into()))?;
            for (job, event) in &batch.events {
                let bytes = serde_json::to_vec(event).map_err(|e| Error::Corrupt {
                    key: format!("events/{job}/{}", event.seq),
                    message: e.to_string(),
                })?;
                events
                    .insert((job.as_str(), event.seq), bytes.as_slice())
                    .map_err(|e| err("writing an event")(e.into()))?;
            }
            let mut meta = txn
                .open_table(META)
                .map_err(|e| err("opening meta")(e.into()))?;
            if let Some(next) = batch.next_job {
                meta.insert(NEXT_JOB, next)
                    .map_err(|e| err("writing meta")(e.into()))?;
            }
        }
        txn.commit().map_err(|e| err("committing")(e.into()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::State;

    fn job(id: &str, seq: u64) -> JobRec {
        let spec = endofm_shared::JobSpec::from_toml(
            "kind = \"pretrain\"\noutput = \"/tmp/out\"\n[data]\nuri = \"/tmp/corpus\"\n",
        )
        .expect("spec");
        JobRec {
            id: id.into(),
            seq,
            spec,
            state: State::Queued,
            generation: 0,
            restarts: 0,
            submitted_ms: 1,
            started_ms: 0,
            finished_ms: 0,
            message: String::new(),
            placement: vec![],
            ranks_done: vec![],
            last_checkpoint: None,
            progress: None,
            events: 1,
            waiting_for: vec![],
            init_resolved: None,
            result: None,
            failure_class: None,
            not_before_ms: 0,
        }
    }

    #[test]
    fn batches_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            let event = EventRec {
                seq: 1,
                unix_ms: 2,
                kind: "submitted".into(),
                message: "hi".into(),
                generation: 0,
                rank: -1,
            };
            store
                .commit(&Batch {
                    jobs: vec![job("job-2", 2), job("job-1", 1)],
                    events: vec![("job-1".into(), event)],
                    next_job: Some(3),
                })
                .expect("commit");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let loaded = store.load().expect("load");
        assert_eq!(loaded.next_job, 3);
        assert_eq!(loaded.jobs.len(), 2);
        assert_eq!(loaded.jobs[0].id, "job-1", "sorted by submission order");
        assert_eq!(loaded.events["job-1"][0].message, "hi");
    }
}
