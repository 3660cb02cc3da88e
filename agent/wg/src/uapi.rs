//! The WireGuard cross-platform userspace API (`get=1` / `set=1` over a unix socket), so that
//! `wg show`/`wg set` and `wireguard-control`'s `Backend::Userspace` can read and configure the
//! device. Protocol: <https://www.wireguard.com/xplatform/>.
//!
//! `wg` looks for `/var/run/wireguard/<interface>.sock`; the socket path is the caller's choice,
//! so a socket `/var/run/wireguard/weft-n1.sock` is interface `weft-n1` to `wg`, whatever the
//! tun device is called in its namespace.
//!
//! Parsing a `set` request is pure ([`parse_set`]); applying it goes through the same typed
//! calls the agent uses. The private key crosses this socket in hex, as the protocol requires;
//! the socket is created 0600.

use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;

use crate::device::{PeerConfig, Shared};
use crate::error::Error;
use crate::key::{PrivateKey, PublicKey, hex, parse_key};
use crate::sys;

/// Bind the UAPI socket, replacing a stale file but never a live device's socket.
pub(crate) fn bind(path: &Path) -> Result<UnixListener, Error> {
    let err = |source| Error::Uapi {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(Error::UapiInUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(listener)
}

pub(crate) fn serve(shared: &Shared, listener: &UnixListener) {
    while !shared.stopped() {
        match sys::poll_readable(listener.as_raw_fd(), 100) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => return,
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        // One client at a time, each bounded in time: `wg` sends one request and reads.
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
        if let Err(e) = handle(shared, stream) {
            tracing::debug!(error = %e, "UAPI client failed");
        }
    }
}

fn handle(shared: &Shared, stream: UnixStream) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut first = String::new();
        if reader.read_line(&mut first)? == 0 {
            return Ok(());
        }
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                break;
            }
            lines.push(line.trim_end().to_string());
        }
        let reply = match first.trim_end() {
            "get=1" => format!("{}errno=0\n\n", get(shared)),
            "set=1" => match parse_set(&lines).and_then(|set| apply(shared, set)) {
                Ok(()) => "errno=0\n\n".to_string(),
                Err(e) => {
                    tracing::info!(error = %e, "UAPI set refused");
                    format!("errno={}\n\n", e.errno())
                }
            },
            _ => "errno=22\n\n".to_string(),
        };
        writer.write_all(reply.as_bytes())?;
    }
}

/// The `get=1` answer without its final `errno` line.
fn get(shared: &Shared) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "private_key={}", hex(&shared.private_key().to_bytes()));
    let _ = writeln!(out, "listen_port={}", shared.listen_port);
    let mark = shared.fwmark();
    if mark != 0 {
        let _ = writeln!(out, "fwmark={mark}");
    }
    for peer in shared.peers() {
        let _ = writeln!(out, "public_key={}", peer.public_key.to_hex());
        let _ = writeln!(out, "protocol_version=1");
        if let Some(endpoint) = peer.endpoint {
            let _ = writeln!(out, "endpoint={endpoint}");
        }
        let (sec, nsec) = peer
            .last_handshake
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        let _ = writeln!(out, "last_handshake_time_sec={sec}");
        let _ = writeln!(out, "last_handshake_time_nsec={nsec}");
        let _ = writeln!(out, "tx_bytes={}", peer.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", peer.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            peer.persistent_keepalive.unwrap_or(0)
        );
        for net in &peer.allowed_ips {
            let _ = writeln!(out, "allowed_ip={net}");
        }
    }
    out
}

/// Why a `set=1` request was refused; `errno` is what goes back on the socket.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetError {
    #[error("UAPI line {0:?} is not key=value")]
    Malformed(String),
    #[error("UAPI key {key} has an invalid value {value:?}")]
    InvalidValue { key: String, value: String },
    #[error("UAPI key {0} is not known")]
    UnknownKey(String),
    #[error("UAPI key {0} before any public_key")]
    NoPeer(String),
    #[error("device refused the change: {0}")]
    Device(String),
}

impl SetError {
    fn errno(&self) -> i32 {
        match self {
            Self::Device(_) => libc::EIO,
            _ => libc::EINVAL,
        }
    }
}

/// A parsed `set=1` request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SetRequest {
    /// Debug shows only its public half.
    pub private_key: Option<PrivateKey>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerChange>,
}

/// One `public_key=` section of a `set=1` request.
#[derive(Debug, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools, reason = "one field per UAPI flag")]
pub struct PeerChange {
    pub public_key: PublicKey,
    pub remove: bool,
    pub update_only: bool,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpNet>,
    /// A non-zero preshared key (refused when applied: not supported yet).
    pub preshared_key: bool,
}

