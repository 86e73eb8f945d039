//! The probe engine benchmark (issue: "a probe engine that tells the truth"). Not a test: it
//! prints figures and writes them to a file. Run it with `make bench-probe`.
//!
//! 1. Timing accuracy: a local target injects 0, 10 and 100 ms before answering; the error of
//!    the measured first-byte time against the injected delay, p50 and p99.
//! 2. Throughput: probes per second and CPU seconds per 1,000 probes, a new connection each,
//!    at 1, 64 and 1,024 concurrent probes, on one thread (as the agent runs).
//! 3. The same load through Prometheus blackbox_exporter's `/probe` endpoint, measured in the
//!    same run against the same target, and the ratios.
//!
//! The target runs in its own process (`demo-target`), so the CPU counted for vantage is the
//! prober's alone; blackbox_exporter's CPU is read from its own process.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::task::JoinSet;
use vantage_agent::probe::Prober;
use vantage_agent::target::Target;
use vantage_proto::Outcome;

#[derive(Parser)]
#[command(about = "Benchmark of the vantage probe engine against blackbox_exporter")]
struct Args {
    /// blackbox_exporter binary (see bench/blackbox-install); without it only vantage is measured.
    #[arg(long)]
    blackbox: Option<PathBuf>,
    /// Seconds per throughput level.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Probes per delay level for the accuracy test.
    #[arg(long, default_value_t = 100)]
    samples: usize,
    /// Where to write the figures.
    #[arg(long, default_value = "target/bench/probe.txt")]
    out: PathBuf,
}

const LEVELS: [usize; 3] = [1, 64, 1024];

/// User + system CPU seconds of a process, from /proc/<pid>/stat (clock ticks of 10 ms).
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; here indexes 11 and 12.
    (tick(11) + tick(12)) / 100.0
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on 127.0.0.1:{port}");
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Result of one throughput level.
struct Level {
    concurrency: usize,
    probes: u64,
    failures: u64,
    seconds: f64,
    cpu: f64,
}

impl Level {
    /// A level that ran from `start` until now: `counts` is (up, failed) probes.
    fn measured(concurrency: usize, (up, failures): (u64, u64), start: Instant, cpu: f64) -> Level {
        Level {
            concurrency,
            probes: up + failures,
            failures,
            seconds: start.elapsed().as_secs_f64(),
            cpu,
        }
    }
    fn rate(&self) -> f64 {
        self.probes as f64 / self.seconds
    }
    fn cpu_per_1000(&self) -> f64 {
        self.cpu / self.probes.max(1) as f64 * 1000.0
    }
}

/// The (up, failed) counts of every task of `set`, added.
async fn join_counts(mut set: JoinSet<(u64, u64)>) -> (u64, u64) {
    let (mut ok, mut bad) = (0, 0);
    while let Some(Ok((o, b))) = set.join_next().await {
        ok += o;
        bad += b;
    }
    (ok, bad)
}

fn vantage_level(url: &str, concurrency: usize, duration: Duration) -> Level {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let target = Target::for_url(1, url).expect("target");
    let cpu0 = cpu_seconds("self");
    let start = Instant::now();
    let counts = runtime.block_on(async {
        let prober = Prober::new();
        let end = start + duration;
        let mut set = JoinSet::new();
        for _ in 0..concurrency {
            let (p, t) = (prober.clone(), target.clone());
            set.spawn(async move {
                let (mut ok, mut bad) = (0u64, 0u64);
                while Instant::now() < end {
                    if p.probe(&t).await.outcome == Outcome::Up {
                        ok += 1;
                    } else {
                        bad += 1;
                    }
                }
                (ok, bad)
            });
        }
        join_counts(set).await
    });
    Level::measured(concurrency, counts, start, cpu_seconds("self") - cpu0)
}

/// Drives blackbox_exporter's /probe with `concurrency` keep-alive client connections.
fn blackbox_level(
    bb_port: u16,
    bb_pid: u32,
    url: &str,
    concurrency: usize,
    duration: Duration,
) -> Level {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let path = format!("/probe?module=http_2xx&target={url}");
    let pid = bb_pid.to_string();
    let cpu0 = cpu_seconds(&pid);
    let start = Instant::now();
    let counts = runtime.block_on(async {
        let end = start + duration;
        let mut set = JoinSet::new();
        for _ in 0..concurrency {
            let path = path.clone();
            set.spawn(async move {
                let (mut ok, mut bad) = (0u64, 0u64);
                let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", bb_port)).await
                else {
                    return (0, 1);
                };
                let Ok((mut sender, conn)) =
                    hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                        .await
                else {
                    return (0, 1);
                };
                tokio::spawn(conn);
                while Instant::now() < end {
                    let req = hyper::Request::get(path.as_str())
                        .header("host", "127.0.0.1")
                        .body(Empty::new())
                        .expect("request");
                    match sender.send_request(req).await {
                        Ok(resp) => {
                            let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                            let up =
                                body.is_ok_and(|b| b.windows(15).any(|w| w == b"probe_success 1"));
                            if up {
                                ok += 1
                            } else {
                                bad += 1
                            }
                        }
                        Err(_) => {
                            bad += 1;
                            break;
                        }
                    }
                }
                (ok, bad)
            });
        }
        join_counts(set).await
    });
    Level::measured(concurrency, counts, start, cpu_seconds(&pid) - cpu0)
}

