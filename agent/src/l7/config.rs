//! What the filter is told, derived from the published view alone (pure: no I/O).

use std::collections::BTreeMap;

use weft_l7::{Config, EndpointConfig, PortPolicy};
use weft_policy::{Direction, PolicyMapKey};

use crate::view::View;

/// The filter configuration the view calls for (revision 0: the supervisor numbers what it
/// sends). No endpoint in it: no rule on this node needs the filter.
pub fn from_view(view: &View) -> Config {
    let policy = &view.plan.desired.policy;
    let mut endpoints = Vec::new();
    for ep in view.endpoints.iter() {
        let entries = || {
            policy
                .range(PolicyMapKey::first_of(ep.id)..)
                .take_while(|(k, _)| k.endpoint_id == ep.id)
        };
        let ingress = PortPolicy::from_entries(entries(), Direction::Ingress);
        let egress = PortPolicy::from_entries(entries(), Direction::Egress);
        if ingress.is_empty() && egress.is_empty() {
            continue;
        }
        endpoints.push(EndpointConfig {
            id: ep.id,
            name: ep.pod(),
            identity: view
                .plan
                .endpoint_identity
                .get(&ep.id)
                .copied()
                .unwrap_or(weft_policy::identity::UNMANAGED),
            addresses: ep.addresses.iter().map(ipnet::IpNet::addr).collect(),
            ingress,
            egress,
        });
    }
    if endpoints.is_empty() {
        return Config::default();
    }
    // Who a source address is, as the datapath's ipcache says: single addresses only (the
    // filter sees connections from pods, whose /32 and /128 entries are all there).
    let addresses = view
        .plan
        .desired
        .ipcache
        .iter()
        .filter(|(net, _)| net.prefix_len() == net.max_prefix_len())
        .map(|(net, spec)| (net.addr(), spec.identity))
        .collect();
    let identities = view
        .plan
        .identity_labels
        .iter()
        .map(|(id, labels)| {
            let labels: BTreeMap<String, String> = labels
                .iter()
                .map(|l| match l.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (l.clone(), String::new()),
                })
                .collect();
            (*id, labels)
        })
        .collect();
    Config {
        revision: 0,
        endpoints,
        identities,
        addresses,
    }
}

/// Whether anything on the node needs the filter.
pub fn needed(config: &Config) -> bool {
    !config.endpoints.is_empty()
}
