//! The device's errors, one enum; each names the object and hints at the usual cause.

use std::io;
use std::path::PathBuf;

use crate::key::PublicKey;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tun device could not be created or configured.
    #[error(
        "cannot create tun device {name}: {source} (needs CAP_NET_ADMIN and /dev/net/tun; a device of that name may exist already)"
    )]
    Tun {
        name: String,
        #[source]
        source: io::Error,
    },
    /// MTU or link state could not be set.
    #[error("cannot set MTU {mtu} and bring {name} up: {source}")]
    Interface {
        name: String,
        mtu: u32,
        #[source]
        source: io::Error,
    },
    /// The UDP socket could not be bound or configured.
    #[error(
        "cannot bind UDP port {port}: {source} (another WireGuard device in this network namespace?)"
    )]
    Bind {
        port: u16,
        #[source]
        source: io::Error,
    },
    /// The UAPI socket could not be created.
    #[error("cannot serve the WireGuard UAPI socket {path}: {source}")]
    Uapi {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another live device answers on the UAPI socket path.
    #[error(
        "UAPI socket {path} belongs to a running device: give each node its own socket path (e.g. /var/run/wireguard/weft-<node>.sock)"
    )]
    UapiInUse { path: PathBuf },
    /// The I/O threads could not be started.
    #[error("cannot start the device's I/O threads: {0}")]
    Spawn(#[source] io::Error),
    /// A peer operation named a key the device does not have.
    #[error("no peer with public key {0}")]
    UnknownPeer(PublicKey),
    /// A setting the device cannot change while running.
    #[error("{0} cannot be changed on a running device")]
    Immutable(&'static str),
    /// A setting the device does not support.
    #[error("{0} is not supported by weft's WireGuard device")]
    Unsupported(&'static str),
    /// A socket option (fwmark) could not be set.
    #[error("cannot set {what} on the UDP socket: {source}")]
    SocketOption {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}
