//! The uplink: numbers results, buffers them, batches them into frames, and publishes the frames
//! over MQTT QoS 1, keeping each frame until a bridge acknowledged it end to end (Kafka holds it;
//! docs/delivery.md). The broker's PUBACK governs only the MQTT window ([`MAX_IN_FLIGHT`]).
//!
//! Flow: probe tasks → bounded channel → [`run`] → [`Outbox`] (`outbox.rs`: numbering, bounded buffer, gap
//! records, frames awaiting PUBACK) → rumqttc `AsyncClient` → the event-loop task, which alone
//! owns the socket (rumqttc deadlocks if the task that polls the event loop also awaits
//! `publish`).
//!
//! Probes never wait on the network: this loop only hands frames to rumqttc with `try_publish`
//! and never awaits the broker. While the broker is unreachable, results wait in the bounded
//! buffer; when it is full the oldest result is dropped, and the dropped sequence numbers travel
//! upstream as [`Gap`] records, so the loss itself lands in SQL.
//!
//! # Why the uplink keeps frames until PUBACK
//! rumqttc replays unacknowledged publishes after a reconnect only if the broker still has the
//! session (`session_present`); otherwise it silently clears them (rumqttc 0.25
//! `EventLoop::poll`; see bytebeamio/rumqtt#923). So the [`Outbox`] keeps every frame until its
//! PUBACK, and when a reconnect reports a lost session it hands all unacknowledged frames to
//! rumqttc again. PUBACKs are matched to frames by order: the broker acknowledges QoS 1 in the
//! order it receives them (MQTT 3.1.1 §4.6), and frames are handed only while connected, so an
//! acknowledgement can never belong to a frame rumqttc dropped (rumqttc's `try_publish` does not
//! return the packet id, so the uplink cannot match by id). The event-loop task checks this
//! invariant on the wire ([`PubackOrder`]: each PUBACK must carry the packet id of the oldest
//! publish it saw go out on this connection); a breach is logged and counted
//! ([`UplinkStats::pubacks_out_of_order`]), never silent. For the same reason status messages go out at QoS 0
//! (no PUBACK to tell apart); they repeat every heartbeat, so one lost status costs nothing.
//!
//! # End-to-end acknowledgements
//! Bridges publish ack frames (`vantage_proto::ack`) on `<prefix>/v1/acks/<region>/<agent>`,
//! which the agent subscribes to at QoS 0. The event-loop task hands them over with `try_send`;
//! [`Outbox::e2e_ack`] marks the frames they cover, [`Outbox::tick`] re-queues frames left
//! without one for `uplink.ack_timeout`, or (no ack ever seen in this boot) switches to the
//! PUBACK fallback for an ingester without acknowledgements.
//!
//! # Control topics
//! An agent that follows the ingester's target sets subscribes, on every (re)connect, to its own
//! set topic and then its region's (in that order: `targets apply` publishes agent sets first, and
//! the broker sends retained messages in subscription order, so an agent never sees the new
//! region set before its own). Received payloads go to the probe loop through watch channels.
//! The agent's last will is a `Lost` status on its status topic.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use vantage_common::backoff::Backoff;
use vantage_common::signal::sleep_unless_stopped;
use vantage_proto::control::{AgentState, MAX_TARGET_SET_LEN};
use vantage_proto::{ProbeResult, MAX_FRAME_LEN};

use crate::config::Config;
use crate::fleet::{self, StatusBoard};
pub use crate::outbox::{Outbox, MAX_FRAMES, MAX_IN_FLIGHT};
use crate::spool::Spool;
pub use crate::uplink_stats::{SpoolState, UplinkStats};

/// Where the uplink delivers received target sets (only for an agent that follows them).
pub struct SetSenders {
    pub region: watch::Sender<Option<Vec<u8>>>,
    pub agent: watch::Sender<Option<Vec<u8>>>,
}

/// The uplink's control side: what to put in status messages, and where received target sets go.
pub struct Control {
    pub board: Arc<StatusBoard>,
    pub sets: Option<SetSenders>,
}

/// Requests rumqttc may queue between this loop and its event loop (more than [`MAX_IN_FLIGHT`],
/// so `try_publish` of a frame fails only if rumqttc itself is stuck).
const CLIENT_QUEUE: usize = 64;

