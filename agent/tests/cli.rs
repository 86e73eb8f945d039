//! The binary refuses bad configuration before doing anything, naming file, key and problem;
//! every subcommand explains itself with an example; `--version`; exit codes (issue #9).

#[path = "../../tests/src/cli.rs"]
mod cli;

const BIN: &str = env!("CARGO_BIN_EXE_vantage-agent");

fn write(name: &str, text: &str) -> String {
    cli::scratch_file("vantage-agent", name, text)
}

/// The environment of a run whose logs are checked: everything logged.
const TRACE: &[(&str, &str)] = &[("RUST_LOG", "trace")];

const GOOD: &str = r#"
agent_id = "pi-1"
region = "eu-north"
[mqtt]
host = "127.0.0.1"
[[targets]]
id = 1
url = "http://127.0.0.1:9/"
"#;

/// (exit code, stdout, stderr) of `vantage-agent ARGS`.
fn run_code(args: &[&str]) -> (Option<i32>, String, String) {
    cli::run_with_env(BIN, args, &[])
}

/// (succeeded, stdout, stderr) of `vantage-agent ARGS`.
fn run(args: &[&str]) -> (bool, String, String) {
    let (code, stdout, stderr) = run_code(args);
    (code == Some(0), stdout, stderr)
}

#[test]
fn check_config_accepts_a_good_file() {
    let path = write("good.toml", GOOD);
    let (ok, stdout, _) = run(&["check-config", &path]);
    assert!(ok);
    assert!(
        stdout.contains("ok (agent pi-1, region eu-north, 1 local targets)"),
        "{stdout}"
    );
}

#[test]
fn run_refuses_unknown_key_and_bad_url() {
    for (name, from, to, needles) in [
        (
            "unknown.toml",
            "[mqtt]",
            "[mqtt]\nhots = \"x\"",
            &["unknown.toml", "hots"][..],
        ),
        (
            "badurl.toml",
            "http://127.0.0.1:9/",
            "http//nope",
            &["badurl.toml: key `targets[0].url`: invalid URL"],
        ),
    ] {
        let path = write(name, &GOOD.replace(from, to));
        let (ok, _, stderr) = run(&["run", "--config", &path]);
        assert!(!ok);
        assert!(needles.iter().all(|n| stderr.contains(n)), "{stderr}");
    }
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

/// A one-shot HTTP server on a std thread: answers one request with `response`.
fn one_response_server(response: &'static str) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(response.as_bytes());
        }
    });
    addr
}

#[test]
fn probe_prints_json_with_column_names() {
    let addr = one_response_server(
        "HTTP/1.1 200 OK\r\ncontent-length: 11\r\nconnection: close\r\n\r\nhello world",
    );
    let url = format!("http://{addr}/");
    let (ok, stdout, stderr) = run(&["probe", "--json", "--regex", "wor+ld", &url]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("\"outcome\":\"up\""), "{stdout}");
    assert!(stdout.contains("\"status\":200"), "{stdout}");
    assert!(stdout.contains("\"regex_match\":true"), "{stdout}");
    assert!(stdout.contains("\"body_bytes\":11"), "{stdout}");
}

#[test]
fn probe_exits_3_when_the_target_is_down() {
    let port = cli::closed_port();
    let (code, text, _) = run_code(&["probe", &format!("http://127.0.0.1:{port}/")]);
    // 3, not 2: 2 is a bad command line (issue #13 item 13).
    assert_eq!(code, Some(3));
    assert!(text.contains("outcome         connect_refused"), "{text}");
}

