//! Probers: a pod that keeps trying to reach a target the whole time a test does something
//! risky, counting what got through. A denied peer's prober must end with zero successes;
//! an allowed peer's prober shows that the test did not simply break everything.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::enter_netns;
use crate::pod::Pod;

/// How often a prober tries, and how long one try may take.
const INTERVAL: Duration = Duration::from_millis(40);
const TRY_TIMEOUT: Duration = Duration::from_millis(250);
/// A prober stops by itself after this long (a test that forgot it cannot hang).
const MAX_RUN: Duration = Duration::from_mins(5);

/// What a prober tries.
#[derive(Debug, Clone, Copy)]
pub enum Probe {
    /// A TCP connection that opens and echoes a byte (the target runs a TCP echo).
    TcpEcho(IpAddr, u16),
    /// A UDP datagram that comes back (the target runs a UDP echo). One socket (one flow)
    /// for the whole run: a flow that got through once would keep getting through.
    UdpEcho(IpAddr, u16),
}

/// The counts of one prober.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub tries: u64,
    pub successes: u64,
}

pub struct Prober {
    stop: Arc<AtomicBool>,
    tries: Arc<AtomicU64>,
    successes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Prober {
    /// Start probing `probe` from `pod` until [`Prober::stop`].
    pub fn start(pod: &Pod, probe: Probe) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tries = Arc::new(AtomicU64::new(0));
        let successes = Arc::new(AtomicU64::new(0));
        let netns = pod.netns_name.clone();
        let thread = {
            let (stop, tries, successes) = (stop.clone(), tries.clone(), successes.clone());
            std::thread::spawn(move || {
                enter_netns(&netns);
                let started = Instant::now();
                let udp = match probe {
                    Probe::UdpEcho(addr, port) => udp_socket(addr, port).ok(),
                    Probe::TcpEcho(..) => None,
                };
                while !stop.load(Ordering::SeqCst) && started.elapsed() < MAX_RUN {
                    let ok = match probe {
                        Probe::TcpEcho(addr, port) => tcp_try(addr, port),
                        Probe::UdpEcho(..) => udp.as_ref().is_some_and(udp_try),
                    };
                    tries.fetch_add(1, Ordering::SeqCst);
                    if ok {
                        successes.fetch_add(1, Ordering::SeqCst);
                    }
                    std::thread::sleep(INTERVAL);
                }
            })
        };
        Self {
            stop,
            tries,
            successes,
            thread: Some(thread),
        }
    }

    /// The counts so far.
    pub fn tally(&self) -> Tally {
        Tally {
            tries: self.tries.load(Ordering::SeqCst),
            successes: self.successes.load(Ordering::SeqCst),
        }
    }

    /// Wait until the prober has tried at least `n` more times (bounded), so that a test
    /// knows it probed through a step.
    pub fn wait_for_tries(&self, n: u64) {
        let target = self.tally().tries + n;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.tally().tries < target && Instant::now() < deadline {
            std::thread::sleep(INTERVAL);
        }
    }

    /// Stop and return the counts.
    pub fn stop(mut self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.tally()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn tcp_try(addr: IpAddr, port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&SocketAddr::new(addr, port), TRY_TIMEOUT)
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(TRY_TIMEOUT));
    let _ = stream.set_write_timeout(Some(TRY_TIMEOUT));
    let mut buf = [0u8; 1];
    stream.write_all(b"p").is_ok() && matches!(stream.read(&mut buf), Ok(1))
}

fn udp_socket(addr: IpAddr, port: u16) -> io::Result<UdpSocket> {
    let bind: SocketAddr = match addr {
        IpAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(bind)?;
    socket.connect((addr, port))?;
    socket.set_read_timeout(Some(TRY_TIMEOUT))?;
    Ok(socket)
}

fn udp_try(socket: &UdpSocket) -> bool {
    let mut buf = [0u8; 16];
    socket.send(b"probe").is_ok() && matches!(socket.recv(&mut buf), Ok(n) if &buf[..n] == b"probe")
}
