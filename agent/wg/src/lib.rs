//! weft's userspace WireGuard device for a node: a tun interface, a UDP socket and a standard
//! UAPI socket, with boringtun's [`noise::Tunn`](boringtun::noise::Tunn) as the protocol state
//! machine and weft's own batching I/O (tun TSO/USO via `IFF_VNET_HDR`, UDP GSO/GRO,
//! `recvmmsg`, TCP coalescing) instead of boringtun's `device` module.
//!
//! The crate owns the device and its peers; it does not decide who the peers are (the agent
//! does) and does not touch routes or addresses (the caller adds them, in the node's netns).
//!
//! ```no_run
//! use weft_wg::{Device, DeviceConfig, PeerConfig, PrivateKey};
//! let config = DeviceConfig::new("weft_wg0", PrivateKey::generate(),
//!     "/var/run/wireguard/weft-n1.sock".into());
//! let device = Device::create(config)?;            // in the node's network namespace
//! device.set_peer(PeerConfig {
//!     public_key: "hN4Z5bK4vO6S2yQ7n8Xz0gTqL1cPjV3wR9mDfA2eUk8=".parse()?,
//!     endpoint: Some("100.65.0.2:51871".parse()?),
//!     allowed_ips: vec!["100.64.2.0/24".parse()?],
//!     persistent_keepalive: None,
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod allowed_ips;
mod datapath;
mod device;
mod error;
mod key;
mod offload;
mod sys;
pub mod uapi;

pub use device::{DEFAULT_LISTEN_PORT, DEFAULT_MTU, Device, DeviceConfig, PeerConfig, PeerStats};
pub use error::Error;
pub use key::{KeyError, PrivateKey, PublicKey};
