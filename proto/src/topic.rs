//! The MQTT topic layout, a contract between agents, bridges, `targets apply` and the broker's
//! ACL: `<prefix>/v1/<channel>/<region>[/<agent>]`.
//!
//! | channel   | topic                                   | written by | read by          |
//! |-----------|-----------------------------------------|------------|------------------|
//! | `results` | `<prefix>/v1/results/<region>/<agent>`  | the agent  | bridges          |
//! | `status`  | `<prefix>/v1/status/<region>/<agent>`   | the agent  | bridges          |
//! | `targets` | `<prefix>/v1/targets/<region>`          | ingester   | the region's agents (retained) |
//! | `targets` | `<prefix>/v1/targets/<region>/<agent>`  | ingester   | that agent (retained) |
//! | `acks`    | `<prefix>/v1/acks/<region>/<agent>`     | bridges    | that agent       |
//!
//! Formatting is [`Topic`]'s `Display` (no allocation, `no_std`); [`Topic::parse`] is its
//! inverse and checks region and agent with [`crate::is_valid_name`]. The `v1` level versions
//! the layout, not the frames (those carry their own version byte).

use core::fmt;

/// The layout version level of every topic.
pub const LAYOUT: &str = "v1";

/// What a topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Result frames ([`crate::decode`]).
    Results,
    /// Agent status frames ([`crate::control::decode_status`]).
    Status,
    /// Retained target sets ([`crate::control::TargetSetReader`]).
    Targets,
    /// End-to-end acknowledgements to one agent ([`crate::ack::decode_ack`]).
    Acks,
}

impl Channel {
    pub const fn as_str(self) -> &'static str {
        match self {
            Channel::Results => "results",
            Channel::Status => "status",
            Channel::Targets => "targets",
            Channel::Acks => "acks",
        }
    }

    fn from_str(s: &str) -> Option<Channel> {
        [
            Channel::Results,
            Channel::Status,
            Channel::Targets,
            Channel::Acks,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// One topic. `agent` is None only for a region's target set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topic<'a> {
    pub prefix: &'a str,
    pub channel: Channel,
    pub region: &'a str,
    pub agent: Option<&'a str>,
}

impl<'a> Topic<'a> {
    /// An agent's own topic on `channel`.
    pub const fn agent(prefix: &'a str, channel: Channel, region: &'a str, agent: &'a str) -> Self {
        Topic {
            prefix,
            channel,
            region,
            agent: Some(agent),
        }
    }

    /// A region's retained target set.
    pub const fn region_targets(prefix: &'a str, region: &'a str) -> Self {
        Topic {
            prefix,
            channel: Channel::Targets,
            region,
            agent: None,
        }
    }

    /// The inverse of `Display` for topics under `prefix`: None for anything else, for names that
    /// [`crate::is_valid_name`] refuses, and for a results, status or acks topic without an agent.
    pub fn parse(prefix: &'a str, topic: &'a str) -> Option<Topic<'a>> {
        let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
        let rest = rest.strip_prefix(LAYOUT)?.strip_prefix('/')?;
        let (channel, rest) = rest.split_once('/')?;
        let channel = Channel::from_str(channel)?;
        let (region, agent) = match rest.split_once('/') {
            Some((region, agent)) => (region, Some(agent)),
            None => (rest, None),
        };
        if !crate::is_valid_name(region) || agent.is_some_and(|a| !crate::is_valid_name(a)) {
            return None;
        }
        if agent.is_none() && channel != Channel::Targets {
            return None;
        }
        Some(Topic {
            prefix,
            channel,
            region,
            agent,
        })
    }
}

impl fmt::Display for Topic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{LAYOUT}/{}/{}",
            self.prefix,
            self.channel.as_str(),
            self.region
        )?;
        match self.agent {
            Some(agent) => write!(f, "/{agent}"),
            None => Ok(()),
        }
    }
}

/// The subscription filter for every agent of every region on `channel`:
/// `<prefix>/v1/<channel>/+/+` (what bridges subscribe to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EveryAgent<'a> {
    pub prefix: &'a str,
    pub channel: Channel,
}

impl fmt::Display for EveryAgent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{LAYOUT}/{}/+/+", self.prefix, self.channel.as_str())
    }
}
