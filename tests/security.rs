//! Issue #8 on the real services (`tests/services/up` must have started them; it also makes the
//! test CA and the secure listeners):
//! - the broker refuses an agent that publishes as another agent (password and certificate);
//! - PostgreSQL TLS is verified (chain and host name) and never silently downgraded;
//! - the whole pipeline runs over MQTT TLS with per-agent identities, Kafka SASL_SSL and verified
//!   PostgreSQL TLS, with every log at TRACE captured, and no secret value appears in it.
//!
//! Each test adds its own MQTT identities (random passwords) under its own topic prefix through
//! `tests/services/lib.sh mqtt-agent`, and removes them at the end.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vantage_tests::harness::{write_file, Run};
use vantage_tests::in_process::{query_scalar, query_triples, start_sink_and_bridge};
use vantage_tests::stage::services_dir;
use vantage_tests::target::TargetServer;

/// What `tests/services/up` wrote to `$VANTAGE_STATE_DIR/env`, overridden by the environment.
struct Secure {
    ca: PathBuf,
    host: String,
    tls_port: u16,
    mtls_port: u16,
    sasl_brokers: String,
    sasl_user: String,
    sasl_password_file: PathBuf,
}

impl Secure {
    fn from_env() -> Secure {
        let dir = std::env::var("VANTAGE_STATE_DIR")
            .unwrap_or_else(|_| "/var/tmp/vantage-services".into());
        let file = std::fs::read_to_string(Path::new(&dir).join("env"))
            .expect("tests/services/up must have written $VANTAGE_STATE_DIR/env");
        let mut vars: BTreeMap<String, String> = file
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        for (k, v) in std::env::vars() {
            if k.starts_with("VANTAGE_") {
                vars.insert(k, v);
            }
        }
        let get = |k: &str| {
            vars.get(k)
                .cloned()
                .unwrap_or_else(|| panic!("{k} missing: run tests/services/up"))
        };
        Secure {
            ca: get("VANTAGE_TLS_CA").into(),
            host: get("VANTAGE_MQTT_HOST"),
            tls_port: get("VANTAGE_MQTT_TLS_PORT").parse().unwrap(),
            mtls_port: get("VANTAGE_MQTT_MTLS_PORT").parse().unwrap(),
            sasl_brokers: get("VANTAGE_KAFKA_SASL_BROKERS"),
            sasl_user: get("VANTAGE_KAFKA_SASL_USER"),
            sasl_password_file: get("VANTAGE_KAFKA_SASL_PASSWORD_FILE").into(),
        }
    }
}

/// 32 random hex characters: a password no log line could contain by accident.
fn random_secret() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs `tests/services/lib.sh CMD ARGS...` with `stdin` as its input.
fn services(args: &[&str], stdin: &str) -> String {
    let mut child = Command::new("bash")
        .arg(services_dir().join("lib.sh"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "lib.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// An agent identity on the secure listeners (removed on drop).
struct Identity {
    user: String,
    password: String,
}

impl Identity {
    fn agent(prefix: &str, region: &str, agent: &str) -> Identity {
        let password = random_secret();
        services(
            &["mqtt-agent", prefix, region, agent],
            &format!("{password}\n"),
        );
        Identity {
            user: agent.to_owned(),
            password,
        }
    }

    fn ingester(prefix: &str, user: &str) -> Identity {
        let password = random_secret();
        services(&["mqtt-ingester", prefix, user], &format!("{password}\n"));
        Identity {
            user: user.to_owned(),
            password,
        }
    }
}

impl Drop for Identity {
    fn drop(&mut self) {
        services(&["mqtt-remove", &self.user], "");
    }
}

fn tls_transport(ca: &Path, client_cert: Option<(&Path, &Path)>) -> rumqttc::Transport {
    let raw = vantage_ingester::tls::RawTls {
        ca_file: Some(ca.to_owned()),
        cert_file: client_cert.map(|c| c.0.to_owned()),
        key_file: client_cert.map(|c| c.1.to_owned()),
    };
    let tls = vantage_ingester::tls::client(&raw).unwrap();
    rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.config))
}

/// Connects with MQTT 5 (so the broker says *why* it refuses a publish), publishes one QoS 1
/// message on each topic in order, and returns the PUBACK reason of each.
async fn publish_v5(
    mut options: rumqttc::v5::MqttOptions,
    topics: &[String],
) -> Vec<rumqttc::v5::mqttbytes::v5::PubAckReason> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event};
    options.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    for t in topics {
        client
            .publish(
                t.clone(),
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                vec![1u8],
            )
            .await
            .unwrap();
    }
    let mut reasons = Vec::new();
    let done = tokio::time::timeout(Duration::from_secs(20), async {
        while reasons.len() < topics.len() {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(ack))) => reasons.push(ack.reason),
                Ok(_) => {}
                Err(e) => panic!("MQTT 5 connection failed: {e}"),
            }
        }
    })
    .await;
    assert!(done.is_ok(), "no PUBACKs within 20 s: {reasons:?}");
    let _ = client.disconnect().await;
    reasons
}

