//! DNS messages as the `dns` probe kind (`probe/dns.rs`) writes and reads them: one query, and
//! a bounded walk of a reply (issue #20). Written by hand, not with hickory-proto, which does
//! not fit the agent's 3 MiB budget. Message format: RFC 1035 4.1 (header, question, resource
//! records) and 4.1.4 (compressed names).
//!
//! A reply is hostile input: [`parse_reply`] reads within its bounds only (`get`,
//! `checked_add`), follows compression pointers only backwards (so every walk ends), bounds a
//! name to 255 bytes and never panics. std only (no other crate), so that the fuzz crate can
//! include this very file (`fuzz/src/lib.rs`, target `dns_replies`) without the agent.

/// Class IN.
pub const CLASS_IN: u16 = 1;

/// Why a reply is not a usable DNS message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// The reply ends inside this part.
    Truncated(&'static str),
    /// QR is clear: a query, not a response.
    NotResponse,
    NameTooLong,
    BadPointer,
    BadLabel,
    /// A question count other than 0 or 1.
    QuestionCount(u16),
    TrailingBytes,
}

// By hand rather than with thiserror: the fuzz crate includes this file without the agent's
// dependencies.
impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Truncated(what) => write!(f, "the reply ends inside {what}"),
            ParseError::NotResponse => f.write_str("the reply is not a response (QR bit clear)"),
            ParseError::NameTooLong => f.write_str("a name in the reply is longer than 255 bytes"),
            ParseError::BadPointer => {
                f.write_str("a compression pointer in the reply does not point backwards")
            }
            ParseError::BadLabel => {
                f.write_str("a label type in the reply is reserved (0x40 or 0x80)")
            }
            ParseError::QuestionCount(n) => write!(f, "the reply has {n} questions, not 1"),
            ParseError::TrailingBytes => f.write_str("bytes after the reply's last record"),
        }
    }
}

impl std::error::Error for ParseError {}

/// What [`parse_reply`] found in a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub id: u16,
    /// TC: the reply was cut to fit its UDP datagram.
    pub truncated: bool,
    pub rcode: u16,
    /// ANCOUNT: the records of the answer section, CNAMEs on the way included.
    pub answers: u16,
    /// The answer section's records of the asked type and class IN: what makes a NOERROR
    /// reply an answer (a CNAME alone is not one). 0 for a truncated reply (not read).
    pub matching: u16,
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

/// Compression pointers followed in one name, at most: a name has at most 127 labels
/// (255 bytes), and a real reply points once per name.
const MAX_JUMPS: u32 = 127;

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
        let mut jumps = 0u32;
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
                    // Backwards only, so a walk ends; and at most MAX_JUMPS of them, so that a
                    // reply of pointer chains cannot cost a walk per byte for every record.
                    jumps += 1;
                    if target >= run_start || jumps > MAX_JUMPS {
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
        let same_question = question(&mut c, qdcount, rcode, name, qtype).unwrap_or(true);
        return Ok(Reply {
            id,
            truncated,
            rcode,
            answers: counts[0],
            matching: 0,
            same_question,
        });
    }
    let same_question = question(&mut c, qdcount, rcode, name, qtype)?;
    let mut matching = 0u16;
    for record in 0..counts.iter().map(|&n| u32::from(n)).sum::<u32>() {
        c.name(None)?;
        // TYPE, CLASS, TTL, RDLENGTH (RFC 1035 4.1.3).
        let fixed = c.take(10, "a record")?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let class = u16::from_be_bytes([fixed[2], fixed[3]]);
        if record < u32::from(counts[0]) && rtype == qtype && class == CLASS_IN {
            matching += 1;
        }
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
        matching,
        same_question,
    })
}

