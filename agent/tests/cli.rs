//! The binary refuses bad configuration before doing anything, naming file, key and problem.

use std::process::Command;

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vantage-agent-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const GOOD: &str = r#"
agent_id = "pi-1"
region = "eu-north"
[mqtt]
host = "127.0.0.1"
[[targets]]
id = 1
url = "http://127.0.0.1:9/"
"#;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vantage-agent"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_accepts_a_good_file() {
    let path = write("good.toml", GOOD);
    let (ok, stdout, _) = run(&["check-config", path.to_str().unwrap()]);
    assert!(ok);
    assert!(
        stdout.contains("ok (agent pi-1, region eu-north, 1 targets)"),
        "{stdout}"
    );
}

#[test]
fn run_refuses_unknown_key_and_bad_url() {
    let path = write(
        "unknown.toml",
        &GOOD.replace("[mqtt]", "[mqtt]\nhots = \"x\""),
    );
    let (ok, _, stderr) = run(&["run", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("unknown.toml") && stderr.contains("hots"),
        "{stderr}"
    );

    let path = write(
        "badurl.toml",
        &GOOD.replace("http://127.0.0.1:9/", "http//nope"),
    );
    let (ok, _, stderr) = run(&["run", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("badurl.toml: key `targets[0].url`: invalid URL"),
        "{stderr}"
    );
}

#[test]
fn missing_file_is_named() {
    let (ok, _, stderr) = run(&["run", "--config", "/nonexistent/agent.toml"]);
    assert!(!ok);
    assert!(
        stderr.contains("/nonexistent/agent.toml: cannot read"),
        "{stderr}"
    );
}