/// Parse the `key=value` lines of a `set=1` request.
pub fn parse_set(lines: &[String]) -> Result<SetRequest, SetError> {
    let mut req = SetRequest::default();
    for line in lines {
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| SetError::Malformed(line.clone()))?;
        let invalid = || SetError::InvalidValue {
            key: key.to_string(),
            value: if key.contains("key") {
                "<key>".into()
            } else {
                value.to_string()
            },
        };
        let peer = req.peers.last_mut();
        match (key, peer) {
            ("private_key", _) => {
                req.private_key = Some(PrivateKey::from_bytes(
                    parse_key(value).map_err(|_| invalid())?,
                ));
            }
            ("listen_port", _) => req.listen_port = Some(value.parse().map_err(|_| invalid())?),
            ("fwmark", _) => req.fwmark = Some(value.parse().map_err(|_| invalid())?),
            ("replace_peers", _) => req.replace_peers = value == "true",
            ("public_key", _) => req.peers.push(PeerChange {
                public_key: value.parse().map_err(|_| invalid())?,
                remove: false,
                update_only: false,
                endpoint: None,
                persistent_keepalive: None,
                replace_allowed_ips: false,
                allowed_ips: Vec::new(),
                preshared_key: false,
            }),
            ("remove", Some(p)) => p.remove = value == "true",
            ("update_only", Some(p)) => p.update_only = value == "true",
            ("endpoint", Some(p)) => p.endpoint = Some(parse_endpoint(value).ok_or_else(invalid)?),
            ("persistent_keepalive_interval", Some(p)) => {
                let secs: u16 = value.parse().map_err(|_| invalid())?;
                p.persistent_keepalive = Some(secs);
            }
            ("replace_allowed_ips", Some(p)) => p.replace_allowed_ips = value == "true",
            ("allowed_ip", Some(p)) => p.allowed_ips.push(value.parse().map_err(|_| invalid())?),
            ("preshared_key", Some(p)) => {
                p.preshared_key = parse_key(value).map_err(|_| invalid())? != [0; 32];
            }
            ("protocol_version", Some(_)) => {
                if value != "1" {
                    return Err(invalid());
                }
            }
            (
                "remove"
                | "update_only"
                | "endpoint"
                | "persistent_keepalive_interval"
                | "replace_allowed_ips"
                | "allowed_ip"
                | "preshared_key"
                | "protocol_version",
                None,
            ) => return Err(SetError::NoPeer(key.to_string())),
            _ => return Err(SetError::UnknownKey(key.to_string())),
        }
    }
    Ok(req)
}

fn parse_endpoint(value: &str) -> Option<SocketAddr> {
    value.parse().ok()
}

fn apply(shared: &Shared, req: SetRequest) -> Result<(), SetError> {
    let device = |e: Error| SetError::Device(e.to_string());
    if let Some(port) = req.listen_port
        && port != shared.listen_port
        && port != 0
    {
        return Err(device(Error::Immutable("listen_port")));
    }
    if let Some(key) = req.private_key {
        shared.set_private_key(key);
    }
    if let Some(mark) = req.fwmark {
        shared.set_fwmark(mark).map_err(device)?;
    }
    if req.replace_peers {
        let keep: Vec<PublicKey> = req
            .peers
            .iter()
            .filter(|p| !p.remove)
            .map(|p| p.public_key)
            .collect();
        for key in shared.peer_keys() {
            if !keep.contains(&key) {
                shared.remove_peer(&key);
            }
        }
    }
    for change in req.peers {
        if change.remove {
            shared.remove_peer(&change.public_key);
            continue;
        }
        if change.preshared_key {
            return Err(device(Error::Unsupported("preshared_key")));
        }
        let existing = shared.peer_config(&change.public_key);
        if existing.is_none() && change.update_only {
            continue;
        }
        let mut config = existing.unwrap_or(PeerConfig {
            public_key: change.public_key,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: None,
        });
        if change.endpoint.is_some() {
            config.endpoint = change.endpoint;
        }
        if let Some(secs) = change.persistent_keepalive {
            config.persistent_keepalive = (secs > 0).then_some(secs);
        }
        if change.replace_allowed_ips {
            config.allowed_ips.clear();
        }
        for net in change.allowed_ips {
            if !config.allowed_ips.contains(&net) {
                config.allowed_ips.push(net);
            }
        }
        shared.set_peer(config).map_err(device)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn parses_what_wg_set_sends() {
        let key = PrivateKey::from_bytes([1; 32]).public_key();
        let req = parse_set(&lines(&format!(
            "listen_port=51871\nreplace_peers=true\npublic_key={}\nendpoint=[fd00::2]:51871\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=100.64.2.0/24\n\
             allowed_ip=fd00:64:2::/64\n",
            key.to_hex()
        )))
        .expect("valid request");
        assert_eq!(req.listen_port, Some(51871));
        assert!(req.replace_peers);
        assert_eq!(req.peers.len(), 1);
        let p = &req.peers[0];
        assert_eq!(p.public_key, key);
        assert_eq!(p.endpoint, Some("[fd00::2]:51871".parse().expect("addr")));
        assert_eq!(p.persistent_keepalive, Some(25));
        assert!(p.replace_allowed_ips);
        assert_eq!(p.allowed_ips.len(), 2);
    }

    #[test]
    fn refuses_bad_requests_without_echoing_keys() {
        assert_eq!(
            parse_set(&lines("allowed_ip=10.0.0.0/8")),
            Err(SetError::NoPeer("allowed_ip".into()))
        );
        assert_eq!(
            parse_set(&lines("bogus=1")),
            Err(SetError::UnknownKey("bogus".into()))
        );
        let err = parse_set(&lines("private_key=secretsecret")).expect_err("bad key");
        assert!(!err.to_string().contains("secretsecret"));
    }
}
