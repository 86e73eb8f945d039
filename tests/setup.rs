//! The setup promise of the README: a Debian machine with Rust is enough, `tests/services/up`
//! installs the rest. `tests/services/check-install` hides this machine's Java and Maven in a
//! private mount namespace and checks what the script would install and which Java Kafka then
//! runs on (issue #14, item 15; what it does not prove is in the script's header).

use std::process::Command;

#[test]
fn services_script_installs_java_and_maven_when_missing() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("services/check-install");
    let out = Command::new("bash").arg(&script).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all cases hold"), "{stdout}");
}
