//! The body check of a probe: content decoding and the regex search, run after the last body
//! byte on threads of their own, under the probe's deadline.
//!
//! Why threads of their own: decoding and searching up to `body_cap` bytes is CPU work that must
//! not run on the (single) runtime thread, where it would delay other probes' timings, and not
//! on tokio's blocking pool either, which `getaddrinfo` shares: a burst of large checks would
//! make DNS lookups queue behind them and inflate `dns_us`.
//!
//! [`slots`] long-lived workers (threads started once, so a check costs a hand-over, not a
//! thread start), each probe holding a slot (a semaphore permit) while its check runs. A check
//! that overruns its deadline cannot be stopped midway through the regex scan (regex-lite has no
//! budget or cancellation), so the probe gives up on that worker instead: it starts a
//! replacement and gives its slot back at once, and the old worker retires when its scan ends.
//! That happens only while fewer than [`slots`] such strays run (after that, an overrunning
//! worker keeps its slot to the end), so one hostile target cannot take every slot for the
//! length of its scans, and threads alive stay at most twice [`slots`]. Decoding looks at the
//! deadline between output chunks, so a decompression bomb stops at the deadline on its own.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout_at;

/// How the body is encoded (its `Content-Encoding`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Encoding {
    Identity,
    /// `gzip` or `x-gzip` (RFC 9110 8.4.1.3: `x-gzip` is the same coding).
    Gzip,
    /// A coding the agent does not decode (it asks only for gzip), as the server wrote it.
    Unsupported(String),
}

impl Encoding {
    /// The coding named by the `Content-Encoding` header values (a list, RFC 9110 8.4).
    pub(super) fn from_headers(headers: &hyper::HeaderMap) -> Encoding {
        let mut codings = Vec::new();
        for value in headers.get_all(hyper::header::CONTENT_ENCODING) {
            let text = String::from_utf8_lossy(value.as_bytes()).to_ascii_lowercase();
            codings.extend(
                text.split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty() && *c != "identity")
                    .map(str::to_owned),
            );
        }
        match codings.as_slice() {
            [] => Encoding::Identity,
            [one] if one == "gzip" || one == "x-gzip" => Encoding::Gzip,
            _ => Encoding::Unsupported(codings.join(", ")),
        }
    }
}

/// What to check: the body as read (at most `cap` bytes) and what to search it for.
pub(super) struct Job {
    pub body: Vec<u8>,
    pub encoding: Encoding,
    /// The body on the wire ended within the cap (false: the agent stopped reading at the cap,
    /// so a compressed stream is cut short by the agent, not by the server).
    pub complete: bool,
    pub regex: regex_lite::Regex,
    /// Most decoded bytes searched.
    pub cap: usize,
}

/// A finished check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Verdict {
    pub matched: bool,
    /// Decoding produced more than `cap` bytes; only the first `cap` were searched.
    pub decoded_truncated: bool,
}

/// Why a check gave no verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum CheckError {
    /// The deadline passed (waiting for a slot, decoding or searching).
    Expired(&'static str),
    /// The body cannot be decoded.
    BadEncoding(String),
    /// The agent could not run the check (no thread, or the check panicked).
    Agent(String),
}

/// Checks a body at most at once; also the most threads given up on at once.
pub fn slots() -> usize {
    static SLOTS: OnceLock<usize> = OnceLock::new();
    // One core stays for the runtime thread; a Pi 4 gets 3, a one-core board 1.
    *SLOTS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get().saturating_sub(1))
            .clamp(1, 4)
    })
}

/// One check handed to a worker.
struct Task {
    job: Job,
    deadline: Instant,
    reply: tokio::sync::oneshot::Sender<Result<Verdict, CheckError>>,
    /// The probe's slot, given back by whichever side lets go of the task last: the worker when
    /// it finishes, or the probe when it gives up on the worker (see the module docs).
    slot: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
}

