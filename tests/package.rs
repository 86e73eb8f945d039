//! The ingester's Debian package (cross/package-ingester, issue #19 item 5), built from the
//! binary `make test` just built: its files, modes and fields; one hardened template unit per
//! stage that `systemd-analyze verify` accepts and `security` rates ≤ 2.0; migrate before the
//! sink; secrets as systemd credentials; install, upgrade with an edited config, and purge with
//! `dpkg --root`.

use std::path::{Path, PathBuf};
use std::process::Command;

use vantage_tests::deb::{
    exposure, lacking, run, stdout, unpack_with_system_units, verify_complaints, DpkgRoot, Scratch,
};

const STAGES: [&str; 4] = ["bridge", "sink", "alert", "web"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The package of target/debug/vantage-ingester, built once per test run into
/// target/test-deb/ingester (xz of a debug binary takes a while).
fn package() -> &'static Path {
    static DEB: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DEB.get_or_init(|| build_package(&repo().join("target/test-deb/ingester")))
}

fn build_package(out: &Path) -> PathBuf {
    let binary = repo().join("target/debug/vantage-ingester");
    assert!(
        binary.is_file(),
        "{} missing: `cargo build --bins` first (make test does)",
        binary.display()
    );
    let path = stdout(
        Command::new(repo().join("cross/package-ingester"))
            .arg("--binary")
            .arg(&binary)
            .arg("--out")
            .arg(out),
    );
    PathBuf::from(path.trim())
}

#[test]
fn ingester_package_has_its_files_units_and_fields() {
    let deb = package();
    let field = |name: &str| {
        stdout(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))
            .trim()
            .to_owned()
    };
    assert_eq!(field("Package"), "vantage-ingester");
    assert_eq!(field("Architecture"), "amd64");
    let depends = field("Depends");
    for dep in ["libc6 (>= ", "libssl3", "zlib1g"] {
        assert!(depends.contains(dep), "Depends: {depends}");
    }
    let listing = stdout(Command::new("dpkg-deb").arg("-c").arg(deb));
    let mode_of = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(".{path}")))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("{path} not in the package:\n{listing}"))
            .to_owned()
    };
    assert_eq!(mode_of("/usr/bin/vantage-ingester"), "-rwxr-xr-x");
    assert_eq!(mode_of("/etc/vantage/ingester.toml"), "-rw-r--r--");
    for unit in [
        "/lib/systemd/system/vantage-ingester@.service",
        "/lib/systemd/system/vantage-ingester-migrate.service",
        "/usr/share/doc/vantage-ingester/copyright",
        "/usr/share/doc/vantage-ingester/ingester.example.toml",
    ] {
        assert_eq!(mode_of(unit), "-rw-r--r--", "{unit}");
    }
    let control = Scratch::new("ingester-control");
    run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control.0));
    assert_eq!(
        std::fs::read_to_string(control.0.join("conffiles")).unwrap(),
        "/etc/vantage/ingester.toml\n"
    );

    // The packaged config is valid as shipped, given the credentials it names.
    let files = Scratch::new("ingester-files");
    unpack_with_system_units(deb, &files.0);
    let creds = files.0.join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    for c in ["ingester-mqtt.pw", "ingester-pg.pw"] {
        std::fs::write(creds.join(c), "pw\n").unwrap();
    }
    let out = run(Command::new(files.0.join("usr/bin/vantage-ingester"))
        .arg("check-config")
        .arg(files.0.join("etc/vantage/ingester.toml"))
        .env("CREDENTIALS_DIRECTORY", &creds));
    let report = String::from_utf8_lossy(&out.stdout);
    for stage in STAGES {
        assert!(
            report
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == [stage, "can", "run"]),
            "{stage}:\n{report}"
        );
    }
}

#[test]
fn every_stage_unit_is_valid_hardened_and_gets_its_credentials() {
    let scratch = Scratch::new("ingester-units");
    let deb = package();
    let root = scratch.0.join("root");
    unpack_with_system_units(deb, &root);
    let units = root.join("lib/systemd/system");
    let template = std::fs::read_to_string(units.join("vantage-ingester@.service")).unwrap();
    let missing = lacking(
        &template,
        &[
            "ExecStart=/usr/bin/vantage-ingester %i --config /etc/vantage/ingester.toml",
            "DynamicUser=yes",
            "CapabilityBoundingSet=",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "WantedBy=multi-user.target",
        ],
    );
    assert!(missing.is_empty(), "template lacks {missing:?}");
    // No secret path in the shared template: each stage's drop-in loads only what it reads.
    assert!(!template.contains("LoadCredential"));
    let drop_ins = |stage: &str| -> String {
        let dir = units.join(format!("vantage-ingester@{stage}.service.d"));
        std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect()
    };
    assert!(drop_ins("bridge")
        .contains("LoadCredential=ingester-mqtt.pw:/etc/vantage/ingester-mqtt.pw"));
    assert!(!drop_ins("bridge").contains("ingester-pg.pw"));
    for stage in ["sink", "alert", "web"] {
        assert!(
            drop_ins(stage).contains("LoadCredential=ingester-pg.pw:/etc/vantage/ingester-pg.pw"),
            "{stage}"
        );
    }
    let sink = drop_ins("sink");
    assert!(sink.contains("Requires=vantage-ingester-migrate.service"));
    assert!(sink.contains("After=vantage-ingester-migrate.service"));

    let mut names: Vec<String> = STAGES
        .iter()
        .map(|s| format!("vantage-ingester@{s}.service"))
        .collect();
    names.push("vantage-ingester-migrate.service".into());
    for unit in &names {
        let complaints = verify_complaints(&root, unit);
        assert!(complaints.trim().is_empty(), "verify {unit}: {complaints}");
        let level = exposure(&root, unit);
        println!("systemd-analyze security {unit}: exposure {level}");
        assert!(level <= 2.0, "{unit}: exposure {level}");
    }
}

#[test]
fn install_upgrade_keeps_the_edited_config_and_purge_removes_secrets() {
    let scratch = Scratch::new("ingester-dpkg");
    let deb = package();
    let db = DpkgRoot::new(scratch.0.join("root"));
    let conf = db.root.join("etc/vantage/ingester.toml");

    db.dpkg(&["-i", deb.to_str().unwrap()]);
    assert!(db.root.join("usr/bin/vantage-ingester").is_file());
    let edited = std::fs::read_to_string(&conf)
        .unwrap()
        .replace("host = \"127.0.0.1\"", "host = \"mqtt.internal\"");
    std::fs::write(&conf, &edited).unwrap();

    // The same package again (an upgrade that does not touch the config): the edit stays.
    db.dpkg(&["-i", deb.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), edited);
    assert_eq!(
        db.status("vantage-ingester"),
        "0.1.0-1 install ok installed"
    );

    std::fs::write(db.root.join("etc/vantage/ingester-pg.pw"), "secret").unwrap();
    std::fs::write(db.root.join("etc/vantage/ingester-mqtt.pw"), "secret").unwrap();
    db.dpkg(&["--remove", "vantage-ingester"]);
    assert!(!db.root.join("usr/bin/vantage-ingester").exists());
    assert!(conf.exists(), "remove keeps conffiles");
    db.dpkg(&["--purge", "vantage-ingester"]);
    assert!(!conf.exists());
    assert!(
        !db.root.join("etc/vantage").exists(),
        "purge removes the passwords"
    );
}
