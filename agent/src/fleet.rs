//! What the agent tells the ingester about itself: the status frame ([`AgentStatus`]) sent when
//! it connects, at every heartbeat, when it stops, and by the broker as its last will.
//!
//! The probe loop (which owns the target sets) writes the target-related fields into a shared
//! [`StatusBoard`]; the uplink (which owns the MQTT connection) reads it when it sends a status,
//! and sends one at once when the board signals a change (a set accepted or refused).

use std::sync::Mutex;

use tokio::sync::Notify;
use vantage_proto::control::{encode_status, AgentState, AgentStatus, Rejection, MAX_STATUS_LEN};

use crate::config::Config;

/// Target-related facts for the next status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Board {
    pub targets: u32,
    /// Probe slots in force (`probes.max_concurrency`, or sized from the schedule).
    pub max_concurrency: u32,
    pub region_set_generation: u64,
    pub agent_set_generation: u64,
    pub rejection: Option<Rejection>,
}

/// [`Board`] shared between the probe loop and the uplink.
#[derive(Debug, Default)]
pub struct StatusBoard {
    board: Mutex<Board>,
    /// Signalled when the board changed; the uplink sends a status.
    pub changed: Notify,
}

impl StatusBoard {
    pub fn new(board: Board) -> StatusBoard {
        StatusBoard {
            board: Mutex::new(board),
            changed: Notify::new(),
        }
    }

    /// Replaces the board, and wakes the uplink if anything changed.
    pub fn set(&self, board: Board) {
        let mut b = self.board.lock().unwrap_or_else(|e| e.into_inner());
        if *b != board {
            *b = board;
            self.changed.notify_one();
        }
    }

    pub fn get(&self) -> Board {
        self.board.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A status frame. `sent_at_ms` 0 means "unknown" (the last will is registered long before the
/// broker sends it).
pub fn status_frame(
    config: &Config,
    boot_id: u64,
    state: AgentState,
    board: &Board,
    pending_results: usize,
    sent_at_ms: u64,
) -> Vec<u8> {
    // Names are validated at config load (≤ 64 bytes); the version is ours.
    let status = AgentStatus {
        state,
        agent_id: config.agent_id.as_str().try_into().unwrap_or_default(),
        region: config.region.as_str().try_into().unwrap_or_default(),
        boot_id,
        version: env!("CARGO_PKG_VERSION").try_into().unwrap_or_default(),
        sent_at_ms,
        max_concurrency: board.max_concurrency,
        buffer_capacity: u32::try_from(config.uplink.buffer_capacity).unwrap_or(u32::MAX),
        targets: board.targets,
        pending_results: u32::try_from(pending_results).unwrap_or(u32::MAX),
        region_set_generation: board.region_set_generation,
        agent_set_generation: board.agent_set_generation,
        rejection: board.rejection.clone(),
    };
    let mut buf = [0u8; MAX_STATUS_LEN];
    // Cannot fail: MAX_STATUS_LEN bounds the largest status.
    encode_status(&status, &mut buf)
        .map(|f| f.to_vec())
        .unwrap_or_default()
}

pub use vantage_common::time::now_ms;
