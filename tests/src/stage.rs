//! Ingester stages as real processes (`vantage-ingester bridge|sink`), so tests can `kill -9`
//! them; and the service restarts of `tests/services/lib.sh`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A binary of this workspace built beside the running executable: `VANTAGE_<NAME>_BIN` if set,
/// else `<dir of current exe>/<name>` or its parent (test executables live in `deps/`).
///
/// # Panics
/// If the binary is not there; build it first (`cargo build --bins`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let var = format!("VANTAGE_{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Ok(path) = std::env::var(&var) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "{name} not found beside {} (build it first: cargo build --bins, or set {var})",
        exe.display()
    );
}

/// `vantage-agent run --config <config>`, stdin closed, stdout discarded, stderr (its log)
/// into `log`; the caller adds environment variables and spawns it.
pub fn agent_command(config: &Path, log: &Path) -> Command {
    let mut c = Command::new(workspace_bin("vantage-agent"));
    c.args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("create the agent's log file"));
    c
}

/// `vantage-ingester <command> --config <config> <rest>`, run to its end.
pub fn ingester_command(config: &Path, command: &[&str], rest: &[&str]) -> std::process::Output {
    Command::new(workspace_bin("vantage-ingester"))
        .args(command)
        .arg("--config")
        .arg(config)
        .args(rest)
        .output()
        .expect("run vantage-ingester")
}

