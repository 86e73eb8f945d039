//! The binary's command line: `check-config` validates without connecting (good and bad files,
//! errors naming file and key), every subcommand has `--help` with an example, `--version`,
//! exit codes, and `--log-format json`.

use std::io::BufRead;
use std::process::{Command, Stdio};

#[path = "../../tests/src/cli.rs"]
mod cli;

const BIN: &str = env!("CARGO_BIN_EXE_vantage-ingester");

fn write(name: &str, text: &str) -> String {
    cli::scratch_file("vantage-ingester", name, text)
}

/// Points at ports where nothing listens: check-config must not try to connect.
const GOOD: &str = r#"
[mqtt]
host = "127.0.0.1"
port = 1
[kafka]
brokers = "127.0.0.1:1"
[postgres]
url = "host=127.0.0.1 port=1 user=vantage dbname=vantage"
[http]
bridge_listen = "0.0.0.0:9464"
sink_listen = "off"
"#;

/// (exit code, stdout, stderr) of `vantage-ingester ARGS`.
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    cli::run_with_env(BIN, args, &[])
}

#[test]
fn check_config_accepts_good_files() {
    let path = write("good.toml", GOOD);
    let (code, stdout, stderr) = run(&["check-config", &path]);
    assert_eq!(code, Some(0), "{stderr}");
    let first = stdout.lines().next().unwrap_or_default();
    assert_eq!(first, format!("{path}: valid"));
    assert!(stdout.contains("  sink           can run\n"), "{stdout}");
    // The shipped example too (with its password variables set).
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/ingester.example.toml");
    let passwords = [("VANTAGE_MQTT_PASSWORD", "x"), ("VANTAGE_PG_PASSWORD", "x")];
    let (code, stdout, stderr) = cli::run_with_env(BIN, &["check-config", example], &passwords);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
}

/// Issue #14 item 13: a valid file that lacks a section some command needs is not "ok": the
/// output says which commands can run and why the others cannot; `--stage` makes it fatal.
#[test]
fn check_config_says_which_commands_the_file_can_run() {
    let path = write(
        "bridge-only.toml",
        &GOOD.replace(
            "[postgres]\nurl = \"host=127.0.0.1 port=1 user=vantage dbname=vantage\"\n",
            "",
        ),
    );
    let (code, stdout, stderr) = run(&["check-config", &path]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stdout.contains(": ok"), "{stdout}");
    assert!(stdout.contains("  bridge         can run\n"), "{stdout}");
    assert!(
        stdout.contains("  sink           cannot run: no [postgres] section\n"),
        "{stdout}"
    );
    let (code, _, _) = run(&["check-config", "--stage", "bridge", &path]);
    assert_eq!(code, Some(0));
    let (code, _, stderr) = run(&[
        "check-config",
        "--stage",
        "bridge",
        "--stage",
        "sink",
        &path,
    ]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("cannot run sink"), "{stderr}");
}

