//! Prometheus metrics on `--metrics-addr`: bundles by state, processes patched, failures by
//! reason, and the time applies kept processes stopped. A tiny HTTP endpoint (`/metrics`).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::journal::{Entry, Event};
use crate::report::{BundleState, Report, Status};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

pub struct Metrics {
    bundles: Family<StateLabel, Gauge>,
    processes: Gauge,
    failures: Family<KindLabel, Counter>,
    rollbacks: Counter,
    stopped: Histogram,
    held: Histogram,
}

impl Metrics {
    /// Registers the metrics and serves them on `addr` from a thread of their own.
    pub fn serve(addr: SocketAddr) -> Result<Metrics> {
        let mut registry = Registry::with_prefix("suture_agent");
        let m = Metrics {
            bundles: Family::default(),
            processes: Gauge::default(),
            failures: Family::default(),
            rollbacks: Counter::default(),
            // 50 µs … 0.4 s.
            stopped: Histogram::new(exponential_buckets(0.00005, 2.0, 14)),
            // 250 µs … 4 s.
            held: Histogram::new(exponential_buckets(0.00025, 2.0, 15)),
        };
        registry.register("bundles", "Bundles by state", m.bundles.clone());
        registry.register(
            "processes_patched",
            "Processes carrying an active bundle",
            m.processes.clone(),
        );
        registry.register(
            "failures",
            "Operations on a process that failed, by the engine's reason",
            m.failures.clone(),
        );
        registry.register(
            "rollbacks",
            "Bundles rolled back by the health guard",
            m.rollbacks.clone(),
        );
        registry.register(
            "apply_stop_seconds",
            "Time every thread of a process was stopped by one apply",
            m.stopped.clone(),
        );
        registry.register(
            "new_process_hold_seconds",
            "Time a starting process was held until patched (from its open to its release)",
            m.held.clone(),
        );
        let registry = Arc::new(registry);
        let server = tiny_http::Server::http(addr)
            .map_err(|e| anyhow!("cannot serve metrics on {addr}: {e}"))?;
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for req in server.incoming_requests() {
                    let resp =
                        if req.url() == "/metrics" {
                            let mut body = String::new();
                            match prometheus_client::encoding::text::encode(&mut body, &registry) {
                                Ok(()) => tiny_http::Response::from_string(body)
                                    .with_header(tiny_http::Header {
                                    field: "Content-Type".parse().expect("static header name"),
                                    value:
                                        "application/openmetrics-text; version=1.0.0; charset=utf-8"
                                            .parse()
                                            .expect("static header value"),
                                }),
                                Err(e) => tiny_http::Response::from_string(e.to_string())
                                    .with_status_code(500),
                            }
                        } else {
                            tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                        };
                    let _ = req.respond(resp);
                }
            })?;
        Ok(m)
    }
}

impl Report for Metrics {
    fn action(&mut self, entry: &Entry) {
        match &entry.event {
            Event::Failed { kind, .. } => {
                self.failures
                    .get_or_create(&KindLabel { kind: kind.clone() })
                    .inc();
            }
            Event::RolledBack { .. } => {
                self.rollbacks.inc();
            }
            _ => {}
        }
    }

    fn status(&mut self, status: &Status) {
        for s in BundleState::ALL {
            let n = status.bundles.iter().filter(|b| b.state == s).count();
            self.bundles
                .get_or_create(&StateLabel {
                    state: s.as_str().into(),
                })
                .set(n as i64);
        }
        let patched: usize = status
            .bundles
            .iter()
            .filter(|b| b.state == BundleState::Active)
            .map(|b| b.processes)
            .sum();
        self.processes.set(patched as i64);
    }

    fn stopped(&mut self, micros: u64) {
        self.stopped.observe(micros as f64 / 1e6);
    }

    fn held(&mut self, micros: u64) {
        self.held.observe(micros as f64 / 1e6);
    }
}
