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
/// buckets from 6 hours on); with `kind`, only the targets of that probe kind (`http`, `tcp`,
/// `tls`, `dns`; migration 0016's `region_comparison(since, target, of_kind)`).
pub async fn query(
    client: &Client,
    since: Duration,
    target: Option<i32>,
    kind: Option<&str>,
) -> Result<Vec<ReportRow>, DbError> {
    let columns = "target_id, region, probes, availability_pct, p50_ms, p95_ms, p99_ms, top_error";
    let secs = since.as_secs_f64();
    let rows = match kind {
        None => {
            let sql =
                format!("SELECT {columns} FROM region_comparison(make_interval(secs => $1), $2)");
            client.query(&sql, &[&secs, &target]).await?
        }
        Some(kind) => {
            let sql = format!(
                "SELECT {columns} FROM region_comparison(make_interval(secs => $1), $2, $3)"
            );
            client.query(&sql, &[&secs, &target, &kind]).await?
        }
    };
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

/// Values as the CSV and JSON outputs carry them: CSV rounds milliseconds to 0.1 and availability
/// to 0.01 percent (as the table shows them), JSON both to 0.001; empty/null where there is no
/// value.
#[derive(serde::Serialize)]
struct Record<'a> {
    target_id: i32,
    region: &'a str,
    probes: i64,
    availability_pct: f64,
    p50_ms: Option<f64>,
    p95_ms: Option<f64>,
    p99_ms: Option<f64>,
    top_error: Option<&'a str>,
}

impl<'a> Record<'a> {
    fn of(r: &'a ReportRow, ms_decimals: i32, pct_decimals: i32) -> Record<'a> {
        let round = |v: f64, decimals: i32| {
            let scale = 10f64.powi(decimals);
            (v * scale).round() / scale
        };
        let ms = |v: Option<f64>| v.map(|v| round(v, ms_decimals));
        Record {
            target_id: r.target_id,
            region: &r.region,
            probes: r.probes,
            availability_pct: round(r.availability_pct, pct_decimals),
            p50_ms: ms(r.p50_ms),
            p95_ms: ms(r.p95_ms),
            p99_ms: ms(r.p99_ms),
            top_error: r.top_error.as_deref(),
        }
    }
}

/// Renders rows as an aligned table, CSV (RFC 4180, by the `csv` crate: a header line, fields
/// quoted where they need it) or a JSON array (serde_json).
pub fn render(rows: &[ReportRow], format: Format) -> String {
    match format {
        Format::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            for r in rows {
                // Serializing plain numbers and strings into memory cannot fail.
                let _ = w.serialize(Record::of(r, 1, 2));
            }
            let bytes = w.into_inner().unwrap_or_default();
            let mut out = String::from_utf8(bytes).unwrap_or_default();
            if rows.is_empty() {
                out.push_str(
                    "target_id,region,probes,availability_pct,p50_ms,p95_ms,p99_ms,top_error\n",
                );
            }
            out
        }
        Format::Json => {
            let records: Vec<Record<'_>> = rows.iter().map(|r| Record::of(r, 3, 3)).collect();
            let mut out = serde_json::to_string(&records).unwrap_or_else(|_| "[]".to_owned());
            out.push('\n');
            out
        }
        Format::Table => table(rows),
    }
}

fn table(rows: &[ReportRow]) -> String {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    let mut out = String::new();
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
            c,
            "target_id,region,probes,availability_pct,p50_ms,p95_ms,p99_ms,top_error\n\
             1,eu-north,10,90.0,12.3,20.0,,timeout\n"
        );
        let j = render(&rows(), Format::Json);
        assert_eq!(
            j.trim(),
            "[{\"target_id\":1,\"region\":\"eu-north\",\"probes\":10,\"availability_pct\":90.0,\
             \"p50_ms\":12.34,\"p95_ms\":20.0,\"p99_ms\":null,\"top_error\":\"timeout\"}]"
        );
    }

    #[test]
    fn csv_quotes_and_json_escapes_what_needs_it() {
        // Names are validated identifiers today; the writers must not depend on it.
        let mut odd = rows();
        odd[0].region = "eu,\"north\"".into();
        let c = render(&odd, Format::Csv);
        assert_eq!(
            c.lines().nth(1).unwrap(),
            "1,\"eu,\"\"north\"\"\",10,90.0,12.3,20.0,,timeout"
        );
        let j = render(&odd, Format::Json);
        let back: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(back[0]["region"], "eu,\"north\"");
    }

    #[test]
    fn empty_reports_keep_their_shape() {
        assert_eq!(
            render(&[], Format::Csv),
            "target_id,region,probes,availability_pct,p50_ms,p95_ms,p99_ms,top_error\n"
        );
        assert_eq!(render(&[], Format::Json), "[]\n");
    }
}
