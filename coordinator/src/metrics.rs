//! The coordinator's Prometheus metrics (`endofm_*`, units in the names) and the HTTP endpoint
//! that serves them (`GET /metrics`, text format; `GET /healthz`). Gauges that describe the
//! state (jobs by state, queue depth, live workers) are read from the state machine at scrape
//! time, so they are never stale.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::core::Core;
use crate::records::State;

/// Label of the per-state job gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// queued, running, succeeded, failed, cancelled.
    pub state: String,
}

/// Label of the RPC histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    /// The gRPC method name.
    pub method: String,
}

/// Handles to every coordinator metric (cheap to clone).
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Jobs by state.
    pub jobs: Family<StateLabel, Gauge>,
    /// Queued jobs.
    pub queue_depth: Gauge,
    /// Registered workers.
    pub workers_alive: Gauge,
    /// Attempts placed.
    pub placements: Counter,
    /// Seconds from (re)queueing to placement.
    pub scheduling_latency: Histogram,
    /// RPC handling seconds by method.
    pub rpc_duration: Family<MethodLabel, Histogram>,
    /// Attempts restarted after failures.
    pub attempt_restarts: Counter,
    /// Workers whose lease expired.
    pub workers_lost: Counter,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.5, 14))
}

impl Metrics {
    /// New metrics, registered in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            jobs: Family::default(),
            queue_depth: Gauge::default(),
            workers_alive: Gauge::default(),
            placements: Counter::default(),
            scheduling_latency: Histogram::new(exponential_buckets(0.001, 3.0, 14)),
            rpc_duration: Family::new_with_constructor(latency_histogram),
            attempt_restarts: Counter::default(),
            workers_lost: Counter::default(),
        };
        registry.register("endofm_jobs", "Jobs by state", m.jobs.clone());
        registry.register(
            "endofm_queue_depth",
            "Jobs waiting for devices",
            m.queue_depth.clone(),
        );
        registry.register(
            "endofm_workers_alive",
            "Registered workers with a live lease",
            m.workers_alive.clone(),
        );
        registry.register(
            "endofm_placements",
            "Attempts placed on workers",
            m.placements.clone(),
        );
        registry.register(
            "endofm_scheduling_latency_seconds",
            "Seconds from queueing to placement",
            m.scheduling_latency.clone(),
        );
        registry.register(
            "endofm_rpc_duration_seconds",
            "Seconds spent handling gRPC calls, by method",
            m.rpc_duration.clone(),
        );
        registry.register(
            "endofm_attempt_restarts",
            "Attempts restarted after a failure",
            m.attempt_restarts.clone(),
        );
        registry.register(
            "endofm_workers_lost",
            "Workers whose heartbeat lease expired",
            m.workers_lost.clone(),
        );
        m
    }

    /// Records the duration of one RPC.
    pub fn observe_rpc(&self, method: &str, seconds: f64) {
        self.rpc_duration
            .get_or_create(&MethodLabel {
                method: method.to_string(),
            })
            .observe(seconds);
    }
}

/// Sets the state gauges from the state machine and renders the registry.
pub fn render(registry: &Registry, core: &Mutex<Core>) -> String {
    if let Ok(core) = core.lock() {
        let (by_state, queue, alive) = core.gauges();
        let m = core.metrics();
        for state in State::ALL {
            m.jobs
                .get_or_create(&StateLabel {
                    state: state.label().to_string(),
                })
                .set(by_state.get(&state).copied().unwrap_or(0));
        }
        m.queue_depth.set(queue);
        m.workers_alive.set(alive);
    }
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        text.clear();
    }
    endofm_shared::prom_text::from_openmetrics(&text)
}

/// Serves `/metrics` and `/healthz` on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    core: Arc<Mutex<Core>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = Arc::clone(&registry);
                let core = Arc::clone(&core);
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            endofm_shared::prom_text::CONTENT_TYPE,
                        )],
                        render(&registry, &core),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the metrics listener (so that the bound address can be reported before serving).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
