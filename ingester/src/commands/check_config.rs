//! `vantage-ingester check-config [--stage S]... FILE`: validate a configuration file without
//! connecting to anything, print which commands it can run, and fail when a command named with
//! `--stage` lacks a section it needs.

use std::path::Path;

use crate::config::{render_stages, Config};

pub fn run(path: &Path, stages: &[String]) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let checks = config.stages();
    println!("{}: valid", path.display());
    print!("{}", render_stages(&checks));
    let unable: Vec<&str> = checks
        .iter()
        .filter(|c| !c.missing.is_empty() && stages.iter().any(|s| s == c.command))
        .map(|c| c.command)
        .collect();
    if !unable.is_empty() {
        anyhow::bail!(
            "{}: cannot run {} (see above)",
            path.display(),
            unable.join(", ")
        );
    }
    Ok(())
}
