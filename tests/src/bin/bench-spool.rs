//! The spool benchmark (issue #18). Not a test: it prints figures and writes them to
//! `target/bench/spool.txt`. Run it with `make bench-spool`.
//!
//! The agent's real uplink state (`Outbox` in front of a `Spool` in a directory under
//! `target/bench/`) is fed as an agent with 100 targets every 10 s feeds it: 10 results a second
//! (the load generator's realistic mix), a flush every `uplink.flush_interval` (1 s), batches of
//! up to 32, frames in the agent's wire format (`vantage_proto::encode`, version 3, what
//! `uplink.wire_format` defaults to), every frame acknowledged at once (a broker that keeps up).
//! No MQTT: this measures what the spool costs the card, not the network. In real time, so the
//! fsync thread and the kernel's writeback see the real rhythm. For each `uplink.spool_fsync`
//! policy:
//!
//! - bytes written per result, divided by the result's encoded size on the wire (the issue's
//!   goal: ≤ 1.5×), both against the frames of this run (about 10 results each: one flush's
//!   worth) and against full frames of 32 (the best the wire does), and against the result's
//!   plain postcard size (what a spool entry holds);
//! - `write` calls per flush (goal: ≤ 1) and per second, fsyncs per second.
//!
//! Bytes and calls are the kernel's counts, not the spool's: `syscw` and `wchar` of
//! /proc/self/io (every write-family syscall of the process and the bytes they passed; nothing
//! else in this process writes while it runs, the figures are printed between runs), with the
//! spool's own counter beside them as a cross-check. `write_bytes` is what the process caused to
//! reach the block device (page writeback: what the card sees, whole 4 KiB pages).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use vantage_agent::spool::{FsyncPolicy, Spool, SpoolConfig};
use vantage_agent::uplink::Outbox;
use vantage_proto::{Batch, ProbeResult};
use vantage_tests::loadgen::Synth;

#[derive(Parser)]
#[command(about = "Bytes and writes the agent's spool costs per result at 100 targets / 10 s")]
struct Args {
    /// Seconds per fsync policy.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Results per second (100 targets every 10 s = 10).
    #[arg(long, default_value_t = 10)]
    rate: u64,
    /// Where to write the figures.
    #[arg(long, default_value = "target/bench/spool.txt")]
    out: PathBuf,
}

/// The write counters of /proc/self/io: the kernel's own count for this process (all threads).
#[derive(Clone, Copy, Default)]
struct Io {
    /// Write-family system calls (`syscw`).
    calls: u64,
    /// Bytes passed to them (`wchar`).
    bytes: u64,
    /// Bytes this process caused to be sent to storage (`write_bytes`).
    device: u64,
}

fn io_counters() -> Io {
    let text = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Io {
        calls: field("syscw:"),
        bytes: field("wchar:"),
        device: field("write_bytes:"),
    }
}

struct Figures {
    policy: String,
    results: u64,
    flushes: u64,
    /// Write syscalls and bytes (kernel counts) and the spool's own count of its writes.
    syscalls: u64,
    bytes: u64,
    spool_writes: u64,
    spool_bytes: u64,
    syncs: u64,
    device: u64,
    postcard: u64,
    frame_bytes: u64,
    frames: u64,
    /// Version 3 bytes of the same results in full frames of 32.
    full_frame_bytes: u64,
}

fn run(args: &Args, policy: FsyncPolicy, name: &str) -> Figures {
    let dir = PathBuf::from("target/bench/spool-dir").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let (spool, replay) = Spool::open(SpoolConfig {
        dir: dir.clone(),
        max_bytes: 64 << 20,
        fsync: policy,
    })
    .expect("open the spool");
    const BOOT_ID: u64 = 1;
    // Outbox::with_spool encodes with vantage_proto::encode (version 3), as the agent does, and
    // with the agent's clock readings: each flush writes the clock state after its results.
    let mut outbox = Outbox::with_spool(BOOT_ID, 32, 10_000, spool, &replay)
        .with_clock(Box::new(vantage_agent::clock_state::read));
    let mut synth = Synth::new(42);
    let mut sent: Vec<ProbeResult> = Vec::new();
    let start_stats = outbox.spool().unwrap().stats().clone();
    let before = io_counters();
    let mut postcard_bytes = 0u64;
    let mut frame_bytes = 0u64;
    let mut frames = 0u64;
    let mut results = 0u64;
    let mut flushes = 0u64;
    let per_result = Duration::from_secs(1) / args.rate as u32;
    let started = Instant::now();
    let mut next_flush = started + Duration::from_secs(1);
    let mut next_result = started;
    while started.elapsed() < Duration::from_secs(args.seconds) {
        let now = Instant::now();
        if now >= next_result {
            let mut r = synth.result();
            let mut buf = [0u8; vantage_proto::MAX_RESULT_LEN];
            postcard_bytes += postcard::to_slice(&r, &mut buf).map_or(0, |b| b.len() as u64);
            r.seq = outbox.push(r);
            sent.push(r);
            // As the uplink does after each result: seals only full batches (none at this rate).
            outbox.seal(false);
            results += 1;
            next_result += per_result;
        }
        if now >= next_flush {
            outbox.seal(true);
            flushes += 1;
            let mut n = 0;
            while let Some(f) = outbox.next_unhanded() {
                frame_bytes += f.len() as u64;
                outbox.mark_handed();
                n += 1;
            }
            frames += n;
            outbox.acked(n);
            next_flush += Duration::from_secs(1);
        }
        std::thread::sleep(
            next_result
                .min(next_flush)
                .saturating_duration_since(Instant::now()),
        );
    }
    // Let the sync thread and the kernel finish what this run asked for.
    std::thread::sleep(Duration::from_secs(1));
    let after = io_counters();
    let s = outbox.spool().unwrap().stats().clone();
    let f = Figures {
        policy: name.to_owned(),
        results,
        flushes,
        syscalls: after.calls - before.calls,
        bytes: after.bytes - before.bytes,
        spool_writes: s.writes - start_stats.writes,
        spool_bytes: s.bytes_written - start_stats.bytes_written,
        syncs: s.syncs - start_stats.syncs,
        device: after.device.saturating_sub(before.device),
        postcard: postcard_bytes,
        frame_bytes,
        frames,
        full_frame_bytes: full_frames(BOOT_ID, &sent),
    };
    drop(outbox);
    let _ = std::fs::remove_dir_all(&dir);
    f
}

