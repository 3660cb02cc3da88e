//! The filter's configuration as the agent pushes it (serde, JSON on the control socket), and
//! its compiled form, swapped in whole so that a change applies to the next request.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use weft_policy::http::{HttpMatcher, HttpRuleError, L7Policy};
use weft_policy::ports::IPPROTO_TCP;
use weft_policy::{DesiredState, Direction, MapEntry, PolicyMapKey, Verdict};

/// Everything the filter knows: which endpoint has which HTTP rules on which port for which
/// peer, and who the identities are.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Increases with every configuration the agent sends; readiness names it.
    pub revision: u64,
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// Identity -> security labels (for access records).
    #[serde(default)]
    pub identities: BTreeMap<u32, BTreeMap<String, String>>,
    /// Address -> identity, from the agent's ipcache: what [`crate::ConfigAddresses`] answers.
    /// Addresses of `endpoints` need not be repeated.
    #[serde(default)]
    pub addresses: BTreeMap<IpAddr, u32>,
}

/// A local endpoint (pod) with HTTP rules in either direction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// The datapath's endpoint id.
    pub id: u32,
    /// `namespace/name`, for access records.
    pub name: String,
    pub identity: u32,
    pub addresses: Vec<IpAddr>,
    /// Rules for connections to this endpoint, by (destination port, source identity).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<PortPolicy>,
    /// Rules for connections from this endpoint, by (destination port, destination identity).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<PortPolicy>,
}

/// The HTTP rules of one `redirect-l7` policy entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortPolicy {
    pub port: u16,
    /// Last port of a range (inclusive); `None`: `port` alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
    /// Peer identity; 0 is any peer, used when the peer has no entry of its own for the port
    /// (as the datapath's lookup).
    pub peer: u32,
    pub http: L7Policy,
}

impl PortPolicy {
    /// The `redirect-l7` entries of one endpoint and direction in a resolved policy state.
    pub fn from_state(state: &DesiredState, endpoint_id: u32, direction: Direction) -> Vec<Self> {
        Self::from_entries(state.endpoint_entries(endpoint_id), direction)
    }

    /// The `redirect-l7` entries in `direction` among one endpoint's policy-map entries.
    pub fn from_entries<'a>(
        entries: impl Iterator<Item = (&'a PolicyMapKey, &'a MapEntry)>,
        direction: Direction,
    ) -> Vec<Self> {
        entries
            .filter(|(k, e)| {
                k.direction == direction
                    && k.protocol == Some(IPPROTO_TCP)
                    && matches!(e.verdict, Verdict::RedirectL7 { .. })
            })
            .filter_map(|(k, e)| {
                let http = e.l7.as_deref()?.clone();
                let (first, last) = (k.port.first(), k.port.last());
                Some(PortPolicy {
                    port: first,
                    end_port: (last != first).then_some(last),
                    peer: k.identity,
                    http,
                })
            })
            .collect()
    }
}

/// Why a configuration was refused (the previous one stays in force).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("endpoint {endpoint} {direction} port {port} peer {peer}: {source}")]
    Rules {
        endpoint: String,
        direction: Direction,
        port: u16,
        peer: u32,
        #[source]
        source: HttpRuleError,
    },
    #[error("endpoint {endpoint}: port range {port}-{end_port} is empty")]
    Range {
        endpoint: String,
        port: u16,
        end_port: u16,
    },
    #[error("address {address} belongs to endpoints {first} and {second}")]
    DuplicateAddress {
        address: IpAddr,
        first: String,
        second: String,
    },
    #[error("revision {got} is older than the one in force ({current})")]
    Stale { got: u64, current: u64 },
}

#[derive(Debug)]
pub(crate) struct CompiledPort {
    first: u16,
    last: u16,
    peer: u32,
    pub(crate) matcher: HttpMatcher,
}

#[derive(Debug)]
pub struct Endpoint {
    pub id: u32,
    pub name: String,
    pub identity: u32,
    ingress: Vec<CompiledPort>,
    egress: Vec<CompiledPort>,
}

impl Endpoint {
    /// The rules for `peer` on `port` in `direction`: the peer's own entry if it has one
    /// covering the port (the narrowest), else the wildcard peer's.
    pub(crate) fn rules(&self, direction: Direction, port: u16, peer: u32) -> Option<&HttpMatcher> {
        let ports = match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        };
        let find = |id: u32| {
            ports
                .iter()
                .filter(|p| p.peer == id && p.first <= port && port <= p.last)
                .min_by_key(|p| p.last - p.first)
        };
        find(peer).or_else(|| find(0)).map(|p| &p.matcher)
    }
}

/// A compiled [`Config`].
#[derive(Debug)]
pub struct Snapshot {
    pub revision: u64,
    by_address: HashMap<IpAddr, Arc<Endpoint>>,
    addresses: HashMap<IpAddr, u32>,
    identities: BTreeMap<u32, BTreeMap<String, String>>,
}

impl Snapshot {
    pub fn compile(config: &Config) -> Result<Self, ConfigError> {
        let mut by_address = HashMap::new();
        let mut addresses: HashMap<IpAddr, u32> =
            config.addresses.iter().map(|(a, i)| (*a, *i)).collect();
        for ep in &config.endpoints {
            let compile = |direction: Direction, ports: &[PortPolicy]| {
                ports
                    .iter()
                    .map(|p| {
                        let last = p.end_port.unwrap_or(p.port);
                        if last < p.port {
                            return Err(ConfigError::Range {
                                endpoint: ep.name.clone(),
                                port: p.port,
                                end_port: last,
                            });
                        }
                        let matcher =
                            HttpMatcher::compile(&p.http).map_err(|source| ConfigError::Rules {
                                endpoint: ep.name.clone(),
                                direction,
                                port: p.port,
                                peer: p.peer,
                                source,
                            })?;
                        Ok(CompiledPort {
                            first: p.port,
                            last,
                            peer: p.peer,
                            matcher,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let compiled = Arc::new(Endpoint {
                id: ep.id,
                name: ep.name.clone(),
                identity: ep.identity,
                ingress: compile(Direction::Ingress, &ep.ingress)?,
                egress: compile(Direction::Egress, &ep.egress)?,
            });
            for a in &ep.addresses {
                if let Some(prev) = by_address.insert(*a, compiled.clone()) {
                    return Err(ConfigError::DuplicateAddress {
                        address: *a,
                        first: prev.name.clone(),
                        second: ep.name.clone(),
                    });
                }
                addresses.insert(*a, ep.identity);
            }
        }
        Ok(Snapshot {
            revision: config.revision,
            by_address,
            addresses,
            identities: config.identities.clone(),
        })
    }

    /// The local endpoint at `addr`.
    pub fn endpoint(&self, addr: IpAddr) -> Option<&Arc<Endpoint>> {
        self.by_address.get(&addr)
    }

    /// The identity the configuration gives `addr` (endpoints and the address table).
    pub fn address_identity(&self, addr: IpAddr) -> Option<u32> {
        self.addresses.get(&addr).copied()
    }

    /// The labels of an identity.
    pub fn labels(&self, identity: u32) -> Option<&BTreeMap<String, String>> {
        self.identities.get(&identity)
    }
}
