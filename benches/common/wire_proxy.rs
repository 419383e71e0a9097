//! A TCP proxy between a benchmark's clients and PostgreSQL that adds a
//! fixed delay each way (a database on another host) and counts the
//! client's turns: writes that follow data from the server. A driver that
//! waits for each answer before sending on makes one turn per round trip; a
//! pipelined exchange makes one in all.
//!
//! Plain threads and blocking sockets: the delay is kept with
//! `thread::sleep`, which is good to some tens of microseconds, where an
//! async timer rounds up to a millisecond.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

pub struct WireProxy {
    /// The address clients connect to.
    pub addr: SocketAddr,
    turns: Arc<AtomicU64>,
}

impl WireProxy {
    /// Listens on a free local port and forwards each connection to
    /// `upstream`, `delay` late each way. Runs until the process exits.
    pub fn start(upstream: SocketAddr, delay: Duration) -> WireProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
        let addr = listener.local_addr().unwrap();
        let turns = Arc::new(AtomicU64::new(0));
        let counted = turns.clone();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                // the server's answer last: a client write now is a turn
                let server_spoke = Arc::new(AtomicBool::new(true));
                for s in [&client, &server] {
                    s.set_nodelay(true).unwrap();
                }
                let up = Direction::ClientToServer {
                    turns: counted.clone(),
                    server_spoke: server_spoke.clone(),
                };
                let down = Direction::ServerToClient { server_spoke };
                pump(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    delay,
                    up,
                );
                pump(server, client, delay, down);
            }
        });
        WireProxy { addr, turns }
    }

    /// Client turns over all connections so far.
    pub fn turns(&self) -> u64 {
        self.turns.load(Ordering::Relaxed)
    }

    /// `url` (`postgres://user:password@host:port/db...`) through this proxy.
    pub fn url(&self, url: &str) -> String {
        let (scheme_user, rest) = url.rsplit_once('@').expect("URL with user@host");
        let end = rest.find('/').unwrap_or(rest.len());
        format!("{scheme_user}@{}{}", self.addr, &rest[end..])
    }
}

/// The host and port of a `postgres://user:password@host:port/db` URL.
pub fn upstream_of(url: &str) -> SocketAddr {
    let (_, rest) = url.rsplit_once('@').expect("URL with user@host");
    let host_port = &rest[..rest.find('/').unwrap_or(rest.len())];
    use std::net::ToSocketAddrs;
    host_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| panic!("the proxy needs a TCP host:port in the URL, not {host_port:?}"))
}

enum Direction {
    ClientToServer {
        turns: Arc<AtomicU64>,
        server_spoke: Arc<AtomicBool>,
    },
    ServerToClient {
        server_spoke: Arc<AtomicBool>,
    },
}

impl Direction {
    fn saw_data(&self) {
        match self {
            Direction::ClientToServer {
                turns,
                server_spoke,
            } => {
                if server_spoke.swap(false, Ordering::AcqRel) {
                    turns.fetch_add(1, Ordering::Relaxed);
                }
            }
            Direction::ServerToClient { server_spoke } => {
                server_spoke.store(true, Ordering::Release)
            }
        }
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read: a
/// reader thread stamps chunks, a writer thread holds each until its time.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration, direction: Direction) {
    let direction = Arc::new(direction);
    let (chunks, due) = mpsc::channel::<(Instant, Vec<u8>)>();
    let reader_side = direction.clone();
    thread::spawn(move || {
        let direction = reader_side;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Direction::ClientToServer { .. } = *direction {
                        direction.saw_data();
                    }
                    if chunks.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        // dropping `chunks` ends the writer once it has written the rest
    });
    thread::spawn(move || {
        for (read_at, chunk) in due {
            if let Some(wait) = (read_at + delay).checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            // The server has spoken once the client can hear it: marked
            // before the write, as the client may answer (and the other
            // pump read that answer) before this thread runs again.
            if let Direction::ServerToClient { .. } = *direction {
                direction.saw_data();
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
