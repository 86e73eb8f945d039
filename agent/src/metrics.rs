//! The agent's optional Prometheus endpoint: `/metrics` (OpenMetrics text) and `/healthz`,
//! served only when `[metrics] listen` is set (off by default: most boards are scraped by
//! nobody). Built with the `metrics` cargo feature (on by default); without it the hooks below
//! compile to nothing and a `listen` setting is refused at start.
//!
//! The hooks are called from the probe tasks (`probe_done`) and once per turn of the uplink
//! loop (`uplink`, a snapshot of its counters: the uplink keeps its own numbers and this module
//! only mirrors them). docs/agent.md lists every metric.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

use crate::probe::Measurement;
use crate::uplink_stats::UplinkStats;

/// The uplink's state at one moment.
#[derive(Debug, Clone, Copy)]
pub struct UplinkSnapshot<'a> {
    pub stats: &'a UplinkStats,
    /// The spool's figures (None without a spool).
    pub spool: Option<&'a crate::uplink_stats::SpoolState>,
    /// Results buffered, not yet acknowledged by the broker.
    pub buffered: usize,
    pub capacity: usize,
    /// Connections made so far (the first one included).
    pub connects: u64,
    pub connected: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("this vantage-agent was built without the `metrics` feature")]
    NotBuiltIn,
}

#[cfg(feature = "metrics")]
pub use imp::{e2e_ack_latency, encode, probe_done, probes_skipped, serve, uplink};

