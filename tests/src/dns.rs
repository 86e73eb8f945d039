//! A real DNS server for the `dns` probe kind's tests (issue #20): Debian's dnsmasq
//! (`tests/services/up` installs it), started on 127.0.0.1 at a free port with the records a
//! test gives on its command line, and a UDP upstream of the test's own for dnsmasq to forward
//! some names to (late by a set delay, or answering SERVFAIL): the faults a real upstream has.
//! Never an address outside loopback.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

/// Where Debian puts dnsmasq (package `dnsmasq-base`).
pub const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// A dnsmasq on 127.0.0.1 (UDP and TCP, one port), stopped on drop. Its cache is off, so every
/// query reaches its records or its upstreams.
pub struct Dnsmasq {
    child: Child,
    pub addr: SocketAddr,
}

impl Dnsmasq {
    /// Starts dnsmasq answering as `args` say (`--address=/up.test/127.0.0.1`,
    /// `--txt-record=...`, `--server=/slow.test/127.0.0.1#PORT`) and waits until it accepts TCP
    /// connections (it opens UDP first).
    pub fn start(args: &[String]) -> Dnsmasq {
        assert!(
            std::path::Path::new(DNSMASQ).exists(),
            "{DNSMASQ} is missing: tests/services/up installs it (Debian dnsmasq-base)"
        );
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(DNSMASQ)
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--no-poll",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--pid-file=",
                    "--cache-size=0",
                    "--log-facility=-",
                    "--log-queries",
                ])
                .arg(format!("--port={port}"))
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {DNSMASQ}: {e}"));
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken meanwhile: another one
                }
                if std::net::TcpStream::connect(addr).is_ok() {
                    return Dnsmasq { child, addr };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("dnsmasq did not start on a free port in 5 tries");
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        // Our own child, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free for both UDP and TCP on 127.0.0.1 (at the moment of asking).
fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// What [`upstream`] does with each query.
#[derive(Clone, Copy, Debug)]
pub enum Upstream {
    /// Waits, then forwards the query to this server and sends back its reply.
    Delay(Duration, SocketAddr),
    /// Answers at once with the query's own header and question, as a response with this
    /// RCODE (2: SERVFAIL).
    Rcode(u8),
}

/// A UDP DNS upstream on 127.0.0.1 for dnsmasq's `--server=/domain/127.0.0.1#PORT`, living
/// as long as the test's runtime.
pub async fn upstream(behaviour: Upstream) -> SocketAddr {
    let socket = std::sync::Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let query = buf[..n].to_vec();
            let socket = socket.clone();
            tokio::spawn(async move {
                let reply = match behaviour {
                    Upstream::Rcode(rcode) => {
                        let mut r = query;
                        if r.len() >= 12 {
                            // QR, RD copied, RA; the RCODE.
                            r[2] = 0x80 | (r[2] & 0x01);
                            r[3] = 0x80 | (rcode & 0x0F);
                            // Only the question stays.
                            r[6..12].fill(0);
                        }
                        Some(r)
                    }
                    Upstream::Delay(delay, server) => {
                        tokio::time::sleep(delay).await;
                        let out = UdpSocket::bind("127.0.0.1:0").await.ok()?;
                        out.send_to(&query, server).await.ok()?;
                        let mut back = vec![0u8; 4096];
                        let (n, _) =
                            tokio::time::timeout(Duration::from_secs(5), out.recv_from(&mut back))
                                .await
                                .ok()?
                                .ok()?;
                        back.truncate(n);
                        Some(back)
                    }
                };
                if let Some(reply) = reply {
                    let _ = socket.send_to(&reply, from).await;
                }
                Some(())
            });
        }
    });
    addr
}
