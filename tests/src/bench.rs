//! What the benchmark binaries (`src/bin/bench-*.rs`) share.

use std::time::Instant;

/// The wall times (ms, sorted) of `runs` executions of `sql` on `client`, after one warm-up.
pub async fn query_times(
    client: &tokio_postgres::Client,
    sql: &str,
    runs: usize,
) -> Result<Vec<f64>, tokio_postgres::Error> {
    client.simple_query(sql).await?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        client.simple_query(sql).await?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}