/// Version 3 bytes of `results` in frames of 32 (the last one partial), each with a clock
/// state as an agent whose clock is synchronised sends it.
fn full_frames(boot_id: u64, results: &[ProbeResult]) -> u64 {
    let mut buf = vec![0u8; vantage_proto::MAX_FRAME_LEN];
    let clock = vantage_proto::ClockHealth {
        synced: true,
        max_error_ms: 20,
        est_error_ms: 2,
        synced_from_seq: Some(0),
        boot_age_s: 86_400,
        sealed_at_ms: results.last().map_or(0, |r| r.started_at_ms + 1_000),
    };
    results
        .chunks(vantage_proto::MAX_RESULTS)
        .map(|chunk| {
            let batch = Batch {
                boot_id,
                results: chunk.iter().copied().collect(),
                gaps: heapless::Vec::new(),
                clock: Some(clock),
            };
            vantage_proto::encode(&batch, &mut buf).map_or(0, |b| b.len() as u64)
        })
        .sum()
}

fn main() {
    let args = Args::parse();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut lines = vec![
        format!(
            "spool benchmark: {} results/s (100 targets every 10 s), flush every 1 s, batches of \
             up to 32, wire format version 3, {} s per policy; load before: {}",
            args.rate,
            args.seconds,
            load.trim()
        ),
        format!(
            "{:<7} {:>7} {:>7} {:>7} {:>9} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8}",
            "fsync",
            "results",
            "flushes",
            "writes",
            "writes/fl",
            "writes/s",
            "spool wr",
            "B/res",
            "wire B",
            "× wire",
            "wire32 B",
            "× wire32",
            "× pc",
            "syncs/s",
            "dev B/res",
        ),
    ];
    let mut all = Vec::new();
    for (policy, name) in [
        (FsyncPolicy::Always, "always"),
        (FsyncPolicy::Every(Duration::from_secs(10)), "10s"),
        (FsyncPolicy::Never, "never"),
    ] {
        let f = run(&args, policy, name);
        let per = |x: u64| x as f64 / f.results.max(1) as f64;
        lines.push(format!(
            "{:<7} {:>7} {:>7} {:>7} {:>9.2} {:>8.2} {:>8} {:>7.1} {:>8.1} {:>8.2} {:>8.1} {:>8.2} {:>7.2} {:>8.2} {:>8.1}",
            f.policy,
            f.results,
            f.flushes,
            f.syscalls,
            f.syscalls as f64 / f.flushes.max(1) as f64,
            f.syscalls as f64 / args.seconds as f64,
            f.spool_writes,
            per(f.bytes),
            per(f.frame_bytes),
            f.bytes as f64 / f.frame_bytes.max(1) as f64,
            per(f.full_frame_bytes),
            f.bytes as f64 / f.full_frame_bytes.max(1) as f64,
            f.bytes as f64 / f.postcard.max(1) as f64,
            f.syncs as f64 / args.seconds as f64,
            per(f.device),
        ));
        println!("{}", lines.last().unwrap());
        all.push(f);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let frames: u64 = all.iter().map(|f| f.frames).sum();
    let results: u64 = all.iter().map(|f| f.results).sum();
    let spool_bytes: u64 = all.iter().map(|f| f.spool_bytes).sum();
    let bytes: u64 = all.iter().map(|f| f.bytes).sum();
    lines.push(format!(
        "writes: write-family syscalls of the process during the run (/proc/self/io syscw; the \
         segment was started at open, before it); spool wr: the spool's own count of its writes. \
         B/res: bytes those syscalls wrote per result (wchar; the spool counted {spool_bytes} B \
         of the kernel's {bytes} B). wire B: version 3 frame bytes per result in this run's \
         frames ({:.1} results per frame: one flush's worth; MQTT header not included), × wire: \
         B/res over that (the goal: ≤ 1.5). wire32 B / × wire32: the same results in full \
         frames of 32. × pc: B/res over the result's plain postcard size (what an entry holds). \
         dev B/res: bytes sent to the block device per result (write_bytes: page writeback). \
         Load after: {}",
        results as f64 / frames.max(1) as f64,
        load.trim()
    ));
    let text = lines.join("\n") + "\n";
    if let Some(dir) = args.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&args.out, &text).expect("write the figures");
    println!("{text}");
}
