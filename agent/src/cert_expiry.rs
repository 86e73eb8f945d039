//! The leaf certificate's expiry (notAfter) from its DER bytes: a minimal walk (Certificate →
//! TBSCertificate → Validity) rather than a full X.509 parser. Measured against `x509-cert`
//! 0.2.5 for the same one field, on armv7 with the dist profile: a test binary of 298,012
//! bytes grows to 338,972 (+40 KiB, 1.2 % of the agent) — so the walk stays, with every index
//! range-checked (`get`, `checked_add`) and fuzzed: the fuzz crate includes this very file
//! (`fuzz/src/lib.rs`) and checks it against `x509-cert` on every certificate that parses.
//!
//! `core` only, no allocation, so that the fuzz crate can include it without the agent.

/// notAfter of a DER X.509 certificate, unix seconds. None if it cannot be read (or is
/// before 1970).
pub fn not_after_unix(cert_der: &[u8]) -> Option<u64> {
    let (cert, _) = der_element(cert_der, 0x30)?;
    let (tbs, _) = der_element(cert, 0x30)?;
    let mut rest = tbs;
    // [0] EXPLICIT version, optional.
    if rest.first() == Some(&0xA0) {
        rest = der_element(rest, 0xA0)?.1;
    }
    rest = der_element(rest, 0x02)?.1; // serialNumber
    rest = der_element(rest, 0x30)?.1; // signature AlgorithmIdentifier
    rest = der_element(rest, 0x30)?.1; // issuer
    let (validity, _) = der_element(rest, 0x30)?;
    let not_before_rest = skip_any(validity)?; // notBefore
    let tag = *not_before_rest.first()?;
    let (time, _) = der_element(not_before_rest, tag)?;
    parse_time(tag, time)
}

/// Reads one DER element with tag `tag` from the front of `input`: (content, rest).
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *input.first()? != tag {
        return None;
    }
    let (len, header): (usize, usize) = match *input.get(1)? {
        l if l < 0x80 => (l as usize, 2),
        0x81 => (*input.get(2)? as usize, 3),
        0x82 => ((*input.get(2)? as usize) << 8 | *input.get(3)? as usize, 4),
        0x83 => (
            (*input.get(2)? as usize) << 16
                | (*input.get(3)? as usize) << 8
                | *input.get(4)? as usize,
            5,
        ),
        _ => return None,
    };
    let end = header.checked_add(len)?;
    Some((input.get(header..end)?, input.get(end..)?))
}

fn skip_any(input: &[u8]) -> Option<&[u8]> {
    der_element(input, *input.first()?).map(|(_, rest)| rest)
}

/// UTCTime (0x17, YYMMDDHHMMSSZ) or GeneralizedTime (0x18, YYYYMMDDHHMMSSZ) to unix seconds.
fn parse_time(tag: u8, s: &[u8]) -> Option<u64> {
    let digits = |range: core::ops::Range<usize>| -> Option<u64> {
        let text = core::str::from_utf8(s.get(range)?).ok()?;
        text.parse().ok()
    };
    let (year, rest) = match tag {
        0x17 => {
            let yy = digits(0..2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        0x18 => (digits(0..4)?, 4),
        _ => return None,
    };
    let month = digits(rest..rest + 2)?;
    let day = digits(rest + 2..rest + 4)?;
    let hour = digits(rest + 4..rest + 6)?;
    let minute = digits(rest + 6..rest + 8)?;
    let second = digits(rest + 8..rest + 10)?;
    if s.get(rest + 10) != Some(&b'Z') || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let days = days_from_civil(year as i64, month as i64, day as i64);
    let secs = days * 86_400 + (hour * 3600 + minute * 60 + second) as i64;
    u64::try_from(secs).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date; Howard Hinnant's `days_from_civil`
/// (http://howardhinnant.github.io/date_algorithms.html).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
    }

    #[test]
    fn times() {
        assert_eq!(parse_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(parse_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(parse_time(0x18, b"20380119031408Z"), Some(2_147_483_648));
        assert_eq!(parse_time(0x18, b"2038011903140Z"), None);
        assert_eq!(parse_time(0x17, b"701301000000Z"), None);
    }

    #[test]
    fn garbage_certificates_give_none() {
        assert_eq!(not_after_unix(&[]), None);
        assert_eq!(not_after_unix(&[0x30, 0x82, 0xFF]), None);
        assert_eq!(not_after_unix(&[0x30, 0x03, 0x30, 0x01, 0x02]), None);
    }
}
