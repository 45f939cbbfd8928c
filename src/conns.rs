//! The listener and the open client connections, as `stats conns` lists them.
//!
//! The accept loop registers each connection (by its socket's file descriptor, as memcached
//! numbers them) for as long as it is served; the connection marks when it works on input
//! and when it waits for more, a relaxed store or two per read.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

/// What a connection is doing, in memcached's state names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum State {
    /// Accepted, no command yet.
    New,
    /// Working on input (the connection asking `stats conns` is here).
    Working,
    /// Waiting for the next command.
    Waiting,
    /// The listening socket.
    Listening,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::New => "conn_new_cmd",
            State::Working => "conn_parse_cmd",
            State::Waiting => "conn_read",
            State::Listening => "conn_listening",
        }
    }

    fn from_u8(n: u8) -> State {
        [State::New, State::Working, State::Waiting, State::Listening]
            .into_iter()
            .find(|s| *s as u8 == n)
            .unwrap_or(State::New)
    }
}

/// One registered socket.
#[derive(Debug)]
struct Socket {
    /// The client's address; `None` for the listener.
    peer: Option<SocketAddr>,
    /// The address it was accepted on (the listener's own for the listener).
    local: SocketAddr,
    state: AtomicU8,
    /// When it last began a command (registered, for the listener), in milliseconds of
    /// [`Conns`]'s clock.
    last_command_ms: AtomicU64,
}

/// Every registered socket by file descriptor.
#[derive(Debug)]
pub struct Conns {
    started: Instant,
    sockets: Mutex<BTreeMap<u64, Arc<Socket>>>,
}

impl Default for Conns {
    fn default() -> Self {
        Conns {
            started: Instant::now(),
            sockets: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Conns {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Registers a client connection until the returned value is dropped.
    pub fn open(self: &Arc<Self>, fd: u64, peer: SocketAddr, local: SocketAddr) -> Registered {
        self.register(fd, Some(peer), local, State::New)
    }

    /// Registers the listening socket until the returned value is dropped.
    pub fn listening(self: &Arc<Self>, fd: u64, local: SocketAddr) -> Registered {
        self.register(fd, None, local, State::Listening)
    }

    fn register(
        self: &Arc<Self>,
        fd: u64,
        peer: Option<SocketAddr>,
        local: SocketAddr,
        state: State,
    ) -> Registered {
        let socket = Arc::new(Socket {
            peer,
            local,
            state: AtomicU8::new(state as u8),
            last_command_ms: AtomicU64::new(self.now_ms()),
        });
        let mut sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        sockets.insert(fd, socket.clone());
        Registered {
            conns: self.clone(),
            fd,
            socket,
        }
    }

    /// `stats conns`: per socket, by file descriptor, `<fd>:addr`, `<fd>:listen_addr` (not
    /// for the listener), `<fd>:state` and `<fd>:secs_since_last_cmd`.
    pub fn rows(&self) -> Vec<(String, String)> {
        let now_ms = self.now_ms();
        let sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows = Vec::with_capacity(sockets.len() * 4);
        for (fd, socket) in sockets.iter() {
            rows.push((
                format!("{fd}:addr"),
                tcp(socket.peer.unwrap_or(socket.local)),
            ));
            if socket.peer.is_some() {
                rows.push((format!("{fd}:listen_addr"), tcp(socket.local)));
            }
            let state = State::from_u8(socket.state.load(Relaxed));
            rows.push((format!("{fd}:state"), state.name().to_owned()));
            let idle_ms = now_ms.saturating_sub(socket.last_command_ms.load(Relaxed));
            rows.push((
                format!("{fd}:secs_since_last_cmd"),
                (idle_ms / 1000).to_string(),
            ));
        }
        rows
    }
}

/// An address as memcached shows a TCP socket's.
fn tcp(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("tcp:{a}"),
        SocketAddr::V6(a) => format!("tcp6:[{}]:{}", a.ip(), a.port()),
    }
}

/// A socket's place in [`Conns`], given up when dropped.
#[derive(Debug)]
pub struct Registered {
    conns: Arc<Conns>,
    fd: u64,
    socket: Arc<Socket>,
}

impl Registered {
    /// Input arrived: the connection works on it, and this is its latest command.
    pub fn working(&self) {
        self.socket.state.store(State::Working as u8, Relaxed);
        let now_ms = self.conns.now_ms();
        self.socket.last_command_ms.store(now_ms, Relaxed);
    }

    /// Everything so far is answered: the connection waits for the next command.
    pub fn waiting(&self) {
        if self.socket.state.load(Relaxed) == State::Working as u8 {
            self.socket.state.store(State::Waiting as u8, Relaxed);
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut sockets = (self.conns.sockets.lock()).unwrap_or_else(|p| p.into_inner());
        // The descriptor may already serve a new connection, which keeps its place.
        if sockets
            .get(&self.fd)
            .is_some_and(|s| Arc::ptr_eq(s, &self.socket))
        {
            sockets.remove(&self.fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn rows_follow_the_sockets_as_memcached_lists_them() {
        let conns = Arc::new(Conns::default());
        let local = addr("127.0.0.1:11211");
        let _listener = conns.listening(24, local);
        let asking = conns.open(23, addr("127.0.0.1:5000"), local);
        let idle = conns.open(25, addr("[::1]:6000"), local);
        idle.working();
        idle.waiting();
        tokio::time::advance(std::time::Duration::from_secs(3)).await;
        asking.working();
        let text: Vec<String> = (conns.rows().iter())
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        assert_eq!(
            text,
            [
                "23:addr tcp:127.0.0.1:5000",
                "23:listen_addr tcp:127.0.0.1:11211",
                "23:state conn_parse_cmd",
                "23:secs_since_last_cmd 0",
                "24:addr tcp:127.0.0.1:11211",
                "24:state conn_listening",
                "24:secs_since_last_cmd 3",
                "25:addr tcp6:[::1]:6000",
                "25:listen_addr tcp:127.0.0.1:11211",
                "25:state conn_read",
                "25:secs_since_last_cmd 3",
            ]
        );
        // A descriptor reused before the old registration is dropped keeps the new one.
        let reused = conns.open(23, addr("127.0.0.1:7000"), local);
        drop(asking);
        assert!(conns.rows().iter().any(|(_, v)| v == "tcp:127.0.0.1:7000"));
        drop(reused);
        drop(idle);
        assert_eq!(conns.rows().len(), 3, "the listener alone");
    }
}
