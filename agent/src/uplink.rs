//! The uplink: numbers results, batches them, and publishes postcard frames over MQTT QoS 1.
//!
//! Flow: probe tasks → bounded channel → [`run`] (sequence numbers, bounded buffer, batches) →
//! rumqttc `AsyncClient` → the event-loop task, which alone owns the socket (rumqttc deadlocks if
//! the task that polls the event loop also awaits `publish`).
//!
//! Probes never wait on the network: this loop only hands frames to rumqttc with `try_publish`,
//! and keeps results in its own bounded buffer while rumqttc's queue is full (broker down). When
//! that buffer is full the oldest results are dropped and counted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use vantage_proto::{Batch, ProbeResult, MAX_FRAME_LEN};

use crate::config::Config;
use crate::probe::Measurement;

/// Requests rumqttc may queue between this loop and its event loop.
const CLIENT_QUEUE: usize = 64;

/// What the uplink did during one run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UplinkStats {
    pub boot_id: u64,
    /// Results numbered (and so produced) in this boot.
    pub results: u64,
    /// Results dropped because the buffer overflowed.
    pub dropped: u64,
    /// Frames handed to the MQTT client.
    pub frames_published: u64,
    /// Frames the broker acknowledged.
    pub frames_acked: u64,
    /// Results still buffered when the drain deadline passed.
    pub undelivered: u64,
}

/// Acknowledgements counted by the event-loop task.
#[derive(Default)]
struct Acks {
    count: AtomicU64,
    changed: Notify,
}

