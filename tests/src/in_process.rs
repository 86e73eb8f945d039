//! The ingester's sink and bridge in-process for end-to-end tests, started in the order the
//! pipeline needs, and the tracing set-up and polling wait those tests share.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vantage_ingester::bridge::{BridgeError, BridgeState, BridgeStats};
use vantage_ingester::sink::{SinkError, SinkStats};
use vantage_ingester::Config;

use crate::harness::{IngesterOptions, Run};
use crate::target::TargetServer;

/// Test output through the test writer, filtered by `RUST_LOG` or else by `default_filter`
/// (e.g. `"warn,vantage_ingester=info"`). Once per process; later calls change nothing.
pub fn init_tracing(default_filter: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 200 ms until it returns Some, for at most `limit`; panics naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The in-process sink and bridge tasks: each ends with its stage's stats once `stop` is
/// cancelled.
pub struct SinkAndBridge {
    pub sink: JoinHandle<Result<SinkStats, SinkError>>,
    pub bridge: JoinHandle<Result<BridgeStats, BridgeError>>,
}

impl SinkAndBridge {
    /// Waits for both tasks after `stop` was cancelled, for the fixtures' tear-down: how they
    /// ended goes to stderr and fails nothing (a test that checks the stats awaits the fields).
    pub async fn join(self) {
        if let Ok(Err(e)) = self.sink.await {
            eprintln!("sink ended with an error: {e}");
        }
        if let Ok(Err(e)) = self.bridge.await {
            eprintln!("bridge ended with an error: {e}");
        }
    }
}

impl SinkAndBridge {
    /// Cancels `stop` and waits for both stages, which must have ended well; (bridge, sink)
    /// stats, printed.
    pub async fn stop(self, stop: &CancellationToken) -> (BridgeStats, SinkStats) {
        stop.cancel();
        let bridge = self.bridge.await.unwrap().unwrap();
        let sink = self.sink.await.unwrap().unwrap();
        println!("bridge: {bridge:?}\nsink: {sink:?}");
        (bridge, sink)
    }
}

/// Rows in `results` (0 while the sink has not created the table yet).
pub async fn count_results(client: &tokio_postgres::Client) -> i64 {
    match client.query_one("SELECT count(*) FROM results", &[]).await {
        Ok(row) => row.get(0),
        Err(_) => 0,
    }
}

/// Waits (90 s at most) until `results` has `expected` rows, then one second more for any
/// duplicate to show up.
pub async fn wait_results_then_settle(client: &tokio_postgres::Client, expected: i64) {
    let arrived = tokio::time::timeout(Duration::from_secs(90), async {
        while count_results(client).await < expected {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let now = count_results(client).await;
    assert!(arrived.is_ok(), "only {now} of {expected} rows arrived");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Starts the sink (first: it applies the migrations), then the bridge, both on `config` and
/// stopped by `stop`, and waits (60 s at most) for the bridge's subscription: agents start only
/// after it exists, because MQTT keeps nothing for a subscriber that never subscribed.
pub async fn start_sink_and_bridge(
    config: &Arc<Config>,
    stop: &CancellationToken,
) -> SinkAndBridge {
    let sink = tokio::spawn({
        let (c, s) = (config.clone(), stop.clone());
        async move { vantage_ingester::sink::run(&c, s).await }
    });
    let state = Arc::new(BridgeState::default());
    let bridge = tokio::spawn({
        let (c, s, st) = (config.clone(), stop.clone(), state.clone());
        async move { vantage_ingester::bridge::run_with_state(&c, s, st).await }
    });
    let subscribed = tokio::time::timeout(Duration::from_secs(60), async {
        while !state.subscribed.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(subscribed.is_ok(), "bridge did not subscribe within 60 s");
    SinkAndBridge { sink, bridge }
}

/// How most end-to-end tests start: a run named after `kind`, a local target, the run's
/// ingester file for `options` and the sink and bridge in-process on it.
pub struct Started {
    pub run: Run,
    pub target: TargetServer,
    /// The ingester file's path, its text (a base other files append sections to) and its
    /// configuration.
    pub file: PathBuf,
    pub base: String,
    pub config: Arc<Config>,
    /// Stops the stages.
    pub stop: CancellationToken,
    pub stages: SinkAndBridge,
}

/// See [`Started`].
pub async fn start(kind: &str, options: &IngesterOptions) -> Started {
    let run = Run::new(kind);
    let target = TargetServer::start("127.0.0.1:0").await.unwrap();
    let (file, base, config) = ingester_base(&run, options);
    let stop = CancellationToken::new();
    let stages = start_sink_and_bridge(&config, &stop).await;
    Started {
        run,
        target,
        file,
        base,
        config,
        stop,
        stages,
    }
}

/// The options these tests run the stages with: two partitions, sink batches of at most
/// `batch_max` rows closed after `batch_timeout_ms`.
pub fn two_partitions(batch_max: usize, batch_timeout_ms: u64) -> IngesterOptions {
    IngesterOptions {
        partitions: 2,
        sink_batch_max: batch_max,
        sink_batch_timeout_ms: batch_timeout_ms,
        ..IngesterOptions::default()
    }
}

/// This run's ingester file for `options`, its text (a base other files append sections to)
/// and its configuration, loaded.
pub fn ingester_base(run: &Run, options: &IngesterOptions) -> (PathBuf, String, Arc<Config>) {
    let file = run.ingester_file(options);
    let text = std::fs::read_to_string(&file).unwrap();
    let config = Arc::new(Config::load(&file).unwrap());
    (file, text, config)
}

/// A client of `config`'s PostgreSQL (`db::connect`, TLS as configured) whose schema is
/// migrated to the latest version.
pub async fn migrated(config: &Config) -> tokio_postgres::Client {
    let pg = config.postgres().unwrap();
    let mut client = vantage_ingester::db::connect(pg).await.unwrap();
    vantage_ingester::db::migrate(&mut client, &pg.schema)
        .await
        .unwrap();
    client
}

/// The first column of every row of `sql` (no parameters).
pub async fn query_column<T>(client: &tokio_postgres::Client, sql: &str) -> Vec<T>
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    let rows = client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    rows.iter().map(|r| r.get(0)).collect()
}

/// The (first, second) columns of every row `sql` returns, collected (a `Vec`, a map).
pub async fn query_pairs<A, B, T>(client: &tokio_postgres::Client, sql: &str) -> T
where
    A: for<'a> tokio_postgres::types::FromSql<'a>,
    B: for<'a> tokio_postgres::types::FromSql<'a>,
    T: FromIterator<(A, B)>,
{
    let rows = client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// The rows of `sql` (no parameters) as triples of its first three columns.
pub async fn query_triples<A, B, C>(client: &tokio_postgres::Client, sql: &str) -> Vec<(A, B, C)>
where
    A: for<'a> tokio_postgres::types::FromSql<'a>,
    B: for<'a> tokio_postgres::types::FromSql<'a>,
    C: for<'a> tokio_postgres::types::FromSql<'a>,
{
    let rows = client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    rows.iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The first column of the one row `sql` returns for `params`.
pub async fn query_scalar<T: for<'a> tokio_postgres::types::FromSql<'a>>(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> T {
    client
        .query_one(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}
