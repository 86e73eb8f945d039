//! `kind = "dns"` (issue #20): one query (a name and a record type) to a resolver, over UDP,
//! asked again over TCP when the UDP reply comes truncated; recorded: the response code, the
//! answer count and the query time, under the target's one deadline.
//!
//! Written by hand rather than with hickory-proto: that crate does not fit the agent's 3 MiB
//! budget (issue #20; measured with `cross/build`, see CHANGELOG), and a probe needs only to
//! write one question and to walk a reply's sections. Message format: RFC 1035 4.1 (header,
//! question, resource records), 4.1.4 (compressed names), 4.2.1 (UDP, 512 bytes, TC), 4.2.2
//! (TCP, a two-byte length before each message); RFC 7766 for retrying a truncated reply over
//! TCP. No EDNS(0): a reply over 512 bytes comes truncated and is asked again over TCP.
//!
//! A reply is hostile input: [`parse_reply`] reads within its bounds only, follows compression
//! pointers only backwards (so every walk ends) and never panics; a reply to another question
//! or with another id is not the answer (a late or forged datagram) and is ignored over UDP.
//!
//! Recorded: `dns_us` is the query time, from the first query sent to the reply read (the TCP
//! fallback included, whose connection time is also `connect_us`); `remote_ip` the resolver;
//! `dns` the reply's RCODE and ANCOUNT. Outcomes: NOERROR with answers `up`; NOERROR without
//! any (no record of that type) and NXDOMAIN `dns_no_such_name`; SERVFAIL
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
use crate::target::Target;

/// Largest reply read over UDP: 512 bytes without EDNS (RFC 1035 4.2.1), with room for a
/// server that sends more anyway (read, then judged like any reply).
const UDP_MAX: usize = 4096;
/// RCODEs with their own outcome.
const NOERROR: u16 = 0;
const SERVFAIL: u16 = 2;
const NXDOMAIN: u16 = 3;
/// Class IN.
const CLASS_IN: u16 = 1;

/// Why a reply is not a usable DNS message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the reply ends inside {0}")]
    Truncated(&'static str),
    #[error("the reply is not a response (QR bit clear)")]
    NotResponse,
    #[error("a name in the reply is longer than 255 bytes")]
    NameTooLong,
    #[error("a compression pointer in the reply does not point backwards")]
    BadPointer,
    #[error("a label type in the reply is reserved (0x40 or 0x80)")]
    BadLabel,
    #[error("the reply has {0} questions, not 1")]
    QuestionCount(u16),
    #[error("bytes after the reply's last record")]
    TrailingBytes,
}

/// What [`parse_reply`] found in a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub id: u16,
    /// TC: the reply was cut to fit its UDP datagram.
    pub truncated: bool,
    pub rcode: u16,
    pub answers: u16,
    /// The reply's question is the one asked (name, case-insensitive, type and class).
    pub same_question: bool,
}

/// The query message for `name` (no final dot, checked by `vantage_common::target`) and
/// `qtype`, class IN, recursion desired (RFC 1035 4.1.1, 4.1.2).
pub fn encode_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    // QR 0, OPCODE 0 (query), RD 1; QDCOUNT 1; AN, NS, AR 0.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        // Labels are at most 63 bytes (checked with the target).
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

