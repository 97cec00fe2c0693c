//! End to end on loopback: real backends, real listeners, real requests.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::HOST;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};

use super::*;
use crate::compile::gateway::table::{HttpRoute, RequestMatch, StringMatch, VirtualHost};
use crate::compile::{BackendAddr, DestinationPlan};

/// A backend that answers its name, echoes a request body, and reports the
/// forwarding headers it got.
async fn backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("backend address");
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.expect("backend accept");
            let service = service_fn(move |req| answer(name, req));
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    addr
}

async fn answer(
    name: &'static str,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let seen = |h: &str| {
        req.headers()
            .get(h)
            .cloned()
            .unwrap_or(hyper::header::HeaderValue::from_static("-"))
    };
    let builder = Response::builder()
        .header("x-name", name)
        .header("x-seen-xff", seen("x-forwarded-for"))
        .header("x-seen-proto", seen("x-forwarded-proto"))
        .header("x-seen-host", seen("host"));
    let body = if req.method() == Method::POST {
        req.into_body()
            .collect()
            .await
            .expect("request body")
            .to_bytes()
    } else {
        Bytes::from_static(name.as_bytes())
    };
    Ok(builder.body(Full::new(body)).expect("response"))
}

fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    listener.local_addr().expect("address")
}

fn dest(name: &str, weight: u64, backends: &[SocketAddr]) -> DestinationPlan {
    DestinationPlan {
        name: name.into(),
        weight,
        backends: backends
            .iter()
            .map(|a| BackendAddr {
                ip: a.ip(),
                port: a.port(),
            })
            .collect(),
    }
}

fn route(field: &str, prefix: Option<&str>, destinations: Vec<DestinationPlan>) -> HttpRoute {
    HttpRoute {
        vs: NamespacedName::new("ns", "vs"),
        field: field.into(),
        matches: prefix
            .map(|p| RequestMatch {
                uri: Some(StringMatch::Prefix(p.into())),
                ..RequestMatch::default()
            })
            .into_iter()
            .collect(),
        destinations,
    }
}

