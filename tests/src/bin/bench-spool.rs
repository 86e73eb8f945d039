//! The spool benchmark (issue #18). Not a test: it prints figures and writes them to
//! `target/bench/spool.txt`. Run it with `make bench-spool`.
//!
//! The agent's real uplink state (`Outbox` in front of a `Spool` in a directory under
//! `target/bench/`) is fed as an agent with 100 targets every 10 s feeds it: 10 results a second
//! (the load generator's realistic mix), a flush every `uplink.flush_interval` (1 s), batches of
//! up to 32, every frame acknowledged at once (a broker that keeps up). No MQTT: this measures
//! what the spool costs the card, not the network. In real time, so the fsync thread and the
//! kernel's writeback see the real rhythm. For each `uplink.spool_fsync` policy:
//!
//! - bytes the spool wrote per result, and that divided by the postcard size of the result (the
//!   issue's goal: ≤ 1.5×);
//! - `write` calls per flush (goal: ≤ 1), fsyncs per second;
//! - bytes the process caused to reach the block device (`write_bytes` of /proc/self/io, which
//!   counts page writeback: what the card really sees, 4 KiB pages at least), per result.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use vantage_agent::spool::{FsyncPolicy, Spool, SpoolConfig};
use vantage_agent::uplink::Outbox;
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

/// `write_bytes` of /proc/self/io: bytes this process caused to be sent to storage.
fn device_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("write_bytes: "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

struct Figures {
    policy: String,
    results: u64,
    flushes: u64,
    writes: u64,
    bytes: u64,
    syncs: u64,
    device: u64,
    encoded: u64,
    frame_bytes: u64,
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
    // With the agent's clock readings: each flush writes the clock state after its results.
    let mut outbox = Outbox::with_spool(1, 32, 10_000, spool, &replay)
        .with_clock(Box::new(vantage_agent::clock_state::read));
    let mut synth = Synth::new(42);
    let start_stats = outbox.spool().unwrap().stats().clone();
    let device_before = device_bytes();
    let mut encoded = 0u64;
    let mut frame_bytes = 0u64;
    let mut results = 0u64;
    let mut flushes = 0u64;
    let per_result = Duration::from_secs(1) / args.rate as u32;
    let started = Instant::now();
    let mut next_flush = started + Duration::from_secs(1);
    let mut next_result = started;
    while started.elapsed() < Duration::from_secs(args.seconds) {
        let now = Instant::now();
        if now >= next_result {
            let r = synth.result();
            let mut buf = [0u8; vantage_proto::MAX_RESULT_LEN];
            encoded += postcard::to_slice(&r, &mut buf).map_or(0, |b| b.len() as u64);
            outbox.push(r);
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
    let s = outbox.spool().unwrap().stats().clone();
    let f = Figures {
        policy: name.to_owned(),
        results,
        flushes,
        writes: s.writes - start_stats.writes,
        bytes: s.bytes_written - start_stats.bytes_written,
        syncs: s.syncs - start_stats.syncs,
        device: device_bytes().saturating_sub(device_before),
        encoded,
        frame_bytes,
    };
    drop(outbox);
    let _ = std::fs::remove_dir_all(&dir);
    f
}

fn main() {
    let args = Args::parse();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut lines = vec![
        format!(
            "spool benchmark: {} results/s (100 targets every 10 s), flush every 1 s, batches of \
             32, {} s per policy; load before: {}",
            args.rate,
            args.seconds,
            load.trim()
        ),
        format!(
            "{:<10} {:>8} {:>8} {:>8} {:>10} {:>10} {:>8} {:>12} {:>10} {:>10}",
            "fsync",
            "results",
            "flushes",
            "writes",
            "writes/fl",
            "B/result",
            "× enc",
            "syncs/s",
            "dev B/res",
            "wire B/res"
        ),
    ];
    for (policy, name) in [
        (FsyncPolicy::Always, "always"),
        (FsyncPolicy::Every(Duration::from_secs(10)), "10s"),
        (FsyncPolicy::Never, "never"),
    ] {
        let f = run(&args, policy, name);
        let per = |x: u64| x as f64 / f.results.max(1) as f64;
        lines.push(format!(
            "{:<10} {:>8} {:>8} {:>8} {:>10.2} {:>10.1} {:>8.2} {:>12.2} {:>10.1} {:>10.1}",
            f.policy,
            f.results,
            f.flushes,
            f.writes,
            f.writes as f64 / f.flushes.max(1) as f64,
            per(f.bytes),
            f.bytes as f64 / f.encoded.max(1) as f64,
            f.syncs as f64 / args.seconds as f64,
            per(f.device),
            per(f.frame_bytes),
        ));
        println!("{}", lines.last().unwrap());
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    lines.push(format!(
        "writes: write calls during the run (the segment was started at open, before it). \
         B/result: bytes the spool wrote per result; × enc: that over the postcard size of the \
         result alone. dev B/res: bytes the process sent to the block device per result \
         (/proc/self/io write_bytes: page writeback, what the card sees). wire B/res: frame \
         bytes per result (MQTT header not included). Load after: {}",
        load.trim()
    ));
    let text = lines.join("\n") + "\n";
    if let Some(dir) = args.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&args.out, &text).expect("write the figures");
    println!("{text}");
}
