//! The Raspberry Pi builds, end to end: the `vantage-agent` binaries from the arm64 (aarch64
//! musl, static) and armhf (armv7 gnueabihf) packages run under qemu-user, probe local HTTP and
//! HTTPS targets, and their results reach PostgreSQL through the real Mosquitto → bridge → Kafka
//! → sink pipeline. The packages themselves are checked too: files, modes, conffiles, maintainer
//! scripts, the systemd unit (valid, hardened), and an upgrade that keeps a locally edited config.
//!
//! Needs the test packages that `make cross-test-build` writes to
//! `$CROSS_TARGET_DIR/deb-test` (default `target/cross/deb-test`; `make test` builds them
//! first), qemu-user-static and dpkg (`cross/install`), and for the end-to-end test the services
//! of `tests/services/up`. The pipeline part follows `tests/pipeline.rs`: its own topic prefix,
//! Kafka topics, group and schema, removed at the end.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;
use vantage_tests::deb::{
    add_system_units, exposure, lacking, run, stdout, verify_complaints, DpkgRoot, Scratch,
};
use vantage_tests::in_process::{count_results, start_sink_and_bridge, wait_results_then_settle};
use vantage_tests::target::TargetServer;
use vantage_tests::tls::TestCa;
use vantage_tests::{unique_id, Services};

const ROUNDS: u64 = 3;
/// Targets per agent: HTTP up with a regex match, HTTP 404, HTTPS up (test CA).
const TARGETS: u64 = 3;

/// One Debian architecture of the agent package and how to run its binary here.
#[derive(Clone, Copy, Debug)]
struct Arch {
    deb: &'static str,
    region: &'static str,
    /// ELF `e_machine`: 183 AArch64, 40 ARM.
    machine: u16,
    /// The static musl build must have no program interpreter.
    static_binary: bool,
    qemu: &'static str,
    /// Where qemu finds the dynamic loader and libraries of a non-static binary.
    sysroot: Option<&'static str>,
}

const ARCHES: [Arch; 2] = [
    Arch {
        deb: "arm64",
        region: "pi-arm64",
        machine: 183,
        static_binary: true,
        qemu: "qemu-aarch64-static",
        sysroot: None,
    },
    Arch {
        deb: "armhf",
        region: "pi-armhf",
        machine: 40,
        static_binary: false,
        qemu: "qemu-arm-static",
        sysroot: Some("/usr/arm-linux-gnueabihf"),
    },
];

impl Arch {
    /// `qemu-… [-L sysroot] <bin>` as a command, arguments to follow.
    fn command(&self, bin: &Path) -> Command {
        let mut c = Command::new(self.qemu);
        if let Some(root) = self.sysroot {
            c.arg("-L").arg(root);
        }
        c.arg(bin);
        c
    }
}

fn deb_dir() -> PathBuf {
    let cross = std::env::var_os("CROSS_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cross"));
    cross.join("deb-test")
}

/// The test package for `arch`, or a failure that says how to make it.
fn deb(arch: &Arch) -> PathBuf {
    let dir = deb_dir();
    let found = std::fs::read_dir(&dir).ok().and_then(|entries| {
        entries.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(&format!("_{}.deb", arch.deb)))
        })
    });
    found.unwrap_or_else(|| {
        panic!(
            "no {} package in {}: run `make cross-test-build` (make test does)",
            arch.deb,
            dir.display()
        )
    })
}

/// Unpacks the package's files into `dir` and returns the agent binary in it.
fn unpack(deb: &Path, dir: &Path) -> PathBuf {
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir));
    dir.join("usr/bin/vantage-agent")
}

/// (e_machine, has a PT_INTERP program header) of an ELF file.
fn elf_machine_and_interp(path: &Path) -> (u16, bool) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..4], b"\x7fELF", "{} is not ELF", path.display());
    assert_eq!(b[5], 1, "little-endian");
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = match b[4] {
        1 => (u32_at(0x1c) as usize, u16_at(0x2a), u16_at(0x2c)),
        2 => (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38)),
        c => panic!("ELF class {c}"),
    };
    const PT_INTERP: u32 = 3;
    let interp = (0..phnum as usize).any(|i| u32_at(phoff + i * phentsize as usize) == PT_INTERP);
    (u16_at(18), interp)
}

// ---------------------------------------------------------------------------------------------
// The packages
// ---------------------------------------------------------------------------------------------