#[cfg(not(feature = "metrics"))]
pub fn probe_done(_m: &Measurement) {}
#[cfg(not(feature = "metrics"))]
pub fn probes_skipped(_total: u64) {}
#[cfg(not(feature = "metrics"))]
pub fn uplink(_s: UplinkSnapshot<'_>) {}
#[cfg(not(feature = "metrics"))]
pub fn e2e_ack_latency(_ms: u64) {}
#[cfg(not(feature = "metrics"))]
pub async fn serve(
    _addr: SocketAddr,
    _shutdown: CancellationToken,
) -> Result<SocketAddr, MetricsError> {
    Err(MetricsError::NotBuiltIn)
}

#[cfg(feature = "metrics")]
mod imp {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, LazyLock};
    use std::time::Duration;

    use hyper::StatusCode;
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
    use prometheus_client::registry::{Registry, Unit};

    use vantage_common::http_server::{
        accept_loop, text_response, Handler, Limits, OPENMETRICS, PLAIN,
    };

    use super::*;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct OutcomeLabel {
        outcome: &'static str,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct BuildLabel {
        version: &'static str,
    }

    struct Metrics {
        registry: Registry,
        probes: Family<OutcomeLabel, Counter>,
        probe_seconds: Histogram,
        skipped: Counter,
        results: Counter,
        dropped: Counter,
        gaps: Counter,
        frames_published: Counter,
        frames_acked: Counter,
        sessions_lost: Counter,
        e2e_acked: Counter,
        e2e_latency: Histogram,
        resends: Counter,
        unacked_frames: Gauge,
        puback_fallback: Gauge,
        buffered: Gauge,
        capacity: Gauge,
        connections: Counter,
        connected: Gauge,
        spool_bytes: Gauge,
        spool_max_bytes: Gauge,
        spool_disk_bytes: Gauge,
        spool_segments: Gauge,
        spool_oldest: Gauge<f64, std::sync::atomic::AtomicU64>,
        spool_writes: Counter,
        spool_bytes_written: Counter,
        spool_syncs: Counter,
        spool_replayed: Counter,
        spool_lost: Counter,
    }

    static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
        let mut m = Metrics {
            registry: Registry::default(),
            probes: Family::default(),
            // 1 ms .. ~65 s
            probe_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            skipped: Counter::default(),
            results: Counter::default(),
            dropped: Counter::default(),
            gaps: Counter::default(),
            frames_published: Counter::default(),
            frames_acked: Counter::default(),
            sessions_lost: Counter::default(),
            e2e_acked: Counter::default(),
            // 1 ms .. ~65 s
            e2e_latency: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            resends: Counter::default(),
            unacked_frames: Gauge::default(),
            puback_fallback: Gauge::default(),
            buffered: Gauge::default(),
            capacity: Gauge::default(),
            connections: Counter::default(),
            connected: Gauge::default(),
            spool_bytes: Gauge::default(),
            spool_max_bytes: Gauge::default(),
            spool_disk_bytes: Gauge::default(),
            spool_segments: Gauge::default(),
            spool_oldest: Gauge::default(),
            spool_writes: Counter::default(),
            spool_bytes_written: Counter::default(),
            spool_syncs: Counter::default(),
            spool_replayed: Counter::default(),
            spool_lost: Counter::default(),
        };
        m.registry = register(&m);
        m
    });

    /// A registry holding (clones of) every metric of `m`.
    fn register(m: &Metrics) -> Registry {
        {
            let mut r = Registry::default();
            let build: Family<BuildLabel, Gauge> = Family::default();
            build
                .get_or_create(&BuildLabel {
                    version: env!("CARGO_PKG_VERSION"),
                })
                .set(1);
            r.register(
                "vantage_agent_build_info",
                "Version of vantage-agent",
                build,
            );
            r.register(
                "vantage_agent_probes",
                "Probes finished, by outcome (up, timeout, connect_refused, ...)",
                m.probes.clone(),
            );
            r.register_with_unit(
                "vantage_agent_probe_duration",
                "Total time of a probe, redirects included",
                Unit::Seconds,
                m.probe_seconds.clone(),
            );
            r.register(
                "vantage_agent_probes_skipped",
                "Probes not started: late, or every probe slot busy",
                m.skipped.clone(),
            );
            r.register(
                "vantage_agent_results",
                "Results numbered by the uplink in this boot",
                m.results.clone(),
            );
            r.register(
                "vantage_agent_results_dropped",
                "Results dropped because the buffer was full (reported as gap records)",
                m.dropped.clone(),
            );
            r.register("vantage_agent_gaps", "Gap records created", m.gaps.clone());
            r.register(
                "vantage_agent_frames_published",
                "Frames handed to the MQTT client (re-sends after a lost session included)",
                m.frames_published.clone(),
            );
            r.register(
                "vantage_agent_frames_acked",
                "Frames the MQTT broker acknowledged",
                m.frames_acked.clone(),
            );
            r.register(
                "vantage_agent_mqtt_sessions_lost",
                "Reconnects after which the broker no longer had the session",
                m.sessions_lost.clone(),
            );
            r.register(
                "vantage_agent_frames_e2e_acked",
                "Frames the ingester acknowledged end to end (Kafka holds them)",
                m.e2e_acked.clone(),
            );
            r.register_with_unit(
                "vantage_agent_e2e_ack_latency",
                "First hand of a frame to the MQTT client to the ingester's end-to-end acknowledgement",
                Unit::Seconds,
                m.e2e_latency.clone(),
            );
            r.register(
                "vantage_agent_frames_resent",
                "Frames sent again because no end-to-end acknowledgement came within uplink.ack_timeout",
                m.resends.clone(),
            );
            r.register(
                "vantage_agent_frames_unacked",
                "Frames the broker acknowledged and the ingester not yet",
                m.unacked_frames.clone(),
            );
            r.register(
                "vantage_agent_puback_fallback",
                "1 while results are freed at the broker's PUBACK (no end-to-end acknowledgements from the ingester, or uplink.end_to_end_acks = off)",
                m.puback_fallback.clone(),
            );
            r.register(
                "vantage_agent_buffer_results",
                "Results buffered and not yet acknowledged by the broker",
                m.buffered.clone(),
            );
            r.register(
                "vantage_agent_buffer_capacity_results",
                "Results the buffer holds before dropping the oldest",
                m.capacity.clone(),
            );
            r.register(
                "vantage_agent_mqtt_connections",
                "Connections made to the MQTT broker (first connect and reconnects)",
                m.connections.clone(),
            );
            r.register(
                "vantage_agent_mqtt_connected",
                "1 while connected to the MQTT broker",
                m.connected.clone(),
            );
            r.register(
                "vantage_agent_spool_bytes",
                "Bytes of results in the spool not yet acknowledged",
                m.spool_bytes.clone(),
            );
            r.register(
                "vantage_agent_spool_max_bytes",
                "uplink.spool_max_bytes: past it the oldest unsent results are dropped into a gap",
                m.spool_max_bytes.clone(),
            );
            r.register(
                "vantage_agent_spool_disk_bytes",
                "Bytes of the spool's segment files (acknowledged data lingers until its segment is deleted)",
                m.spool_disk_bytes.clone(),
            );
            r.register(
                "vantage_agent_spool_segments",
                "Segment files in the spool",
                m.spool_segments.clone(),
            );
            r.register_with_unit(
                "vantage_agent_spool_oldest_unacked_age",
                "Age of the oldest result not yet acknowledged (from its probe start; 0 when none)",
                Unit::Seconds,
                m.spool_oldest.clone(),
            );
            r.register(
                "vantage_agent_spool_writes",
                "write calls to the spool (one per flush, plus one per new segment)",
                m.spool_writes.clone(),
            );
            r.register_with_unit(
                "vantage_agent_spool_written",
                "Bytes written to the spool",
                Unit::Bytes,
                m.spool_bytes_written.clone(),
            );
            r.register(
                "vantage_agent_spool_syncs",
                "fsyncs of the spool (uplink.spool_fsync)",
                m.spool_syncs.clone(),
            );
            r.register(
                "vantage_agent_spool_replayed",
                "Results of earlier boots found in the spool at start",
                m.spool_replayed.clone(),
            );
            r.register(
                "vantage_agent_spool_lost",
                "Results the spool found torn or corrupt at start (reported as gap records)",
                m.spool_lost.clone(),
            );
            r
        }
    }

    /// A probe finished.
    pub fn probe_done(m: &Measurement) {
        METRICS
            .probes
            .get_or_create(&OutcomeLabel {
                outcome: m.outcome.as_str(),
            })
            .inc();
        METRICS.probe_seconds.observe(f64::from(m.total_us) / 1e6);
    }

    /// The run's count of skipped probes so far.
    pub fn probes_skipped(total: u64) {
        METRICS.skipped.inner().store(total, Ordering::Relaxed);
    }

    /// Mirrors the uplink's counters (monotonic within a run, so they stay valid counters).
    pub fn uplink(s: UplinkSnapshot<'_>) {
        let m = &*METRICS;
        let set = |c: &Counter, v: u64| c.inner().store(v, Ordering::Relaxed);
        set(&m.results, s.stats.results);
        set(&m.dropped, s.stats.dropped);
        set(&m.gaps, s.stats.gaps);
        set(&m.frames_published, s.stats.frames_published);
        set(&m.frames_acked, s.stats.frames_acked);
        set(&m.sessions_lost, s.stats.sessions_lost);
        set(&m.e2e_acked, s.stats.frames_e2e_acked);
        set(&m.resends, s.stats.resends);
        m.unacked_frames.set(s.stats.unacked_frames as i64);
        m.puback_fallback.set(i64::from(s.stats.puback_fallback));
        set(&m.connections, s.connects);
        m.buffered.set(s.buffered as i64);
        m.capacity.set(s.capacity as i64);
        m.connected.set(i64::from(s.connected));
        set(&m.spool_replayed, s.stats.replayed);
        set(&m.spool_lost, s.stats.replay_lost);
        if let Some(sp) = s.spool {
            m.spool_bytes.set(sp.live_bytes as i64);
            m.spool_max_bytes.set(sp.max_bytes as i64);
            m.spool_disk_bytes.set(sp.disk_bytes as i64);
            m.spool_segments.set(sp.segments as i64);
            m.spool_oldest
                .set(sp.oldest_unacked_age_ms.unwrap_or(0) as f64 / 1000.0);
            set(&m.spool_writes, sp.io.writes);
            set(&m.spool_bytes_written, sp.io.bytes_written);
            set(&m.spool_syncs, sp.io.syncs);
        }
    }

    /// A frame was acknowledged end to end `ms` after it was first handed to the MQTT client.
    pub fn e2e_ack_latency(ms: u64) {
        METRICS.e2e_latency.observe(ms as f64 / 1000.0);
    }

    /// The registry in OpenMetrics text.
    pub fn encode() -> String {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &METRICS.registry);
        text
    }

    /// Binds `addr` and serves `/metrics` and `/healthz` until `shutdown`, on a task of the
    /// current runtime (the shared `vantage_common::http_server`); at most 8 connections at once,
    /// each for at most 10 s. Returns the bound address (port 0 picks one; it is logged).
    pub async fn serve(
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) -> Result<SocketAddr, MetricsError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        let bound = listener.local_addr().unwrap_or(addr);
        tracing::info!(addr = %bound, "metrics listening (/metrics, /healthz)");
        let handler: Handler = Arc::new(|req: hyper::Request<_>| {
            Box::pin(async move {
                match req.uri().path() {
                    "/metrics" => text_response(StatusCode::OK, OPENMETRICS, encode()),
                    "/healthz" => text_response(StatusCode::OK, PLAIN, "ok\n".to_owned()),
                    _ => text_response(StatusCode::NOT_FOUND, PLAIN, "try /metrics\n".to_owned()),
                }
            })
        });
        let limits = Limits {
            max_connections: 8,
            deadline: Duration::from_secs(10),
            keep_alive: false,
        };
        tokio::spawn(accept_loop(listener, limits, shutdown, handler));
        Ok(bound)
    }
}