/// [`ingester_command`], which must exit with `code`; its stdout.
pub fn ingester_stdout(config: &Path, command: &[&str], rest: &[&str], code: i32) -> String {
    let out = ingester_command(config, command, rest);
    assert_eq!(
        out.status.code(),
        Some(code),
        "vantage-ingester {command:?}: {out:?}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One `vantage-ingester <stage>` process, its stderr in a log file.
pub struct StageProcess {
    pub name: String,
    pub stage: String,
    config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    /// Times this stage was started.
    pub starts: u32,
}

/// The sink and the bridge of `config` as processes (named `sink` and `bridge`, logs in
/// `dir`), once the bridge has subscribed (within 60 s): MQTT keeps nothing for a subscriber
/// that never subscribed.
pub async fn sink_and_bridge(config: &Path, dir: &Path) -> (StageProcess, StageProcess) {
    let sink = StageProcess::start("sink", "sink", config, dir);
    let bridge = StageProcess::start("bridge", "bridge", config, dir);
    assert!(
        bridge
            .wait_log("subscribed", 1, Duration::from_secs(60))
            .await,
        "bridge did not subscribe:\n{}",
        bridge.log_text()
    );
    (sink, bridge)
}

impl StageProcess {
    /// Starts `vantage-ingester <stage> --config <config>`; logs go to `<dir>/<name>.log`.
    pub fn start(name: &str, stage: &str, config: &Path, dir: &Path) -> StageProcess {
        let mut s = StageProcess {
            name: name.to_owned(),
            stage: stage.to_owned(),
            config: config.to_owned(),
            log: dir.join(format!("{name}.log")),
            child: None,
            starts: 0,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open stage log");
        let child = Command::new(workspace_bin("vantage-ingester"))
            .arg(&self.stage)
            .arg("--config")
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("VANTAGE_STAGE_LOG")
                    .unwrap_or_else(|_| "info,rdkafka=warn,tokio_postgres=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start vantage-ingester");
        self.child = Some(child);
        self.starts += 1;
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9`: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again (after [`StageProcess::kill9`]).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// SIGTERM, then waits up to `timeout` for the exit; returns the exit code (None: killed
    /// after the timeout, or by a signal).
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many log lines contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The address of the stage's HTTP endpoint, as it logged it (`http listening ...
    /// addr=...`); waits up to 60 s for the line.
    ///
    /// # Panics
    /// If the stage did not log it in time.
    pub async fn http_addr(&self) -> SocketAddr {
        assert!(
            self.wait_log("http listening", 1, Duration::from_secs(60))
                .await,
            "{} did not start its http endpoint:\n{}",
            self.name,
            self.log_text()
        );
        let text = self.log_text();
        let line = text.lines().find(|l| l.contains("http listening")).unwrap();
        let addr = line
            .split("addr=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        addr.parse().unwrap()
    }

    /// Waits until the log has at least `n` lines containing `needle`.
    pub async fn wait_log(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log_count(needle) >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

impl Drop for StageProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// GET `path` on `addr`; (status, body), `(0, "")` if nothing answers. The stages' endpoint
/// closes each connection after one answer.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

/// The services script folder (`tests/services`).
pub fn services_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("services")
}

/// Runs `tests/services/up` (idempotent: starts whatever is down, waits until all answer).
pub fn services_up() -> Result<(), String> {
    let mut up = Command::new("bash");
    up.arg(services_dir().join("up"));
    run_script(up, "tests/services/up")
}

/// Runs `commands` after sourcing `tests/services/lib.sh` (and its `check_ports`).
fn lib_sh(commands: &str, what: &str) -> Result<(), String> {
    let script = format!(
        "set -euo pipefail; source '{}'; check_ports; {commands}",
        services_dir().join("lib.sh").display(),
    );
    let mut bash = Command::new("bash");
    bash.args(["-c", &script]);
    run_script(bash, what)
}

/// Runs `script` to its end; an error naming `what` with its output unless it exits 0.
fn run_script(mut script: Command, what: &str) -> Result<(), String> {
    let out = script
        .output()
        .map_err(|e| format!("cannot start the script for {what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A service of `tests/services/lib.sh`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Postgres,
    Mosquitto,
    Kafka,
}

impl Service {
    fn lib_fn(self) -> &'static str {
        match self {
            Service::Postgres => "down_postgres",
            Service::Mosquitto => "down_mosquitto",
            Service::Kafka => "down_kafka",
        }
    }
}

/// Stops one service gracefully with the script's own function (PostgreSQL: `pg_ctl stop -m
/// fast`; Mosquitto and Kafka: SIGTERM, so both write their state), under the script's lock.
pub fn service_down(service: Service) -> Result<(), String> {
    lib_sh(
        &format!("lock_state_dir; {}", service.lib_fn()),
        &format!("stopping {service:?}"),
    )
}

/// Stops `service`, keeps it down for `down_for`, then brings everything up again.
pub async fn restart_service(service: Service, down_for: Duration) -> Result<Duration, String> {
    outage(service_down, service, down_for).await
}

/// [`service_down`] off the runtime's threads.
pub async fn service_down_async(service: Service) -> Result<(), String> {
    blocking(move || service_down(service)).await
}

/// [`services_up`] off the runtime's threads.
pub async fn services_up_async() -> Result<(), String> {
    blocking(services_up).await
}

/// Runs the blocking `f` (a `tests/services` script) on tokio's blocking threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
}

/// `stop` of `service` (a clean stop or `kill -9`), `down_for` of nothing, then everything up
/// again; how long until everything answered.
async fn outage<T: Send + 'static>(
    stop: fn(Service) -> Result<T, String>,
    service: Service,
    down_for: Duration,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    blocking(move || stop(service)).await?;
    tokio::time::sleep(down_for).await;
    services_up_async().await?;
    Ok(t0.elapsed())
}

/// The state folder of `tests/services` (`VANTAGE_STATE_DIR`).
fn state_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("VANTAGE_STATE_DIR").unwrap_or_else(|_| "/var/tmp/vantage-services".into()),
    )
}

/// The number on the first line of `file` under the state folder (a pid file).
fn pid_in(file: &str) -> Option<u32> {
    let text = std::fs::read_to_string(state_dir().join(file)).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// Processes whose parent is `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            // /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split
            // after the last ')'.
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|st| {
                    let rest = st.rsplit_once(')')?.1.to_owned();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Whether `pid` is gone (or a zombie waiting for its parent: it runs no code any more).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(st) => st
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// `kill -9` of a service of `tests/services`: no shutdown code runs, nothing is written that
/// was not written already. PostgreSQL: the postmaster and every process it started at once,
/// as a crash leaves them (a lone postmaster's backends would live on). Returns the pids.
pub fn kill9_service(service: Service) -> Result<Vec<u32>, String> {
    let pids = match service {
        Service::Kafka => vec![kafka_pid().ok_or("no Kafka pid file")?],
        Service::Mosquitto => {
            vec![pid_in("mosquitto/mosquitto.pid").ok_or("no Mosquitto pid file")?]
        }
        Service::Postgres => {
            let postmaster =
                pid_in("postgres/data/postmaster.pid").ok_or("no PostgreSQL postmaster.pid")?;
            let mut pids = vec![postmaster];
            pids.extend(children_of(postmaster));
            pids
        }
    };
    // kill(1) exits 1 when any pid has already exited (a PostgreSQL backend ending between the
    // listing above and the kill): that is not a failure. What counts is below: every pid gone.
    Command::new("kill")
        .arg("-KILL")
        .args(pids.iter().map(u32::to_string))
        .status()
        .map_err(|e| format!("kill: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids.iter().all(|&p| gone(p)) {
        if Instant::now() > deadline {
            return Err(format!(
                "{service:?}: {pids:?} still alive 10 s after kill -9"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(pids)
}

/// `kill -9` of `service`, `down_for` of nothing, then `tests/services/up` (PostgreSQL runs
/// crash recovery, Kafka log recovery, Mosquitto reloads its last saved database). Returns how
/// long until everything answered again.
pub async fn crash_service(service: Service, down_for: Duration) -> Result<Duration, String> {
    outage(kill9_service, service, down_for).await
}

/// Makes Mosquitto write its persistence database now (SIGUSR1), as its periodic autosave
/// (`autosave_interval`) does, and waits a moment for the write.
pub fn mosquitto_save() -> Result<(), String> {
    let pid = pid_in("mosquitto/mosquitto.pid").ok_or("no Mosquitto pid file")?;
    let status = Command::new("kill")
        .args(["-USR1", &pid.to_string()])
        .status()
        .map_err(|e| format!("kill: {e}"))?;
    if !status.success() {
        return Err(format!("kill -USR1 {pid} failed"));
    }
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

/// Makes sure every service is up when dropped (also when a test panics half-way through a
/// restart): other tests share them.
pub struct ServicesGuard;

impl Drop for ServicesGuard {
    fn drop(&mut self) {
        if let Err(e) = services_up() {
            eprintln!("WARNING: could not bring the services back up: {e}");
        }
    }
}

/// Unregisters the test Kafka's broker (id 1) from its KRaft controller with Kafka's own
/// `kafka-cluster unregister`: the broker keeps running and serving requests, but its metadata
/// answers list no broker, as a broker in controlled shutdown answers for a moment before it
/// stops. It stays so until Kafka restarts (and cannot finish a graceful stop meanwhile:
/// restart it with [`crash_service`]).
pub fn kafka_unregister_broker() -> Result<(), String> {
    lib_sh(
        "find_java >/dev/null; kafka_tool org.apache.kafka.tools.ClusterTool unregister \
         --bootstrap-server \"$HOST:$KAFKA_PORT\" --id 1",
        "kafka-cluster unregister",
    )
}

/// The pid of the running Kafka of `tests/services` (`$VANTAGE_STATE_DIR/kafka/kafka.pid`).
pub fn kafka_pid() -> Option<u32> {
    pid_in("kafka/kafka.pid")
}

/// A process stopped with SIGSTOP (frozen: connections stay open, nothing is answered) until
/// this is dropped, which sends SIGCONT; also when a test panics.
pub struct Frozen(u32);

impl Frozen {
    pub fn freeze(pid: u32) -> Frozen {
        let _ = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status();
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}
