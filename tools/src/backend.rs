//! An HTTP backend inside a pod: answers every request with
//! `Hello World by <pod> (<version>)`, as the seed's flaskapp does (or, for
//! `GET /bytes/N`, N bytes), and closes.
//! It runs on a thread of the calling process that has entered the pod's network
//! namespace; dropping the guard stops it.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::netns::Netns;

/// The body a backend answers with; the probe reads the pod name back from it.
pub fn greeting(pod: &str, version: &str) -> String {
    format!("Hello World by {pod} ({version})\n")
}

#[derive(Debug)]
pub struct Backend {
    pub pod: String,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Serves on `[::]:port` (IPv4 and IPv6) inside `ns`.
    pub fn spawn(ns: &Netns, pod: &str, version: &str, port: u16) -> anyhow::Result<Self> {
        let file = ns.open()?;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let body = greeting(pod, version);
        let thread = std::thread::Builder::new()
            .name(format!("backend-{pod}"))
            .spawn({
                let (stop, served) = (stop.clone(), served.clone());
                move || {
                    let listener = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(anyhow::Error::from)
                        .and_then(|()| Ok(TcpListener::bind(SocketAddr::from(([0u16; 8], port)))?));
                    let listener = match listener {
                        Ok(l) => {
                            let _ = tx.send(Ok(()));
                            l
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    while !stop.load(Ordering::Relaxed) {
                        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                        if !matches!(poll(&mut fds, PollTimeout::from(50u8)), Ok(n) if n > 0) {
                            continue;
                        }
                        if let Ok((stream, _)) = listener.accept() {
                            served.fetch_add(1, Ordering::Relaxed);
                            let _ = answer(stream, &body, End::HalfClose);
                        }
                    }
                }
            })?;
        rx.recv()??;
        Ok(Backend {
            pod: pod.to_owned(),
            stop,
            served,
            thread: Some(thread),
        })
    }

    /// Connections accepted so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

/// How an answer ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// A FIN after the answer, as servers do.
    HalfClose,
    /// An RST right after the answer (`SO_LINGER` 0), no FIN: a server that
    /// answered, then aborted.
    Reset,
}

/// Reads one request and answers it (see the module's doc), then ends it.
pub(crate) fn answer(mut stream: TcpStream, body: &str, end: End) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    // `GET /bytes/N`: N bytes of `x` (bulk answers), else the greeting.
    let bulk = std::str::from_utf8(&request)
        .ok()
        .and_then(|r| r.split(' ').nth(1))
        .and_then(|path| path.strip_prefix("/bytes/"))
        .and_then(|n| n.parse::<usize>().ok());
    let length = bulk.unwrap_or(body.len());
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes())?;
    match bulk {
        Some(mut left) => {
            let chunk = [b'x'; 64 << 10];
            while left > 0 {
                let n = left.min(chunk.len());
                stream.write_all(&chunk[..n])?;
                left -= n;
            }
        }
        None => stream.write_all(body.as_bytes())?,
    }
    match end {
        End::HalfClose => stream.shutdown(std::net::Shutdown::Write),
        End::Reset => socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO)),
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