/// The binary prints why a probe is not up, in text and JSON (issue #13, "must show"): a refused
/// connection names the address and the OS error; broken chunked framing says so.
#[test]
fn probe_prints_the_error_detail() {
    let port = cli::closed_port();
    let refused = format!("http://127.0.0.1:{port}/");
    let (code, stdout, stderr) = run_code(&["probe", &refused]);
    assert_eq!(code, Some(3), "{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("detail "))
        .unwrap_or_else(|| panic!("no detail line:\n{stdout}"));
    assert!(
        line.contains(&format!("connect to 127.0.0.1:{port}:")) && line.contains("refused"),
        "{line}"
    );

    let broken = one_response_server(
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\nzz\r\nhi\r\n0\r\n\r\n",
    );
    let (code, stdout, stderr) = run_code(&["probe", "--json", &format!("http://{broken}/")]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stdout.contains("\"outcome\":\"protocol_error\",\"failed_phase\":\"body\",\"detail\":\""),
        "{stdout}"
    );
    let detail = &stdout[stdout.find("\"detail\":\"").unwrap()..];
    let detail = &detail[..detail.find("\",").unwrap()];
    assert!(detail.contains("chunk"), "{detail}");
}

#[test]
fn probe_rejects_bad_options_by_flag_name() {
    // Options that parse but fail the target checks are a bad command line too: exit 2.
    let (code, _, stderr) = run_code(&["probe", "--accept", "700", "http://127.0.0.1:9/"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--accept:"), "{stderr}");
    let (code, _, stderr) = run_code(&["probe", "ftp://x/"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("URL: scheme \"ftp\""), "{stderr}");
}

/// Issue #20: `probe --kind tcp HOST:PORT`, and the keys that do not apply to a kind refused
/// by their flag's name (exit 2).
#[test]
fn probe_kind_tcp_and_its_refusals() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (code, stdout, stderr) = run_code(&["probe", "--json", "--kind", "tcp", &addr]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("\"outcome\":\"up\"") && stdout.contains("\"kind\":\"tcp\""),
        "{stdout}"
    );
    let (code, _, stderr) = run_code(&["probe", "--kind", "tcp", "--regex", "x", &addr]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--regex: does not apply to a tcp target"),
        "{stderr}"
    );
    let (code, _, stderr) = run_code(&["probe", "--kind", "tls", "127.0.0.1"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("HOST:PORT:"), "{stderr}");
    let (code, _, stderr) = run_code(&["probe", "--kind", "udp", &addr]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--kind"), "{stderr}");
}

/// Issue #20: `probe --kind dns NAME --type --resolver`; a closed UDP port answers with ICMP
/// port unreachable (exit 3, connect_refused), a resolver given by name is refused (exit 2).
#[test]
fn probe_kind_dns_and_its_refusals() {
    let closed = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (code, stdout, stderr) = run_code(&[
        "probe",
        "--json",
        "--kind",
        "dns",
        "up.test",
        "--type",
        "TXT",
        "--resolver",
        &closed,
    ]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stdout.contains("\"outcome\":\"connect_refused\"")
            && stdout.contains("\"kind\":\"dns\"")
            && stdout.contains("\"dns_rcode\":null"),
        "{stdout}"
    );
    let (code, _, stderr) = run_code(&[
        "probe",
        "--kind",
        "dns",
        "up.test",
        "--resolver",
        "ns.example",
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--resolver:"), "{stderr}");
    let (code, _, stderr) = run_code(&["probe", "--kind", "dns", "up.test", "--type", "NOPE"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--type:"), "{stderr}");
}

#[test]
fn every_subcommand_has_help_with_an_example() {
    cli::checked_help(BIN, "vantage-agent");
    for sub in ["run", "check-config", "probe"] {
        let (code, stdout, stderr) = run_code(&[sub, "--help"]);
        assert_eq!(code, Some(0), "{sub}: {stderr}");
        assert!(
            stdout.contains(&format!("Example: vantage-agent {sub}")),
            "{sub}: {stdout}"
        );
        assert!(stdout.contains("--log-format"), "{sub}: {stdout}");
    }
    assert_eq!(run_code(&["no-such-command"]).0, Some(2));
}

#[test]
fn check_config_validates_the_metrics_section() {
    let with_metrics = GOOD.replace(
        "[[targets]]",
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[[targets]]",
    );
    let path = write("metrics-good.toml", &with_metrics);
    let (code, stdout, stderr) = run_code(&["check-config", &path]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(": ok"), "{stdout}");
    let cases = &[
        (
            "metrics-listen.toml",
            with_metrics.replace("127.0.0.1:0", "localhost:9464"),
            "key `metrics.listen`",
        ),
        (
            "metrics-unknown.toml",
            with_metrics.replace("[metrics]", "[metrics]\npath = \"/m\""),
            "path",
        ),
    ];
    let unrefused = cli::unrefused_files(BIN, write, cases);
    assert!(unrefused.is_empty(), "{}", unrefused.join("\n"));
}

/// Every class of command-line mistake exits 2, whatever clap or the target checks found;
/// a bad configuration file or a failed run exits 1; `probe` exits 3 when the target is not up
/// (docs/agent.md, "Exit codes"; the same scheme as vantage-ingester). Issue #13 item 13: a
/// usage error used to exit 2 like "probed, not up".
#[test]
fn exit_codes_of_every_class() {
    let good = &write("codes-good.toml", GOOD);
    let broken = &write("codes-broken.toml", "agent_id = [");
    let central = &write(
        "codes-central.toml",
        &GOOD[..GOOD.find("[[targets]]").unwrap()],
    );
    let url = "http://127.0.0.1:9/";
    let cases: &[(&str, &[&str], i32)] = &[
        ("no arguments", &[], 2),
        ("unknown subcommand", &["no-such-command"], 2),
        ("unknown flag", &["run", "--config", good, "--bogus"], 2),
        (
            "unknown global flag value",
            &["--log-format", "xml", "check-config", good],
            2,
        ),
        ("missing --config", &["run"], 2),
        ("missing URL", &["probe"], 2),
        ("missing config file argument", &["check-config"], 2),
        (
            "duration without unit",
            &["probe", "--timeout", "5", url],
            2,
        ),
        (
            "not a number",
            &["run", "--config", good, "--rounds", "x"],
            2,
        ),
        (
            "number out of range",
            &["probe", "--max-redirects", "300", url],
            2,
        ),
        ("conflicting flags", &["probe", "--ipv4", "--ipv6", url], 2),
        ("bad accepted status", &["probe", "--accept", "700", url], 2),
        ("bad URL", &["probe", "not a url"], 2),
        ("bad header", &["probe", "-H", "no colon", url], 2),
        ("bad method", &["probe", "--method", "G ET", url], 2),
        ("bad regex", &["probe", "--regex", "(", url], 2),
        ("zero body cap", &["probe", "--body-cap", "0", url], 2),
        (
            "missing config file",
            &["check-config", "/nonexistent/agent.toml"],
            1,
        ),
        ("config syntax error", &["check-config", broken], 1),
        ("config syntax error (run)", &["run", "--config", broken], 1),
        (
            "--rounds without local targets",
            &["run", "--config", central, "--rounds", "1"],
            1,
        ),
        ("help", &["--help"], 0),
        ("subcommand help", &["probe", "--help"], 0),
        ("version", &["--version"], 0),
        ("good file", &["check-config", good], 0),
        ("probe: not up", &["probe", "--timeout", "2s", url], 3),
    ];
    let wrong = cli::wrong_exit_codes(BIN, cases);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// A server on a std thread that answers up to `n` requests with `response` and hands each
/// request's text (request line and headers) to the returned channel.
fn capturing_server(
    response: &'static str,
    n: usize,
) -> (std::net::SocketAddr, std::sync::mpsc::Receiver<String>) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..n {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let request = cli::read_request_head(&mut s);
            let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
            let _ = s.write_all(response.as_bytes());
        }
    });
    (addr, rx)
}

/// `--accept` takes a comma list as well as repeated flags (issue #13 item 14).
#[test]
fn probe_accepts_a_comma_list_of_statuses() {
    let moved = "HTTP/1.1 301 Moved Permanently\r\nlocation: /elsewhere\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    let (addr, _requests) = capturing_server(moved, 2);
    let url = format!("http://{addr}/");
    let (code, stdout, stderr) =
        run_code(&["probe", "--max-redirects", "0", "--accept", "200,301", &url]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("status          301"), "{stdout}");
    // A code outside the list still counts as not up; a bad element names the flag.
    let (code, _, stderr) = run_code(&[
        "probe",
        "--max-redirects",
        "0",
        "--accept",
        "200,204-206",
        &url,
    ]);
    assert_eq!(code, Some(3), "{stderr}");
    let (code, _, stderr) = run_code(&["probe", "--accept", "200,abc", &url]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--accept:") && stderr.contains("abc"),
        "{stderr}"
    );
}

/// A user:password in the URL is sent as HTTP basic authentication (percent-decoded, as curl
/// does) and is a secret: not in the request line or Host header, not in the printed
/// measurement, not in any log line even at TRACE, not in an error message (issue #13 item 14).
#[test]
fn url_credentials_are_basic_auth_and_never_printed() {
    const PASSWORD: &str = "s3cr%40t-pw"; // percent-encoded "s3cr@t-pw"
    const DECODED: &str = "s3cr@t-pw";
    // base64("probe-user:s3cr@t-pw")
    const BASIC: &str = "cHJvYmUtdXNlcjpzM2NyQHQtcHc=";
    let ok = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
    let (addr, requests) = capturing_server(ok, 3);
    let url = format!("http://probe-user:{PASSWORD}@{addr}/private");
    let secrets = [PASSWORD, DECODED, BASIC];
    let leaks = |what: &str, text: &str| {
        for s in secrets {
            assert!(!text.contains(s), "{what} shows {s:?}:\n{text}");
        }
    };

    // The one-shot probe, text and JSON.
    for json in [false, true] {
        let mut args = vec!["probe", url.as_str()];
        if json {
            args.insert(1, "--json");
        }
        let (code, stdout, stderr) = cli::run_with_env(BIN, &args, TRACE);
        assert_eq!(code, Some(0), "{stdout}{stderr}");
        leaks("probe output", &stdout);
        leaks("probe log", &stderr);
        let request = requests
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        assert!(
            request.starts_with("GET /private HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.to_ascii_lowercase().contains(&format!(
                "authorization: basic {}",
                BASIC.to_ascii_lowercase()
            )),
            "{request}"
        );
        assert!(request.contains(&format!("host: {addr}\r\n")), "{request}");
        assert!(
            !request.contains(PASSWORD) && !request.contains(DECODED),
            "{request}"
        );
    }

    // A URL that does not parse: the error names the flag, not the password.
    let bad = format!("http://probe-user:{PASSWORD}@{addr}:99999/");
    let (code, _, stderr) = run_code(&["probe", &bad]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("URL: invalid URL"), "{stderr}");
    leaks("URL error", &stderr);

    // A configured target: check-config, and a `run` at TRACE (no broker here: the result
    // stays undelivered, which is a failed --rounds run, exit 1; the logs are what matters).
    let config = &write(
        "basic-auth.toml",
        &format!(
            "{}\n[uplink]\ndrain_timeout = \"500ms\"\n[[targets]]\nid = 1\nurl = \"{url}\"\n\
             interval = \"1s\"\ntimeout = \"1s\"\n",
            GOOD[..GOOD.find("[[targets]]").unwrap()]
                .replace("127.0.0.1\"", "127.0.0.1\"\nport = 1")
        ),
    );
    let (code, stdout, stderr) = cli::run_with_env(BIN, &["check-config", config], TRACE);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    leaks("check-config", &stdout);
    let (_, _, stderr) =
        cli::run_with_env(BIN, &["run", "--rounds", "1", "--config", config], TRACE);
    let request = requests
        .recv_timeout(std::time::Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("the agent never probed:\n{stderr}"));
    assert!(
        request
            .to_ascii_lowercase()
            .contains("authorization: basic"),
        "{request}"
    );
    assert!(stderr.contains("agent stopped"), "{stderr}");
    leaks("run log", &stderr);
}

/// A spool directory that cannot be created stops `run` at once with exit code 1, naming the
/// directory and the way out (issue #18; docs/agent.md "The spool").
#[test]
fn run_refuses_a_spool_it_cannot_create() {
    // Under a regular file: no directory can be made there, not even by root.
    let blocker = write("not-a-dir", "a file");
    let config = write(
        "spool-blocked.toml",
        &GOOD.replace(
            "region = \"eu-north\"",
            &format!("region = \"eu-north\"\nstate_dir = \"{}\"", blocker),
        ),
    );
    let (code, _, stderr) = run_code(&["run", "--config", &config]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("spool"), "{stderr}");
    assert!(stderr.contains("not-a-dir"), "{stderr}");
    assert!(stderr.contains("spool_max_bytes = 0"), "{stderr}");
}