/// Longest wait between reconnect attempts (before jitter).
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the event-loop task tells the uplink loop.
#[derive(Default)]
struct Link {
    /// Set after a successful CONNACK, cleared on any connection error. Frames are handed to
    /// rumqttc only while set, so none can slip into a session that is about to be discarded.
    connected: AtomicBool,
    /// PUBACKs received, in total.
    acks: AtomicU64,
    /// CONNACKs with `session_present = false`, in total.
    fresh_sessions: AtomicU64,
    /// CONNACKs in total.
    connects: AtomicU64,
    /// PUBACKs that did not answer the oldest unacknowledged publish (see [`PubackOrder`]).
    pubacks_out_of_order: AtomicU64,
    wake: Notify,
}

/// The packet ids of QoS 1 publishes as they went out on this connection (rumqttc's
/// `Outgoing::Publish` events, which follow the wire order, replays after a reconnect
/// included), so that each PUBACK can be checked against the oldest. Owned by the event-loop
/// task, the only one that sees both.
#[derive(Debug, Default)]
struct PubackOrder {
    sent: std::collections::VecDeque<u16>,
}

impl PubackOrder {
    fn sent(&mut self, pkid: u16) {
        // 0: a QoS 0 publish (status messages), never acknowledged.
        if pkid != 0 {
            self.sent.push_back(pkid);
        }
    }

    /// Whether `pkid` acknowledges the oldest publish in flight. A later one is taken out with
    /// the ones before it (so one breach is reported once, not at every PUBACK after it); an
    /// unknown one changes nothing.
    fn acked(&mut self, pkid: u16) -> bool {
        match self.sent.iter().position(|&p| p == pkid) {
            Some(0) => {
                self.sent.pop_front();
                true
            }
            Some(i) => {
                self.sent.drain(..=i);
                false
            }
            None => false,
        }
    }

    /// A new connection: rumqttc sends what was in flight again, as new `Outgoing` events.
    fn reset(&mut self) {
        self.sent.clear();
    }
}

