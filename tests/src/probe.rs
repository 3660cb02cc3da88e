//! Traffic from and to pods: echo servers and probes for TCP, UDP, ICMP and HTTP, IPv4 and IPv6.
//!
//! Socket work runs on threads that entered the pod's namespace first, so no process is needed;
//! ping and curl run as processes inside the namespace. Every loop is bounded in time.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::netns::{enter_netns, in_netns};
use crate::pod::Pod;

/// How often server threads look at their stop flag.
const POLL: Duration = Duration::from_millis(50);

impl Pod {
    /// Connect over TCP from inside the pod. The stream stays in the pod's namespace.
    pub fn tcp_connect(&self, addr: IpAddr, port: u16, timeout: Duration) -> io::Result<TcpStream> {
        in_netns(&self.netns_name, || {
            let stream = TcpStream::connect_timeout(&SocketAddr::new(addr, port), timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            Ok(stream)
        })
    }

    /// Whether a TCP connection to `addr:port` opens and echoes a message within `timeout`
    /// (the peer must run [`spawn_tcp_echo`](Self::spawn_tcp_echo)).
    pub fn tcp_probe(&self, addr: IpAddr, port: u16, timeout: Duration) -> bool {
        let Ok(mut stream) = self.tcp_connect(addr, port, timeout) else {
            return false;
        };
        tcp_roundtrip(&mut stream, b"weft-probe\n").is_ok()
    }

    /// Whether a UDP datagram to `addr:port` comes back within `timeout`
    /// (the peer must run [`spawn_udp_echo`](Self::spawn_udp_echo)).
    pub fn udp_probe(&self, addr: IpAddr, port: u16, timeout: Duration) -> bool {
        in_netns(&self.netns_name, || -> io::Result<bool> {
            let bind: SocketAddr = match addr {
                IpAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
                IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let socket = UdpSocket::bind(bind)?;
            socket.connect((addr, port))?;
            let deadline = Instant::now() + timeout;
            let message = b"weft-udp-probe";
            let mut buf = [0u8; 64];
            // Resend a few times within the deadline: the first datagram may race a neighbour
            // resolution on a fresh link.
            while Instant::now() < deadline {
                socket.send(message)?;
                let wait = (deadline - Instant::now()).min(Duration::from_millis(300));
                socket.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
                match socket.recv(&mut buf) {
                    Ok(n) if &buf[..n] == message => return Ok(true),
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::ConnectionRefused
                        ) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(false)
        })
        .unwrap_or(false)
    }

    /// Whether one ICMP echo to `addr` is answered within a second (`ping -c1 -W1`).
    pub fn ping(&self, addr: IpAddr) -> bool {
        self.exec("ping", &["-c1", "-W1", "-n", &addr.to_string()])
            .status
            .success()
    }

    /// Whether one ICMP echo to `addr` is answered within `timeout` (`ping -c1 -W<s>`), for
    /// probes expected to be dropped, which cost the whole timeout.
    pub fn ping_within(&self, addr: IpAddr, timeout: Duration) -> bool {
        let wait = format!("{:.2}", timeout.as_secs_f64());
        self.exec("ping", &["-c1", "-W", &wait, "-n", &addr.to_string()])
            .status
            .success()
    }

    /// `ping` retried up to `tries` times (for the first packets on a fresh link).
    pub fn ping_retry(&self, addr: IpAddr, tries: usize) -> bool {
        (0..tries).any(|_| self.ping(addr))
    }

    /// Run `curl` from the pod: `-sS --max-time <timeout>` plus `args`.
    pub fn curl(&self, url: &str, timeout: Duration, args: &[&str]) -> Output {
        let max = format!("{:.1}", timeout.as_secs_f64());
        let mut all = vec!["-sS", "--max-time", &max];
        all.extend_from_slice(args);
        all.push(url);
        self.exec("curl", &all)
    }

    /// URL of `path` on this pod's `addr` (IPv6 bracketed).
    pub fn url(addr: IpAddr, port: u16, path: &str) -> String {
        format!("http://{}{path}", SocketAddr::new(addr, port))
    }

    /// Serve HTTP/1.1 with keep-alive on `[::]:port` until the pod drops: every request
    /// (head only; bodies are not read) is answered `200` with `<pod> <METHOD> <path>`, and
    /// counted in the returned counter (what reached the server).
    pub fn spawn_counting_http_server(&self, port: u16) -> Arc<AtomicU64> {
        let listener = in_netns(&self.netns_name, || TcpListener::bind(("::", port)))
            .unwrap_or_else(|e| panic!("pod {}: cannot listen on TCP {port}: {e}", self.name));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = self.stop.clone();
        let count = Arc::new(AtomicU64::new(0));
        let counted = count.clone();
        let name = self.name.clone();
        let thread = std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (stop, count, name) = (stop.clone(), counted.clone(), name.clone());
                        std::thread::spawn(move || serve_http(stream, &stop, &count, &name));
                    }
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        });
        self.threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(thread);
        count
    }

    /// Serve TCP echo on `[::]:port` (IPv4 and IPv6) until the pod drops.
    pub fn spawn_tcp_echo(&self, port: u16) {
        let listener = in_netns(&self.netns_name, || TcpListener::bind(("::", port)))
            .unwrap_or_else(|e| panic!("pod {}: cannot listen on TCP {port}: {e}", self.name));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = self.stop.clone();
        let thread = std::thread::spawn(move || serve_tcp_echo(&listener, &stop));
        self.threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(thread);
    }