#[test]
fn packages_have_the_expected_files_modes_and_fields() {
    for arch in &ARCHES {
        let deb = deb(arch);
        let field = |name: &str| {
            stdout(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name))
                .trim()
                .to_owned()
        };
        assert_eq!(field("Package"), "vantage-agent");
        assert_eq!(field("Architecture"), arch.deb);
        if arch.static_binary {
            assert_eq!(field("Depends"), "", "a static binary depends on nothing");
        } else {
            assert!(field("Depends").contains("libc6 (>= "), "{arch:?}");
        }

        // Every path with its mode and owner, directories included.
        let listing = stdout(Command::new("dpkg-deb").arg("-c").arg(&deb));
        let mut entries: Vec<(String, String, String)> = listing
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[5].to_owned(), f[0].to_owned(), f[1].to_owned())
            })
            .collect();
        entries.sort();
        let files: Vec<(&str, &str)> = entries
            .iter()
            .filter(|(_, mode, _)| mode.starts_with('-'))
            .map(|(p, m, _)| (p.as_str(), m.as_str()))
            .collect();
        assert_eq!(
            files,
            [
                ("./etc/vantage/agent.toml", "-rw-r--r--"),
                ("./lib/systemd/system/vantage-agent.service", "-rw-r--r--"),
                ("./usr/bin/vantage-agent", "-rwxr-xr-x"),
                (
                    "./usr/share/doc/vantage-agent/agent.example.toml",
                    "-rw-r--r--"
                ),
                ("./usr/share/doc/vantage-agent/copyright", "-rw-r--r--"),
            ],
            "{arch:?}"
        );
        for (path, mode, owner) in &entries {
            assert_eq!(owner, "root/root", "{path}");
            if mode.starts_with('d') {
                assert_eq!(mode, "drwxr-xr-x", "{path}");
            }
        }

        // Control area: the config is a conffile; maintainer scripts are executable shell.
        let scratch = Scratch::new("control");
        run(Command::new("dpkg-deb")
            .arg("-e")
            .arg(&deb)
            .arg(scratch.0.join("DEBIAN")));
        let control = scratch.0.join("DEBIAN");
        assert_eq!(
            std::fs::read_to_string(control.join("conffiles")).unwrap(),
            "/etc/vantage/agent.toml\n"
        );
        for script in ["preinst", "postinst", "prerm", "postrm"] {
            let path = control.join(script);
            let mode = std::fs::metadata(&path).unwrap().permissions();
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
                0o755,
                "{script}"
            );
            run(Command::new("sh").arg("-n").arg(&path));
        }

        // The binary is for the package's architecture (and static where it should be).
        let files = Scratch::new("files");
        let bin = unpack(&deb, &files.0);
        let (machine, interp) = elf_machine_and_interp(&bin);
        assert_eq!(machine, arch.machine, "{arch:?}");
        assert_eq!(interp, !arch.static_binary, "{arch:?}: program interpreter");
    }
}

/// The unit passes `systemd-analyze verify` and scores well on `systemd-analyze security`, and
/// has each hardening setting the deployment promises.
#[test]
fn systemd_unit_is_valid_and_hardened() {
    let files = Scratch::new("unit");
    unpack(&deb(&ARCHES[0]), &files.0);
    let root = &files.0;
    let unit = root.join("lib/systemd/system/vantage-agent.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    let missing = lacking(
        &text,
        &[
            "ExecStart=/usr/bin/vantage-agent run --config /etc/vantage/agent.toml",
            "Restart=on-failure",
            "DynamicUser=yes",
            "StateDirectory=vantage",
            "CapabilityBoundingSet=",
            "AmbientCapabilities=",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "LoadCredential=mqtt.pw:/etc/vantage/mqtt.pw",
            "WantedBy=multi-user.target",
        ],
    );
    assert!(missing.is_empty(), "unit lacks {missing:?}");

    add_system_units(root);
    let complaints = verify_complaints(root, "/lib/systemd/system/vantage-agent.service");
    assert!(
        !complaints.contains("vantage-agent"),
        "systemd-analyze verify: {complaints}"
    );
    let exposure = exposure(root, "vantage-agent.service");
    println!("systemd-analyze security: exposure {exposure}");
    assert!(exposure <= 2.0, "exposure {exposure}");
}

