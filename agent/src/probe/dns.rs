//! `kind = "dns"` (issue #20): one query (a name and a record type) to a resolver, over UDP,
//! asked again over TCP when the UDP reply comes truncated; recorded: the response code, the
//! answer count and the query time, under the target's one deadline.
//!
//! The messages are written and read by `crate::dns_wire` (by hand, RFC 1035 4.1: hickory-proto
//! does not fit the agent's 3 MiB budget, see CHANGELOG). Transport: RFC 1035 4.2.1 (UDP, 512
//! bytes, TC), 4.2.2 (TCP, a two-byte length before each message); RFC 7766 for retrying a
//! truncated reply over TCP. No EDNS(0): a reply over 512 bytes comes truncated and is asked
//! again over TCP. A reply to another question or with another id is not the answer (a late or
//! forged datagram) and is ignored over UDP.
//!
//! Recorded: `dns_us` is the query time, from the first query sent to the reply read (the TCP
//! fallback included, whose connection time is also `connect_us`); `remote_ip` the resolver;
//! `dns` the reply's RCODE and ANCOUNT. Outcomes: NOERROR with a record of the asked type `up`;
//! NOERROR without one (a CNAME alone is none) and NXDOMAIN `dns_no_such_name`; SERVFAIL
//! `dns_server_failure`; any other RCODE `dns_failed`; a reply that is not DNS
//! `protocol_error`; the deadline `timeout` (all in phase `dns`; a TCP connection that fails
//! in phase `connect`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout_at;
use vantage_proto::{DnsReply, Outcome, Phase};

use super::{fail, timed_out, us, Failure, Measurement, Prober};
use crate::dns_wire::{encode_query, parse_reply, ParseError, Reply};
use crate::target::Target;

/// Largest reply read over UDP: 512 bytes without EDNS (RFC 1035 4.2.1), with room for a
/// server that sends more anyway (read, then judged like any reply).
const UDP_MAX: usize = 4096;
/// RCODEs with their own outcome.
const NOERROR: u16 = 0;
const SERVFAIL: u16 = 2;
const NXDOMAIN: u16 = 3;

/// The first `nameserver` of `/etc/resolv.conf` (resolv.conf(5)), port 53.
fn system_resolver() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next()? == "nameserver")
            .then(|| words.next()?.parse::<IpAddr>().ok())
            .flatten()
            .map(|ip| SocketAddr::new(ip, vantage_common::target::DNS_PORT))
    })
}

/// A query id: random, so a forged or late reply is unlikely to pass for the answer.
fn query_id() -> u16 {
    getrandom::u32().map_or_else(|_| fastrand::u16(..), |v| v as u16)
}

/// How a reply ends the probe: its outcome (None: up) and why.
fn judge(reply: &Reply, qtype: u16) -> Option<(Outcome, String)> {
    let type_name = || vantage_common::target::query_type_name(qtype);
    match reply.rcode {
        // The records of the asked type, not ANCOUNT: a CNAME alone is no answer.
        NOERROR if reply.matching > 0 => None,
        NOERROR => Some((
            Outcome::DnsNoSuchName,
            format!("NOERROR without a {} record", type_name()),
        )),
        NXDOMAIN => Some((Outcome::DnsNoSuchName, "NXDOMAIN".into())),
        SERVFAIL => Some((Outcome::DnsServerFailure, "SERVFAIL".into())),
        code => Some((Outcome::DnsFailed, format!("response code {code}"))),
    }
}

impl Prober {
    /// One dns check of `target`; every failure ends up in `m`.
    pub(super) async fn measure_dns(
        &self,
        target: &Target,
        start: Instant,
        deadline: tokio::time::Instant,
        m: &mut Measurement,
    ) {
        let result = self.dns_check(target, deadline, m).await;
        m.total_us = us(start.elapsed());
        match result {
            Err(f) => m.end(f.outcome, Some(f.phase), f.detail),
            Ok(reply) => {
                m.dns = Some(DnsReply {
                    rcode: reply.rcode,
                    answers: reply.answers,
                });
                let qtype = target.dns.as_ref().map_or(1, |q| q.qtype);
                match judge(&reply, qtype) {
                    None => m.outcome = Outcome::Up,
                    Some((outcome, detail)) => m.end(outcome, Some(Phase::Dns), detail),
                }
            }
        }
    }