    /// Serve a TCP "ticker" on `[::]:port`: every accepted connection gets one byte `t`
    /// every 50 ms until the peer goes, the pod drops, or two minutes pass. For tests of
    /// traffic the server side starts.
    pub fn spawn_tcp_ticker(&self, port: u16) {
        let listener = in_netns(&self.netns_name, || TcpListener::bind(("::", port)))
            .unwrap_or_else(|e| panic!("pod {}: cannot listen on TCP {port}: {e}", self.name));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = self.stop.clone();
        let thread = std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let stop = stop.clone();
                        std::thread::spawn(move || {
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                            let deadline = Instant::now() + Duration::from_mins(2);
                            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                                if stream.write_all(b"t").is_err() {
                                    return;
                                }
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        });
        self.threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(thread);
    }

    /// Send a UDP datagram of `size` bytes to `addr:port` and wait for the same bytes to come
    /// back (the peer runs [`spawn_udp_echo`](Self::spawn_udp_echo)); larger than the MTU, it
    /// travels as fragments both ways.
    pub fn udp_roundtrip_of(
        &self,
        addr: IpAddr,
        port: u16,
        size: usize,
        timeout: Duration,
    ) -> bool {
        in_netns(&self.netns_name, || -> io::Result<bool> {
            let bind: SocketAddr = match addr {
                IpAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
                IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let socket = UdpSocket::bind(bind)?;
            socket.connect((addr, port))?;
            #[allow(
                clippy::cast_possible_truncation,
                reason = "the pattern repeats every 251 bytes"
            )]
            let message: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut buf = vec![0u8; size + 1];
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                socket.send(&message)?;
                let wait = (deadline - Instant::now()).min(Duration::from_millis(300));
                socket.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
                match socket.recv(&mut buf) {
                    Ok(n) if buf[..n] == message[..] => return Ok(true),
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::ConnectionRefused
                        ) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(false)
        })
        .unwrap_or(false)
    }

    /// Serve UDP echo on `[::]:port` (IPv4 and IPv6) until the pod drops.
    pub fn spawn_udp_echo(&self, port: u16) {
        let socket = in_netns(&self.netns_name, || UdpSocket::bind(("::", port)))
            .unwrap_or_else(|e| panic!("pod {}: cannot bind UDP {port}: {e}", self.name));
        socket
            .set_read_timeout(Some(POLL))
            .expect("udp read timeout");
        let stop = self.stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::SeqCst) {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], peer);
                }
            }
        });
        self.threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(thread);
    }

    /// Serve HTTP on `[::]:port` with `python3 -m http.server` (a directory listing) until the
    /// pod drops; returns once the server accepts connections.
    pub fn spawn_http_server(&self, port: u16) {
        self.spawn(
            "python3",
            &[
                "-m",
                "http.server",
                "--bind",
                "::",
                "--directory",
                "/",
                &port.to_string(),
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let up = in_netns(&self.netns_name, || {
                TcpStream::connect_timeout(&(Ipv6Addr::LOCALHOST, port).into(), POLL).is_ok()
            });
            if up {
                return;
            }
            std::thread::sleep(POLL);
        }
        panic!("pod {}: http server on {port} did not come up", self.name);
    }

    /// Run `f` on a thread inside the pod's namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.netns_name, f)
    }

    /// Run `f` on a detached thread inside the pod's namespace, with the pod's stop flag; the
    /// pod joins it on drop, so `f` must return soon after the flag is set.
    pub fn spawn_thread(&self, f: impl FnOnce(Arc<AtomicBool>) + Send + 'static) {
        let name = self.netns_name.clone();
        let stop = self.stop.clone();
        let thread = std::thread::spawn(move || {
            enter_netns(&name);
            f(stop);
        });
        self.threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(thread);
    }
}

/// Write `message` and read it back (the stream's timeouts bound the wait).
pub fn tcp_roundtrip(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    stream.write_all(message)?;
    let mut buf = vec![0u8; message.len()];
    stream.read_exact(&mut buf)?;
    if buf == message {
        Ok(())
    } else {
        Err(io::Error::other("echo differs from what was sent"))
    }
}

fn serve_tcp_echo(listener: &TcpListener, stop: &Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let stop = stop.clone();
                // Detached: it ends when the peer closes or the pod's stop flag is set.
                std::thread::spawn(move || echo_connection(stream, &stop));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

fn echo_connection(mut stream: TcpStream, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(POLL));
    let mut buf = [0u8; 16384];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// One keep-alive HTTP/1.1 connection of [`Pod::spawn_counting_http_server`]; ends when the
/// peer goes, the stop flag is set, or after a minute.
fn serve_http(mut stream: TcpStream, stop: &AtomicBool, count: &AtomicU64, name: &str) {
    let deadline = Instant::now() + Duration::from_mins(1);
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(POLL));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let mut words = head.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            count.fetch_add(1, Ordering::SeqCst);
            let body = format!("{name} {method} {path}\n");
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(answer.as_bytes()).is_err() {
                return;
            }
            continue;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    }
}
