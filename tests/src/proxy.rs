//! A TCP proxy on 127.0.0.1:0 that can cut the network: tests put it between an agent and the
//! shared Mosquitto to simulate a broker outage without stopping the broker other tests use.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct CuttableProxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Bumped at every cut; connections end when it changes.
    cuts: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    /// Forwards connections to `upstream`; starts connected when `up`.
    pub async fn start(upstream: SocketAddr, up: bool) -> std::io::Result<CuttableProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up_flag = Arc::new(AtomicBool::new(up));
        let (cuts, _) = watch::channel(0u64);
        let task = tokio::spawn({
            let (up, cuts) = (up_flag.clone(), cuts.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::Acquire) {
                        // Network down: the connection attempt fails.
                        drop(inbound);
                        continue;
                    }
                    let mut cut = cuts.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            }
        });
        Ok(CuttableProxy {
            addr,
            up: up_flag,
            cuts,
            task,
        })
    }

    /// Drops every connection and refuses new ones until [`CuttableProxy::restore`].
    pub fn cut(&self) {
        self.up.store(false, Ordering::Release);
        self.cuts.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::Release);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
