//! One request: route it, forward it to a backend, answer.

use std::cell::RefCell;
use std::convert::Infallible;
use std::hash::{BuildHasher as _, RandomState};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http_body_util::{Either, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, HeaderName, HeaderValue};
use hyper::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use tracing::debug;

use super::PortCtx;
use super::select::{Info, Table, pick_backend};

/// The upstream's body streamed back, or one of ours.
pub(super) type Body = Either<Incoming, Full<Bytes>>;

/// Headers of one connection only; never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

thread_local! {
    // rand has no OS source here (no `sys_rng` feature): std's randomly keyed
    // hasher seeds each thread's generator instead.
    static RNG: RefCell<StdRng> =
        RefCell::new(StdRng::seed_from_u64(RandomState::new().hash_one(std::thread::current().id())));
}

pub(super) async fn handle(
    ctx: Arc<PortCtx>,
    table: Arc<Table>,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let route = table.route(&Info::of(&req));
    let response = match route {
        None => reply(StatusCode::NOT_FOUND, ""),
        Some(route) => match RNG.with_borrow_mut(|rng| pick_backend(&route.destinations, rng)) {
            None => reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
            Some(backend) => forward(&ctx, backend, peer, req).await,
        },
    };
    let route = route.map(|r| (&r.vs, r.field.as_str()));
    ctx.stats.count(ctx.port, route, response.status().as_u16());
    Ok(response)
}

async fn forward(
    ctx: &PortCtx,
    backend: SocketAddr,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    parts.uri = match upstream_uri(backend, &parts.uri) {
        Ok(uri) => uri,
        Err(e) => {
            debug!("gateway port {}: upstream uri: {e}", ctx.port);
            return reply(StatusCode::BAD_REQUEST, "bad request uri");
        }
    };
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    add_forwarded(&mut parts.headers, peer);
    match ctx.client.request(Request::from_parts(parts, body)).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Either::Left(body))
        }
        Err(e) if e.is_connect() => {
            debug!("gateway port {}: {backend}: {e}", ctx.port);
            reply(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error")
        }
        Err(e) => {
            debug!("gateway port {}: {backend}: {e}", ctx.port);
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream reset before headers",
            )
        }
    }
}

/// The absolute URI the client connects by; the `Host` header stays as sent.
fn upstream_uri(backend: SocketAddr, uri: &Uri) -> Result<Uri, hyper::http::Error> {
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    Uri::builder()
        .scheme("http")
        .authority(backend.to_string())
        .path_and_query(path)
        .build()
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // `Connection` may name more headers of the hop.
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// `x-forwarded-for` gets the client appended (`a, client`), as Envoy does.
fn add_forwarded(headers: &mut HeaderMap, peer: IpAddr) {
    let mut chain: Vec<String> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect();
    chain.push(peer.to_string());
    if let Ok(value) = HeaderValue::from_str(&chain.join(", ")) {
        headers.insert("x-forwarded-for", value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
}

fn reply(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *response.status_mut() = status;
    response
}