struct Pool {
    /// One permit per worker that is not a stray: holding one means a worker is free for you.
    slots: Arc<Semaphore>,
    /// Tasks not yet taken by a worker: never more than the permits handed out. A plain
    /// mutex and condvar rather than `std::sync::mpsc`, which added 13-15 KB to the `dist`
    /// binary (`make bench-size`) for a queue this simple.
    queue: Arc<(Mutex<VecDeque<Task>>, Condvar)>,
    /// Workers the probes gave up on, still finishing a check.
    strays: Arc<AtomicUsize>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let pool = Pool {
            slots: Arc::new(Semaphore::new(0)),
            queue: Arc::new((Mutex::new(VecDeque::with_capacity(slots())), Condvar::new())),
            strays: Arc::new(AtomicUsize::new(0)),
        };
        // A permit only for a worker that started: if none could, checks fail as `other`.
        for _ in 0..slots() {
            match pool.start_worker() {
                Ok(()) => pool.slots.add_permits(1),
                Err(e) => tracing::warn!(error = %e, "cannot start a check thread"),
            }
        }
        pool
    })
}

impl Pool {
    fn start_worker(&self) -> std::io::Result<()> {
        let (queue, strays) = (self.queue.clone(), self.strays.clone());
        std::thread::Builder::new()
            .name("vantage-check".into())
            .spawn(move || loop {
                let task = {
                    let (tasks, ready) = &*queue;
                    let mut tasks = lock(tasks);
                    loop {
                        match tasks.pop_front() {
                            Some(task) => break task,
                            None => tasks = ready.wait(tasks).unwrap_or_else(|e| e.into_inner()),
                        }
                    }
                };
                let Task {
                    job,
                    deadline,
                    reply,
                    slot,
                } = task;
                let verdict =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(job, deadline)))
                        .unwrap_or_else(|_| Err(CheckError::Agent("the check panicked".into())));
                let _ = reply.send(verdict);
                if lock(&slot).take().is_none() {
                    // The probe gave up on this worker and started a replacement: retire.
                    strays.fetch_sub(1, Ordering::AcqRel);
                    return;
                }
                // (The permit, dropped here, makes this worker free again.)
            })
            .map(drop)
    }
}

/// A check the probe gave up on at its deadline, still running on its worker and holding the
/// body (up to a few times `body_cap`, see budget.rs). Dropping it does not stop the check.
pub struct Leftover(tokio::sync::oneshot::Receiver<Result<Verdict, CheckError>>);

impl Leftover {
    /// Resolves once the check has ended and its memory is freed.
    pub async fn finished(self) {
        // The worker drops the job (body, decoded text) before it replies or drops the sender.
        let _ = self.0.await;
    }
}

/// Runs `job` on a check worker; gives up at `deadline`, handing back the check still running
/// then, if any.
pub(super) async fn run(
    job: Job,
    deadline: tokio::time::Instant,
) -> (Result<Verdict, CheckError>, Option<Leftover>) {
    let pool = pool();
    let permit = match timeout_at(deadline, pool.slots.clone().acquire_owned()).await {
        Err(_) => {
            return (
                Err(CheckError::Expired("waiting for a free check thread")),
                None,
            )
        }
        // The semaphore is never closed.
        Ok(Err(_)) => return (Err(CheckError::Agent("check slots closed".into())), None),
        Ok(Ok(permit)) => permit,
    };
    let slot = Arc::new(Mutex::new(Some(permit)));
    let (reply, mut verdict) = tokio::sync::oneshot::channel();
    let task = Task {
        job,
        deadline: deadline.into_std(),
        reply,
        slot: slot.clone(),
    };
    let (tasks, ready) = &*pool.queue;
    lock(tasks).push_back(task);
    ready.notify_one();
    match timeout_at(deadline, &mut verdict).await {
        Ok(Ok(verdict)) => (verdict, None),
        Ok(Err(_)) => (
            Err(CheckError::Agent("the check worker is gone".into())),
            None,
        ),
        Err(_) => {
            give_up(pool, &slot);
            (
                Err(CheckError::Expired("decoding or searching the body")),
                Some(Leftover(verdict)),
            )
        }
    }
}

