//! The filter's listening socket. Built so the datapath can steer flows to it transparently:
//! with `transparent`, the socket has `IP_TRANSPARENT` and tc `bpf_sk_assign` can hand it
//! connections addressed to any pod; the original destination is then the accepted socket's
//! local address. Without steering (tests, a listener per upstream), a fixed destination
//! stands in for it.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// Where an accepted connection was going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OriginalDestination {
    /// The accepted socket's local address (transparent steering keeps it).
    LocalAddress,
    /// Always this address (a plain listener in front of one upstream).
    Fixed(SocketAddr),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    /// Set `IP_TRANSPARENT` (IPv4; needs `CAP_NET_ADMIN`), for `bpf_sk_assign` steering.
    pub transparent: bool,
    pub destination: OriginalDestination,
}

/// Why the listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("cannot {what} for {address}: {source}")]
    Socket {
        what: &'static str,
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("transparent listening on IPv6 ({0}) is not supported yet (IPV6_TRANSPARENT)")]
    TransparentIpv6(SocketAddr),
}

/// An accepted connection and where it was going.
#[derive(Debug)]
pub struct Accepted {
    pub stream: TcpStream,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

#[derive(Debug)]
pub struct Listener {
    inner: TcpListener,
    local: SocketAddr,
    destination: OriginalDestination,
}

impl Listener {
    /// Bind and listen (must run inside a tokio runtime).
    pub fn bind(config: ListenerConfig) -> Result<Self, ListenerError> {
        let address = config.address;
        let err = |what| {
            move |source| ListenerError::Socket {
                what,
                address,
                source,
            }
        };
        if config.transparent && address.is_ipv6() {
            return Err(ListenerError::TransparentIpv6(address));
        }
        let socket = Socket::new(
            Domain::for_address(address),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .map_err(err("create a socket"))?;
        socket
            .set_reuse_address(true)
            .map_err(err("set SO_REUSEADDR"))?;
        if config.transparent {
            socket
                .set_ip_transparent(true)
                .map_err(err("set IP_TRANSPARENT (needs CAP_NET_ADMIN)"))?;
        }
        socket
            .set_nonblocking(true)
            .map_err(err("set O_NONBLOCK"))?;
        socket.bind(&address.into()).map_err(err("bind"))?;
        socket.listen(1024).map_err(err("listen"))?;
        let inner = TcpListener::from_std(socket.into()).map_err(err("register the socket"))?;
        let local = inner.local_addr().map_err(err("read the local address"))?;
        Ok(Listener {
            inner,
            local,
            destination: config.destination,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub async fn accept(&self) -> io::Result<Accepted> {
        let (stream, source) = self.inner.accept().await?;
        let destination = match self.destination {
            OriginalDestination::Fixed(a) => a,
            OriginalDestination::LocalAddress => stream.local_addr()?,
        };
        Ok(Accepted {
            stream,
            source,
            destination,
        })
    }
}