/// Runs until `results` is closed (all probes done) and the buffer is delivered or the drain
/// deadline passes, or until `shutdown` fires and the same drain happens.
pub async fn run(
    config: Arc<Config>,
    boot_id: u64,
    mut results: mpsc::Receiver<Measurement>,
    shutdown: CancellationToken,
) -> UplinkStats {
    let mut options = MqttOptions::new(
        format!("vantage-agent-{}", config.agent_id),
        config.mqtt.host.clone(),
        config.mqtt.port,
    );
    options.set_keep_alive(config.mqtt.keep_alive);
    options.set_max_packet_size(MAX_FRAME_LEN + 1024, MAX_FRAME_LEN + 1024);
    if let (Some(user), Some(pass)) = (&config.mqtt.username, &config.mqtt.password) {
        options.set_credentials(user.clone(), pass.clone());
    } else if let Some(user) = &config.mqtt.username {
        options.set_credentials(user.clone(), String::new());
    }
    let (client, eventloop) = AsyncClient::new(options, CLIENT_QUEUE);
    let acks = Arc::new(Acks::default());
    let loop_stop = CancellationToken::new();
    let event_task = tokio::spawn(poll_events(eventloop, acks.clone(), loop_stop.clone()));

    let topic = config.results_topic();
    let capacity = config.uplink.buffer_capacity;
    let batch_max = config.uplink.batch_max;
    let mut stats = UplinkStats {
        boot_id,
        ..UplinkStats::default()
    };
    let mut buffer: VecDeque<ProbeResult> = VecDeque::with_capacity(capacity);
    let mut flush = tokio::time::interval(config.uplink.flush_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;

    while open {
        tokio::select! {
            received = results.recv() => match received {
                Some(m) => {
                    if buffer.len() == capacity {
                        buffer.pop_front();
                        stats.dropped += 1;
                        tracing::warn!(dropped = stats.dropped, "uplink buffer full, dropped oldest result");
                    }
                    buffer.push_back(to_wire(stats.results, &m));
                    stats.results += 1;
                    if buffer.len() >= batch_max {
                        publish_ready(&client, &topic, boot_id, batch_max, &mut buffer, &mut stats, false);
                    }
                }
                None => open = false,
            },
            _ = flush.tick() => {
                publish_ready(&client, &topic, boot_id, batch_max, &mut buffer, &mut stats, true);
            }
            _ = shutdown.cancelled() => open = false,
        }
    }

    // Drain: keep offering the buffer to rumqttc, then wait for the broker's acks.
    let drain_deadline = tokio::time::Instant::now() + config.uplink.drain_timeout;
    loop {
        publish_ready(
            &client,
            &topic,
            boot_id,
            batch_max,
            &mut buffer,
            &mut stats,
            true,
        );
        let acked = acks.count.load(Ordering::Acquire);
        if buffer.is_empty() && acked >= stats.frames_published {
            break;
        }
        let wait = tokio::time::timeout_at(drain_deadline, async {
            tokio::select! {
                _ = acks.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        });
        if wait.await.is_err() {
            tracing::warn!(
                buffered = buffer.len(),
                unacked = stats.frames_published.saturating_sub(acked),
                "drain deadline passed with results undelivered"
            );
            break;
        }
    }
    stats.frames_acked = acks.count.load(Ordering::Acquire);
    stats.undelivered = buffer.len() as u64;
    let _ = client.try_disconnect();
    // Give the event loop a moment to send DISCONNECT, then stop it.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while !event_task.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    loop_stop.cancel();
    let _ = event_task.await;
    stats
}

/// Hands full batches (and, when `partial`, a last partial one) to rumqttc until its queue is full.
fn publish_ready(
    client: &AsyncClient,
    topic: &str,
    boot_id: u64,
    batch_max: usize,
    buffer: &mut VecDeque<ProbeResult>,
    stats: &mut UplinkStats,
    partial: bool,
) {
    let mut frame = [0u8; MAX_FRAME_LEN];
    while buffer.len() >= batch_max || (partial && !buffer.is_empty()) {
        let n = buffer.len().min(batch_max);
        let mut batch = Batch {
            boot_id,
            results: heapless::Vec::new(),
            gaps: heapless::Vec::new(),
        };
        for r in buffer.iter().take(n) {
            // Cannot fail: batch_max <= MAX_RESULTS is checked at config load.
            let _ = batch.results.push(*r);
        }
        let bytes = match vantage_proto::encode(&batch, &mut frame) {
            Ok(bytes) => bytes.to_vec(),
            Err(e) => {
                // Unreachable by construction (MAX_FRAME_LEN bounds every batch); drop rather
                // than loop forever on it.
                tracing::error!(error = %e, "cannot encode batch, dropping it");
                buffer.drain(..n);
                stats.dropped += n as u64;
                continue;
            }
        };
        match client.try_publish(topic, QoS::AtLeastOnce, false, bytes) {
            Ok(()) => {
                buffer.drain(..n);
                stats.frames_published += 1;
            }
            // Queue full (broker slow or down): keep the results, try on the next tick.
            Err(_) => return,
        }
    }
}

fn to_wire(seq: u64, m: &Measurement) -> ProbeResult {
    let us = |d: std::time::Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
    ProbeResult {
        seq,
        target_id: m.target_id,
        started_at_ms: m.started_at_ms,
        status: m.status,
        outcome: m.outcome,
        regex: m.regex,
        total_us: us(m.total),
        dns_us: m.dns.map(us),
        connect_us: m.connect.map(us),
        tls_us: m.tls.map(us),
        ttfb_us: m.ttfb.map(us),
        transfer_us: m.transfer.map(us),
        body_bytes: m.body_bytes,
        body_truncated: m.body_truncated,
        failed_phase: m.failed_phase,
        redirects: m.redirects,
        cert_not_after_s: m.cert_not_after_s,
        remote_ip: m.remote_ip.map(Into::into),
    }
}

/// The only task that touches the MQTT socket. Reconnects with capped exponential backoff.
async fn poll_events(mut eventloop: EventLoop, acks: Arc<Acks>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                acks.count.fetch_add(1, Ordering::AcqRel);
                acks.changed.notify_waiters();
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!("connected to MQTT broker");
                backoff = Duration::from_millis(100);
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                tracing::debug!("MQTT disconnect sent");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "MQTT connection error");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
