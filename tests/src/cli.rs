//! The command-line tests' helpers, std only: `agent/tests/cli.rs` and `ingester/tests/cli.rs`
//! include this file with `#[path]` (they are tests of other crates, and a crate of its own
//! would be too much for this), and `vantage_tests::cli` offers it to the end-to-end tests.

use std::process::Command;

/// Reads a request's head, up to its blank line (or the end of the stream, or an error), for a
/// test server on a std thread that answers once the request is in.
#[allow(dead_code)] // `ingester/tests/cli.rs` includes this file and runs no such server
pub fn read_request_head(s: &mut impl std::io::Read) -> Vec<u8> {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    request
}

/// A loopback port nothing listens on (bound, then released): connections to it are refused.
#[allow(dead_code)] // not every includer of this file needs one
pub fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `text` to `name` in this process's scratch folder for `binary`; its path (as text,
/// for command lines).
pub fn scratch_file(binary: &str, name: &str, text: &str) -> String {
    let dir = std::env::temp_dir().join(format!("{binary}-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str()
        .expect("a UTF-8 temporary directory")
        .to_owned()
}

/// (exit code, stdout, stderr) of `bin ARGS` with the extra environment `env`.
pub fn run_with_env(
    bin: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let out = Command::new(bin)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Each `(what, args, exit code)` of `cases` run as `bin ARGS`; one line (and the stderr) for
/// every case that exited otherwise: empty when all were right.
pub fn wrong_exit_codes(bin: &str, cases: &[(&str, &[&str], i32)]) -> Vec<String> {
    let mut wrong = Vec::new();
    for (what, args, want) in cases {
        let (code, _, stderr) = run_with_env(bin, args, &[]);
        if code != Some(*want) {
            wrong.push(format!(
                "{what} {args:?}: exit {code:?}, want {want}\n{stderr}"
            ));
        }
    }
    wrong
}

/// `bin check-config FILE` for each `(file name, text, needle)` of `cases`, the file written by
/// `write`: one line (and the stderr) for every file that was not refused with exit 1 and a
/// message naming the file and `needle`; empty when all were.
pub fn unrefused_files(
    bin: &str,
    write: impl Fn(&str, &str) -> String,
    cases: &[(&str, String, &str)],
) -> Vec<String> {
    let mut unrefused = Vec::new();
    for (name, text, needle) in cases {
        let path = write(name, text);
        let (code, _, stderr) = run_with_env(bin, &["check-config", &path], &[]);
        if code != Some(1) || !stderr.contains(name) || !stderr.contains(needle) {
            unrefused.push(format!(
                "{name}: exit {code:?}, want 1 naming {needle:?}\n{stderr}"
            ));
        }
    }
    unrefused
}

/// The `--help` text of `bin`, once `bin --version` printed `name` and its version and `--help`
/// exited 0 telling the exit codes.
pub fn checked_help(bin: &str, name: &str) -> String {
    let (code, stdout, _) = run_with_env(bin, &["--version"], &[]);
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with(&format!("{name} ")), "{stdout}");
    let (code, stdout, _) = run_with_env(bin, &["--help"], &[]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("Exit codes"), "{stdout}");
    stdout
}
