//! The long-running stages: load the config, start the stage's operator endpoint when its
//! `[http]` address is set (what `/readyz` checks differs per stage), run until SIGINT/SIGTERM.

use std::path::Path;
use std::sync::Arc;

use vantage_common::signal::shutdown_on_signal;

use crate::http::{self, Readiness};
use crate::metrics::Stage;
use crate::{alert, bridge, sink, web, Config};

/// `vantage-ingester bridge`: ready when connected and subscribed to MQTT and Kafka answers.
pub async fn bridge(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let shutdown = shutdown_on_signal();
    let state = Arc::<bridge::BridgeState>::default();
    if let Some(addr) = config.http.bridge_listen {
        let ready = Readiness::new(Stage::Bridge)
            .mqtt(state.clone())
            .kafka(config.kafka()?)?;
        http::start(addr, ready, shutdown.clone()).await?;
    }
    bridge::run_with_state(&config, shutdown, state).await?;
    Ok(())
}

/// `vantage-ingester sink`: ready when Kafka and PostgreSQL answer.
pub async fn sink(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let shutdown = shutdown_on_signal();
    if let Some(addr) = config.http.sink_listen {
        let ready = Readiness::new(Stage::Sink)
            .kafka(config.kafka()?)?
            .postgres(config.postgres()?);
        http::start(addr, ready, shutdown.clone()).await?;
    }
    sink::run(&config, shutdown).await?;
    Ok(())
}

/// `vantage-ingester alert`: ready when PostgreSQL answers.
pub async fn alert(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let shutdown = shutdown_on_signal();
    if let Some(addr) = config.http.alert_listen {
        let ready = Readiness::new(Stage::Alert).postgres(config.postgres()?);
        http::start(addr, ready, shutdown.clone()).await?;
    }
    alert::run(&config, shutdown).await?;
    Ok(())
}

/// `vantage-ingester web`: the dashboard is its own endpoint (`[web] listen`).
pub async fn web(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    web::run(&config, shutdown_on_signal()).await?;
    Ok(())
}
