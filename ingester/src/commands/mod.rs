//! What the `vantage-ingester` commands do beyond calling one function: one module per command
//! that carries behaviour (main.rs only parses the command line and dispatches here).
//!
//! - [`stage`]: the long-running stages (`bridge`, `sink`, `alert`, `web`) with their operator
//!   endpoint (`/metrics`, `/healthz`, `/readyz`) and shutdown on SIGINT/SIGTERM;
//! - [`check_config`]: validate a file and say which commands it can run;
//! - [`maintain`]: partitions, retention and a rollup round now, with flag overrides.

pub mod check_config;
pub mod maintain;
pub mod stage;

/// How a command that inspects something ended: `Attention` is exit status 3 (a service is
/// unreachable, an agent is stale, an incident is open; see docs/ingester.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Fine,
    Attention,
}

impl Outcome {
    /// `Attention` when `flag` holds.
    pub fn attention_if(flag: bool) -> Outcome {
        if flag {
            Outcome::Attention
        } else {
            Outcome::Fine
        }
    }
}
