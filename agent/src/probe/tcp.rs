//! `kind = "tcp"` (issue #20): a TCP connection to `address`, measured as the HTTP probe's
//! DNS and connect phases are, then optionally `send` written and `expect` checked against
//! the first bytes the peer sends (a banner: `SSH-2.0-`, `220 `, `+PONG`), all under the
//! target's one deadline.
//!
//! The check is a prefix match read at most `expect.len()` bytes far, so memory stays bounded
//! and a wrong answer is known from its first differing byte, without waiting for the
//! deadline. Phases: `first_byte` is writing `send` and waiting for the first byte (`ttfb_us`
//! from the connection, or from the end of the write, to the first byte read), `body` the rest
//! of the expected bytes (`transfer_us`); `body_bytes` counts what was read. `regex` carries
//! the check's state (not configured, matched, not matched), as the `regex_match` column.

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout_at;
use vantage_proto::{Outcome, Phase, RegexOutcome};

use super::{borrowed, fail, timed_out, us, Failure, Measurement, Prober};
use crate::target::Target;

impl Prober {
    /// One tcp check of `target`; every failure ends up in `m`.
    pub(super) async fn measure_tcp(
        &self,
        target: &Target,
        start: Instant,
        deadline: tokio::time::Instant,
        m: &mut Measurement,
    ) {
        let checked = self.tcp_check(target, deadline, m).await;
        m.total_us = us(start.elapsed());
        match checked {
            Ok(()) => m.outcome = Outcome::Up,
            Err(f) => f.end(m),
        }
    }

    async fn tcp_check(
        &self,
        target: &Target,
        deadline: tokio::time::Instant,
        m: &mut Measurement,
    ) -> Result<(), TcpFailure> {
        let address = target
            .address
            .as_ref()
            .ok_or_else(|| fail(Outcome::Other, Phase::Dns, "no address"))?;
        let mut tcp = self
            .open(target, &borrowed(&address.host), address.port, deadline, m)
            .await?;
        let mut waiting_since = Instant::now();
        if !target.send.is_empty() {
            match timeout_at(deadline, tcp.write_all(&target.send)).await {
                Err(_) => return Err(timed_out(Phase::FirstByte, target.timeout).into()),
                Ok(Err(e)) => {
                    return Err(fail(
                        super::classify_io(&e),
                        Phase::FirstByte,
                        format!("writing send: {e}"),
                    )
                    .into())
                }
                Ok(Ok(())) => waiting_since = Instant::now(),
            }
        }
        if target.expect.is_empty() {
            return Ok(());
        }
        let expect = &target.expect[..];
        let mut got = vec![0u8; expect.len()];
        let mut read = 0;
        let mut first: Option<Instant> = None;
        let phase = |first: Option<Instant>| match first {
            None => Phase::FirstByte,
            Some(_) => Phase::Body,
        };
        while read < expect.len() {
            let n = match timeout_at(deadline, tcp.read(&mut got[read..])).await {
                Err(_) => return Err(timed_out(phase(first), target.timeout).into()),
                Ok(Err(e)) => {
                    return Err(fail(
                        super::classify_io(&e),
                        phase(first),
                        format!("reading: {e}"),
                    )
                    .into())
                }
                Ok(Ok(n)) => n,
            };
            if n == 0 {
                return Err(fail(
                    Outcome::ConnectionReset,
                    phase(first),
                    format!(
                        "the peer closed the connection after {read} of the {} expected bytes",
                        expect.len()
                    ),
                )
                .into());
            }
            let now = Instant::now();
            if first.is_none() {
                first = Some(now);
                m.ttfb_us = Some(us(now.saturating_duration_since(waiting_since)));
            }
            let chunk = read..read + n;
            read += n;
            m.body_bytes = read as u32;
            m.transfer_us = first.map(|t| us(now.saturating_duration_since(t)));
            if got[chunk.clone()] != expect[chunk] {
                m.regex = RegexOutcome::NotMatched;
                return Err(TcpFailure::Mismatch(format!(
                    "expected {:?}, received {:?}",
                    String::from_utf8_lossy(expect),
                    String::from_utf8_lossy(&got[..read])
                )));
            }
        }
        m.regex = RegexOutcome::Matched;
        Ok(())
    }
}

/// How a tcp check failed: like any probe, or (an answer arrived and was checked) a mismatch.
enum TcpFailure {
    Failed(Failure),
    Mismatch(String),
}

impl From<Failure> for TcpFailure {
    fn from(f: Failure) -> Self {
        TcpFailure::Failed(f)
    }
}

impl TcpFailure {
    fn end(self, m: &mut Measurement) {
        match self {
            TcpFailure::Failed(f) => m.end(f.outcome, Some(f.phase), f.detail),
            TcpFailure::Mismatch(detail) => m.end(Outcome::ExpectMismatch, None, detail),
        }
    }
}