/// A bounded reader of a message.
struct Cursor<'a> {
    msg: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ParseError> {
        let end = self.pos.checked_add(n).ok_or(ParseError::Truncated(what))?;
        let bytes = self
            .msg
            .get(self.pos..end)
            .ok_or(ParseError::Truncated(what))?;
        self.pos = end;
        Ok(bytes)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ParseError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// Reads the name at the cursor (RFC 1035 4.1.4: labels, ending in a zero byte or a
    /// pointer) and leaves the cursor after it; appends its labels, lowercased and
    /// dot-separated, to `out` when given. A pointer must point before the start of the
    /// labels it ends, so each jump goes strictly backwards and a walk ends; the name is at
    /// most 255 bytes (RFC 1035 2.3.4).
    fn name(&mut self, mut out: Option<&mut Vec<u8>>) -> Result<(), ParseError> {
        let mut at = self.pos;
        // Where the current run of labels started: pointers must point before it.
        let mut run_start = at;
        let mut resume: Option<usize> = None;
        let mut length = 0usize;
        loop {
            let len = *self.msg.get(at).ok_or(ParseError::Truncated("a name"))?;
            match len & 0xC0 {
                0x00 if len == 0 => break,
                0x00 => {
                    let label = self
                        .msg
                        .get(at + 1..at + 1 + usize::from(len))
                        .ok_or(ParseError::Truncated("a name"))?;
                    length += 1 + label.len();
                    // With the root's zero byte: at most 255 (RFC 1035 2.3.4).
                    if length + 1 > 255 {
                        return Err(ParseError::NameTooLong);
                    }
                    if let Some(out) = out.as_deref_mut() {
                        if !out.is_empty() {
                            out.push(b'.');
                        }
                        out.extend(label.iter().map(u8::to_ascii_lowercase));
                    }
                    at += 1 + label.len();
                }
                0xC0 => {
                    let low = *self
                        .msg
                        .get(at + 1)
                        .ok_or(ParseError::Truncated("a name"))?;
                    let target = usize::from(u16::from_be_bytes([len & 0x3F, low]));
                    if target >= run_start {
                        return Err(ParseError::BadPointer);
                    }
                    resume.get_or_insert(at + 2);
                    at = target;
                    run_start = target;
                }
                _ => return Err(ParseError::BadLabel),
            }
        }
        self.pos = resume.unwrap_or(at + 1);
        Ok(())
    }
}

/// Reads a reply to the question (`name`, `qtype`, IN): its header, its question, and every
/// record of its answer, authority and additional sections (bounds only: the data of a
/// record is not interpreted). Total: any bytes give a [`Reply`] or a [`ParseError`].
pub fn parse_reply(msg: &[u8], name: &str, qtype: u16) -> Result<Reply, ParseError> {
    let mut c = Cursor { msg, pos: 0 };
    let id = c.u16("the header")?;
    let flags = c.u16("the header")?;
    let qdcount = c.u16("the header")?;
    let counts = [
        c.u16("the header")?,
        c.u16("the header")?,
        c.u16("the header")?,
    ];
    if flags & 0x8000 == 0 {
        return Err(ParseError::NotResponse);
    }
    let truncated = flags & 0x0200 != 0;
    let rcode = flags & 0x000F;
    // A truncated reply may end anywhere after its header: only the header counts then (it
    // is asked again over TCP), and a question cut off is taken for the one asked (the id
    // matched; the worst a forged one can do is make the probe ask again over TCP).
    if truncated {
        let same_question = question(&mut c, qdcount, name, qtype).unwrap_or(true);
        return Ok(Reply {
            id,
            truncated,
            rcode,
            answers: counts[0],
            same_question,
        });
    }
    let same_question = question(&mut c, qdcount, name, qtype)?;
    for _ in 0..counts.iter().map(|&n| u32::from(n)).sum::<u32>() {
        c.name(None)?;
        // TYPE, CLASS, TTL, RDLENGTH (RFC 1035 4.1.3).
        let fixed = c.take(10, "a record")?;
        let rdlength = u16::from_be_bytes([fixed[8], fixed[9]]);
        c.take(usize::from(rdlength), "a record's data")?;
    }
    if c.pos != msg.len() {
        return Err(ParseError::TrailingBytes);
    }
    Ok(Reply {
        id,
        truncated,
        rcode,
        answers: counts[0],
        same_question,
    })
}