/// "accepted" (success; nobody subscribed is fine), "refused" (not authorized), or the reason.
fn verdicts(reasons: &[rumqttc::v5::mqttbytes::v5::PubAckReason]) -> Vec<String> {
    use rumqttc::v5::mqttbytes::v5::PubAckReason;
    reasons
        .iter()
        .map(|r| match r {
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => "accepted".into(),
            PubAckReason::NotAuthorized => "refused".into(),
            other => format!("{other:?}"),
        })
        .collect()
}

/// Whether this session's connection to PostgreSQL is TLS.
const OWN_SSL: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

/// A new run (its topic prefix too) and two agents of it with their broker identities:
/// `a-<run id>` in eu-north and `b-<run id>` in `region_b`.
fn two_agents(kind: &str, region_b: &str) -> (Run, String, (String, Identity), (String, Identity)) {
    let run = Run::new(kind);
    let prefix = run.prefix();
    let (a, b) = (format!("a-{}", run.id), format!("b-{}", run.id));
    let id_a = Identity::agent(&prefix, "eu-north", &a);
    let id_b = Identity::agent(&prefix, region_b, &b);
    (run, prefix, (a, id_a), (b, id_b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_publish_as_another_agent() {
    let sec = Secure::from_env();
    let (run, prefix, (a, id_a), (b, _id_b)) = two_agents("acl", "us-east");
    let own = format!("{prefix}/v1/results/eu-north/{a}");
    let own_status = format!("{prefix}/v1/status/eu-north/{a}");
    let as_b = format!("{prefix}/v1/results/us-east/{b}");
    let as_a_elsewhere = format!("{prefix}/v1/results/us-east/{a}");
    let targets_of_b = format!("{prefix}/v1/targets/us-east/{b}");

    // Password identity over TLS.
    let mut options =
        rumqttc::v5::MqttOptions::new(format!("acl-a-{}", run.id), &sec.host, sec.tls_port);
    options.set_credentials(&id_a.user, &id_a.password);
    options.set_transport(tls_transport(&sec.ca, None));
    let reasons = publish_v5(
        options,
        &[
            own.clone(),
            own_status.clone(),
            as_b.clone(),
            as_a_elsewhere.clone(),
            targets_of_b.clone(),
        ],
    )
    .await;
    assert_eq!(
        verdicts(&reasons),
        ["accepted", "accepted", "refused", "refused", "refused"],
        "own results, own status, B's results, A in another region, B's targets: {reasons:?}"
    );

    // Certificate identity (CN = agent id) over mutual TLS: the same ACL.
    let paths = services(&["client-cert", &a], "");
    let mut lines = paths.lines();
    let (cert, key) = (
        PathBuf::from(lines.next().unwrap()),
        PathBuf::from(lines.next().unwrap()),
    );
    let mut options =
        rumqttc::v5::MqttOptions::new(format!("acl-a-cert-{}", run.id), &sec.host, sec.mtls_port);
    options.set_transport(tls_transport(&sec.ca, Some((&cert, &key))));
    let reasons = publish_v5(options, &[own.clone(), as_b.clone()]).await;
    assert_eq!(
        verdicts(&reasons),
        ["accepted", "refused"],
        "certificate identity: own results, B's results: {reasons:?}"
    );

    // A wrong password is refused at CONNECT.
    let mut options =
        rumqttc::v5::MqttOptions::new(format!("acl-bad-{}", run.id), &sec.host, sec.tls_port);
    options.set_credentials(&id_a.user, "not-the-password");
    options.set_transport(tls_transport(&sec.ca, None));
    let (_client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 10);
    let refused = tokio::time::timeout(Duration::from_secs(20), eventloop.poll())
        .await
        .expect("broker answered within 20 s");
    assert!(refused.is_err(), "wrong password accepted: {refused:?}");
    let _ = std::fs::remove_dir_all(&run.dir);
}

/// MQTT 5 options for `who` on the password-and-TLS listener.
fn secure_v5(sec: &Secure, who: &Identity, client_id: String) -> rumqttc::v5::MqttOptions {
    let mut options = rumqttc::v5::MqttOptions::new(client_id, &sec.host, sec.tls_port);
    options.set_credentials(&who.user, &who.password);
    options.set_transport(tls_transport(&sec.ca, None));
    options.set_keep_alive(Duration::from_secs(10));
    options
}

/// A subscriber in a task: the broker's verdict on the subscription, then each payload received.
struct Subscriber {
    granted: bool,
    payloads: tokio::sync::mpsc::Receiver<Vec<u8>>,
    _client: rumqttc::v5::AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

async fn subscribe_v5(options: rumqttc::v5::MqttOptions, topic: &str) -> Subscriber {
    use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
    use rumqttc::v5::{AsyncClient, Event};
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client
        .subscribe(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    let (verdict_tx, verdict_rx) = tokio::sync::oneshot::channel();
    let (tx, payloads) = tokio::sync::mpsc::channel(16);
    let task = tokio::spawn(async move {
        let mut verdict_tx = Some(verdict_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let granted = matches!(ack.return_codes[..], [SubscribeReasonCode::Success(_)]);
                    if let Some(v) = verdict_tx.take() {
                        let _ = v.send(granted);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(p.payload.to_vec()).await;
                }
                Ok(_) => {}
                Err(e) => panic!("subscriber's MQTT 5 connection failed: {e}"),
            }
        }
    });
    let granted = tokio::time::timeout(Duration::from_secs(20), verdict_rx)
        .await
        .expect("SUBACK within 20 s")
        .unwrap();
    Subscriber {
        granted,
        payloads,
        _client: client,
        task,
    }
}

/// End-to-end acknowledgements free an agent's spool, so who writes and reads them matters
/// (SECURITY.md): only an ingester publishes them, and each agent reads only its own. Were the
/// read refused, the agent would quietly fall back to the broker's PUBACK and every delivery test
/// would still pass; were the write allowed, one agent could free another's unsent results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_are_written_only_by_the_ingester_and_read_only_by_their_agent() {
    let sec = Secure::from_env();
    let (run, prefix, (a, id_a), (b, id_b)) = two_agents("acl-acks", "us-east");
    let ingester = Identity::ingester(&prefix, &format!("ing-{}", run.id));
    let acks_a = format!("{prefix}/v1/acks/eu-north/{a}");
    let acks_b = format!("{prefix}/v1/acks/us-east/{b}");

    // An agent cannot publish acknowledgements: neither its own nor another's.
    let reasons = publish_v5(
        secure_v5(&sec, &id_a, format!("acks-a-pub-{}", run.id)),
        &[acks_a.clone(), acks_b.clone()],
    )
    .await;
    assert_eq!(
        verdicts(&reasons),
        ["refused", "refused"],
        "A publishing its own acks, B's acks: {reasons:?}"
    );

    // A reads its own; B, subscribing to A's, is refused or at least never sent them.
    let mut own = subscribe_v5(
        secure_v5(&sec, &id_a, format!("acks-a-sub-{}", run.id)),
        &acks_a,
    )
    .await;
    assert!(own.granted, "agent A may not read its own ack topic");
    let mut other = subscribe_v5(
        secure_v5(&sec, &id_b, format!("acks-b-sub-{}", run.id)),
        &acks_a,
    )
    .await;

    let reasons = publish_v5(
        secure_v5(&sec, &ingester, format!("acks-ing-{}", run.id)),
        std::slice::from_ref(&acks_a),
    )
    .await;
    assert_eq!(
        verdicts(&reasons),
        ["accepted"],
        "the ingester writing A's acks: {reasons:?}"
    );
    let got = tokio::time::timeout(Duration::from_secs(10), own.payloads.recv())
        .await
        .expect("agent A received its ack within 10 s");
    assert_eq!(got, Some(vec![1u8]));
    // The broker delivers to both subscribers in the same pass; two more seconds for B to be sure.
    let leaked = tokio::time::timeout(Duration::from_secs(2), other.payloads.recv()).await;
    assert!(
        leaked.is_err(),
        "agent B (subscription granted: {}) received agent A's ack: {leaked:?}",
        other.granted
    );
    own.task.abort();
    other.task.abort();
    let _ = std::fs::remove_dir_all(&run.dir);
}

/// Watches one MQTT 3.1.1 connection in a task: (connections acknowledged, errors seen).
fn watch_connection(
    options: rumqttc::MqttOptions,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<(u32, u32)> {
    tokio::spawn(async move {
        let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
        let (mut connacks, mut errors) = (0, 0);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return (connacks, errors),
                event = eventloop.poll() => match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => connacks += 1,
                    Ok(_) => {}
                    Err(_) => {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    })
}

/// Connects, waits for the CONNACK, disconnects: one attempt to take over a client id.
async fn connect_once(options: rumqttc::MqttOptions) {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    let connected = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("the intruder's own connection failed: {e}"),
            }
        }
    })
    .await;
    assert!(connected.is_ok(), "no CONNACK within 20 s");
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await;
}

/// Issue #14 item 7: agent A's credentials cannot push agent B off by connecting with B's
/// client id (Mosquitto does not tie a client id to a user unless told to): the secure
/// listeners take the client id from the user name (`use_username_as_clientid`), which on the
/// mutual-TLS listener is the certificate's CN. Five takeover attempts on each; B's connection
/// must not notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_take_over_another_agents_client_id() {
    let sec = Secure::from_env();
    let (run, _, (a, id_a), (b, id_b)) = two_agents("clientid", "eu-north");
    let victim_id = format!("vantage-agent-{b}");
    let cert = |name: &str| {
        let paths = services(&["client-cert", name], "");
        let mut lines = paths.lines();
        (
            PathBuf::from(lines.next().unwrap()),
            PathBuf::from(lines.next().unwrap()),
        )
    };
    let (cert_a, cert_b) = (cert(&a), cert(&b));
    for (listener, port) in [("password", sec.tls_port), ("certificate", sec.mtls_port)] {
        let options = |who: &Identity, pem: &(PathBuf, PathBuf)| {
            let mut o = rumqttc::MqttOptions::new(&victim_id, &sec.host, port);
            o.set_keep_alive(Duration::from_secs(30));
            if port == sec.mtls_port {
                o.set_transport(tls_transport(&sec.ca, Some((&pem.0, &pem.1))));
            } else {
                o.set_credentials(&who.user, &who.password);
                o.set_transport(tls_transport(&sec.ca, None));
            }
            o
        };
        let stop = CancellationToken::new();
        let victim = watch_connection(options(&id_b, &cert_b), stop.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
        for _ in 0..5 {
            connect_once(options(&id_a, &cert_a)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
        let (connacks, errors) = victim.await.unwrap();
        assert_eq!(
            (connacks, errors),
            (1, 0),
            "{listener} listener: B's connection (connected, errors) after five takeover \
             attempts with A's credentials"
        );
    }
    drop((id_a, id_b));
    // Sessions (clean here, but named after the users) and files.
    run.cleanup(&[a.clone(), b.clone(), victim_id]).await;
}

/// `targets apply` publishes over MQTT 3.1.1, where a broker acknowledges a publish its ACL
/// refuses and drops it: apply must read its sets back and fail then. An identity allowed on the
/// targets topics (the ingester's) passes the same check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_publish_is_read_back_and_acl_drops_are_caught() {
    let sec = Secure::from_env();
    let run = Run::new("acl-targets");
    let prefix = run.prefix();
    let agent = format!("a-{}", run.id);
    let agent_id = Identity::agent(&prefix, "eu-north", &agent);
    let ingester_id = Identity::ingester(&prefix, &format!("ing-{}", run.id));
    let mqtt_as = |who: &Identity| {
        let pw = run.dir.join(format!("{}.pw", who.user));
        write_file(&pw, &who.password);
        let text = format!(
            "[mqtt]\nhost = \"{host}\"\nport = {port}\nusername = \"{user}\"\npassword_file = \"{pw}\"\n\
             client_id = \"t-{user}\"\ntopic_prefix = \"{prefix}\"\n[mqtt.tls]\nca_file = \"{ca}\"\n",
            host = sec.host,
            port = sec.tls_port,
            user = who.user,
            pw = pw.display(),
            ca = sec.ca.display(),
        );
        let path = run.dir.join(format!("ingester-{}.toml", who.user));
        write_file(&path, &text);
        vantage_ingester::Config::load(&path).unwrap()
    };
    // The agent's own region set: it may read that topic, but not write it.
    let set = vec![(format!("{prefix}/v1/targets/eu-north"), vec![1, 7, 0])];

    let as_agent = mqtt_as(&agent_id);
    let mqtt = as_agent.mqtt().unwrap();
    vantage_ingester::targets::publish(mqtt, set.clone())
        .await
        .expect("MQTT 3.1.1: the broker acknowledges even a refused publish");
    let err = vantage_ingester::targets::verify_retained(mqtt, &set)
        .await
        .expect_err("a dropped set must not pass the read-back");
    assert!(err.contains("does not hold the published set"), "{err}");

    let as_ingester = mqtt_as(&ingester_id);
    let mqtt = as_ingester.mqtt().unwrap();
    vantage_ingester::targets::publish(mqtt, set.clone())
        .await
        .unwrap();
    vantage_ingester::targets::verify_retained(mqtt, &set)
        .await
        .expect("the ingester's identity reads its sets back");
    // Clear the retained set again.
    let clear = vec![(set[0].0.clone(), Vec::new())];
    vantage_ingester::targets::publish(mqtt, clear)
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tls_is_verified_and_never_downgraded() {
    use vantage_ingester::config::{PgTls, PostgresConfig};
    let sec = Secure::from_env();
    let services = vantage_tests::Services::from_env();
    let pg: tokio_postgres::Config = services.pg_url.parse().unwrap();
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let tls = |ca: Option<&Path>| {
        PgTls::VerifyFull(
            vantage_ingester::tls::client(&vantage_ingester::tls::RawTls {
                ca_file: ca.map(Path::to_owned),
                ..Default::default()
            })
            .unwrap(),
        )
    };
    let config = |url: String, tls: PgTls| PostgresConfig {
        url,
        password: password.clone(),
        schema: "public".into(),
        tls,
    };
    let url = |host: &str| format!("host={host} port={port} user=vantage dbname=vantage");

    // The test CA, by address and by name: TLS in use.
    for host in ["127.0.0.1", "localhost"] {
        let client = vantage_ingester::db::connect(&config(url(host), tls(Some(&sec.ca))))
            .await
            .unwrap_or_else(|e| panic!("TLS to {host}: {e}"));
        let ssl: bool = query_scalar(&client, OWN_SSL, &[]).await;
        assert!(ssl, "connection to {host} is not TLS");
    }
    // Not signed by a trusted CA (the bundled public roots): refused.
    let Err(e) = vantage_ingester::db::connect(&config(url("127.0.0.1"), tls(None))).await else {
        panic!("a certificate from an unknown CA was accepted");
    };
    assert!(format!("{e:?}").contains("UnknownIssuer"), "{e:?}");
    // Right CA, wrong name: the certificate is for localhost and 127.0.0.1 only.
    let Err(e) = vantage_ingester::db::connect(&config(
        format!("host=db.example hostaddr=127.0.0.1 port={port} user=vantage dbname=vantage"),
        tls(Some(&sec.ca)),
    ))
    .await
    else {
        panic!("a certificate for another name was accepted");
    };
    assert!(format!("{e:?}").contains("NotValidForName"), "{e:?}");
    // `sslmode=disable` in the URL does not turn TLS off: the configuration decides.
    let client = vantage_ingester::db::connect(&config(
        format!("{} sslmode=disable", url("127.0.0.1")),
        tls(Some(&sec.ca)),
    ))
    .await
    .unwrap();
    let ssl: bool = query_scalar(&client, OWN_SSL, &[]).await;
    assert!(
        ssl,
        "sslmode=disable in the URL downgraded a verify-full connection"
    );
}

/// Every log line of this test binary, at TRACE, for the secrets check.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
            .with_ansi(false)
            .with_writer(move || CaptureWriter(sink.clone()))
            .try_init();
        logs
    })
    .clone()
}

struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const ROUNDS: u64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipeline_over_tls_sasl_ssl_and_verified_postgres_logs_no_secret() {
    let logs = captured_logs();
    let sec = Secure::from_env();
    let run = Run::new("secure");
    let prefix = run.prefix();
    let target = TargetServer::start("127.0.0.1:0").await.unwrap();
    let agents = [
        ("eu-north", format!("eu-{}", run.id)),
        ("us-east", format!("us-{}", run.id)),
    ];
    let identities: Vec<Identity> = agents
        .iter()
        .map(|(region, agent)| Identity::agent(&prefix, region, agent))
        .collect();
    let bridge_user = format!("ingester-{}", run.id);
    let bridge_identity = Identity::ingester(&prefix, &bridge_user);

    // A PostgreSQL role of this run with a random password (the shared one is a plain word).
    let admin = run.pg().await;
    let pg_role = format!("sec_{}", run.id);
    let pg_password = random_secret();
    // The test's own statement holds the password, and tokio-postgres logs statements at
    // DEBUG: run it with no subscriber, so the capture below sees only what vantage logs.
    {
        use tracing::instrument::WithSubscriber as _;
        admin
            .batch_execute(&format!(
                "CREATE ROLE {pg_role} LOGIN SUPERUSER PASSWORD '{pg_password}'"
            ))
            .with_subscriber(tracing::subscriber::NoSubscriber::default())
            .await
            .unwrap();
    }
    let services = vantage_tests::Services::from_env();
    let pg: tokio_postgres::Config = services.pg_url.parse().unwrap();
    let pg_port = pg.get_ports().first().copied().unwrap_or(5432);
    let kafka_password = std::fs::read_to_string(&sec.sasl_password_file)
        .unwrap()
        .trim()
        .to_owned();

    let secret_file = |name: &str, value: &str| {
        let p = run.dir.join(name);
        write_file(&p, &format!("{value}\n"));
        p.display().to_string()
    };
    let ingester_toml = format!(
        r#"
[mqtt]
host = "{host}"
port = {tls_port}
username = "{bridge_user}"
password_file = "{mqtt_pw}"
client_id = "{client_id}"
topic_prefix = "{prefix}"
[mqtt.tls]
ca_file = "{ca}"

[kafka]
brokers = "{sasl_brokers}"
topic = "{topic}"
dead_letter_topic = "{dlq}"
group_id = "{group}"
partitions = 2
replication_factor = 1
min_insync_replicas = 1
[kafka.properties]
"security.protocol" = "SASL_SSL"
"sasl.mechanisms" = "SCRAM-SHA-512"
"sasl.username" = "{sasl_user}"
"ssl.ca.location" = "{ca}"
"ssl.endpoint.identification.algorithm" = "https"
# librdkafka's own debug output too: it must not print the SASL password either
"debug" = "security,broker,protocol"
[kafka.secret_files]
"sasl.password" = "{kafka_pw}"

[postgres]
url = "host=localhost port={pg_port} user={pg_role} dbname=vantage"
password_file = "{pg_pw}"
schema = "{schema}"
tls = "verify-full"
ca_file = "{ca}"

[sink]
batch_max = 50
batch_timeout = "100ms"
"#,
        host = sec.host,
        tls_port = sec.tls_port,
        mqtt_pw = secret_file("bridge.pw", &bridge_identity.password),
        client_id = run.bridge_client_id("tls"),
        ca = sec.ca.display(),
        sasl_brokers = sec.sasl_brokers,
        topic = run.topic(),
        dlq = run.dead_letter_topic(),
        group = run.group(),
        sasl_user = sec.sasl_user,
        kafka_pw = sec.sasl_password_file.display(),
        pg_pw = secret_file("pg.pw", &pg_password),
        schema = run.schema(),
    );
    let ingester_file = run.dir.join("ingester.toml");
    write_file(&ingester_file, &ingester_toml);
    let ingester = Arc::new(vantage_ingester::Config::load(&ingester_file).unwrap());
    tracing::debug!(config = ?ingester, "ingester configuration (Debug must not show secrets)");

    let stop = CancellationToken::new();
    let stages = start_sink_and_bridge(&ingester, &stop).await;

    let mut runs = Vec::new();
    for ((region, agent), identity) in agents.iter().zip(&identities) {
        // The spool (uplink.spool_max_bytes) lives in state_dir: this run's folder.
        let spool_state_dir = run.dir.display();
        let text = format!(
            r#"
agent_id = "{agent}"
region = "{region}"
state_dir = "{spool_state_dir}"
[mqtt]
host = "{host}"
port = {port}
username = "{agent}"
password_file = "{pw}"
topic_prefix = "{prefix}"
[mqtt.tls]
ca_file = "{ca}"
[uplink]
batch_max = 4
flush_interval = "200ms"
[[targets]]
id = 1
url = "{url}"
interval = "1s"
timeout = "1s"
regex = "target: ok"
"#,
            host = sec.host,
            port = sec.tls_port,
            pw = secret_file(&format!("{agent}.pw"), &identity.password),
            ca = sec.ca.display(),
            url = target.url("/"),
        );
        let path = run.dir.join(format!("{agent}.toml"));
        write_file(&path, &text);
        let config = vantage_agent::Config::load(&path).unwrap();
        tracing::debug!(config = ?config, "agent configuration (Debug must not show secrets)");
        runs.push(vantage_agent::run(
            config,
            vantage_agent::RunOptions {
                rounds: Some(ROUNDS),
            },
            CancellationToken::new(),
        ));
    }
    let summaries = futures::future::join_all(runs).await;
    let mut produced = 0;
    for s in summaries {
        let s = s.unwrap();
        assert_eq!(s.uplink.results, ROUNDS, "{s:?}");
        assert_eq!(s.uplink.undelivered, 0, "{s:?}");
        produced += s.uplink.results as i64;
    }

    let stored = run.wait_rows(produced, Duration::from_secs(90)).await;
    assert_eq!(stored, produced, "rows in PostgreSQL vs results produced");
    let client = run.pg().await;
    let sql = "SELECT region, agent, count(*) FROM results GROUP BY 1, 2 ORDER BY 1";
    let by_region: Vec<(String, String, i64)> = query_triples(&client, sql).await;
    assert_eq!(
        by_region,
        [
            ("eu-north".to_owned(), agents[0].1.clone(), ROUNDS as i64),
            ("us-east".to_owned(), agents[1].1.clone(), ROUNDS as i64),
        ]
    );
    // The sink's own sessions are TLS.
    let tls_sessions: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.usename = $1 AND s.ssl",
            &[&pg_role],
        )
        .await
        .unwrap()
        .get(0);
    let plain_sessions: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.usename = $1 AND NOT s.ssl",
            &[&pg_role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        tls_sessions >= 1 && plain_sessions == 0,
        "{tls_sessions} TLS, {plain_sessions} plain"
    );

    let (bridge_stats, _) = stages.stop(&stop).await;
    assert_eq!(bridge_stats.dead_lettered, 0, "{bridge_stats:?}");

    // Bad secrets: the errors name the key, never the value.
    for (from, to, key, secret) in [
        (
            "[kafka.secret_files]".to_owned(),
            format!("\"sasl.password\" = \"{kafka_password}\"\n[kafka.secret_files]"),
            "kafka.properties.sasl.password",
            &kafka_password,
        ),
        (
            format!("user={pg_role} "),
            format!("user={pg_role} password={pg_password} "),
            "postgres.url",
            &pg_password,
        ),
    ] {
        let bad = ingester_toml.replace(&from, &to);
        let e = vantage_ingester::Config::parse(&bad, Path::new("bad.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && !e.contains(secret.as_str()), "{e}");
        tracing::error!(error = %e, "config error (logged, as main would)");
    }

    let _ = admin
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", run.schema()))
        .await;
    // The sink's pool may still be closing; DROP ROLE waits for nobody, so retry briefly.
    for _ in 0..50 {
        if admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {pg_role}"))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The secure listener names each session after its user (`use_username_as_clientid`).
    let mut client_ids = vec![bridge_user.clone()];
    client_ids.extend(agents.iter().map(|(_, a)| a.clone()));
    run.cleanup(&client_ids).await;
    let mut secrets = vec![
        ("kafka SASL password", kafka_password.clone()),
        ("PostgreSQL password", pg_password.clone()),
        ("bridge MQTT password", bridge_identity.password.clone()),
    ];
    secrets.extend(
        identities
            .iter()
            .map(|i| ("agent MQTT password", i.password.clone())),
    );
    drop(identities);
    drop(bridge_identity);

    // The secrets check, over everything logged at TRACE by this binary so far.
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        text.contains("librdkafka") && text.contains("SASL"),
        "the capture did not see librdkafka's debug output ({} bytes)",
        text.len()
    );
    assert!(
        text.contains("connected to MQTT broker"),
        "capture incomplete"
    );
    if let Ok(path) = std::env::var("VANTAGE_SECURITY_LOG") {
        std::fs::write(path, &text).unwrap();
    }
    for (what, value) in &secrets {
        assert!(value.len() >= 16, "{what} is too short to search for");
        assert!(
            !text.contains(value.as_str()),
            "the {what} appears in the logs ({} bytes captured)",
            text.len()
        );
    }
    eprintln!(
        "secrets check: {} secrets searched in {} bytes of TRACE logs, none found",
        secrets.len(),
        text.len()
    );
}
