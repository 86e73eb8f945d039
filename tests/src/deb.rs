//! Checking Debian packages without installing them on this machine: commands that must
//! succeed, scratch directories, `systemd-analyze verify`/`security` on a package's units
//! unpacked into a scratch root, and `dpkg --root` installs (tests/package.rs; tests/arm.rs has
//! the agent's own copies of these, to be folded here).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `cmd`; panics with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (cross/install installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// [`run`]'s standard output.
pub fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).unwrap()
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(what: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("vantage-deb-{what}-{}", crate::unique_id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Unpacks the package's files into `dir`, plus this machine's own system units.
pub fn unpack_with_system_units(deb: &Path, dir: &Path) {
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir));
    add_system_units(dir);
}

/// Copies this machine's own system units under `root` (verify needs sysinit.target and the
/// like under the same root).
pub fn add_system_units(root: &Path) {
    let dest = root.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&dest).unwrap();
    for entry in std::fs::read_dir("/usr/lib/systemd/system").unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dest.join(entry.file_name())).unwrap();
        }
    }
}

/// The lines of `lines` that the unit file `text` lacks (each compared with a unit line
/// trimmed of white space).
pub fn lacking<'a>(text: &str, lines: &[&'a str]) -> Vec<&'a str> {
    lines
        .iter()
        .copied()
        .filter(|line| !text.lines().any(|l| l.trim() == *line))
        .collect()
}

/// What `systemd-analyze verify` says about `unit` (a name, instances of templates included)
/// under `root`: its complaints, empty when it has none.
pub fn verify_complaints(root: &Path, unit: &str) -> String {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(unit)
        .output()
        .expect("systemd-analyze (cross/install installs systemd)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        text
    } else {
        format!("exit {}: {text}", out.status)
    }
}

/// The "overall exposure level" of `systemd-analyze security` for `unit` under `root`.
pub fn exposure(root: &Path, unit: &str) -> f64 {
    let out = run(Command::new("systemd-analyze")
        .arg("security")
        .arg("--offline=yes")
        .arg(format!("--root={}", root.display()))
        .arg("--no-pager")
        .arg(unit));
    let report = String::from_utf8_lossy(&out.stdout);
    report
        .lines()
        .find_map(|l| l.split(&format!("{unit}: ")).nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"))
}

/// An empty dpkg database under a scratch root, for chrootless `dpkg --root` runs.
pub struct DpkgRoot {
    pub root: PathBuf,
    pub admin: PathBuf,
}

impl DpkgRoot {
    pub fn new(root: PathBuf) -> DpkgRoot {
        let admin = root.join("var/lib/dpkg");
        for d in ["info", "updates", "triggers"] {
            std::fs::create_dir_all(admin.join(d)).unwrap();
        }
        std::fs::write(admin.join("status"), "").unwrap();
        std::fs::write(admin.join("available"), "").unwrap();
        DpkgRoot { root, admin }
    }

    /// `dpkg --root` with `args`: the scratch root has no shell, so the maintainer scripts run
    /// chrootless and skip systemctl (DPKG_ROOT is set).
    pub fn dpkg(&self, args: &[&str]) -> Output {
        let mut c = Command::new("dpkg");
        c.arg(format!("--root={}", self.root.display()))
            .args([
                "--force-architecture",
                "--force-depends",
                "--force-script-chrootless",
                "--force-not-root",
                "--log=/dev/null",
            ])
            .args(args)
            .stdin(std::process::Stdio::null());
        run(&mut c)
    }

    /// `${Version} ${Status}` of `package` in this root's database.
    pub fn status(&self, package: &str) -> String {
        stdout(
            Command::new("dpkg-query")
                .arg(format!("--admindir={}", self.admin.display()))
                .args(["-W", "-f", "${Version} ${Status}", package]),
        )
    }
}
