//! The local target of the demo: `demo-target 127.0.0.1:8080` serves the test target (query
//! knobs `delay_ms` and `status`) until interrupted.

use tokio_util::sync::CancellationToken;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("demo-target: serving on http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let serving = tokio::spawn(vantage_tests::target::serve(listener, stop.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    stop.cancel();
    let _ = serving.await;
    Ok(())
}
