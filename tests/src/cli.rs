//! The command-line tests' helpers, std only: `agent/tests/cli.rs` and `ingester/tests/cli.rs`
//! include this file with `#[path]` (they are tests of other crates, and a crate of its own
//! would be too much for this), and `vantage_tests::cli` offers it to the end-to-end tests.

use std::path::PathBuf;
use std::process::Command;

/// Writes `text` to `name` in this process's scratch folder for `binary`; its path.
pub fn scratch_file(binary: &str, name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{binary}-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
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
