//! Shutdown on SIGINT or SIGTERM, the same way for every long-running command of both binaries.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Cancels `token` on SIGINT or SIGTERM (logged as "shutdown requested").
pub async fn cancel_on_signal(token: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install SIGTERM handler");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
    token.cancel();
}

/// A token cancelled on SIGINT or SIGTERM, by a task spawned on the current runtime.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    tokio::spawn(cancel_on_signal(token.clone()));
    token
}

/// Sleeps `pause` unless `stop` is cancelled first (tokio-util's `run_until_cancelled`): true
/// when the pause passed, false when it is time to stop. How every retry and polling loop of
/// both binaries waits.
pub async fn sleep_unless_stopped(stop: &CancellationToken, pause: Duration) -> bool {
    stop.run_until_cancelled(tokio::time::sleep(pause))
        .await
        .is_some()
}
