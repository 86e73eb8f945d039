//! A probe the memory budget can never hold is not sent, and is reported as a result with
//! outcome `memory_refused` (issue #13 item 3). A local target like that is refused at load
//! (config.rs); a pushed set can still carry one, which is what this test stands for by
//! lowering the budget after the load.

use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "current_thread")]
async fn a_probe_too_big_for_the_budget_is_refused_with_an_outcome() {
    // A server that must never be asked.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let text = format!(
        "agent_id = \"budget-test\"\nregion = \"eu-north\"\nstate_dir = \"{dir}\"\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = 1\n\
         [uplink]\ndrain_timeout = \"200ms\"\n\
         [[targets]]\nid = 1\nurl = \"http://{addr}/\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\n\
         regex = \"ok\"\nbody_cap = 1048576\n",
        dir = std::env::temp_dir().display(),
    );
    let mut config = vantage_agent::Config::parse(&text, Path::new("budget.toml")).unwrap();
    // 128 KiB floor + 5 × 1 MiB with the regex: more than 4 MiB.
    config.memory_budget = 4 << 20;
    let summary = tokio::time::timeout(
        Duration::from_secs(30),
        vantage_agent::run(
            config,
            vantage_agent::RunOptions { rounds: Some(3) },
            CancellationToken::new(),
        ),
    )
    .await
    .expect("the run ends after its rounds")
    .unwrap();
    assert_eq!(
        (summary.probes_started, summary.probes_refused),
        (0, 3),
        "{summary:?}"
    );
    // Each refusal is a numbered result (undelivered here: no broker).
    assert_eq!(summary.uplink.results, 3, "{summary:?}");
    assert!(
        listener.accept().is_err(),
        "the target was contacted although the probe was refused"
    );
    let metrics = vantage_agent::metrics::encode();
    assert!(
        metrics.contains("vantage_agent_probes_total{outcome=\"memory_refused\"} 3"),
        "{metrics}"
    );
}
