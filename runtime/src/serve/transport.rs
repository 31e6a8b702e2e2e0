//! The HTTP side of `mae-run serve`: HTTP/1.1 by hyper on a small tokio runtime, TLS by rustls
//! (ring provider), and the limits that keep one client from holding the service:
//!
//! - a cap on open connections (`--max-connections`; beyond it, 503 and close), and on those of
//!   one client address (`--max-connections-per-client`; an IPv6 client by its /64), so that
//!   one address holding connections open cannot take every slot;
//! - a deadline for the request head (`--header-timeout-ms`, hyper's header read timeout; also
//!   the TLS handshake's) and a size limit on it (`--max-header-bytes`, 431 beyond);
//! - a deadline for the body (`--body-timeout-ms`, 408) and a size limit (`--max-body-bytes`,
//!   413), checked from `Content-Length` before anything is read;
//! - the bearer token is checked on the head alone, so a refused request costs no body read and
//!   no model work.
//!
//! Connections are tasks, not threads: a client trickling bytes holds only its own task, never a
//! worker. Decoding, preprocessing and waiting for the model happen on at most `--workers`
//! blocking threads at once.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use crate::serve::routes::{gate, handle, route_label, takes_body};
use crate::serve::state::{error_response, route_error, Caller, Reply, Req, Shared};

/// The limits of the HTTP side.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body: usize,
    pub max_header: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub workers: usize,
}

/// Largest number of open connections `--max-connections` may ask for.
const MAX_CONNECTIONS: usize = 1 << 20;

/// A body over the limit is still read (and dropped) up to this many bytes, so that the client
/// gets the 413 rather than a reset connection.
const DRAIN_LIMIT: usize = 64 << 20;

