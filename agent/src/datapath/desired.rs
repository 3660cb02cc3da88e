//! What the agent wants the datapath to hold, in the agent's terms: endpoints with their
//! isolation, address prefixes with their identity and place, nodes, and the policy core's
//! map entries. [`super::Datapath::apply`] turns this into the kernel ABI; nothing outside
//! the datapath module sees that ABI.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use weft_policy::{EndpointPolicy, MapEntry, PolicyMapKey};

/// The complete desired content of the endpoint, ipcache, node and policy maps.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Desired {
    /// By the host-side ifindex of the pod's interface.
    pub endpoints: BTreeMap<u32, EndpointSpec>,
    pub ipcache: BTreeMap<IpNet, IpcacheSpec>,
    /// By node id (this agent's numbering of the other nodes; never 0).
    pub nodes: BTreeMap<u16, NodeSpec>,
    pub policy: BTreeMap<PolicyMapKey, MapEntry>,
    /// The cluster's pod CIDRs and whose they are (read by the datapath only under strict
    /// encryption).
    pub cluster: BTreeMap<IpNet, ClusterSpec>,
    /// Strict encryption: pod traffic between nodes that does not go through the encryption
    /// device is dropped (`unencrypted`).
    pub strict_encryption: bool,
    /// ifindex of the encryption device, 0 for none.
    pub encrypt_ifindex: u32,
}

/// Whose pod CIDR a cluster range is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterSpec {
    /// This node's.
    Local,
    /// Node `node`'s (its id in the nodes map).
    Node { node: u16 },
    /// A configured cluster range no node claims (no peer carries it).
    Unclaimed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointSpec {
    pub endpoint_id: u32,
    pub identity: u32,
    pub policy: EndpointPolicy,
}

/// Where an address lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// A pod of this node, behind the host-side interface `ifindex`.
    LocalPod { ifindex: u32 },
    /// A pod of node `node`.
    RemotePod { node: u16 },
    /// An address of this node.
    LocalNode,
    /// An address of node `node`.
    RemoteNode { node: u16 },
    /// Outside the cluster (CIDR identities).
    Outside,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpcacheSpec {
    pub identity: u32,
    pub place: Place,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSpec {
    pub underlay: IpAddr,
    /// Traffic to its pods goes through the encryption device.
    pub encrypt: bool,
    pub encrypt_ifindex: u32,
}

/// How many entries each map holds at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub endpoints: usize,
    pub ipcache: usize,
    pub nodes: usize,
    pub policy: usize,
}

impl Capacity {
    pub const KERNEL: Capacity = Capacity {
        endpoints: weft_common::MAX_ENDPOINTS,
        ipcache: weft_common::IPCACHE_MAX_ENTRIES,
        nodes: weft_common::MAX_NODES,
        policy: weft_common::POLICY_MAX_ENTRIES,
    };
}
