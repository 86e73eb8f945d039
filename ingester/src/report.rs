//! `vantage-ingester report`: availability, response-time percentiles and the top error per
//! target and region over a window, read from the rollups (SQL function `region_comparison`).

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
    /// Percentiles of the total time, from histograms (within 1% of the exact value).
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The most frequent outcome other than `up`, if any probe failed.
    pub top_error: Option<String>,
}

/// Output formats of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// Targets × regions over the last `since` (whole minute buckets below 6 hours, whole hour
/// buckets from 6 hours on).
pub async fn query(
    client: &Client,
    since: Duration,
    target: Option<i32>,
) -> Result<Vec<ReportRow>, DbError> {
    let rows = client
        .query(
            "SELECT target_id, region, probes, availability_pct, p50_ms, p95_ms, p99_ms, top_error
               FROM region_comparison(make_interval(secs => $1), $2)",
            &[&since.as_secs_f64(), &target],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ReportRow {
            target_id: r.get(0),
            region: r.get(1),
            probes: r.get(2),
            availability_pct: r.get::<_, Option<f64>>(3).unwrap_or(0.0),
            p50_ms: r.get(4),
            p95_ms: r.get(5),
            p99_ms: r.get(6),
            top_error: r.get(7),
        })
        .collect())
}

/// Renders rows as an aligned table, CSV, or a JSON array.
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
                    ms(r.p50_ms).replace('-', ""),
                    ms(r.p95_ms).replace('-', ""),
                    ms(r.p99_ms).replace('-', ""),
                    r.top_error.as_deref().unwrap_or("")
                );
            }
        }
        Format::Json => {
            let num = |v: Option<f64>| v.map_or_else(|| "null".to_owned(), |v| format!("{v:.3}"));
            out.push('[');
            for (i, r) in rows.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                // Region and outcome names are validated identifiers ([a-z0-9._-]): no escaping
                // is needed.
                let _ = write!(
                    out,
                    "{{\"target_id\":{},\"region\":\"{}\",\"probes\":{},\"availability_pct\":{:.3},\
                     \"p50_ms\":{},\"p95_ms\":{},\"p99_ms\":{},\"top_error\":{}}}",
                    r.target_id,
                    r.region,
                    r.probes,
                    r.availability_pct,
                    num(r.p50_ms),
                    num(r.p95_ms),
                    num(r.p99_ms),
                    r.top_error
                        .as_deref()
                        .map_or_else(|| "null".to_owned(), |e| format!("\"{e}\""))
                );
            }
            out.push_str("]\n");
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

    fn rows() -> [ReportRow; 1] {
        [ReportRow {
            target_id: 1,
            region: "eu-north".into(),
            probes: 10,
            availability_pct: 90.0,
            p50_ms: Some(12.34),
            p95_ms: Some(20.0),
            p99_ms: None,
            top_error: Some("timeout".into()),
        }]
    }

    #[test]
    fn renders_table_csv_and_json() {
        let t = render(&rows(), Format::Table);
        assert!(t.lines().nth(1).unwrap().contains("eu-north"), "{t}");
        assert!(t.contains("12.3") && t.contains("timeout"), "{t}");
        let c = render(&rows(), Format::Csv);
        assert_eq!(
            c.lines().nth(1).unwrap(),
            "1,eu-north,10,90.00,12.3,20.0,,timeout"
        );
        let j = render(&rows(), Format::Json);
        assert_eq!(
            j.trim(),
            "[{\"target_id\":1,\"region\":\"eu-north\",\"probes\":10,\"availability_pct\":90.000,\
             \"p50_ms\":12.340,\"p95_ms\":20.000,\"p99_ms\":null,\"top_error\":\"timeout\"}]"
        );
    }
}
