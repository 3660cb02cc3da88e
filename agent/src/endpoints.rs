//! The pods of this node, as CNI ADDs registered them: persisted in the state directory so
//! that a restarted agent knows its endpoints (and keeps their ids, which the pinned maps
//! are keyed by). A CNI ADD is believed only once the kernel agrees with it ([`podnet`]):
//! the namespace exists, holds the interface, whose veth peer is the host-side interface
//! named, the addresses are the pod's, and no other endpoint owns the interface or an
//! address. A DEL removes exactly what its own ADD made.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tracing::info;
use weft_api::{ApiError, CniEndpoint, CniRef, ErrorCode};

use crate::fsutil::{self, FsError};
use crate::podnet;

const ENDPOINTS_FILE: &str = "endpoints.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointRecord {
    pub id: u32,
    pub container_id: String,
    pub ifname: String,
    pub host_ifname: String,
    pub ifindex: u32,
    pub netns: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub addresses: Vec<IpNet>,
}

impl EndpointRecord {
    /// `namespace/name`.
    pub fn pod(&self) -> String {
        format!("{}/{}", self.pod_namespace, self.pod_name)
    }

    pub fn key(&self) -> (String, String) {
        (self.container_id.clone(), self.ifname.clone())
    }
}

pub struct Registry {
    file: PathBuf,
    records: BTreeMap<(String, String), EndpointRecord>,
}

impl Registry {
    /// # Errors
    /// When the state file exists but cannot be read.
    pub fn load(state_dir: &Path) -> Result<Self, FsError> {
        let file = state_dir.join(ENDPOINTS_FILE);
        let records: Vec<EndpointRecord> = fsutil::read_json(&file)?.unwrap_or_default();
        Ok(Self {
            file,
            records: records.into_iter().map(|r| (r.key(), r)).collect(),
        })
    }

    /// Endpoints from an earlier run: keep those whose interface still exists with the same
    /// ifindex, forget (and return) the rest.
    pub fn readopt(&mut self) -> Vec<EndpointRecord> {
        let mut gone = Vec::new();
        self.records.retain(|_, ep| {
            let alive = nix::net::if_::if_nametoindex(ep.host_ifname.as_str())
                .is_ok_and(|index| index == ep.ifindex);
            if !alive {
                info!(pod = %ep.pod(), ifname = %ep.host_ifname, "endpoint's interface is gone; forgetting it");
                gone.push(ep.clone());
            }
            alive
        });
        gone
    }

    pub fn iter(&self) -> impl Iterator<Item = &EndpointRecord> {
        self.records.values()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn get(&self, r: &CniRef) -> Option<&EndpointRecord> {
        self.records
            .get(&(r.container_id.clone(), r.ifname.clone()))
    }

    /// Check an ADD against the kernel and the other endpoints; the record to add.
    ///
    /// # Errors
    /// [`ErrorCode::Invalid`] for what does not exist, [`ErrorCode::Conflict`] for what
    /// belongs to someone else.
    pub fn check_add(&self, ep: &CniEndpoint) -> Result<EndpointRecord, ApiError> {
        let pod = format!("{}/{}", ep.pod_namespace, ep.pod_name);
        let invalid = |m: String| ApiError::new(ErrorCode::Invalid, format!("pod {pod}: {m}"));
        let conflict = |m: String| ApiError::new(ErrorCode::Conflict, format!("pod {pod}: {m}"));
        if ep.addresses.is_empty() {
            return Err(invalid("prevResult has no addresses".into()));
        }
        let host = podnet::link(&ep.host_ifname).map_err(|e| {
            invalid(format!(
                "the host-side interface does not exist in the node's network namespace: {e}"
            ))
        })?;
        let inside = podnet::pod_side(Path::new(&ep.netns), &ep.ifname).map_err(invalid)?;
        if host.peer_ifindex != Some(inside.link.ifindex)
            || inside.link.peer_ifindex != Some(host.ifindex)
        {
            return Err(conflict(format!(
                "{} is not the veth peer of {} in {}: refusing to attach",
                ep.host_ifname, ep.ifname, ep.netns
            )));
        }
        let have: BTreeSet<IpAddr> = inside.addresses.iter().copied().collect();
        if let Some(missing) = ep.addresses.iter().find(|a| !have.contains(&a.addr())) {
            return Err(conflict(format!(
                "{} is not an address of {} in {}",
                missing.addr(),
                ep.ifname,
                ep.netns
            )));
        }
        let key = (ep.container_id.clone(), ep.ifname.clone());
        for other in self.records.values().filter(|r| r.key() != key) {
            if other.ifindex == host.ifindex || other.host_ifname == ep.host_ifname {
                return Err(conflict(format!(
                    "interface {} belongs to endpoint {} (container {})",
                    ep.host_ifname,
                    other.pod(),
                    other.container_id
                )));
            }
            if let Some(a) = ep
                .addresses
                .iter()
                .find(|a| other.addresses.iter().any(|o| o.addr() == a.addr()))
            {
                return Err(conflict(format!(
                    "address {} belongs to endpoint {}",
                    a.addr(),
                    other.pod()
                )));
            }
        }
        let id = match self.records.get(&key) {
            Some(existing) => existing.id,
            None => self.next_id(),
        };
        Ok(EndpointRecord {
            id,
            container_id: ep.container_id.clone(),
            ifname: ep.ifname.clone(),
            host_ifname: ep.host_ifname.clone(),
            ifindex: host.ifindex,
            netns: ep.netns.clone(),
            pod_name: ep.pod_name.clone(),
            pod_namespace: ep.pod_namespace.clone(),
            addresses: ep.addresses.clone(),
        })
    }

    pub fn insert(&mut self, record: EndpointRecord) -> Option<EndpointRecord> {
        self.records.insert(record.key(), record)
    }

    pub fn remove(&mut self, r: &CniRef) -> Option<EndpointRecord> {
        self.records
            .remove(&(r.container_id.clone(), r.ifname.clone()))
    }

    /// # Errors
    /// When the state file cannot be written.
    pub fn persist(&self) -> Result<(), FsError> {
        let records: Vec<&EndpointRecord> = self.records.values().collect();
        fsutil::write_json(&self.file, &records)
    }

    fn next_id(&self) -> u32 {
        let used: BTreeSet<u32> = self.records.values().map(|e| e.id).collect();
        (1..u32::MAX)
            .find(|id| !used.contains(id))
            .unwrap_or(u32::MAX)
    }
}

/// Whether the host-side interface of `record` is still the one its ADD attached to (same
/// name, same ifindex): only then may a DEL detach programs from it.
pub fn still_attached(record: &EndpointRecord) -> bool {
    nix::net::if_::if_nametoindex(record.host_ifname.as_str())
        .is_ok_and(|index| index == record.ifindex)
}