    async fn dns_check(
        &self,
        target: &Target,
        deadline: tokio::time::Instant,
        m: &mut Measurement,
    ) -> Result<Reply, Failure> {
        let query = target
            .dns
            .as_ref()
            .ok_or_else(|| fail(Outcome::Other, Phase::Dns, "no query"))?;
        let resolver = query.resolver.or_else(system_resolver).ok_or_else(|| {
            fail(
                Outcome::DnsFailed,
                Phase::Dns,
                "no resolver: none configured and no nameserver in /etc/resolv.conf",
            )
        })?;
        m.remote_ip = Some(resolver.ip().into());
        // The policy is about what targets make the agent reach: a configured resolver is
        // one; the agent's own (often 127.0.0.53) is not, as for the other kinds' lookups.
        if query.resolver.is_some() && !self.address_policy.permits(resolver.ip()) {
            return Err(fail(
                Outcome::AddressRefused,
                Phase::Dns,
                format!("{} refused by probes.private_addresses", resolver.ip()),
            ));
        }
        let (name, qtype) = (query.name.as_str(), query.qtype);
        let sent = Instant::now();
        let reply = match udp_exchange(resolver, name, qtype, deadline).await {
            Ok(reply) if reply.truncated => {
                tcp_exchange(resolver, name, qtype, target, deadline, m).await?
            }
            Ok(reply) => reply,
            Err(UdpFailure::Expired) => return Err(timed_out(Phase::Dns, target.timeout)),
            Err(UdpFailure::Io(e)) => {
                let outcome = match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => Outcome::ConnectRefused,
                    std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable => Outcome::Unreachable,
                    _ => Outcome::DnsFailed,
                };
                return Err(fail(outcome, Phase::Dns, format!("UDP to {resolver}: {e}")));
            }
            Err(UdpFailure::Malformed(e)) => {
                return Err(fail(Outcome::ProtocolError, Phase::Dns, e.to_string()))
            }
        };
        m.dns_us = Some(us(sent.elapsed()));
        Ok(reply)
    }
}

/// How the UDP part failed.
enum UdpFailure {
    Expired,
    Io(std::io::Error),
    /// A reply with the query's id and question that is not a DNS message.
    Malformed(ParseError),
}

