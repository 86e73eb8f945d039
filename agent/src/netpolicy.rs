//! Probe safety: which addresses a probe may connect to.
//!
//! An agent sits inside someone's network. A target set (central, or a compromised control
//! channel) or a target server's redirect could point it at the router, a printer or the Pi
//! itself, and the results would report what is reachable there. With
//! `probes.private_addresses = "refuse"` the prober checks the address it is about to connect
//! to, after DNS and on every redirect hop (so DNS rebinding and redirects are covered too),
//! and ends the probe with `Outcome::AddressRefused` instead of connecting.
//!
//! The default is `"allow"`: many agents exist precisely to watch services on their own
//! network (an intranet site, a NAS), and the demo and tests probe 127.0.0.1. Fleets that probe
//! only the public internet should set `"refuse"` (the packaged configuration does).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Deserialize;

/// `probes.private_addresses`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressPolicy {
    /// Probe any address (default; see the module docs for why).
    #[default]
    Allow,
    /// Refuse loopback, private, link-local, unique-local, CGNAT, unspecified, multicast and
    /// other non-global addresses.
    Refuse,
}

impl AddressPolicy {
    /// Whether a probe may connect to `ip`.
    pub fn permits(self, ip: IpAddr) -> bool {
        self == AddressPolicy::Allow || is_public(ip)
    }
}

/// Whether `ip` is a globally routed unicast address (the complement of the special-purpose
/// ranges of the IANA IPv4/IPv6 special-purpose address registries that matter here). IPv4
/// mapped into IPv6 is judged as the IPv4 address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // 100.64/10 carrier-grade NAT
        || (a == 192 && b == 0 && c == 0) // 192.0.0/24 IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // 198.18/15 benchmarking
        || (a == 192 && b == 88 && c == 99) // 192.88.99/24 6to4 relay anycast (deprecated)
        || a >= 240) // 240/4 reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // fc00::/7 unique local
        || (s[0] & 0xffc0) == 0xfe80 // fe80::/10 link-local
        || (s[0] & 0xffc0) == 0xfec0 // fec0::/10 site-local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // 2001:db8::/32 documentation
        || (s[0] == 0x0064 && s[1] == 0xff9b) // 64:ff9b::/96 NAT64 and 64:ff9b:1::/48 local-use NAT64
        || (s[0] == 0x2001 && s[1] == 0) // 2001::/32 Teredo (embeds an IPv4 address)
        || s[0] == 0x2002 // 6to4 (embeds an IPv4 address)
        || s[..6] == [0; 6] // ::/96 IPv4-compatible (::a.b.c.d, deprecated)
        || s[..6] == [0, 0, 0, 0, 0xffff, 0]) // ::ffff:0:0:0/96 IPv4-translated (SIIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_public_addresses_are_refused() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:192.168.0.1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "::10.0.0.1",
            "::ffff:0:10.0.0.1",
            "64:ff9b:1::a00:1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "192.88.99.1",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert!(!is_public(ip), "{a}");
            assert!(!AddressPolicy::Refuse.permits(ip), "{a}");
            assert!(AddressPolicy::Allow.permits(ip), "{a}");
        }
        for a in [
            "93.184.215.14",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert!(is_public(ip), "{a}");
            assert!(AddressPolicy::Refuse.permits(ip), "{a}");
        }
    }
}
