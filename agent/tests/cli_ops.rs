//! Operability of the command line (issue #9): every subcommand explains itself with an
//! example, `--version`, exit codes, `check-config` on the `[metrics]` section.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vantage-agent"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vantage-agent-cli-ops-{}", std::process::id()));
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
port = 1
[metrics]
listen = "127.0.0.1:0"
[[targets]]
id = 1
url = "http://127.0.0.1:9/"
"#;

#[test]
fn every_subcommand_has_help_with_an_example() {
    let (code, stdout, _) = run(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("vantage-agent "), "{stdout}");
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("Exit codes"), "{stdout}");
    for sub in ["run", "check-config", "probe"] {
        let (code, stdout, stderr) = run(&[sub, "--help"]);
        assert_eq!(code, Some(0), "{sub}: {stderr}");
        assert!(
            stdout.contains(&format!("Example: vantage-agent {sub}")),
            "{sub}: {stdout}"
        );
        assert!(stdout.contains("--log-format"), "{sub}: {stdout}");
    }
    assert_eq!(run(&["no-such-command"]).0, Some(2));
}

#[test]
fn check_config_validates_the_metrics_section() {
    let path = write("good.toml", GOOD);
    let (code, stdout, stderr) = run(&["check-config", path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(": ok"), "{stdout}");
    for (name, text, needle) in [
        (
            "listen.toml",
            GOOD.replace("127.0.0.1:0", "localhost:9464"),
            "key `metrics.listen`",
        ),
        (
            "unknown.toml",
            GOOD.replace("[metrics]", "[metrics]\npath = \"/m\""),
            "path",
        ),
    ] {
        let path = write(name, &text);
        let (code, _, stderr) = run(&["check-config", path.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains(name) && stderr.contains(needle),
            "{name}: {stderr}"
        );
    }
}
