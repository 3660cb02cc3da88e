//! Who this node's WireGuard peers are, from the node list of the published view: pure, so
//! every rule that keeps a remote node from claiming what is not its own is tested here.

use std::net::SocketAddr;

use ipnet::IpNet;
use weft_wg::PublicKey;

use crate::plan::NodeSummary;

/// One peer as the device and the routes should have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    pub node: String,
    pub public_key: PublicKey,
    pub endpoint: SocketAddr,
    /// The node's pod CIDRs that survived the checks; routed through the device.
    pub allowed_ips: Vec<IpNet>,
}

/// The peer set and why some node or prefix was left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub peers: Vec<DesiredPeer>,
    pub problems: Vec<String>,
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The peers for `nodes` (the view's list, this node marked `local`): every other node that
/// publishes a valid key and an address. A pod CIDR is left out when it overlaps this node's
/// own pod CIDRs, any node's underlay address (the tunnel would carry its own packets), or a
/// CIDR an earlier node (by name) already claimed; a key is left out when it is this node's
/// or an earlier node's. Each exclusion is a problem line naming the node and field.
pub fn desired(nodes: &[NodeSummary], own_key: &PublicKey, port: u16) -> Desired {
    let mut out = Desired::default();
    let mut claimed: Vec<(IpNet, String)> = Vec::new();
    for node in nodes.iter().filter(|n| n.local) {
        claimed.extend(node.pod_cidrs.iter().map(|c| (*c, node.name.clone())));
    }
    let underlay: Vec<IpNet> = nodes
        .iter()
        .flat_map(|n| n.addresses.iter().map(|a| IpNet::from(*a)))
        .collect();
    let mut keys: Vec<PublicKey> = vec![*own_key];
    for node in nodes.iter().filter(|n| !n.local) {
        let name = &node.name;
        let Some(text) = node.wireguard_public_key.as_deref() else {
            out.problems.push(format!(
                "node {name} publishes no wireguardPublicKey: traffic to its pods is not encrypted"
            ));
            continue;
        };
        let Ok(key) = text.parse::<PublicKey>() else {
            out.problems.push(format!(
                "node {name}: wireguardPublicKey is not a WireGuard key (32 bytes of base64): not a peer"
            ));
            continue;
        };
        if keys.contains(&key) {
            out.problems.push(format!(
                "node {name}: wireguardPublicKey is already another node's: not a peer"
            ));
            continue;
        }
        let Some(address) = node.addresses.first() else {
            out.problems
                .push(format!("node {name} publishes no addresses: not a peer"));
            continue;
        };
        let mut allowed_ips = Vec::new();
        for cidr in &node.pod_cidrs {
            let cidr = cidr.trunc();
            if let Some((_, owner)) = claimed.iter().find(|(c, _)| overlaps(c, &cidr)) {
                out.problems.push(format!(
                    "node {name}: podCIDR {cidr} overlaps a pod CIDR of node {owner}: not routed to it"
                ));
            } else if underlay.iter().any(|u| overlaps(u, &cidr)) {
                out.problems.push(format!(
                    "node {name}: podCIDR {cidr} holds a node address: not routed through the tunnel"
                ));
            } else {
                claimed.push((cidr, name.clone()));
                allowed_ips.push(cidr);
            }
        }
        keys.push(key);
        out.peers.push(DesiredPeer {
            node: name.clone(),
            public_key: key,
            endpoint: SocketAddr::new(*address, port),
            allowed_ips,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_wg::PrivateKey;

    fn node(
        name: &str,
        local: bool,
        addr: &str,
        cidrs: &[&str],
        key: Option<String>,
    ) -> NodeSummary {
        NodeSummary {
            name: name.into(),
            local,
            addresses: vec![addr.parse().expect("address")],
            pod_cidrs: cidrs.iter().map(|c| c.parse().expect("cidr")).collect(),
            pods: 0,
            wireguard_public_key: key,
        }
    }

    fn key() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    #[test]
    fn other_nodes_with_keys_become_peers_on_their_underlay_address() {
        let (own, k2) = (key(), key());
        let nodes = [
            node(
                "n1",
                true,
                "100.65.0.1",
                &["100.64.1.0/24"],
                Some(own.to_string()),
            ),
            node(
                "n2",
                false,
                "100.65.0.2",
                &["100.64.2.0/24", "fd00:64:0:2::/64"],
                Some(k2.to_string()),
            ),
        ];
        let d = desired(&nodes, &own, 51871);
        assert_eq!(d.problems, Vec::<String>::new());
        assert_eq!(
            d.peers,
            [DesiredPeer {
                node: "n2".into(),
                public_key: k2,
                endpoint: "100.65.0.2:51871".parse().expect("endpoint"),
                allowed_ips: vec![
                    "100.64.2.0/24".parse().expect("cidr"),
                    "fd00:64:0:2::/64".parse().expect("cidr")
                ],
            }]
        );
    }

    #[test]
    fn nodes_without_a_valid_unique_key_are_not_peers_and_are_reported() {
        let (own, k2) = (key(), key());
        let nodes = [
            node(
                "n1",
                true,
                "100.65.0.1",
                &["100.64.1.0/24"],
                Some(own.to_string()),
            ),
            node("n2", false, "100.65.0.2", &["100.64.2.0/24"], None),
            node(
                "n3",
                false,
                "100.65.0.3",
                &["100.64.3.0/24"],
                Some("junk".into()),
            ),
            node(
                "n4",
                false,
                "100.65.0.4",
                &["100.64.4.0/24"],
                Some(own.to_string()),
            ),
            node(
                "n5",
                false,
                "100.65.0.5",
                &["100.64.5.0/24"],
                Some(k2.to_string()),
            ),
            node(
                "n6",
                false,
                "100.65.0.6",
                &["100.64.6.0/24"],
                Some(k2.to_string()),
            ),
        ];
        let d = desired(&nodes, &own, 51871);
        let peers: Vec<&str> = d.peers.iter().map(|p| p.node.as_str()).collect();
        assert_eq!(peers, ["n5"]);
        assert_eq!(d.problems.len(), 4, "{:?}", d.problems);
        for (problem, name) in d.problems.iter().zip(["n2", "n3", "n4", "n6"]) {
            assert!(problem.contains(&format!("node {name}")), "{problem}");
        }
        assert!(
            d.problems[1].contains("wireguardPublicKey"),
            "{}",
            d.problems[1]
        );
    }

    #[test]
    fn a_remote_node_cannot_claim_local_pods_other_nodes_pods_or_node_addresses() {
        let own = key();
        let nodes = [
            node(
                "n1",
                true,
                "100.65.0.1",
                &["100.64.1.0/24"],
                Some(own.to_string()),
            ),
            // Wider than n1's pods, n3's pods, and the underlay: all refused.
            node(
                "n2",
                false,
                "100.65.0.2",
                &["100.64.0.0/16", "100.65.0.0/24", "100.64.9.0/24"],
                Some(key().to_string()),
            ),
            node(
                "n3",
                false,
                "100.65.0.3",
                &["100.64.9.0/25"],
                Some(key().to_string()),
            ),
        ];
        let d = desired(&nodes, &own, 51871);
        assert_eq!(
            d.peers[0].allowed_ips,
            ["100.64.9.0/24".parse::<IpNet>().expect("cidr")]
        );
        assert!(d.peers[1].allowed_ips.is_empty(), "{:?}", d.peers[1]);
        assert_eq!(d.problems.len(), 3, "{:?}", d.problems);
        assert!(d.problems[0].contains("node n1"), "{}", d.problems[0]);
        assert!(d.problems[1].contains("node address"), "{}", d.problems[1]);
        assert!(d.problems[2].contains("of node n2"), "{}", d.problems[2]);
    }
}
