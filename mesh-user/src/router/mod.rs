//! The HTTP router of gateway ports whose bound routes need a per-request
//! decision (uri, headers, method, authority): serves compile's
//! [`HttpTable`](crate::compile::gateway::table::HttpTable)s.
//!
//! Each gateway port gets its own loopback listeners; the table a port serves
//! sits in a watch channel, so an update switches new requests to the new
//! table while requests in flight finish on theirs.

mod forward;
mod listen;
mod select;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::compile::gateway::table::HttpTable;
use crate::model::NamespacedName;

use select::Table;

/// The loopback addresses a gateway port is served on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listening {
    pub v4: SocketAddr,
    /// `None` when `[::1]` cannot be bound (no IPv6 on loopback).
    pub v6: Option<SocketAddr>,
}

/// Requests served so far by one route (or by none: `field` empty, `vs`
/// default) with one status code.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteStat {
    pub port: u16,
    pub vs: NamespacedName,
    pub field: String,
    pub code: u16,
    pub requests: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("gateway port {port}: cannot listen on {addr}: {source}")]
    Bind {
        port: u16,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("VirtualService {vs} {field}: bad regex {regex:?}: {source}")]
    BadRegex {
        vs: NamespacedName,
        field: String,
        regex: String,
        #[source]
        source: Box<regex::Error>,
    },
    #[error("gateway port {port} has two tables")]
    DuplicatePort { port: u16 },
    #[error("the router needs a tokio runtime: {0}")]
    NoRuntime(#[from] tokio::runtime::TryCurrentError),
}

type StatKey = (u16, NamespacedName, String, u16);

/// Request counts shared by every port's connections.
#[derive(Debug, Default)]
struct Stats(Mutex<BTreeMap<StatKey, u64>>);

impl Stats {
    fn count(&self, port: u16, route: Option<(&NamespacedName, &str)>, code: u16) {
        let (vs, field) = route.map_or_else(Default::default, |(vs, field)| {
            (vs.clone(), field.to_owned())
        });
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *map.entry((port, vs, field, code)).or_default() += 1;
    }

    fn snapshot(&self) -> Vec<RouteStat> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.iter()
            .map(|((port, vs, field, code), requests)| RouteStat {
                port: *port,
                vs: vs.clone(),
                field: field.clone(),
                code: *code,
                requests: *requests,
            })
            .collect()
    }
}

/// A handle on the router's request counts.
#[derive(Clone, Debug)]
pub struct StatsHandle(Arc<Stats>);

impl StatsHandle {
    pub fn snapshot(&self) -> Vec<RouteStat> {
        self.0.snapshot()
    }
}

type HttpClient = Client<HttpConnector, Incoming>;

/// What every connection of one port shares.
#[derive(Debug)]
struct PortCtx {
    port: u16,
    client: HttpClient,
    stats: Arc<Stats>,
}

/// One served gateway port. Dropping it stops accepting and tells the open
/// connections to close once their request in flight is answered.
#[derive(Debug)]
struct Served {
    listening: Listening,
    table: watch::Sender<Arc<Table>>,
    accept: Vec<JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        for task in &self.accept {
            task.abort();
        }
    }
}

/// Whether this process may set `mark` on its sockets (`SO_MARK` needs
/// CAP_NET_ADMIN): checked once at start, so a router never fails its
/// requests on it.
pub fn can_set_mark(mark: u32) -> nix::Result<()> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, setsockopt, socket, sockopt};
    let probe = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&probe, sockopt::Mark, &mark)
}

#[derive(Debug)]
pub struct Router {
    ports: BTreeMap<u16, Served>,
    client: HttpClient,
    stats: Arc<Stats>,
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

impl Router {
    pub fn new() -> Self {
        Self::with_mark(None)
    }

    /// A router whose connections to backends carry `mark` (`SO_MARK`): the
    /// agent's sockops adds those to the same-node shortcut.
    pub fn with_mark(mark: Option<u32>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_mark(mark);
        Self {
            ports: BTreeMap::new(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            stats: Arc::default(),
        }
    }

    /// Serves exactly `tables` (one per gateway port): a new port gets
    /// listeners on `0.0.0.0:0` and `[::]:0`; a port already served keeps
    /// its listeners and switches new requests to its new table; a port no
    /// longer in `tables` stops accepting while requests in flight finish.
    /// On error nothing changes. Returns the addresses of every served port.
    pub fn update(
        &mut self,
        tables: Vec<HttpTable>,
    ) -> Result<BTreeMap<u16, Listening>, RouterError> {
        let compiled = compile_all(&tables)?;
        // Bind every new port before changing anything, so that an error
        // leaves the router as it was.
        let mut fresh = BTreeMap::new();
        for (port, table) in &compiled {
            if !self.ports.contains_key(port) {
                fresh.insert(*port, self.serve(*port, table.clone())?);
            }
        }
        self.ports.retain(|port, _| compiled.contains_key(port));
        for (port, table) in compiled {
            if let Some(served) = self.ports.get(&port) {
                served.table.send_replace(table);
            }
        }
        self.ports.append(&mut fresh);
        Ok(self
            .ports
            .iter()
            .map(|(port, served)| (*port, served.listening))
            .collect())
    }

    /// Requests served so far per (port, vs, field, status code).
    pub fn stats(&self) -> Vec<RouteStat> {
        self.stats.snapshot()
    }

    /// The same counts, readable after the router moved elsewhere (/metrics).
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle(self.stats.clone())
    }

    fn serve(&self, port: u16, table: Arc<Table>) -> Result<Served, RouterError> {
        let ctx = Arc::new(PortCtx {
            port,
            client: self.client.clone(),
            stats: self.stats.clone(),
        });
        listen::serve(ctx, table)
    }
}

fn compile_all(tables: &[HttpTable]) -> Result<BTreeMap<u16, Arc<Table>>, RouterError> {
    let mut compiled = BTreeMap::new();
    for table in tables {
        let port = table.port;
        if compiled
            .insert(port, Arc::new(Table::compile(table)?))
            .is_some()
        {
            return Err(RouterError::DuplicatePort { port });
        }
    }
    Ok(compiled)
}