#[test]
fn check_config_refuses_bad_files_naming_file_and_key() {
    let cases = &[
        (
            "unknown.toml",
            GOOD.replace("[kafka]", "[kafka]\nbrokerz = \"x\""),
            "brokerz",
        ),
        (
            "listen.toml",
            GOOD.replace("\"0.0.0.0:9464\"", "\"localhost:9464\""),
            "key `http.bridge_listen`",
        ),
        (
            "partition.toml",
            GOOD.replace(
                "port = 1\n[kafka]",
                "port = 1\npartition = \"2/2\"\n[kafka]",
            ),
            "key `mqtt.partition`",
        ),
        ("syntax.toml", "[mqtt\nhost=".to_owned(), "syntax.toml"),
    ];
    let unrefused = cli::unrefused_files(BIN, write, cases);
    assert!(unrefused.is_empty(), "{}", unrefused.join("\n"));
    let (code, _, stderr) = run(&["check-config", "/nonexistent/ingester.toml"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("/nonexistent/ingester.toml: cannot read"),
        "{stderr}"
    );
}

#[test]
fn every_subcommand_explains_itself() {
    let stdout = cli::checked_help(BIN, "vantage-ingester");
    let subcommands: Vec<String> = stdout
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect();
    assert!(subcommands.len() >= 7, "{subcommands:?}");
    for sub in &subcommands {
        let (code, stdout, stderr) = run(&[sub, "--help"]);
        assert_eq!(code, Some(0), "{sub}: {stderr}");
        assert!(
            stdout.contains("Example: vantage-ingester "),
            "{sub} --help has no example:\n{stdout}"
        );
        assert!(stdout.contains("--log-format"), "{sub}: {stdout}");
    }
    // A bad command line is exit code 2.
    assert_eq!(run(&["no-such-command"]).0, Some(2));
    // A stage that cannot start (its http port cannot be bound) is exit code 1.
    let path = write("bind.toml", &GOOD.replace("0.0.0.0:9464", "192.0.2.1:9464"));
    let (code, _, stderr) = run(&["bridge", "--config", &path]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot listen on 192.0.2.1:9464"),
        "{stderr}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    // The bridge logs where its http endpoint listens before it connects to anything.
    let path = write("json.toml", &GOOD.replace("0.0.0.0:9464", "127.0.0.1:0"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_vantage-ingester"))
        .args(["--log-format", "json", "bridge", "--config"])
        .arg(&path)
        // Not whatever the caller's RUST_LOG says: the line below is an INFO event.
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // Read on a thread, so a bridge that never logs fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let _ = tx.send(std::io::BufReader::new(stderr).lines().next());
    });
    let first = rx.recv_timeout(std::time::Duration::from_secs(60));
    let _ = child.kill();
    let _ = child.wait();
    let line = first
        .expect("no log line within 60 s")
        .expect("stderr closed without a line")
        .unwrap();
    let event: serde_json::Value = serde_json::from_str(&line).expect(&line);
    assert_eq!(event["level"], "INFO", "{line}");
    assert!(event["timestamp"].is_string(), "{line}");
    assert!(
        event["fields"]["message"]
            .as_str()
            .unwrap()
            .starts_with("http listening"),
        "{line}"
    );
    assert!(
        event["fields"]["addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{line}"
    );
}

/// Every class of command-line mistake exits 2; a bad configuration file or a failed command
/// exits 1; `status` exits 3 when a configured service cannot be reached. The same scheme as
/// vantage-agent (whose `probe` exits 3 when the target is not up); docs/ingester.md and
/// docs/agent.md, "Exit codes" (issue #13 item 13).
#[test]
fn exit_codes_of_every_class() {
    let good = &write("codes-good.toml", GOOD);
    let broken = &write("codes-broken.toml", "[mqtt\nhost=");
    let targets = &write("codes-targets.toml", "[[targets]]\nid = 1\n");
    let cases: &[(&str, &[&str], i32)] = &[
        ("no arguments", &[], 2),
        ("unknown subcommand", &["no-such-command"], 2),
        ("unknown flag", &["check-config", good, "--bogus"], 2),
        (
            "bad global flag value",
            &["--log-format", "xml", "check-config", good],
            2,
        ),
        ("missing --config", &["bridge"], 2),
        ("missing file argument", &["check-config"], 2),
        ("missing nested subcommand", &["targets"], 2),
        ("unknown nested subcommand", &["targets", "frobnicate"], 2),
        (
            "duration without unit",
            &["report", "--config", good, "--since", "5"],
            2,
        ),
        (
            "not a number",
            &["report", "--config", good, "--target", "x"],
            2,
        ),
        (
            "bad enum value",
            &["report", "--config", good, "--format", "xml"],
            2,
        ),
        (
            "missing config file",
            &["check-config", "/nonexistent/ingester.toml"],
            1,
        ),
        ("config syntax error", &["check-config", broken], 1),
        (
            "config syntax error (stage)",
            &["sink", "--config", broken],
            1,
        ),
        ("bad targets file", &["targets", "check", targets], 1),
        ("help", &["--help"], 0),
        ("subcommand help", &["targets", "apply", "--help"], 0),
        ("version", &["--version"], 0),
        ("good file", &["check-config", good], 0),
        (
            "status: services unreachable",
            &["status", "--config", good],
            3,
        ),
    ];
    let wrong = cli::wrong_exit_codes(BIN, cases);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
