//! An ordered prefetch pool: background threads produce items `first, first + 1, …` (up to an
//! optional end) at most `depth` ahead of the consumer, and the consumer takes them strictly in
//! order whatever order they finish in. Items are a pure function of their sequence number, so
//! the output does not depend on the thread count or timing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{Error, Result};

type Produce<T> = dyn Fn(usize) -> Result<T> + Send + Sync;

struct Shared<T> {
    produce: Box<Produce<T>>,
    end: Option<usize>,
    depth: usize,
    /// Next sequence number a thread claims.
    next: AtomicUsize,
    /// First sequence number the consumer has not taken.
    consumed: Mutex<usize>,
    ready: Mutex<BTreeMap<usize, Result<T>>>,
    changed: Condvar,
    stop: AtomicBool,
}

impl<T> Shared<T> {
    fn worker(&self) {
        loop {
            let seq = self.next.fetch_add(1, Ordering::SeqCst);
            if self.end.is_some_and(|end| seq >= end) {
                return;
            }
            {
                let mut consumed = self.consumed.lock().unwrap_or_else(|e| e.into_inner());
                while seq >= *consumed + self.depth && !self.stop.load(Ordering::SeqCst) {
                    consumed = self
                        .changed
                        .wait_timeout(consumed, Duration::from_millis(200))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            // A panic producing an item becomes that item's error: the consumer never waits
            // for an item nobody will produce.
            let item = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.produce)(seq)))
                .unwrap_or_else(|payload| {
                    let text = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic without a message".into());
                    Err(Error::Service {
                        what: "data loader".into(),
                        reason: format!(
                            "a data thread panicked producing item {seq}: {text}; this is a bug, please report it"
                        ),
                    })
                });
            self.ready
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(seq, item);
            self.changed.notify_all();
        }
    }
}

/// The running pool; dropping it stops and joins the threads.
pub(crate) struct Prefetch<T> {
    shared: Arc<Shared<T>>,
    threads: Vec<JoinHandle<()>>,
    next: usize,
}

impl<T> std::fmt::Debug for Prefetch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Prefetch(next {}, {} threads)",
            self.next,
            self.threads.len()
        )
    }
}

impl<T: Send + 'static> Prefetch<T> {
    /// Starts `threads` threads named `name-i` producing items from `first` on (before `end`
    /// when given), at most `depth` ahead of the consumer.
    pub fn start(
        name: &str,
        threads: usize,
        depth: usize,
        (first, end): (usize, Option<usize>),
        produce: impl Fn(usize) -> Result<T> + Send + Sync + 'static,
    ) -> Result<Self> {
        let shared = Arc::new(Shared {
            produce: Box::new(produce),
            end,
            depth: depth.max(1),
            next: AtomicUsize::new(first),
            consumed: Mutex::new(first),
            ready: Mutex::new(BTreeMap::new()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut pool = Self {
            shared,
            threads: Vec::new(),
            next: first,
        };
        for i in 0..threads.max(1) {
            let s = Arc::clone(&pool.shared);
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || s.worker())
                .map_err(|e| Error::Input {
                    name: "data loader".into(),
                    reason: format!("cannot start a data thread: {e}"),
                })?;
            pool.threads.push(handle);
        }
        Ok(pool)
    }

    /// The next item in sequence order (blocks until it is ready).
    pub fn take(&mut self) -> Result<T> {
        let seq = self.next;
        if self.shared.end.is_some_and(|end| seq >= end) {
            return Err(Error::Input {
                name: "data loader".into(),
                reason: format!("item {seq} requested past the end"),
            });
        }
        let mut ready = self.shared.ready.lock().unwrap_or_else(|e| e.into_inner());
        let item = loop {
            if let Some(item) = ready.remove(&seq) {
                break item;
            }
            // Liveness: threads end only past `end` or when stopped; all gone means no item.
            if self.threads.iter().all(|t| t.is_finished()) {
                return Err(Error::Service {
                    what: "data loader".into(),
                    reason: format!("every data thread ended before item {seq} was produced"),
                });
            }
            ready = self
                .shared
                .changed
                .wait_timeout(ready, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        };
        drop(ready);
        self.next += 1;
        *self
            .shared
            .consumed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = self.next;
        self.shared.changed.notify_all();
        item
    }
}

impl<T> Drop for Prefetch<T> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panicking_producer_is_an_error_not_a_hang() {
        let mut pool = super::Prefetch::start("t", 2, 2, (0, Some(4)), |i| {
            if i == 1 {
                panic!("odd clip");
            }
            Ok(i)
        })
        .expect("start");
        assert_eq!(pool.take().expect("item 0"), 0);
        let err = pool.take().expect_err("item 1 panicked").to_string();
        assert!(
            err.contains("panicked") && err.contains("odd clip"),
            "{err}"
        );
        assert_eq!(pool.take().expect("item 2"), 2);
    }

    use super::*;

    #[test]
    fn items_arrive_in_order_from_any_thread_count() {
        for threads in [1, 3] {
            let mut pool = Prefetch::start("t", threads, 4, (5, Some(20)), |seq| {
                // Later items finish first.
                std::thread::sleep(Duration::from_micros(((20 - seq) * 50) as u64));
                Ok(seq * 10)
            })
            .expect("start");
            let got: Vec<usize> = (5..20).map(|_| pool.take().expect("item")).collect();
            assert_eq!(got, (5..20).map(|s| s * 10).collect::<Vec<_>>());
            assert!(pool.take().is_err(), "past the end");
        }
    }

    #[test]
    fn errors_reach_the_consumer_in_place() {
        let mut pool = Prefetch::start("t", 2, 2, (0, None), |seq| {
            if seq == 2 {
                Err(Error::Input {
                    name: "item".into(),
                    reason: "two".into(),
                })
            } else {
                Ok(seq)
            }
        })
        .expect("start");
        assert_eq!(pool.take().expect("0"), 0);
        assert_eq!(pool.take().expect("1"), 1);
        assert!(pool.take().expect_err("2").to_string().contains("two"));
        assert_eq!(pool.take().expect("3"), 3);
    }
}