/// Reads the question section (one question, as in every reply to one; none is allowed for
/// some error replies) and says whether it is `name`, `qtype`, IN. A NOERROR reply without
/// its question is not taken for the answer: only its 16-bit id would then match it.
fn question(
    c: &mut Cursor<'_>,
    qdcount: u16,
    rcode: u16,
    name: &str,
    qtype: u16,
) -> Result<bool, ParseError> {
    match qdcount {
        0 => Ok(rcode != 0),
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
                matching: 2,
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

    /// Found in review: the answer count included CNAMEs, so a NOERROR reply holding only a
    /// CNAME (the alias exists, its target has no record of the type) was judged `up`.
    #[test]
    fn only_records_of_the_asked_type_answer() {
        // up.test A -> CNAME to "x" (a one-label name), and nothing else.
        let mut cname_only = reply(0x8180, 0);
        cname_only[6..8].copy_from_slice(&1u16.to_be_bytes());
        cname_only.extend_from_slice(&[0xC0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 3, 1, b'x', 0]);
        let r = parse_reply(&cname_only, "up.test", 1).unwrap();
        assert_eq!((r.answers, r.matching), (1, 0));
        // The CNAME, then an A record of its target: one answer of the type.
        let mut chain = cname_only.clone();
        chain[7] = 2;
        let target = (cname_only.len() - 3) as u8;
        chain.extend_from_slice(&[0xC0, target, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
        let r = parse_reply(&chain, "up.test", 1).unwrap();
        assert_eq!((r.answers, r.matching), (2, 1));
        // An A record in the additional section answers nothing.
        let mut extra = reply(0x8180, 0);
        extra[11] = 1;
        extra.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
        assert_eq!(parse_reply(&extra, "up.test", 1).unwrap().matching, 0);
    }

    /// Found in review: a reply without its question was taken for any query with its id.
    /// Error replies may leave the question out (so a SERVFAIL still counts); NOERROR may not.
    #[test]
    fn a_noerror_reply_without_its_question_is_not_the_answer() {
        let header_only = |flags: u16| {
            let mut r = reply(flags, 0)[..12].to_vec();
            r[4..6].copy_from_slice(&0u16.to_be_bytes());
            r
        };
        assert!(
            !parse_reply(&header_only(0x8180), "up.test", 1)
                .unwrap()
                .same_question
        );
        assert!(
            parse_reply(&header_only(0x8182), "up.test", 1)
                .unwrap()
                .same_question
        );
    }

    /// Found in review: pointers only go backwards, so a walk ends, but a reply of pointer
    /// chains could make every name walk the whole chain. More than MAX_JUMPS is an error.
    #[test]
    fn long_pointer_chains_are_refused() {
        // An answer whose data is a chain of pointers, each to the one before it (the first to
        // the question's name), then a second answer whose name is the chain's last pointer.
        let chain = |links: usize| {
            let mut r = reply(0x8180, 0);
            r[7] = 2;
            r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60]);
            r.extend_from_slice(&((links * 2) as u16).to_be_bytes());
            let mut previous = 12usize;
            for _ in 0..links {
                let here = r.len();
                r.extend_from_slice(&[0xC0 | (previous >> 8) as u8, previous as u8]);
                previous = here;
            }
            r.extend_from_slice(&[0xC0 | (previous >> 8) as u8, previous as u8]);
            r.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
            parse_reply(&r, "up.test", 1)
        };
        assert_eq!(chain(MAX_JUMPS as usize - 1).map(|r| r.matching), Ok(2));
        assert_eq!(chain(MAX_JUMPS as usize), Err(ParseError::BadPointer));
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
                "the answer's name a pointer to itself",
                with(&|r| r[25..27].copy_from_slice(&[0xC0, 25])),
                ParseError::BadPointer,
            ),
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
            let rdlength = (3 + 6 * runs) as u16;
            m.extend_from_slice(&[0, 0, 16, 0, 1, 0, 0, 0, 0]);
            m.extend_from_slice(&rdlength.to_be_bytes());
            let mut previous = m.len() as u16;
            m.extend_from_slice(&[1, b'x', 0]);
            for _ in 0..runs {
                let here = m.len() as u16;
                // Three-byte labels: the 255-byte bound comes before the bound on jumps.
                m.extend_from_slice(&[3, b'x', b'y', b'z']);
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
}