/// Reads the question section (one question, as in every reply to one; none is allowed for
/// some error replies) and says whether it is `name`, `qtype`, IN.
fn question(c: &mut Cursor<'_>, qdcount: u16, name: &str, qtype: u16) -> Result<bool, ParseError> {
    match qdcount {
        0 => Ok(true),
        1 => {
            let mut got = Vec::with_capacity(name.len());
            c.name(Some(&mut got))?;
            let t = c.u16("the question")?;
            let class = c.u16("the question")?;
            Ok(got.eq_ignore_ascii_case(name.as_bytes()) && t == qtype && class == CLASS_IN)
        }
        n => Err(ParseError::QuestionCount(n)),
    }
}

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
        NOERROR if reply.answers > 0 => None,
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
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply to `up.test` A with id 0x1234, `flags`, and `answers` records of 127.0.0.1
    /// whose names point at the question's (offset 12).
    fn reply(flags: u16, answers: u16) -> Vec<u8> {
        let mut r = encode_query(0x1234, "up.test", 1);
        r[2..4].copy_from_slice(&flags.to_be_bytes());
        r[6..8].copy_from_slice(&answers.to_be_bytes());
        for _ in 0..answers {
            r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
        }
        r
    }

    #[test]
    fn a_query_is_rfc_1035_bytes() {
        assert_eq!(
            encode_query(0xABCD, "up.test", 16),
            [
                0xAB, 0xCD, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2, b'u', b'p', 4, b't', b'e', b's', b't',
                0, 0, 16, 0, 1
            ]
        );
    }

    #[test]
    fn good_replies_are_read() {
        let ok = parse_reply(&reply(0x8180, 2), "up.test", 1).unwrap();
        assert_eq!(
            ok,
            Reply {
                id: 0x1234,
                truncated: false,
                rcode: 0,
                answers: 2,
                same_question: true
            }
        );
        // NXDOMAIN with an SOA in the authority section, the name compressed.
        let mut nx = reply(0x8183, 0);
        nx[10..12].copy_from_slice(&1u16.to_be_bytes());
        nx.extend_from_slice(&[0xC0, 12, 0, 6, 0, 1, 0, 0, 0, 60, 0, 3, 1, 2, 3]);
        let nx = parse_reply(&nx, "up.test", 1).unwrap();
        assert_eq!((nx.rcode, nx.answers), (3, 0));
        // The question in other case is the same question (RFC 4343).
        let mut upper = reply(0x8180, 1);
        upper[13] = b'U';
        assert!(parse_reply(&upper, "up.test", 1).unwrap().same_question);
        // Another question, another type: read, but not the answer.
        assert!(
            !parse_reply(&reply(0x8180, 1), "up.tesu", 1)
                .unwrap()
                .same_question
        );
        assert!(
            !parse_reply(&reply(0x8180, 1), "up.test", 28)
                .unwrap()
                .same_question
        );
        // Truncated (TC) and cut after the header: its header still says so.
        let tc = &reply(0x8380, 3)[..12];
        let tc = parse_reply(tc, "up.test", 1).unwrap();
        assert!(tc.truncated && tc.same_question);
    }

    /// Hostile and broken replies: each one an error, none a panic.
    #[test]
    fn malformed_replies_are_errors() {
        let good = reply(0x8180, 1);
        let with = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut r = good.clone();
            edit(&mut r);
            r
        };
        let cases: Vec<(&str, Vec<u8>, ParseError)> = vec![
            ("empty", vec![], ParseError::Truncated("the header")),
            (
                "short header",
                good[..11].to_vec(),
                ParseError::Truncated("the header"),
            ),
            (
                "a query",
                encode_query(1, "up.test", 1),
                ParseError::NotResponse,
            ),
            (
                "cut in the question",
                good[..16].to_vec(),
                ParseError::Truncated("a name"),
            ),
            (
                "cut in a record",
                good[..good.len() - 6].to_vec(),
                ParseError::Truncated("a record"),
            ),
            (
                "cut in the data",
                good[..good.len() - 2].to_vec(),
                ParseError::Truncated("a record's data"),
            ),
            (
                "more answers than sent",
                with(&|r| r[7] = 2),
                ParseError::Truncated("a name"),
            ),
            (
                "trailing bytes",
                with(&|r| r.push(0)),
                ParseError::TrailingBytes,
            ),
            (
                "two questions",
                with(&|r| r[5] = 2),
                ParseError::QuestionCount(2),
            ),
            // A pointer to itself, forwards, and to the header's start loop or read junk.
            (
                "pointer to itself",
                with(&|r| r[25..27].copy_from_slice(&[0xC0, 29])),
                ParseError::BadPointer,
            ),
            (
                "pointer forwards",
                with(&|r| r[25..27].copy_from_slice(&[0xC0, 40])),
                ParseError::BadPointer,
            ),
            (
                "pointer past the end",
                with(&|r| r[25..27].copy_from_slice(&[0xFF, 0xFF])),
                ParseError::BadPointer,
            ),
            (
                "pointer cut",
                with(&|r| r.truncate(26)),
                ParseError::Truncated("a name"),
            ),
            (
                "label type 0x40",
                with(&|r| r[12] = 0x42),
                ParseError::BadLabel,
            ),
            (
                "label type 0x80",
                with(&|r| r[12] = 0x82),
                ParseError::BadLabel,
            ),
            (
                "label past the end",
                with(&|r| r[12] = 63),
                ParseError::Truncated("a name"),
            ),
            (
                "rdlength past the end",
                with(&|r| r[36] = 200),
                ParseError::Truncated("a record's data"),
            ),
        ];
        for (what, bytes, want) in cases {
            assert_eq!(parse_reply(&bytes, "up.test", 1), Err(want), "{what}");
        }
        // Two pointers to each other: the second points forwards (the walk would not end).
        let mut pair = good.clone();
        pair.extend_from_slice(&[0xC0, 12]);
        let at = pair.len() - 2;
        pair[25..27].copy_from_slice(&[0xC0, at as u8]);
        assert_eq!(
            parse_reply(&pair, "up.test", 1),
            Err(ParseError::BadPointer)
        );
        // A name of many runs, each a label and a pointer back to the one before (the runs
        // sit in the data of a first record, the name is the second record's): every jump
        // goes backwards, and the name's 255-byte bound ends it.
        let chain = |runs: usize| {
            let mut m = vec![0, 7, 0x81, 0x80, 0, 0, 0, 2, 0, 0, 0, 0];
            let rdlength = (3 + 4 * runs) as u16;
            m.extend_from_slice(&[0, 0, 16, 0, 1, 0, 0, 0, 0]);
            m.extend_from_slice(&rdlength.to_be_bytes());
            let mut previous = m.len() as u16;
            m.extend_from_slice(&[1, b'x', 0]);
            for _ in 0..runs {
                let here = m.len() as u16;
                m.extend_from_slice(&[1, b'x']);
                m.extend_from_slice(&(0xC000 | previous).to_be_bytes());
                previous = here;
            }
            m.extend_from_slice(&(0xC000 | previous).to_be_bytes());
            m.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 0, 0, 0]);
            m
        };
        assert_eq!(parse_reply(&chain(10), "x", 1).map(|r| r.answers), Ok(2));
        assert_eq!(
            parse_reply(&chain(130), "x", 1),
            Err(ParseError::NameTooLong)
        );
        // Every cut and every byte changed: a value or an error, never a panic.
        for cut in 0..good.len() {
            let _ = parse_reply(&good[..cut], "up.test", 1);
        }
        for i in 0..good.len() {
            for b in [0u8, 0x3F, 0x40, 0xC0, 0xFF] {
                let mut m = good.clone();
                m[i] = b;
                let _ = parse_reply(&m, "up.test", 1);
            }
        }
    }

    #[test]
    fn replies_are_judged_by_their_code() {
        let r = |rcode, answers| Reply {
            id: 0,
            truncated: false,
            rcode,
            answers,
            same_question: true,
        };
        let outcome = |rcode, answers| judge(&r(rcode, answers), 1).map(|(o, _)| o);
        assert_eq!(outcome(0, 1), None);
        assert_eq!(outcome(0, 0), Some(Outcome::DnsNoSuchName));
        assert_eq!(outcome(3, 0), Some(Outcome::DnsNoSuchName));
        assert_eq!(outcome(2, 0), Some(Outcome::DnsServerFailure));
        assert_eq!(outcome(5, 0), Some(Outcome::DnsFailed));
    }
}