/// Runs until `results` is closed (all probes done) and everything is acknowledged. From
/// `shutdown` (or the end of input) on, at most `uplink.drain_timeout` more; what is then not
/// acknowledged is counted in [`UplinkStats::undelivered`].
///
/// Each received result's `seq` is replaced by the next sequence number of this boot.
pub async fn run(
    config: Arc<Config>,
    boot_id: u64,
    mut results: mpsc::Receiver<ProbeResult>,
    control: Control,
    shutdown: CancellationToken,
) -> UplinkStats {
    let status_topic = config.status_topic();
    let mut options = MqttOptions::new(
        format!("vantage-agent-{}", config.agent_id),
        config.mqtt.host.clone(),
        config.mqtt.port,
    );
    options.set_keep_alive(config.mqtt.keep_alive);
    // A persistent session: after a reconnect the broker resumes it and rumqttc replays what was
    // not acknowledged; the client id is stable per agent.
    options.set_clean_session(false);
    // Incoming: target sets (the largest messages an agent receives).
    options.set_max_packet_size(MAX_TARGET_SET_LEN + 1024, MAX_FRAME_LEN + 1024);
    // The broker sends this when the connection dies without a DISCONNECT. QoS 1, so the
    // bridge's persistent session keeps it if the bridge is away.
    options.set_last_will(LastWill::new(
        &status_topic,
        fleet::status_frame(
            &config,
            boot_id,
            AgentState::Lost,
            &control.board.get(),
            0,
            0,
        ),
        QoS::AtLeastOnce,
        false,
    ));
    if let Some(user) = &config.mqtt.username {
        options.set_credentials(
            user.clone(),
            config.mqtt.password.clone().unwrap_or_default(),
        );
    }
    crate::mqtt_tls::apply(&mut options, &config.mqtt);
    let (client, eventloop) = AsyncClient::new(options, CLIENT_QUEUE);
    let link = Arc::new(Link::default());
    let loop_stop = CancellationToken::new();
    let subscriptions = control.sets.map(|senders| Subscriptions {
        agent_topic: config.agent_targets_topic(),
        region_topic: config.region_targets_topic(),
        senders,
    });
    let mut filters: Vec<(String, QoS)> = subscriptions
        .as_ref()
        .map(|s| {
            vec![
                (s.agent_topic.clone(), QoS::AtLeastOnce),
                (s.region_topic.clone(), QoS::AtLeastOnce),
            ]
        })
        .unwrap_or_default();
    // End-to-end acknowledgements: the event loop hands them over through a small bounded
    // channel with `try_send` (it never waits); one lost here costs a re-send after the ack
    // timeout, like one lost by the broker (they travel at QoS 0).
    let (ack_tx, mut ack_rx) = mpsc::channel::<Vec<u8>>(ACK_QUEUE);
    let acks_topic = config.uplink.end_to_end_acks.then(|| config.acks_topic());
    if let Some(t) = &acks_topic {
        filters.insert(0, (t.clone(), QoS::AtMostOnce));
    }
    let board = control.board;
    let event_task = tokio::spawn(poll_events(
        eventloop,
        link.clone(),
        loop_stop.clone(),
        boot_id,
        subscriptions,
        acks_topic.map(|topic| AckRoute { topic, tx: ack_tx }),
    ));
    let mut seen_connects = 0u64;
    let mut need_subscribe = false;
    let mut heartbeat = tokio::time::interval(config.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let send_status = |state: AgentState, pending: usize| {
        let frame = fleet::status_frame(
            &config,
            boot_id,
            state,
            &board.get(),
            pending,
            fleet::now_ms(),
        );
        if let Err(e) = client.try_publish(&status_topic, QoS::AtMostOnce, false, frame) {
            tracing::debug!(error = %e, "status not sent");
        }
    };

    let topic = config.results_topic();
    let mut outbox = match config.spool_config() {
        None => Outbox::new(
            boot_id,
            config.uplink.batch_max,
            config.uplink.buffer_capacity,
        ),
        // Reading a spool of many megabytes takes a while on an SD card: off the runtime the
        // probes share (they queue their results in the channel meanwhile).
        Some(spool_config) => {
            let dir = spool_config.dir.clone();
            match tokio::task::spawn_blocking(move || Spool::open(spool_config)).await {
                Ok(Ok((spool, replay))) => {
                    if replay.records > 0 || replay.lost > 0 || !replay.gaps.is_empty() {
                        tracing::info!(
                            dir = %dir.display(),
                            records = replay.records,
                            lost = replay.lost,
                            gaps = replay.gaps.len(),
                            corrupt = replay.corrupt,
                            "spool replayed: sending results of earlier boots first"
                        );
                    }
                    if replay.lost > 0 {
                        tracing::warn!(
                            lost = replay.lost,
                            "spool had a torn or corrupt tail (power cut?); its lost results are reported as a gap"
                        );
                    }
                    Outbox::with_spool(
                        boot_id,
                        config.uplink.batch_max,
                        config.uplink.buffer_capacity,
                        spool,
                        &replay,
                    )
                }
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                        Ok(Ok(_)) => String::new(),
                    };
                    // The run already checked the directory (lib.rs); this is a disk gone bad
                    // meanwhile. Results still flow, in memory only.
                    tracing::error!(dir = %dir.display(), %error, "cannot open the spool; results are kept in memory only");
                    Outbox::new(
                        boot_id,
                        config.uplink.batch_max,
                        config.uplink.buffer_capacity,
                    )
                }
            }
        }
    };
    if config.uplink.end_to_end_acks {
        outbox = outbox.with_e2e_acks(config.uplink.ack_timeout);
    }
    outbox = outbox.with_encoder(config.uplink.wire_format.encoder());
    // Every frame says how far this machine's clock can be trusted (read-only adjtimex).
    outbox = outbox.with_clock(Box::new(crate::clock_state::read));
    outbox.tick(fleet::now_ms());
    let mut seen = Seen::default();
    let mut flush = tokio::time::interval(config.uplink.flush_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // `open`: the input channel may still deliver. `draining`: shutdown came or input ended; the
    // drain deadline runs. After shutdown the loop keeps receiving: probes still in flight send
    // their results, and the channel closes once the last one is done (lib.rs drops its sender).
    let mut open = true;
    let mut draining = false;
    // A full buffer drops at the probes' rate: one line per 10 s, with the lines suppressed.
    let drop_log = crate::ratelimit::RateLimit::new("uplink buffer full", Duration::from_secs(10));
    // Armed when draining starts; far in the future until then.
    let drain_deadline = tokio::time::sleep(Duration::from_secs(365 * 86_400));
    tokio::pin!(drain_deadline);

    loop {
        tokio::select! {
            received = results.recv(), if open => match received {
                Some(r) => {
                    let dropped_before = outbox.stats().dropped;
                    outbox.push(r);
                    if outbox.stats().dropped > dropped_before {
                        if let Some(suppressed) = drop_log.allow() {
                            tracing::warn!(
                                capacity = config.uplink.buffer_capacity,
                                dropped = outbox.stats().dropped,
                                suppressed,
                                "uplink buffer full, dropping oldest results (sent as gap records)"
                            );
                        }
                    }
                    outbox.seal(false);
                }
                None => open = false,
            },
            _ = flush.tick() => outbox.seal(true),
            _ = link.wake.notified() => {}
            Some(frame) = ack_rx.recv() => match vantage_proto::ack::decode_ack(&frame) {
                Ok(ack) => {
                    outbox.tick(fleet::now_ms());
                    outbox.e2e_ack(&ack);
                }
                Err(e) => tracing::warn!(error = %e, "end-to-end acknowledgement not understood, ignored"),
            },
            _ = heartbeat.tick() => {
                if link.connected.load(Ordering::Acquire) {
                    send_status(AgentState::Heartbeat, outbox.pending_results());
                }
            }
            _ = board.changed.notified() => {
                if link.connected.load(Ordering::Acquire) {
                    send_status(AgentState::Heartbeat, outbox.pending_results());
                }
            }
            _ = shutdown.cancelled(), if !draining => {}
            _ = &mut drain_deadline, if draining => {
                tracing::warn!(
                    undelivered = outbox.pending_results(),
                    "drain deadline passed with results undelivered"
                );
                break;
            }
        }
        if !draining && (!open || shutdown.is_cancelled()) {
            draining = true;
            drain_deadline
                .as_mut()
                .reset(tokio::time::Instant::now() + config.uplink.drain_timeout);
            outbox.draining(config.uplink.drain_timeout / 2);
        }
        if draining {
            outbox.seal(true);
        }
        // A new connection: announce, and (re)subscribe to the target sets, which makes the
        // broker send the retained ones again.
        let connects = link.connects.load(Ordering::Acquire);
        let connected = link.connected.load(Ordering::Acquire);
        if connects != seen_connects && connected {
            seen_connects = connects;
            send_status(AgentState::Online, outbox.pending_results());
            need_subscribe = !filters.is_empty();
        }
        // Queued until rumqttc takes it (a full request queue is retried at the next wake-up,
        // at the latest the next flush tick), so an agent never stays connected but deaf.
        if need_subscribe && connected {
            let subscriptions = filters
                .iter()
                .map(|(f, qos)| rumqttc::SubscribeFilter::new(f.clone(), *qos));
            match client.try_subscribe_many(subscriptions) {
                Ok(()) => need_subscribe = false,
                Err(e) => tracing::debug!(error = %e, "subscribe to target sets not queued yet"),
            }
        }
        outbox.tick(fleet::now_ms());
        pump(&client, &topic, &link, &mut seen, &mut outbox);
        let spool = outbox.spool_state(fleet::now_ms());
        crate::metrics::uplink(crate::metrics::UplinkSnapshot {
            spool: spool.as_ref(),
            stats: outbox.stats(),
            buffered: outbox.pending_results(),
            capacity: config.uplink.buffer_capacity,
            connects: link.connects.load(Ordering::Relaxed),
            connected: link.connected.load(Ordering::Relaxed),
        });
        if !open && outbox.is_empty() {
            break;
        }
    }
    // Whatever arrives after the deadline is numbered and counted as undelivered, until the
    // probe loop drops its sender: it aborts the probes still in flight at the same deadline
    // and counts them (lib.rs), so this ends soon, and no result disappears without a trace.
    // (Closing the channel here instead made the results of probes that finished after the
    // deadline vanish uncounted: issue #14 item 11.)
    while let Some(r) = results.recv().await {
        outbox.push(r);
    }
    // What is still pending stays in the spool for the next start.
    outbox.flush_spool();

    let mut stats = outbox.stats().clone();
    stats.undelivered += outbox.pending_results() as u64;
    stats.reconnects = link.connects.load(Ordering::Acquire).saturating_sub(1);
    stats.pubacks_out_of_order = link.pubacks_out_of_order.load(Ordering::Acquire);
    // A clean goodbye (the broker drops the last will on DISCONNECT); requests go out in order.
    if link.connected.load(Ordering::Acquire) {
        send_status(AgentState::Offline, outbox.pending_results());
    }
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

/// Counters of [`Link`] the uplink loop has already applied.
#[derive(Default)]
struct Seen {
    acks: u64,
    fresh_sessions: u64,
}

/// Applies what the event loop reported, then hands waiting frames to rumqttc while connected.
fn pump(client: &AsyncClient, topic: &str, link: &Link, seen: &mut Seen, outbox: &mut Outbox) {
    // Order matters: `connected` is stored (Release) after `fresh_sessions`, so reading it first
    // (Acquire) guarantees a fresh session of the current connection is seen below. Acks counted
    // before a fresh session belong to frames handed before it; none can be counted after it
    // until this function hands frames again.
    let connected = link.connected.load(Ordering::Acquire);
    let fresh = link.fresh_sessions.load(Ordering::Acquire);
    let acks = link.acks.load(Ordering::Acquire);
    outbox.acked(acks - seen.acks);
    if acks != seen.acks {
        // PUBACKs opened the window: seal what waits (full batches only; the flush tick seals
        // partial ones).
        outbox.seal(false);
    }
    seen.acks = acks;
    if fresh != seen.fresh_sessions {
        // The first connection is fresh too; there is nothing handed then, so this is a no-op.
        if outbox.handed() > 0 {
            tracing::warn!(
                frames = outbox.handed(),
                "broker lost the MQTT session, re-sending unacknowledged frames"
            );
            outbox.session_lost();
        }
        seen.fresh_sessions = fresh;
    }
    if !connected {
        return;
    }
    while let Some(frame) = outbox.next_unhanded() {
        match client.try_publish(topic, QoS::AtLeastOnce, false, frame.to_vec()) {
            Ok(()) => outbox.mark_handed(),
            // rumqttc's queue is full: try again on the next wake-up.
            Err(_) => return,
        }
    }
}

/// End-to-end acknowledgements waiting for the uplink loop, at most.
const ACK_QUEUE: usize = 256;

/// The agent's ack topic and where its payloads go.
struct AckRoute {
    topic: String,
    tx: mpsc::Sender<Vec<u8>>,
}

/// The target set topics and where their payloads go.
struct Subscriptions {
    agent_topic: String,
    region_topic: String,
    senders: SetSenders,
}

/// The only task that touches the MQTT socket. Reconnects with capped exponential backoff and
/// jitter (so a fleet does not reconnect in lockstep after a broker restart).
async fn poll_events(
    mut eventloop: EventLoop,
    link: Arc<Link>,
    stop: CancellationToken,
    seed: u64,
    subscriptions: Option<Subscriptions>,
    acks: Option<AckRoute>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut events = Events {
        link,
        order: PubackOrder::default(),
        subscriptions,
        acks,
    };
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                // rumqttc returns a CONNACK straight from its connect, ahead of events the
                // previous connection left in its queue: packets taken in by a read that then
                // failed (a PUBACK among them), a publish whose write failed. They belong to
                // that connection, so they are handled first; otherwise the order check would
                // hold such a PUBACK against this connection (found in CI: see the test
                // `a_puback_read_just_before_a_connection_error_belongs_to_that_connection`),
                // and the pump could count it after this session's re-send.
                let left: Vec<Event> = eventloop.state.events.drain(..).collect();
                for event in left {
                    if !events.handle(event) {
                        return;
                    }
                }
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to MQTT broker"
                );
                events.connected(ack.session_present);
                backoff.reset();
            }
            Ok(event) => {
                if !events.handle(event) {
                    return;
                }
            }
            Err(e) => {
                // No reset of the order check here: what this connection left queued is
                // handled at the next CONNACK, against its publishes.
                events.link.connected.store(false, Ordering::Release);
                let wait = backoff.next_jittered_pause(&mut rng);
                tracing::warn!(error = %e, retry_in = ?wait, "MQTT connection error");
                if !sleep_unless_stopped(&stop, wait).await {
                    return;
                }
            }
        }
    }
}

