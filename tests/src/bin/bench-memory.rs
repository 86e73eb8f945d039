//! The body-memory benchmark (issue #13 item 3). Not a test: it prints figures and writes them
//! to a file. Run it with `bench/memory`.
//!
//! A local server answers every request with a 5 MB text body, all of it but the last byte at
//! once; the last byte waits until every probe of the round holds its body (or two seconds have
//! passed), so the agent really has 64 bodies of 5 MB in memory at the same moment when
//! nothing stops it. The real `vantage-agent` (a process of its own, so its RSS is its own)
//! probes 64 targets on that server once (`run --rounds 1`, targets picked so that they are all
//! due in the first half second), with a regex (so the body is kept for the check) and
//! `body_cap = 5 MiB`:
//!
//! 1. without a budget (`probes.memory_budget = "64GiB"`, what the agent did before it had one);
//! 2. with the default budget (128 MiB);
//! 3. with the default budget and no regex (bodies are not kept).
//!
//! Peak RSS is the agent's `VmHWM` (/proc/<pid>/status), sampled until it exits; the server
//! counts how many bodies were held at once.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
#[command(about = "Peak RSS of vantage-agent under 64 concurrent 5 MB bodies")]
struct Args {
    /// The vantage-agent binary (release build).
    #[arg(long, default_value = "target/release/vantage-agent")]
    agent: PathBuf,
    /// Targets (concurrent bodies).
    #[arg(long, default_value_t = 64)]
    targets: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 5_000_000)]
    size: usize,
    /// Where to write the figures.
    #[arg(long, default_value = "target/bench/memory.txt")]
    out: PathBuf,
}

/// How many connections hold all but the last byte of their body right now, and at most.
#[derive(Default)]
struct Holding {
    now: AtomicUsize,
    most: AtomicUsize,
    served: AtomicUsize,
}

async fn serve(listener: tokio::net::TcpListener, size: usize, all: usize, h: Arc<Holding>) {
    let line = b"vantage memory benchmark: a line of plain text to fill the body.\n";
    let body: Arc<Vec<u8>> = Arc::new(line.iter().copied().cycle().take(size).collect());
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let (body, h) = (body.clone(), h.clone());
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n",
                body.len()
            );
            if s.write_all(head.as_bytes()).await.is_err()
                || s.write_all(&body[..body.len() - 1]).await.is_err()
            {
                return;
            }
            let now = h.now.fetch_add(1, Ordering::SeqCst) + 1;
            h.most.fetch_max(now, Ordering::SeqCst);
            // Hold until every probe holds its body, or for two seconds at most.
            let until = Instant::now() + Duration::from_secs(2);
            while h.now.load(Ordering::SeqCst) < all && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = s.write_all(&body[body.len() - 1..]).await;
            h.served.fetch_add(1, Ordering::SeqCst);
            h.now.fetch_sub(1, Ordering::SeqCst);
            let _ = s.shutdown().await;
        });
    }
}

/// VmHWM and VmRSS of `pid` in KiB (0 once it is gone).
fn hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

struct Case {
    name: &'static str,
    budget: &'static str,
    regex: bool,
}

struct Figures {
    peak_kib: u64,
    held_at_once: usize,
    served: usize,
    seconds: f64,
    summary: String,
}

async fn run_case(args: &Args, case: &Case, dir: &std::path::Path) -> Figures {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let holding = Arc::new(Holding::default());
    let server = tokio::spawn(serve(listener, args.size, args.targets, holding.clone()));
    // Targets all due within the first half second of their 30 s interval.
    let interval = Duration::from_secs(30);
    let ids: Vec<u32> = (1..)
        .filter(|&id| vantage_agent::scheduler::phase(id, interval) < Duration::from_millis(500))
        .take(args.targets)
        .collect();
    let services = vantage_tests::Services::from_env();
    let pw = dir.join("agent.pw");
    std::fs::write(&pw, "agent-secret").unwrap();
    let mut text = format!(
        "agent_id = \"bench-memory\"\nregion = \"bench\"\nstate_dir = \"{dir}\"\n\
         [mqtt]\nhost = \"{host}\"\nport = {port}\nusername = \"agent\"\npassword_file = \"{pw}\"\n\
         topic_prefix = \"bench-memory\"\n\
         [uplink]\ndrain_timeout = \"2s\"\n\
         [probes]\nmemory_budget = \"{budget}\"\n",
        dir = dir.display(),
        host = services.mqtt_host,
        port = services.mqtt_port,
        pw = pw.display(),
        budget = case.budget,
    );
    for id in &ids {
        text.push_str(&format!(
            "[[targets]]\nid = {id}\nurl = \"http://{addr}/{id}\"\ninterval = \"30s\"\n\
             timeout = \"30s\"\nbody_cap = {cap}\n{regex}",
            cap = 5 << 20,
            regex = if case.regex {
                "regex = \"memory benchmark\"\n"
            } else {
                ""
            },
        ));
    }
    let config = dir.join(format!("{}.toml", case.name));
    std::fs::write(&config, text).unwrap();
    let log = dir.join(format!("{}.log", case.name));
    let started = Instant::now();
    let mut child = Command::new(&args.agent)
        .args(["run", "--rounds", "1", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start vantage-agent");
    let pid = child.id();
    let mut peak = 0;
    let deadline = started + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        peak = peak.max(hwm_kib(pid));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    server.abort();
    let summary = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("agent stopped"))
        .map(|l| {
            let keep = [
                "probes_started",
                "skipped_no_memory",
                "probes_refused",
                "probes_aborted",
            ];
            l.split([',', '{', '}'])
                .map(str::trim)
                .filter(|f| keep.iter().any(|k| f.starts_with(k)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_else(|| "no summary line".into());
    Figures {
        peak_kib: peak,
        held_at_once: holding.most.load(Ordering::SeqCst),
        served: holding.served.load(Ordering::SeqCst),
        seconds: started.elapsed().as_secs_f64(),
        summary,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("vantage-bench-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        Case {
            name: "no-budget",
            budget: "64GiB",
            regex: true,
        },
        Case {
            name: "default-budget",
            budget: "128MiB",
            regex: true,
        },
        Case {
            name: "no-regex",
            budget: "128MiB",
            regex: false,
        },
    ];
    let mut out = format!(
        "bench-memory: vantage-agent ({}) probing {} targets once, each a {} byte text body \
         (body_cap 5 MiB), the server holding the last byte until all hold their body (2 s at \
         most). Peak RSS = VmHWM of the agent process.\n",
        args.agent.display(),
        args.targets,
        args.size
    );
    for case in &cases {
        let f = run_case(&args, case, &dir).await;
        let line = format!(
            "{:<15} memory_budget {:<7} regex {:<5}  peak RSS {:>7.1} MiB  bodies held at once {:>3}  served {:>3}  {:>5.1} s  ({})\n",
            case.name,
            case.budget,
            case.regex,
            f.peak_kib as f64 / 1024.0,
            f.held_at_once,
            f.served,
            f.seconds,
            f.summary,
        );
        print!("{line}");
        out.push_str(&line);
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&args.out, out).unwrap();
    println!("written to {}", args.out.display());
}