/// `dpkg --root` into a scratch root: install, edit the config, upgrade twice (same and changed
/// packaged config), remove, purge.
#[test]
fn upgrade_keeps_the_edited_config_and_purge_removes_state() {
    let deb1 = deb(&ARCHES[0]);
    let scratch = Scratch::new("dpkg");
    let db = DpkgRoot::new(scratch.0.join("root"));
    let root = db.root.clone();
    let dpkg = |args: &[&str]| db.dpkg(args);
    // A later version of the same package, optionally with a changed packaged config.
    let repack = |version: &str, new_config: Option<&str>| {
        let tree = scratch.0.join(format!("tree-{version}"));
        run(Command::new("dpkg-deb").arg("-R").arg(&deb1).arg(&tree));
        let control = tree.join("DEBIAN/control");
        let text = std::fs::read_to_string(&control).unwrap();
        let text: String = text
            .lines()
            .map(|l| {
                if l.starts_with("Version:") {
                    format!("Version: {version}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(&control, text).unwrap();
        if let Some(extra) = new_config {
            let conf = tree.join("etc/vantage/agent.toml");
            let mut text = std::fs::read_to_string(&conf).unwrap();
            text.push_str(extra);
            std::fs::write(&conf, text).unwrap();
        }
        let out = scratch.0.join(format!("vantage-agent_{version}.deb"));
        run(Command::new("dpkg-deb")
            .arg("--root-owner-group")
            .arg("-b")
            .arg(&tree)
            .arg(&out));
        out
    };
    let conf = root.join("etc/vantage/agent.toml");
    let packaged = std::fs::read_to_string(&conf).unwrap_or_default();
    assert!(packaged.is_empty(), "fresh root");

    dpkg(&["-i", deb1.to_str().unwrap()]);
    assert!(root.join("usr/bin/vantage-agent").is_file());
    let edited = std::fs::read_to_string(&conf)
        .unwrap()
        .replace("agent_id = \"pi-kitchen\"", "agent_id = \"pi-edited-here\"");
    std::fs::write(&conf, &edited).unwrap();

    // Same packaged config: the local edit stays, silently.
    dpkg(&["-i", repack("99.0.0-1", None).to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), edited);

    // Changed packaged config: dpkg would ask; unattended (confdef/confold) it keeps the edit and
    // puts the new version beside it.
    dpkg(&[
        "--force-confdef",
        "--force-confold",
        "-i",
        repack("99.0.1-1", Some("# new in 99.0.1\n"))
            .to_str()
            .unwrap(),
    ]);
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), edited);
    let dist = std::fs::read_to_string(root.join("etc/vantage/agent.toml.dpkg-dist")).unwrap();
    assert!(dist.ends_with("# new in 99.0.1\n"));
    let status = db.status("vantage-agent");
    assert_eq!(status, "99.0.1-1 install ok installed");

    // Remove keeps the config; purge removes it and the state the service left behind.
    std::fs::create_dir_all(root.join("var/lib/private/vantage")).unwrap();
    std::fs::write(root.join("var/lib/private/vantage/targets"), "x").unwrap();
    std::fs::write(root.join("etc/vantage/mqtt.pw"), "secret").unwrap();
    dpkg(&["--remove", "vantage-agent"]);
    assert!(!root.join("usr/bin/vantage-agent").exists());
    assert!(conf.exists(), "remove keeps conffiles");
    dpkg(&["--purge", "vantage-agent"]);
    assert!(!conf.exists());
    assert!(!root.join("var/lib/private/vantage").exists());
    assert!(!root.join("etc/vantage").exists());
}

/// The packaged /etc/vantage/agent.toml is accepted by the packaged binary (only the password
/// path changed: the systemd credential does not exist outside the service).
#[test]
fn packaged_config_passes_check_config_on_arm() {
    for arch in &ARCHES {
        let files = Scratch::new("config");
        let bin = unpack(&deb(arch), &files.0);
        let pw = files.0.join("mqtt.pw");
        std::fs::write(&pw, "secret\n").unwrap();
        let conf = files.0.join("etc/vantage/agent.toml");
        let text = std::fs::read_to_string(&conf).unwrap();
        let credential = "/run/credentials/vantage-agent.service/mqtt.pw";
        assert!(text.contains(credential));
        std::fs::write(&conf, text.replace(credential, pw.to_str().unwrap())).unwrap();
        let out = stdout(arch.command(&bin).arg("check-config").arg(&conf));
        assert!(out.contains(": ok (agent pi-kitchen"), "{arch:?}: {out}");
    }
}

// ---------------------------------------------------------------------------------------------
// End to end: ARM agents under qemu-user → Mosquitto → bridge → Kafka → sink → PostgreSQL
// ---------------------------------------------------------------------------------------------

struct Pipeline {
    id: String,
    dir: Scratch,
    services: Services,
}

impl Pipeline {
    fn prefix(&self) -> String {
        format!("arm{}", self.id)
    }
    fn schema(&self) -> String {
        format!("arm_{}", self.id)
    }
    fn topic(&self) -> String {
        format!("vantage.arm-results.{}", self.id)
    }
    fn dead_letter_topic(&self) -> String {
        format!("vantage.arm-dead-letter.{}", self.id)
    }

    fn secret(&self, name: &str, value: &str) -> PathBuf {
        let path = self.dir.0.join(name);
        std::fs::write(&path, value).unwrap();
        path
    }

    fn ingester_config(&self) -> vantage_ingester::Config {
        let s = &self.services;
        let text = format!(
            r#"
[mqtt]
host = "{mqtt_host}"
port = {mqtt_port}
username = "ingester"
password_file = "{pw}"
client_id = "arm-bridge-{id}"
topic_prefix = "{prefix}"

[kafka]
brokers = "{brokers}"
topic = "{topic}"
dead_letter_topic = "{dlq}"
group_id = "arm-sink-{id}"
partitions = 1
replication_factor = 1
min_insync_replicas = 1

[postgres]
{pg}
schema = "{schema}"

[sink]
batch_max = 50
batch_timeout = "100ms"
"#,
            mqtt_host = s.mqtt_host,
            mqtt_port = s.mqtt_port,
            pw = self.secret("ingester.pw", "ingester-secret").display(),
            id = self.id,
            prefix = self.prefix(),
            brokers = s.kafka_brokers,
            topic = self.topic(),
            dlq = self.dead_letter_topic(),
            pg = s.pg_toml_plain(&self.dir.0),
            schema = self.schema(),
        );
        let path = self.dir.0.join("ingester.toml");
        std::fs::write(&path, &text).unwrap();
        vantage_ingester::Config::load(&path).unwrap()
    }

    /// The agent's config file for `arch`: an HTTP target that matches its regex, an HTTP 404,
    /// and an HTTPS target whose certificate comes from `ca_pem` (ring's ARM code on the path).
    fn agent_config(
        &self,
        arch: &Arch,
        http: &TargetServer,
        https: &TargetServer,
        ca_pem: &Path,
    ) -> PathBuf {
        let s = &self.services;
        // The spool (uplink.spool_max_bytes) lives in state_dir: this run's folder.
        let spool_state_dir = self.dir.0.display();
        let text = format!(
            r#"
agent_id = "{region}-{id}"
region = "{region}"
state_dir = "{spool_state_dir}"

[mqtt]
host = "{mqtt_host}"
port = {mqtt_port}
username = "agent"
password_file = "{pw}"
topic_prefix = "{prefix}"

[uplink]
batch_max = 4
flush_interval = "200ms"

# Generous timeouts: under qemu on a busy two-core machine a TLS probe with its regex check (now
# inside the deadline) can take over a second. interval > timeout: a probe still running when its
# target is due again is skipped (one probe in flight per target).
[[targets]]
id = 1
url = "{t1}"
interval = "6s"
timeout = "5s"
regex = "target: ok"

[[targets]]
id = 2
url = "{t2}"
interval = "6s"
timeout = "5s"

[[targets]]
id = 3
url = "{t3}"
interval = "6s"
timeout = "5s"
regex = "target: ok"
ca_file = "{ca}"
ip_family = "ipv4"
"#,
            region = arch.region,
            id = self.id,
            mqtt_host = s.mqtt_host,
            mqtt_port = s.mqtt_port,
            pw = self.secret("agent.pw", "agent-secret").display(),
            prefix = self.prefix(),
            t1 = http.url("/"),
            t2 = http.url("/missing?status=404"),
            t3 = https.url_with_host("localhost", "/"),
            ca = ca_pem.display(),
        );
        let path = self.dir.0.join(format!("agent-{}.toml", arch.deb));
        std::fs::write(&path, &text).unwrap();
        path
    }
}

async fn pg(p: &Pipeline) -> tokio_postgres::Client {
    p.services.pg(&p.schema()).await
}

async fn cleanup(p: &Pipeline) {
    let client = pg(p).await;
    let _ = client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", p.schema()))
        .await;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &p.services.kafka_brokers)
        .create()
        .unwrap();
    let _ = admin
        .delete_topics(&[&p.topic(), &p.dead_letter_topic()], &AdminOptions::new())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn arm_agents_under_qemu_reach_postgres_exactly_once() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let p = Pipeline {
        id: unique_id(),
        dir: Scratch::new("e2e"),
        services: Services::from_env(),
    };
    let bins: Vec<(Arch, PathBuf)> = ARCHES
        .iter()
        .map(|arch| {
            let dir = p.dir.0.join(arch.deb);
            (*arch, unpack(&deb(arch), &dir))
        })
        .collect();

    let http = TargetServer::start("127.0.0.1:0").await.unwrap();
    let ca = TestCa::new();
    let ca_pem = p.dir.0.join("ca.pem");
    ca.write_pem(&ca_pem);
    let leaf = ca.leaf(&["localhost"], (2020, 1, 1), (2099, 1, 1));
    let https = TargetServer::start_tls("127.0.0.1:0", leaf.server_config())
        .await
        .unwrap();

    let ingester = Arc::new(p.ingester_config());
    let stop = CancellationToken::new();
    let stages = start_sink_and_bridge(&ingester, &stop).await;

    // Both emulated agents at once, each a child process: `qemu-… vantage-agent run --rounds`.
    let agents: Vec<_> = bins
        .iter()
        .map(|(arch, bin)| {
            let config = p.agent_config(arch, &http, &https, &ca_pem);
            let mut cmd = tokio::process::Command::from(arch.command(bin));
            cmd.arg("run")
                .arg("--config")
                .arg(&config)
                .arg("--rounds")
                .arg(ROUNDS.to_string())
                .env("RUST_LOG", "info")
                .kill_on_drop(true);
            let arch = *arch;
            async move {
                let started = Instant::now();
                let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
                    .await
                    .unwrap_or_else(|_| panic!("{arch:?}: agent still running after 120 s"))
                    .unwrap();
                let log = String::from_utf8_lossy(&out.stderr).into_owned();
                assert!(out.status.success(), "{arch:?}: {}\n{log}", out.status);
                println!(
                    "{}: agent ran {:.1?} under {}",
                    arch.deb,
                    started.elapsed(),
                    arch.qemu
                );
                log
            }
        })
        .collect();
    let logs = futures::future::join_all(agents).await;
    for log in &logs {
        let want = format!("results: {}", TARGETS * ROUNDS);
        assert!(
            log.contains(&want),
            "expected `{want}` in the summary:\n{log}"
        );
        assert!(log.contains("undelivered: 0"), "{log}");
    }

    let expected = (ARCHES.len() as u64 * TARGETS * ROUNDS) as i64;
    let client = pg(&p).await;
    wait_results_then_settle(&client, expected).await;
    let (bridge_stats, _) = stages.stop(&stop).await;

    assert_eq!(count_results(&client).await, expected);
    assert_eq!(bridge_stats.dead_lettered, 0, "{bridge_stats:?}");
    let rows = client
        .query(
            "SELECT region, agent, target_id, status, outcome, regex_match,
                    tls_us IS NOT NULL, cert_not_after IS NOT NULL, count(*),
                    count(DISTINCT (boot_id, seq))
               FROM results GROUP BY 1, 2, 3, 4, 5, 6, 7, 8 ORDER BY 1, 3",
            &[],
        )
        .await
        .unwrap();
    type Row = (
        String,
        String,
        i32,
        Option<i16>,
        String,
        Option<bool>,
        bool,
        bool,
        i64,
        i64,
    );
    let got: Vec<Row> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
                r.get(8),
                r.get(9),
            )
        })
        .collect();
    let n = ROUNDS as i64;
    let mut want: Vec<Row> = Vec::new();
    for arch in &ARCHES {
        let (region, agent) = (arch.region.to_owned(), format!("{}-{}", arch.region, p.id));
        #[rustfmt::skip]
        want.extend([
            (region.clone(), agent.clone(), 1, Some(200), "up".into(), Some(true), false, false, n, n),
            (region.clone(), agent.clone(), 2, Some(404), "status_not_accepted".into(), None, false, false, n, n),
            (region, agent, 3, Some(200), "up".into(), Some(true), true, true, n, n),
        ]);
    }
    assert_eq!(got, want);

    cleanup(&p).await;
}