/// What the event-loop task does with each event rumqttc reports, CONNACKs and errors aside.
struct Events {
    link: Arc<Link>,
    order: PubackOrder,
    subscriptions: Option<Subscriptions>,
    acks: Option<AckRoute>,
}

impl Events {
    /// A new connection is up: the order check starts over (rumqttc sends what was in flight
    /// again, as new `Outgoing` events), and the uplink loop is told.
    fn connected(&mut self, session_present: bool) {
        let link = &self.link;
        self.order.reset();
        if !session_present {
            link.fresh_sessions.fetch_add(1, Ordering::AcqRel);
        }
        link.connects.fetch_add(1, Ordering::AcqRel);
        link.connected.store(true, Ordering::Release);
        link.wake.notify_one();
    }

    /// Handles one event; false once the DISCONNECT of a shutdown went out.
    fn handle(&mut self, event: Event) -> bool {
        let link = &self.link;
        match event {
            Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => self.order.sent(pkid),
            Event::Incoming(Packet::PubAck(ack)) => {
                if !self.order.acked(ack.pkid) {
                    link.pubacks_out_of_order.fetch_add(1, Ordering::AcqRel);
                    tracing::error!(
                        pkid = ack.pkid,
                        "PUBACK out of order: the uplink frees frames in send order, so a frame \
                         may be counted as with the broker before it is (please report this)"
                    );
                }
                link.acks.fetch_add(1, Ordering::AcqRel);
                link.wake.notify_one();
            }
            Event::Incoming(Packet::Publish(p)) => {
                if let Some(route) = self.acks.as_ref().filter(|r| p.topic == r.topic) {
                    if route.tx.try_send(p.payload.to_vec()).is_err() {
                        tracing::debug!("end-to-end acknowledgement dropped: uplink busy");
                    } else {
                        link.wake.notify_one();
                    }
                    return true;
                }
                // Otherwise only the two target set topics are subscribed to.
                if let Some(s) = &self.subscriptions {
                    let sender = if p.topic == s.agent_topic {
                        Some(&s.senders.agent)
                    } else if p.topic == s.region_topic {
                        Some(&s.senders.region)
                    } else {
                        None
                    };
                    match sender {
                        Some(tx) => {
                            tracing::debug!(topic = %p.topic, bytes = p.payload.len(), "target set received");
                            tx.send_replace(Some(p.payload.to_vec()));
                        }
                        None => tracing::debug!(topic = %p.topic, "unexpected message ignored"),
                    }
                }
            }
            Event::Incoming(Packet::SubAck(ack))
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) =>
            {
                // Retrying cannot help: the broker's ACL does not let this identity read its
                // target sets. Loud, because the agent keeps probing its last set forever.
                tracing::error!(codes = ?ack.return_codes, "broker refused a subscription of this agent (its target sets or its end-to-end acknowledgements: check the ACL)");
            }
            Event::Outgoing(rumqttc::Outgoing::Disconnect) => {
                tracing::debug!("MQTT disconnect sent");
                return false;
            }
            _ => {}
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::BytesMut;
    use rumqttc::{AsyncClient, ConnAck, ConnectReturnCode, MqttOptions, Packet, PubAck, QoS};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;

    use super::{poll_events, Link, PubackOrder};

    #[test]
    fn pubacks_in_send_order_keep_the_invariant() {
        let mut o = PubackOrder::default();
        for pkid in [1, 0, 2, 3] {
            o.sent(pkid);
        }
        assert!(o.acked(1) && o.acked(2) && o.acked(3));
        // Nothing in flight: a PUBACK for nothing breaks it.
        assert!(!o.acked(4));
    }

    #[test]
    fn a_puback_out_of_order_is_reported_once() {
        let mut o = PubackOrder::default();
        for pkid in [1, 2, 3, 4] {
            o.sent(pkid);
        }
        assert!(!o.acked(3), "3 answered before 1 and 2");
        assert!(o.acked(4), "after the breach, 4 is the oldest again");
    }

    #[test]
    fn a_new_connection_starts_over() {
        let mut o = PubackOrder::default();
        o.sent(7);
        o.sent(8);
        o.reset();
        // rumqttc replays 7 and 8 on the new connection.
        o.sent(7);
        o.sent(8);
        assert!(o.acked(7) && o.acked(8));
    }

    /// Reads one MQTT packet from a scripted peer's socket.
    async fn read_packet(sock: &mut TcpStream, buf: &mut BytesMut) -> Packet {
        loop {
            match Packet::read(buf, 1 << 16) {
                Ok(p) => return p,
                Err(rumqttc::Error::InsufficientBytes(_)) => {
                    assert!(sock.read_buf(buf).await.unwrap() > 0, "peer closed");
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    async fn read_publish(sock: &mut TcpStream, buf: &mut BytesMut) -> u16 {
        match read_packet(sock, buf).await {
            Packet::Publish(p) => p.pkid,
            other => panic!("expected a publish, got {other:?}"),
        }
    }

    async fn accept_session(listener: &TcpListener, session_present: bool) -> TcpStream {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::new();
        assert!(matches!(
            read_packet(&mut sock, &mut buf).await,
            Packet::Connect(_)
        ));
        buf.clear();
        ConnAck::new(ConnectReturnCode::Success, session_present)
            .write(&mut buf)
            .unwrap();
        sock.write_all(&buf).await.unwrap();
        sock
    }

    /// Found in CI (the spooled network-cut test counted one breach): rumqttc's read takes in
    /// several packets at once, so a PUBACK can be queued as an event when the same read then
    /// fails; the CONNACK of the next connection is returned ahead of it. The event-loop task
    /// must count that PUBACK against the connection it arrived on, not the new one. Scripted
    /// peer, because the timing cannot be forced through a real broker.
    #[tokio::test]
    async fn a_puback_read_just_before_a_connection_error_belongs_to_that_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut options = MqttOptions::new("order-test", "127.0.0.1", port);
        options.set_clean_session(false);
        let (client, eventloop) = AsyncClient::new(options, 8);
        let link = Arc::new(Link::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(poll_events(
            eventloop,
            link.clone(),
            stop.clone(),
            1,
            None,
            None,
        ));
        client
            .publish("r", QoS::AtLeastOnce, false, vec![1])
            .await
            .unwrap();
        client
            .publish("r", QoS::AtLeastOnce, false, vec![2])
            .await
            .unwrap();

        // First connection: PUBACK 1 and a malformed packet in one segment, so that one read
        // queues the PUBACK and then fails.
        let mut sock = accept_session(&listener, false).await;
        let mut buf = BytesMut::new();
        assert_eq!(read_publish(&mut sock, &mut buf).await, 1);
        assert_eq!(read_publish(&mut sock, &mut buf).await, 2);
        let mut out = BytesMut::new();
        PubAck::new(1).write(&mut out).unwrap();
        out.extend_from_slice(&[0x00, 0x00]);
        sock.write_all(&out).await.unwrap();

        // Second connection, session kept: rumqttc sends 2 again; the peer acknowledges it.
        let mut sock = accept_session(&listener, true).await;
        let mut buf = BytesMut::new();
        assert_eq!(read_publish(&mut sock, &mut buf).await, 2);
        let mut out = BytesMut::new();
        PubAck::new(2).write(&mut out).unwrap();
        sock.write_all(&out).await.unwrap();

        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while link.acks.load(Ordering::Acquire) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "PUBACKs not seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(link.connects.load(Ordering::Acquire), 2);
        assert_eq!(link.pubacks_out_of_order.load(Ordering::Acquire), 0);
        stop.cancel();
        task.await.unwrap();
    }
}
