//! The topic layout: formatting and parsing are inverses, and parsing refuses what is not ours.

use vantage_proto::topic::{Channel, EveryAgent, Topic};

#[test]
fn every_channel_formats_and_parses_back() {
    let cases = [
        (
            Topic::agent("vantage", Channel::Results, "eu-north", "pi-1"),
            "vantage/v1/results/eu-north/pi-1",
        ),
        (
            Topic::agent("vantage", Channel::Status, "eu-north", "pi-1"),
            "vantage/v1/status/eu-north/pi-1",
        ),
        (
            Topic::agent("vantage", Channel::Targets, "eu-north", "pi-1"),
            "vantage/v1/targets/eu-north/pi-1",
        ),
        (
            Topic::agent("vantage", Channel::Acks, "eu-north", "pi-1"),
            "vantage/v1/acks/eu-north/pi-1",
        ),
        (
            Topic::region_targets("a/b", "us-east"),
            "a/b/v1/targets/us-east",
        ),
    ];
    for (topic, text) in cases {
        assert_eq!(topic.to_string(), text);
        assert_eq!(Topic::parse(topic.prefix, text), Some(topic), "{text}");
    }
    assert_eq!(
        EveryAgent {
            prefix: "vantage",
            channel: Channel::Results
        }
        .to_string(),
        "vantage/v1/results/+/+"
    );
}

#[test]
fn parse_refuses_what_is_not_a_vantage_topic() {
    for bad in [
        "other/v1/results/eu/pi",     // another prefix
        "vantagex/v1/results/eu/pi",  // a longer prefix
        "vantage/v2/results/eu/pi",   // another layout
        "vantage/v1/nacks/eu/pi",     // an unknown channel
        "vantage/v1/acks/eu",         // acks need an agent
        "vantage/v1/results/eu",      // results need an agent
        "vantage/v1/status/eu",       // status too
        "vantage/v1/results/eu/pi/x", // one level too many
        "vantage/v1/results/EU/pi",   // not a valid name
        "vantage/v1/results/eu/",     // empty agent
        "vantage/v1/results//pi",     // empty region
        "vantage/v1/targets/eu/+",    // a wildcard is not a name
        "vantage",
        "",
    ] {
        assert_eq!(Topic::parse("vantage", bad), None, "{bad}");
    }
}
