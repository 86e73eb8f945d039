//! Plain-text tables for the admin commands (`targets list`, `agents`): columns padded to their
//! widest cell, two spaces apart, no trailing blanks.

/// `rows[0]` is the header. Every row must have the same number of cells.
pub fn align<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn pads_columns() {
        let rows = [
            ["A".to_owned(), "LONG HEADER".to_owned()],
            ["wide cell".to_owned(), "x".to_owned()],
        ];
        assert_eq!(
            super::align(&rows),
            "A          LONG HEADER\nwide cell  x\n"
        );
    }
}