/// The probe no longer waits for its check: if fewer than [`slots`] strays run, start a
/// replacement worker and give the slot back now, leaving the old worker to finish and retire.
fn give_up(pool: &Pool, slot: &Mutex<Option<OwnedSemaphorePermit>>) {
    let room = |n: usize| (n < slots()).then_some(n + 1);
    if pool
        .strays
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, room)
        .is_err()
    {
        return; // Too many strays: this worker keeps its slot until it is done.
    }
    let mut held = lock(slot);
    let Some(permit) = held.take() else {
        // The worker finished meanwhile and kept going: not a stray.
        pool.strays.fetch_sub(1, Ordering::AcqRel);
        return;
    };
    match pool.start_worker() {
        Ok(()) => drop(permit),
        Err(e) => {
            // No replacement: the old worker keeps its slot and stays a worker.
            tracing::warn!(error = %e, "cannot start a check thread");
            *held = Some(permit);
            pool.strays.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Decodes and searches (on the check thread).
fn check(job: Job, deadline: Instant) -> Result<Verdict, CheckError> {
    if Instant::now() >= deadline {
        return Err(CheckError::Expired("waiting for a free check thread"));
    }
    // `job` (the body) and the decoded text are dropped when this returns, before the reply.
    let (text, decoded_truncated) = match &job.encoding {
        Encoding::Identity => (Cow::Borrowed(&job.body[..]), false),
        Encoding::Gzip => {
            let (text, truncated) = gunzip_capped(&job.body, job.cap, job.complete, deadline)?;
            (Cow::Owned(text), truncated)
        }
        Encoding::Unsupported(coding) => {
            return Err(CheckError::BadEncoding(format!(
                "content-encoding {coding:?} is not decoded (the agent asks for gzip only)"
            )))
        }
    };
    if Instant::now() >= deadline {
        return Err(CheckError::Expired("decoding the body"));
    }
    // Lossy: invalid UTF-8 becomes U+FFFD and cannot crash or hide the rest of the text. The
    // whole (capped) body is searched at once, so a match across network chunks is found.
    let matched = job.regex.is_match(&String::from_utf8_lossy(&text));
    Ok(Verdict {
        matched,
        decoded_truncated,
    })
}

/// Output produced between two looks at the clock while decoding.
const DECODE_STEP: usize = 64 * 1024;

/// Decodes a gzip body into at most `cap` bytes: (text, more decoded bytes were left).
///
/// Every member of a multi-member stream is decoded (RFC 1952 2.2); bytes after the last member
/// that do not start another one are ignored, as zlib-based clients do. `complete` says the
/// compressed body was read to its end: then a stream that ends early is the server's fault
/// (an error); otherwise the agent cut it at the cap and what decoded so far is searched.
fn gunzip_capped(
    compressed: &[u8],
    cap: usize,
    complete: bool,
    deadline: Instant,
) -> Result<(Vec<u8>, bool), CheckError> {
    let mut out = Vec::new();
    let mut rest = compressed;
    let mut step = vec![0u8; DECODE_STEP];
    let mut members = 0;
    // An empty body (a 204, a HEAD) with a gzip label has nothing to decode.
    while !rest.is_empty() {
        if members > 0 && !rest.starts_with(&[0x1f, 0x8b]) {
            break;
        }
        members += 1;
        let mut decoder = flate2::bufread::GzDecoder::new(rest);
        loop {
            if Instant::now() >= deadline {
                return Err(CheckError::Expired("decoding the body"));
            }
            let want = step.len().min(cap + 1 - out.len().min(cap));
            match decoder.read(&mut step[..want]) {
                Ok(0) => break,
                Ok(n) => {
                    out.extend_from_slice(&step[..n]);
                    if out.len() > cap {
                        // One byte past the cap proves there is more: keep exactly `cap`.
                        out.truncate(cap);
                        return Ok((out, true));
                    }
                }
                Err(e) if !complete && e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    // Cut by the agent at the cap: the rest of the stream was never read.
                    return Ok((out, true));
                }
                Err(e) => return Err(CheckError::BadEncoding(format!("invalid gzip body: {e}"))),
            }
        }
        rest = decoder.into_inner();
    }
    // (When the agent stopped reading at the cap, the body is flagged truncated already.)
    Ok((out, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn gzip_is_decoded_and_capped() {
        let gz = gz(&b"hello "[..].repeat(1000));
        assert_eq!(
            gunzip_capped(&gz, 1 << 20, true, later()).unwrap(),
            (b"hello "[..].repeat(1000), false)
        );
        let (text, truncated) = gunzip_capped(&gz, 100, true, later()).unwrap();
        assert_eq!((text.len(), truncated), (100, true));
        // Exactly the decoded size: nothing was left out.
        assert!(!gunzip_capped(&gz, 6000, true, later()).unwrap().1);
        assert_eq!(
            gunzip_capped(b"", 100, true, later()).unwrap(),
            (vec![], false)
        );
    }

    #[test]
    fn members_are_all_decoded_and_trailing_garbage_ignored() {
        let mut two = gz(b"first ");
        two.extend(gz(b"second"));
        two.extend_from_slice(b"\0\0junk");
        assert_eq!(
            gunzip_capped(&two, 100, true, later()).unwrap().0,
            b"first second"
        );
    }

    #[test]
    fn corrupt_gzip_is_an_error_and_a_cut_one_only_when_the_server_cut_it() {
        let body = gz(&b"0123456789"[..].repeat(1000));
        let half = &body[..body.len() / 2];
        assert!(matches!(
            gunzip_capped(b"plain text", 100, true, later()),
            Err(CheckError::BadEncoding(_))
        ));
        assert!(matches!(
            gunzip_capped(half, 1 << 20, true, later()),
            Err(CheckError::BadEncoding(_))
        ));
        let (text, truncated) = gunzip_capped(half, 1 << 20, false, later()).unwrap();
        assert!(truncated && !text.is_empty());
    }

    #[test]
    fn decoding_stops_at_the_deadline() {
        let bomb = gz(&vec![0u8; 8 << 20]);
        let past = Instant::now();
        assert_eq!(
            gunzip_capped(&bomb, 64 << 20, true, past),
            Err(CheckError::Expired("decoding the body"))
        );
    }

    #[test]
    fn content_encoding_header_values() {
        let enc = |values: &[&str]| {
            let mut h = hyper::HeaderMap::new();
            for v in values {
                h.append(hyper::header::CONTENT_ENCODING, v.parse().unwrap());
            }
            Encoding::from_headers(&h)
        };
        assert_eq!(enc(&[]), Encoding::Identity);
        assert_eq!(enc(&["identity"]), Encoding::Identity);
        assert_eq!(enc(&["GZIP"]), Encoding::Gzip);
        assert_eq!(enc(&["x-gzip"]), Encoding::Gzip);
        assert_eq!(enc(&["br"]), Encoding::Unsupported("br".into()));
        assert_eq!(
            enc(&["gzip", "gzip"]),
            Encoding::Unsupported("gzip, gzip".into())
        );
    }

    #[tokio::test]
    async fn an_overrunning_check_times_out_and_frees_its_slot() {
        // A regex scan that takes far longer than the deadline (2 MiB, no match, debug build).
        let job = |deadline_ms| {
            (
                Job {
                    body: vec![b'a'; 2 << 20],
                    encoding: Encoding::Identity,
                    complete: true,
                    regex: regex_lite::Regex::new("(a|b)+z").unwrap(),
                    cap: 2 << 20,
                },
                tokio::time::Instant::now() + Duration::from_millis(deadline_ms),
            )
        };
        let (slow, deadline) = job(30);
        let started = Instant::now();
        let (verdict, leftover) = run(slow, deadline).await;
        assert!(matches!(verdict, Err(CheckError::Expired(_))));
        assert!(started.elapsed() < Duration::from_secs(2));
        let leftover = leftover.expect("the scan is still running");
        // The stray thread gave its slot back: a quick check still gets one.
        let quick = Job {
            body: b"target: ok".to_vec(),
            encoding: Encoding::Identity,
            complete: true,
            regex: regex_lite::Regex::new("ok").unwrap(),
            cap: 100,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let (verdict, none) = run(quick, deadline).await;
        assert_eq!(
            verdict,
            Ok(Verdict {
                matched: true,
                decoded_truncated: false
            })
        );
        assert!(none.is_none());
        // The stray ends by itself; then its memory is free.
        tokio::time::timeout(Duration::from_secs(300), leftover.finished())
            .await
            .expect("the stray scan ends");
    }
}