/// Sends the query over UDP and waits for its reply: a datagram with another id, another
/// question or that is not a response is not it (ignored, the wait goes on).
async fn udp_exchange(
    resolver: SocketAddr,
    name: &str,
    qtype: u16,
    deadline: tokio::time::Instant,
) -> Result<Reply, UdpFailure> {
    let local: SocketAddr = match resolver {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(UdpFailure::Io)?;
    // Connected: the kernel passes on datagrams from the resolver only (and reports an ICMP
    // port unreachable as ECONNREFUSED).
    socket.connect(resolver).await.map_err(UdpFailure::Io)?;
    let id = query_id();
    let message = encode_query(id, name, qtype);
    match timeout_at(deadline, socket.send(&message)).await {
        Err(_) => return Err(UdpFailure::Expired),
        Ok(Err(e)) => return Err(UdpFailure::Io(e)),
        Ok(Ok(_)) => {}
    }
    let mut buf = vec![0u8; UDP_MAX];
    loop {
        let n = match timeout_at(deadline, socket.recv(&mut buf)).await {
            Err(_) => return Err(UdpFailure::Expired),
            Ok(Err(e)) => return Err(UdpFailure::Io(e)),
            Ok(Ok(n)) => n,
        };
        let datagram = &buf[..n];
        // Only a datagram that carries the query's id is judged (the id is the first two
        // bytes of any message).
        if datagram.get(..2) != Some(&id.to_be_bytes()[..]) {
            continue;
        }
        match parse_reply(datagram, name, qtype) {
            Ok(reply) if reply.same_question => return Ok(reply),
            Ok(_) | Err(ParseError::NotResponse) => continue,
            Err(e) => return Err(UdpFailure::Malformed(e)),
        }
    }
}

/// Asks again over TCP (RFC 7766 after a truncated UDP reply): one message each way, each
/// after its two-byte length (RFC 1035 4.2.2).
async fn tcp_exchange(
    resolver: SocketAddr,
    name: &str,
    qtype: u16,
    target: &Target,
    deadline: tokio::time::Instant,
    m: &mut Measurement,
) -> Result<Reply, Failure> {
    let t = Instant::now();
    let mut tcp = match timeout_at(deadline, TcpStream::connect(resolver)).await {
        Err(_) => {
            return Err(fail(
                Outcome::ConnectTimeout,
                Phase::Connect,
                format!("no TCP connection to {resolver} before the deadline"),
            ))
        }
        Ok(Err(e)) => {
            return Err(fail(
                super::classify_connect(&e),
                Phase::Connect,
                format!("TCP to {resolver} (after a truncated UDP reply): {e}"),
            ))
        }
        Ok(Ok(tcp)) => tcp,
    };
    m.connect_us = Some(us(t.elapsed()));
    let _ = tcp.set_nodelay(true);
    let id = query_id();
    let message = encode_query(id, name, qtype);
    let mut framed = Vec::with_capacity(2 + message.len());
    // A query is at most 12 + 255 + 4 bytes.
    framed.extend_from_slice(&(message.len() as u16).to_be_bytes());
    framed.extend_from_slice(&message);
    let io_failure = |e: std::io::Error| {
        fail(
            super::classify_io(&e),
            Phase::Dns,
            format!("TCP to {resolver}: {e}"),
        )
    };
    let reply = timeout_at(deadline, async {
        tcp.write_all(&framed).await?;
        let mut len = [0u8; 2];
        tcp.read_exact(&mut len).await?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        tcp.read_exact(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    })
    .await
    .map_err(|_| timed_out(Phase::Dns, target.timeout))?
    .map_err(io_failure)?;
    let malformed = |what: String| fail(Outcome::ProtocolError, Phase::Dns, what);
    let parsed = parse_reply(&reply, name, qtype).map_err(|e| malformed(e.to_string()))?;
    if parsed.id != id || !parsed.same_question {
        return Err(malformed(
            "the TCP reply answers another query (id or question)".into(),
        ));
    }
    // Over TCP nothing is cut to fit a datagram: a TC reply there was read by its header
    // alone (the UDP rule), so it is not taken for an answer.
    if parsed.truncated {
        return Err(malformed("the TCP reply is marked truncated".into()));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_judged_by_their_code() {
        let r = |rcode, matching| Reply {
            id: 0,
            truncated: false,
            rcode,
            answers: matching,
            matching,
            same_question: true,
        };
        let outcome = |rcode, answers| judge(&r(rcode, answers), 1).map(|(o, _)| o);
        assert_eq!(outcome(0, 1), None);
        assert_eq!(outcome(0, 0), Some(Outcome::DnsNoSuchName));
        assert_eq!(outcome(3, 0), Some(Outcome::DnsNoSuchName));
        assert_eq!(outcome(2, 0), Some(Outcome::DnsServerFailure));
        assert_eq!(outcome(5, 0), Some(Outcome::DnsFailed));
        // A CNAME without a record of the type: ANCOUNT 1, nothing matching.
        let cname_only = Reply {
            matching: 0,
            ..r(0, 1)
        };
        assert_eq!(
            judge(&cname_only, 1).map(|(o, _)| o),
            Some(Outcome::DnsNoSuchName)
        );
    }
}
