//! `AckBook`: the bridge's end-to-end acknowledgements, collected per agent and boot after
//! Kafka's delivery reports and released as ack frames a short while later (coalescing: one
//! frame per agent per `linger` instead of one per delivery). No I/O: the bridge feeds it
//! delivered frames and publishes what [`AckBook::due`] returns (QoS 0: a lost ack only costs
//! the agent a re-send after its `uplink.ack_timeout`, and the sink's key removes the duplicate).
//!
//! Each bridge acknowledges only what it delivered itself, so several bridges (partitioned or
//! one shared subscription) need no coordination: an agent collects acknowledgements from all.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use vantage_proto::ack::{encode_ack, Ack, SeqRange, MAX_ACK_LEN};
use vantage_proto::topic::{Channel, Topic};

/// How long an acknowledgement waits for company before it is published.
pub const LINGER: Duration = Duration::from_millis(20);

/// Most agent boots with acknowledgements waiting; beyond it the oldest entry is released at
/// once (bounds memory when a huge fleet delivers within one `LINGER`).
const MAX_ENTRIES: usize = 16_384;

/// Ranges waiting for one (agent topic, boot).
struct Entry {
    since: Instant,
    ranges: Vec<SeqRange>,
}

/// See the module docs.
pub struct AckBook {
    prefix: String,
    linger: Duration,
    /// Key: (region, agent, boot).
    waiting: HashMap<(String, String, u64), Entry>,
}

/// One ack frame to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub topic: String,
    pub frame: Vec<u8>,
}

impl AckBook {
    pub fn new(prefix: &str, linger: Duration) -> AckBook {
        AckBook {
            prefix: prefix.to_owned(),
            linger,
            waiting: HashMap::new(),
        }
    }

    /// Kafka holds `ranges` of `boot` from the agent `region/agent`.
    pub fn delivered(
        &mut self,
        region: &str,
        agent: &str,
        boot: u64,
        ranges: &[SeqRange],
        now: Instant,
    ) {
        if ranges.is_empty() {
            return;
        }
        let entry = self
            .waiting
            .entry((region.to_owned(), agent.to_owned(), boot))
            .or_insert_with(|| Entry {
                since: now,
                ranges: Vec::new(),
            });
        entry.ranges.extend_from_slice(ranges);
    }

    /// When the next entry falls due (None: nothing waits).
    pub fn next_due(&self) -> Option<Instant> {
        self.waiting.values().map(|e| e.since + self.linger).min()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The ack frames of every entry that waited `linger` (all of them when `all`, at shutdown),
    /// removed from the book. An entry with more than [`vantage_proto::ack::MAX_ACK_RANGES`] merged ranges becomes
    /// several frames.
    pub fn due(&mut self, now: Instant, all: bool) -> Vec<Due> {
        let over = self.waiting.len().saturating_sub(MAX_ENTRIES);
        let mut keys: Vec<_> = self
            .waiting
            .iter()
            .filter(|(_, e)| all || now >= e.since + self.linger)
            .map(|(k, _)| k.clone())
            .collect();
        if keys.len() < over {
            let mut oldest: Vec<_> = self
                .waiting
                .iter()
                .map(|(k, e)| (e.since, k.clone()))
                .collect();
            oldest.sort();
            keys = oldest
                .into_iter()
                .take(over.max(keys.len()))
                .map(|(_, k)| k)
                .collect();
        }
        let mut out = Vec::new();
        for key in keys {
            let Some(mut entry) = self.waiting.remove(&key) else {
                continue;
            };
            let (region, agent, boot) = key;
            let topic = Topic::agent(&self.prefix, Channel::Acks, &region, &agent).to_string();
            entry.ranges.sort_unstable_by_key(|r| r.first);
            let mut rest = &entry.ranges[..];
            while !rest.is_empty() {
                // Merge greedily up to the frame's capacity, then start the next frame.
                let mut ack = Ack {
                    boot_id: boot,
                    ranges: Default::default(),
                };
                let merged = &mut ack.ranges;
                let mut used = 0;
                for r in rest {
                    if let Some(l) = merged.last_mut() {
                        if r.first <= l.last.saturating_add(1) {
                            l.last = l.last.max(r.last);
                            used += 1;
                            continue;
                        }
                    }
                    if merged.push(*r).is_err() {
                        break;
                    }
                    used += 1;
                }
                rest = &rest[used..];
                let mut buf = [0u8; MAX_ACK_LEN];
                match encode_ack(&ack, &mut buf) {
                    Ok(frame) => out.push(Due {
                        topic: topic.clone(),
                        frame: frame.to_vec(),
                    }),
                    // Unreachable: MAX_ACK_LEN is the largest ack.
                    Err(e) => tracing::error!(error = %e, "cannot encode an ack frame"),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vantage_proto::ack::decode_ack;

    fn r(first: u64, last: u64) -> SeqRange {
        SeqRange { first, last }
    }

    #[test]
    fn coalesces_per_agent_and_boot_after_the_linger() {
        let t0 = Instant::now();
        let mut book = AckBook::new("v", LINGER);
        book.delivered("eu", "pi-1", 7, &[r(0, 31)], t0);
        book.delivered("eu", "pi-1", 7, &[r(32, 63)], t0 + Duration::from_millis(5));
        book.delivered("eu", "pi-2", 7, &[r(0, 0)], t0 + Duration::from_millis(15));
        assert!(book.due(t0 + Duration::from_millis(10), false).is_empty());
        let due = book.due(t0 + LINGER, false);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].topic, "v/v1/acks/eu/pi-1");
        let ack = decode_ack(&due[0].frame).unwrap();
        assert_eq!(ack.boot_id, 7);
        assert_eq!(&ack.ranges[..], &[r(0, 63)]);
        assert_eq!(book.due(t0 + LINGER * 2, false).len(), 1);
        assert!(book.is_empty());
    }

    #[test]
    fn many_separate_ranges_become_several_frames() {
        let t0 = Instant::now();
        let mut book = AckBook::new("v", LINGER);
        let ranges: Vec<_> = (0..150).map(|i| r(i * 10, i * 10 + 3)).collect();
        book.delivered("eu", "pi-1", 1, &ranges, t0);
        let due = book.due(t0, true);
        assert_eq!(due.len(), 3);
        let got: Vec<SeqRange> = due
            .iter()
            .flat_map(|d| decode_ack(&d.frame).unwrap().ranges.into_iter())
            .collect();
        assert_eq!(got, ranges);
    }
}
