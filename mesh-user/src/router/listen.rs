//! The listeners and connections of one gateway port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener as StdListener};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::select::Table;
use super::{Listening, PortCtx, RouterError, Served, forward};

type TableRx = watch::Receiver<Arc<Table>>;

/// Binds the port's listeners and starts accepting: on every address of the
/// node (IPv4 and IPv6), so that the node's own processes reach them on
/// loopback and clients outside the node through the gateway's tc programs,
/// which translate (node address, gateway port) to (node address, this port).
pub(super) fn serve(ctx: Arc<PortCtx>, table: Arc<Table>) -> Result<Served, RouterError> {
    let runtime = Handle::try_current()?;
    let port = ctx.port;
    let (tx, rx) = watch::channel(table);
    let v4 = bind(port, (Ipv4Addr::UNSPECIFIED, 0).into())?;
    let (v4, task) = start(&runtime, port, v4, ctx.clone(), rx.clone())?;
    let mut served = Served {
        listening: Listening { v4, v6: None },
        table: tx,
        accept: vec![task],
    };
    match bind(port, (Ipv6Addr::UNSPECIFIED, 0).into())
        .and_then(|v6| start(&runtime, port, v6, ctx, rx))
    {
        Ok((v6, task)) => {
            served.listening.v6 = Some(v6);
            served.accept.push(task);
        }
        Err(e) => debug!("gateway port {port}: no IPv6 listener: {e}"),
    }
    Ok(served)
}

fn bind(port: u16, addr: SocketAddr) -> Result<StdListener, RouterError> {
    let err = |source| RouterError::Bind { port, addr, source };
    let listener = StdListener::bind(addr).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(listener)
}

fn start(
    runtime: &Handle,
    port: u16,
    listener: StdListener,
    ctx: Arc<PortCtx>,
    table: TableRx,
) -> Result<(SocketAddr, JoinHandle<()>), RouterError> {
    let err = |addr, source| RouterError::Bind { port, addr, source };
    let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    let addr = listener.local_addr().map_err(|e| err(unspecified, e))?;
    let _runtime = runtime.enter();
    let listener = TcpListener::from_std(listener).map_err(|e| err(addr, e))?;
    Ok((addr, runtime.spawn(accept(listener, ctx, table))))
}

async fn accept(listener: TcpListener, ctx: Arc<PortCtx>, table: TableRx) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(connection(stream, peer.ip(), ctx.clone(), table.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: retrying at once would spin.
                warn!("gateway port {}: accept: {e}", ctx.port);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves one client connection, each request on the port's table of the
/// moment; once the port is removed, answers the request in flight and closes.
async fn connection(stream: TcpStream, peer: IpAddr, ctx: Arc<PortCtx>, table: TableRx) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!("gateway port {}: nodelay: {e}", ctx.port);
    }
    let mut removed = table.clone();
    let service = service_fn(move |req| {
        let current = table.borrow().clone();
        forward::handle(ctx.clone(), current, peer, req)
    });
    let mut conn = pin!(
        http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(stream), service)
    );
    let done = tokio::select! {
        done = conn.as_mut() => done,
        () = port_removed(&mut removed) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = done {
        debug!("gateway connection from {peer}: {e}");
    }
}

/// Resolves when the port's table sender is dropped.
async fn port_removed(table: &mut TableRx) {
    while table.changed().await.is_ok() {}
}