fn main() {
    let args = Args::parse();
    let mut report = String::new();
    let mut line = |s: String| {
        println!("{s}");
        report.push_str(&s);
        report.push('\n');
    };
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .expect("exe dir");
    let target_port = free_port();
    let _target = KillOnDrop(
        Command::new(exe_dir.join("demo-target"))
            .arg(format!("127.0.0.1:{target_port}"))
            .stderr(Stdio::null())
            .spawn()
            .expect("start demo-target (build it with the bench: cargo build --release --bins)"),
    );
    wait_for_port(target_port);
    let base = format!("http://127.0.0.1:{target_port}");
    line(format!(
        "vantage probe benchmark — {} cores, target demo-target on {base}, {} s per level",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.seconds
    ));

    // 1. Timing accuracy.
    line(String::new());
    line(
        "timing accuracy: measured first-byte time minus injected delay (sequential probes)".into(),
    );
    line(format!(
        "{:>10} {:>8} {:>12} {:>12}",
        "delay ms", "probes", "err p50 ms", "err p99 ms"
    ));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for delay in [0u64, 10, 100] {
        let target = Target::for_url(1, &format!("{base}/?delay_ms={delay}")).expect("target");
        let prober = Prober::new();
        let mut errors: Vec<f64> = runtime.block_on(async {
            let mut v = Vec::new();
            for _ in 0..args.samples {
                let m = prober.probe(&target).await;
                if let Some(ttfb) = m.ttfb_us {
                    v.push(f64::from(ttfb) / 1000.0 - delay as f64);
                }
            }
            v
        });
        errors.sort_by(f64::total_cmp);
        line(format!(
            "{:>10} {:>8} {:>12.3} {:>12.3}",
            delay,
            errors.len(),
            percentile(&errors, 0.5),
            percentile(&errors, 0.99)
        ));
    }

    // 2. vantage throughput.
    let duration = Duration::from_secs(args.seconds);
    let url = format!("{base}/");
    let ours: Vec<Level> = LEVELS
        .iter()
        .map(|&c| vantage_level(&url, c, duration))
        .collect();

    // 3. blackbox_exporter, same target, same concurrency.
    let theirs: Option<Vec<Level>> = args.blackbox.as_ref().map(|bin| {
        let dir = std::env::temp_dir().join(format!("vantage-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = dir.join("blackbox.yml");
        std::fs::write(
            &config,
            "modules:\n  http_2xx:\n    prober: http\n    timeout: 5s\n    http:\n      preferred_ip_protocol: ip4\n",
        )
        .expect("write blackbox config");
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start blackbox_exporter");
        let pid = child.id();
        let _bb = KillOnDrop(child);
        wait_for_port(port);
        let levels = LEVELS
            .iter()
            .map(|&c| blackbox_level(port, pid, &url, c, duration))
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        levels
    });

    line(String::new());
    line("throughput: new connection per probe, GET of a 51-byte page".into());
    line(format!(
        "{:<16} {:>6} {:>10} {:>9} {:>16}",
        "prober", "conc", "probes/s", "failed", "CPU s/1000 probes"
    ));
    let mut show = |name: &str, l: &Level| {
        line(format!(
            "{:<16} {:>6} {:>10.0} {:>9} {:>16.3}",
            name,
            l.concurrency,
            l.rate(),
            l.failures,
            l.cpu_per_1000()
        ))
    };
    for l in &ours {
        show("vantage", l);
    }
    if let Some(theirs) = &theirs {
        for l in theirs {
            show("blackbox_exporter", l);
        }
        line(String::new());
        line("ratios (vantage / blackbox_exporter): probes per second, CPU per probe".into());
        for (o, t) in ours.iter().zip(theirs) {
            line(format!(
                "  concurrency {:>4}: rate x{:.2}, CPU per probe x{:.2}",
                o.concurrency,
                o.rate() / t.rate().max(f64::MIN_POSITIVE),
                o.cpu_per_1000() / t.cpu_per_1000().max(f64::MIN_POSITIVE)
            ));
        }
    } else {
        line("(blackbox_exporter not measured: pass --blackbox PATH)".into());
    }

    if let Some(dir) = args.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&args.out, &report) {
        Ok(()) => println!("\nwritten to {}", args.out.display()),
        Err(e) => eprintln!("cannot write {}: {e}", args.out.display()),
    }
}