fn table(port: u16, domain: &str, routes: Vec<HttpRoute>) -> HttpTable {
    HttpTable {
        port,
        hosts: vec![VirtualHost {
            domain: domain.into(),
            routes,
        }],
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

type TestClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(
    client: &TestClient,
    to: SocketAddr,
    host: &str,
    method: Method,
    path: &str,
    body: Bytes,
) -> Reply {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{to}{path}"))
        .header(HOST, host)
        .header("x-forwarded-for", "10.0.0.1")
        .body(Full::new(body))
        .expect("request");
    let (parts, body) = client
        .request(req)
        .await
        .expect("router answers")
        .into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("response body").to_bytes(),
    }
}

async fn get(client: &TestClient, to: SocketAddr, host: &str, path: &str) -> Reply {
    send(client, to, host, Method::GET, path, Bytes::new()).await
}

/// How many of `n` GETs `a` answers (the others must be `b`).
async fn count_a(client: &TestClient, to: SocketAddr, n: u64) -> u64 {
    let mut a = 0;
    for _ in 0..n {
        let reply = get(client, to, "w.example", "/").await;
        assert_eq!(reply.status, StatusCode::OK);
        match &reply.body[..] {
            b"a" => a += 1,
            b"b" => {}
            other => panic!("unexpected answer {other:?}"),
        }
    }
    a
}

/// Asserts `hits` of `n` draws is within 4.5 binomial standard deviations of `p`.
fn assert_binomial(hits: u64, n: u64, p: f64) {
    let n = n as f64;
    let sigma = (n * p * (1.0 - p)).sqrt();
    let off = (hits as f64 - n * p).abs();
    assert!(
        off <= 4.5 * sigma,
        "{hits} of {n}: expected {} ± {}",
        n * p,
        4.5 * sigma
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_path_with_404_and_503() {
    let (a, b) = (backend("a").await, backend("b").await);
    let mut router = Router::new();
    let routes = vec![
        route("spec.http[0]", Some("/a"), vec![dest("a", 100, &[a])]),
        route("spec.http[1]", Some("/b"), vec![dest("b", 100, &[b])]),
        route("spec.http[2]", Some("/empty"), vec![dest("none", 100, &[])]),
        route(
            "spec.http[3]",
            Some("/closed"),
            vec![dest("closed", 100, &[closed_port()])],
        ),
    ];
    let listening = router
        .update(vec![table(8080, "svc.example", routes)])
        .expect("update");
    let to = listening[&8080].v4;
    let c = client();
    let reply = get(&c, to, "svc.example", "/a/x?q=1").await;
    assert_eq!((reply.status, &reply.body[..]), (StatusCode::OK, &b"a"[..]));
    assert_eq!(reply.header("x-seen-host"), "svc.example");
    assert_eq!(reply.header("x-seen-xff"), "10.0.0.1, 127.0.0.1");
    assert_eq!(reply.header("x-seen-proto"), "http");
    let reply = get(&c, to, "SVC.example:8080", "/b").await;
    assert_eq!((reply.status, &reply.body[..]), (StatusCode::OK, &b"b"[..]));
    assert_eq!(
        get(&c, to, "svc.example", "/c").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&c, to, "other.example", "/a").await.status,
        StatusCode::NOT_FOUND
    );
    let reply = get(&c, to, "svc.example", "/empty").await;
    assert_eq!(
        (reply.status, &reply.body[..]),
        (StatusCode::SERVICE_UNAVAILABLE, &b"no healthy upstream"[..])
    );
    let reply = get(&c, to, "svc.example", "/closed").await;
    assert_eq!(
        (reply.status, &reply.body[..]),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            &b"upstream connect error"[..]
        )
    );
    if let Some(v6) = listening[&8080].v6 {
        let reply = get(&c, v6, "svc.example", "/a").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("x-seen-xff"), "10.0.0.1, ::1");
    }

    let stats: BTreeMap<(String, u16), u64> = router
        .stats()
        .into_iter()
        .map(|s| {
            assert_eq!(s.port, 8080);
            ((s.field, s.code), s.requests)
        })
        .collect();
    let expected_a = if listening[&8080].v6.is_some() { 2 } else { 1 };
    let expected = BTreeMap::from([
        ((String::new(), 404), 2),
        (("spec.http[0]".into(), 200), expected_a),
        (("spec.http[1]".into(), 200), 1),
        (("spec.http[2]".into(), 503), 1),
        (("spec.http[3]".into(), 503), 1),
    ]);
    assert_eq!(stats, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_then_update_then_removal() {
    let (a, b) = (backend("a").await, backend("b").await);
    let weighted = |wa, wb| {
        let routes = vec![route(
            "spec.http[0]",
            None,
            vec![dest("a", wa, &[a]), dest("b", wb, &[b])],
        )];
        vec![table(80, "*.example", routes)]
    };
    let mut router = Router::new();
    let first = router.update(weighted(80, 20)).expect("update");
    let to = first[&80].v4;
    let c = client();
    let n = 2000;
    assert_binomial(count_a(&c, to, n).await, n, 0.8);

    // Same listeners, new weights for the next requests (on the same
    // keep-alive connection too).
    let second = router.update(weighted(0, 100)).expect("update");
    assert_eq!(second, first);
    assert_eq!(count_a(&c, to, 200).await, 0);
    let third = router.update(weighted(30, 70)).expect("update");
    assert_eq!(third, first);
    assert_binomial(count_a(&c, to, n).await, n, 0.3);

    // Removed: the listener closes.
    assert!(router.update(Vec::new()).expect("update").is_empty());
    wait_refused(to).await;
}

/// Polls (bounded) until `to` refuses connections: the accept task's abort
/// lands on a worker thread of its own.
async fn wait_refused(to: SocketAddr) {
    for _ in 0..500 {
        match TcpStream::connect(to).await {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return,
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    panic!("{to} still accepts after its port was removed");
}

/// A backend that tells when a request reached it and answers once released.
async fn gated_backend(started: mpsc::UnboundedSender<()>, release: Arc<Notify>) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("backend address");
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("backend accept");
        let service = service_fn(move |_req: Request<Incoming>| {
            let (started, release) = (started.clone(), release.clone());
            async move {
                let _ = started.send(());
                release.notified().await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"slow"))))
            }
        });
        let _ = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_in_flight_finishes_after_removal() {
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let slow = gated_backend(started_tx, release.clone()).await;
    let mut router = Router::new();
    let routes = vec![route("spec.http[0]", None, vec![dest("slow", 1, &[slow])])];
    let to = router.update(vec![table(80, "*", routes)]).expect("update")[&80].v4;
    let pending = tokio::spawn(async move { get(&client(), to, "h", "/").await });
    started
        .recv()
        .await
        .expect("the request reaches the backend");
    assert!(router.update(Vec::new()).expect("update").is_empty());
    wait_refused(to).await;
    release.notify_one();
    let reply = pending.await.expect("request task");
    assert_eq!(
        (reply.status, &reply.body[..]),
        (StatusCode::OK, &b"slow"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_body_both_ways() {
    let a = backend("a").await;
    let mut router = Router::new();
    let routes = vec![route("spec.http[0]", None, vec![dest("a", 1, &[a])])];
    let to = router.update(vec![table(80, "*", routes)]).expect("update")[&80].v4;
    let body: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let body = Bytes::from(body);
    let reply = send(&client(), to, "any", Method::POST, "/upload", body.clone()).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.len(), body.len());
    assert!(reply.body == body, "the body came back altered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_update_changes_nothing() {
    let mut router = Router::new();
    let ok = router
        .update(vec![table(80, "*", Vec::new())])
        .expect("update");
    let bad = HttpTable {
        port: 81,
        hosts: vec![VirtualHost {
            domain: "*".into(),
            routes: vec![HttpRoute {
                matches: vec![RequestMatch {
                    uri: Some(StringMatch::Regex("(".into())),
                    ..RequestMatch::default()
                }],
                ..route("spec.http[0]", None, Vec::new())
            }],
        }],
    };
    let err = router
        .update(vec![table(80, "*", Vec::new()), bad])
        .expect_err("bad update rejected");
    assert!(matches!(err, RouterError::BadRegex { .. }), "{err}");
    let dup = router.update(vec![table(80, "*", Vec::new()), table(80, "*", Vec::new())]);
    assert!(matches!(dup, Err(RouterError::DuplicatePort { port: 80 })));
    assert_eq!(
        router
            .update(vec![table(80, "*", Vec::new())])
            .expect("update"),
        ok
    );
}