/// A rustls server configuration from PEM files.
pub fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| anyhow::anyhow!("--tls-cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        bail!("--tls-cert {}: no PEM certificate in it", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("--tls-key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| format!("--tls-cert {} and its key", cert.display()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The open connections of each client address, against `--max-connections-per-client`.
struct PerClient {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection counted against its client; the count drops with it.
struct ClientSlot {
    table: Arc<PerClient>,
    client: IpAddr,
}

/// The address a client is counted under: IPv4 as it is (an IPv4-mapped IPv6 address as its
/// IPv4 one), IPv6 by its /64, the smallest block a host is usually given.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

impl PerClient {
    /// A slot for one more connection of `ip`, unless it has `max` open.
    fn take(table: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let client = client_key(ip);
        let mut open = table.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(client).or_insert(0);
        if *n >= table.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            table: table.clone(),
            client,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// What every connection's requests need.
struct Ctx {
    shared: Arc<Shared>,
    limits: Limits,
    workers: Arc<Semaphore>,
}

/// Listens on `listen` and serves until SIGINT/SIGTERM; then stops accepting, lets every open
/// connection finish the request it is on, and returns. `on_listen` gets the bound address.
pub(crate) fn serve(
    listen: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    shared: Arc<Shared>,
    on_listen: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    if limits.max_connections > MAX_CONNECTIONS {
        bail!("--max-connections is over {MAX_CONNECTIONS}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        // Sockets and timers only: the models run on their own threads, decoding on the
        // blocking pool.
        .worker_threads(2)
        .max_blocking_threads(limits.workers.max(1))
        .thread_name("mae-serve-io")
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    rt.block_on(async move {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        on_listen(listener.local_addr().unwrap_or(listen));
        let (stop_tx, stop_rx) = watch::channel(false);
        ctrlc::set_handler(move || {
            let _ = stop_tx.send(true);
        })
        .context("cannot install the SIGINT/SIGTERM handler")?;
        let max_connections = limits.max_connections;
        let conns = Arc::new(Semaphore::new(max_connections));
        let per_client = Arc::new(PerClient {
            max: limits.max_connections_per_client.max(1),
            open: Mutex::new(HashMap::new()),
        });
        let ctx = Arc::new(Ctx {
            shared,
            workers: Arc::new(Semaphore::new(limits.workers.max(1))),
            limits,
        });
        let acceptor = tls.map(TlsAcceptor::from);
        let mut stop = stop_rx.clone();
        let mut last_warned = None;
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little, keep serving.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                _ = stop.wait_for(|s| *s) => break,
            };
            let Some(slot) = PerClient::take(&per_client, peer.ip()) else {
                // At most a line a second: a client flooding the cap must not flood the log.
                if last_warned.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(1)) {
                    last_warned = Some(Instant::now());
                    tracing::warn!(
                        "connection from {peer} refused: {} open from {} \
                         (--max-connections-per-client)",
                        per_client.max,
                        client_key(peer.ip())
                    );
                }
                tokio::spawn(refuse(tcp, acceptor.is_none(), PER_CLIENT_FULL));
                continue;
            };
            let Ok(permit) = conns.clone().try_acquire_owned() else {
                tokio::spawn(refuse(tcp, acceptor.is_none(), ALL_FULL));
                continue;
            };
            let (ctx, acceptor, stop) = (ctx.clone(), acceptor.clone(), stop_rx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let _slot = slot;
                let _ = tcp.set_nodelay(true);
                match acceptor {
                    None => connection(TokioIo::new(tcp), peer, ctx, stop).await,
                    Some(a) => {
                        let handshake = a.accept(tcp);
                        if let Ok(Ok(tls)) =
                            tokio::time::timeout(ctx.limits.header_timeout, handshake).await
                        {
                            connection(TokioIo::new(tls), peer, ctx, stop).await;
                        }
                    }
                }
            });
        }
        drop(listener);
        // Every connection holds a permit until it ends: having them all means all ended.
        let _ = conns.acquire_many(max_connections as u32).await;
        Ok(())
    })
}

/// The 503 bodies of a connection over `--max-connections` and over
/// `--max-connections-per-client`.
const ALL_FULL: &str = r#"{"error":"too many open connections; retry later"}"#;
const PER_CLIENT_FULL: &str =
    r#"{"error":"too many open connections from this address; close some and retry"}"#;

/// Answers a connection over a cap with 503 (over TLS, only closes it) and closes it.
async fn refuse(mut tcp: TcpStream, plain: bool, body: &str) {
    if plain {
        let msg = format!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n{body}",
            body.len()
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(msg.as_bytes())).await;
    }
    let _ = tcp.shutdown().await;
}

/// Serves one connection's requests until it closes or the server stops.
async fn connection<I>(
    io: TokioIo<I>,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.limits.header_timeout)
        .max_buf_size(ctx.limits.max_header.max(8192));
    let svc_ctx = ctx.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let ctx = svc_ctx.clone();
        async move { Ok::<_, Infallible>(respond(req, peer, &ctx).await) }
    });
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.wait_for(|s| *s) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// One request: token, body, handler, metrics.
async fn respond(req: Request<Incoming>, peer: SocketAddr, ctx: &Ctx) -> Response<Full<Bytes>> {
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let address = peer.to_string();
    let reply = match gate(&ctx.shared, &path, &parts.headers, Some(&address)) {
        Err(r) => r,
        Ok(key) => {
            let body = if takes_body(&parts.method, &path) {
                read_body(body, &parts.headers, &path, &ctx.limits).await
            } else {
                Ok(Vec::new())
            };
            match body {
                Err(r) => r,
                Ok(body) => {
                    let req = Req {
                        method: parts.method,
                        path: path.clone(),
                        query,
                        headers: parts.headers,
                        body,
                        caller: Caller {
                            key,
                            address: Some(address),
                        },
                    };
                    run_handler(req, ctx).await
                }
            }
        }
    };
    ctx.shared.metrics.request(
        route_label(&path),
        reply.status,
        start.elapsed().as_secs_f64(),
    );
    let mut b = Response::builder().status(reply.status);
    for (k, v) in &reply.headers {
        b = b.header(*k, v);
    }
    b.body(Full::new(Bytes::from(reply.body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// Runs the handler on a blocking thread, at most `--workers` at once.
async fn run_handler(req: Req, ctx: &Ctx) -> Reply {
    let Ok(permit) = ctx.workers.clone().acquire_owned().await else {
        return error_response(503, "shutting down");
    };
    let shared = ctx.shared.clone();
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        handle(req, &shared)
    });
    task.await
        .unwrap_or_else(|_| error_response(500, "internal error"))
}

/// Reads a request body within the size and time limits; over the size, the rest is read and
/// dropped (up to `DRAIN_LIMIT`) and the answer is 413.
async fn read_body(
    mut body: Incoming,
    headers: &HeaderMap,
    path: &str,
    limits: &Limits,
) -> Result<Vec<u8>, Reply> {
    let max = limits.max_body;
    let declared = headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let too_large = || route_error(path, 413, &format!("request body over {max} bytes"));
    if declared.is_some_and(|n| n > DRAIN_LIMIT.max(max) as u64) {
        return Err(too_large());
    }
    let deadline = tokio::time::Instant::now() + limits.body_timeout;
    let mut buf = Vec::with_capacity(declared.map_or(0, |n| n.min(max as u64) as usize));
    let mut seen = 0usize;
    let mut over = declared.is_some_and(|n| n > max as u64);
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                let ms = limits.body_timeout.as_millis();
                return Err(route_error(
                    path,
                    408,
                    &format!("the request body did not arrive within {ms} ms"),
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(route_error(
                    path,
                    400,
                    &format!("cannot read the request body: {e}"),
                ))
            }
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen > max {
                over = true;
            }
            if over {
                if seen > DRAIN_LIMIT.max(max) {
                    break;
                }
            } else {
                buf.extend_from_slice(&data);
            }
        }
    }
    if over {
        return Err(too_large());
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn each_client_gets_its_own_cap() {
        let table = Arc::new(PerClient {
            max: 2,
            open: Mutex::new(HashMap::new()),
        });
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let (a1, a2) = (PerClient::take(&table, a), PerClient::take(&table, a));
        assert!(a1.is_some() && a2.is_some());
        assert!(PerClient::take(&table, a).is_none());
        // The same address written as IPv4-mapped IPv6 is the same client.
        assert!(PerClient::take(&table, "::ffff:127.0.0.1".parse().unwrap()).is_none());
        assert!(PerClient::take(&table, b).is_some());
        drop(a1);
        assert!(PerClient::take(&table, a).is_some());
        assert!(
            !table.open.lock().unwrap().contains_key(&b),
            "b's count not dropped"
        );
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let x: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let y: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let z: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(x), client_key(y));
        assert_ne!(client_key(x), client_key(z));
        assert_eq!(
            client_key("10.0.0.7".parse().unwrap()).to_string(),
            "10.0.0.7"
        );
    }
}
