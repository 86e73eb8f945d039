//! `vantage-ingester report`: response times and availability per target and region, from SQL.

use std::fmt::Write as _;
use std::time::Duration;

use tokio_postgres::Client;

use crate::db::DbError;

/// One line of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportRow {
    pub target_id: i32,
    pub region: String,
    pub probes: i64,
    /// Percentage of probes whose outcome was `up`.
    pub availability_pct: f64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The most frequent failure outcome, if any probe failed.
    pub top_error: Option<String>,
}

/// Output formats of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
}

/// Targets × regions over the last `since`, from the raw results table.
pub async fn query(client: &Client, since: Duration) -> Result<Vec<ReportRow>, DbError> {
    let rows = client
        .query(
            "SELECT target_id, region, count(*) AS probes,
                    100.0 * avg((outcome = 'up')::int)::float8 AS availability_pct,
                    percentile_cont(0.50) WITHIN GROUP (ORDER BY total_us) / 1000.0 AS p50_ms,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY total_us) / 1000.0 AS p95_ms,
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY total_us) / 1000.0 AS p99_ms,
                    mode() WITHIN GROUP (ORDER BY outcome) FILTER (WHERE outcome <> 'up') AS top_error
               FROM results
              WHERE started_at >= now() - make_interval(secs => $1)
              GROUP BY target_id, region
              ORDER BY target_id, region",
            &[&since.as_secs_f64()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ReportRow {
            target_id: r.get(0),
            region: r.get(1),
            probes: r.get(2),
            availability_pct: r.get(3),
            p50_ms: r.get(4),
            p95_ms: r.get(5),
            p99_ms: r.get(6),
            top_error: r.get(7),
        })
        .collect())
}

/// Renders rows as an aligned text table or as CSV.
pub fn render(rows: &[ReportRow], format: Format) -> String {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    let mut out = String::new();
    match format {
        Format::Csv => {
            out.push_str(
                "target_id,region,probes,availability_pct,p50_ms,p95_ms,p99_ms,top_error\n",
            );
            for r in rows {
                let _ = writeln!(
                    out,
                    "{},{},{},{:.2},{},{},{},{}",
                    r.target_id,
                    r.region,
                    r.probes,
                    r.availability_pct,
                    ms(r.p50_ms),
                    ms(r.p95_ms),
                    ms(r.p99_ms),
                    r.top_error.as_deref().unwrap_or("")
                );
            }
        }
        Format::Table => {
            let _ = writeln!(
                out,
                "{:>6}  {:<16} {:>7} {:>8} {:>9} {:>9} {:>9}  top error",
                "target", "region", "probes", "up %", "p50 ms", "p95 ms", "p99 ms"
            );
            for r in rows {
                let _ = writeln!(
                    out,
                    "{:>6}  {:<16} {:>7} {:>8.2} {:>9} {:>9} {:>9}  {}",
                    r.target_id,
                    r.region,
                    r.probes,
                    r.availability_pct,
                    ms(r.p50_ms),
                    ms(r.p95_ms),
                    ms(r.p99_ms),
                    r.top_error.as_deref().unwrap_or("-")
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_table_and_csv() {
        let rows = [ReportRow {
            target_id: 1,
            region: "eu-north".into(),
            probes: 10,
            availability_pct: 90.0,
            p50_ms: Some(12.34),
            p95_ms: Some(20.0),
            p99_ms: None,
            top_error: Some("timeout".into()),
        }];
        let t = render(&rows, Format::Table);
        assert!(t.lines().nth(1).unwrap().contains("eu-north"), "{t}");
        assert!(t.contains("12.3") && t.contains("timeout"), "{t}");
        let c = render(&rows, Format::Csv);
        assert_eq!(
            c.lines().nth(1).unwrap(),
            "1,eu-north,10,90.00,12.3,20.0,-,timeout"
        );
    }
}
