//! `weft policy explain` on the agent's side: resolves the two ends (a pod name or an
//! address) through the published view, asks the policy core for the verdict of each
//! direction this node enforces (the core reads the same entries the maps hold), and
//! compares it with the datapath's recent flows for the same connection. Reads the view only.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use weft_api::{
    ApiError, DatapathCheck, ErrorCode, ExplainAudit, ExplainEnd, ExplainHop, ExplainQuery,
    ExplainReport, Flow, ObservedFlow,
};
use weft_policy::explain::{Hop, Reason};
use weft_policy::identity::WORLD;
use weft_policy::ports::{
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, protocol_name,
};
use weft_policy::{AuditChange, DesiredState, Direction, PolicyMapKey};

use crate::observe::reserved_identity_name;
use crate::view::{View, verdict_name};

/// One end, resolved.
struct End {
    report: ExplainEnd,
    /// The local endpoint id, when the end is an endpoint of this node.
    endpoint_id: Option<u32>,
}

/// The explanation of `query` from `view`, without the datapath check (see [`check_flows`]).
///
/// # Errors
/// `invalid` for an unknown protocol, `not-found` for an end that names no pod, `conflict`
/// for a pod name that more than one namespace has.
pub fn explain(view: &View, query: &ExplainQuery) -> Result<ExplainReport, ApiError> {
    let protocol = parse_protocol(&query.protocol)?;
    let from = resolve_end(view, &query.from)?;
    let to = resolve_end(view, &query.to)?;
    // The core's port: for ICMP the type in the high byte (code 0).
    let port = if matches!(protocol, IPPROTO_ICMP | IPPROTO_ICMPV6) {
        let ty = u8::try_from(query.port).map_err(|_| {
            ApiError::new(
                ErrorCode::Invalid,
                format!("ICMP type {} is out of range (0-255)", query.port),
            )
        })?;
        u16::from(ty) << 8
    } else {
        query.port
    };
    let state = local_state(view, [from.endpoint_id, to.endpoint_id]);
    let peer = |end: &End| match end.endpoint_id {
        Some(endpoint_id) => weft_policy::Peer::Local {
            endpoint_id,
            identity: end.report.identity,
        },
        None => weft_policy::Peer::Remote {
            identity: end.report.identity,
        },
    };
    let explanation = weft_policy::explain(&state, peer(&from), peer(&to), protocol, port);
    let hops: Vec<ExplainHop> = explanation.hops.iter().map(|h| hop_row(view, h)).collect();
    Ok(ExplainReport {
        verdict: if explanation.allowed() {
            "allowed"
        } else {
            "dropped"
        }
        .into(),
        from: from.report,
        to: to.report,
        protocol: protocol_name(protocol),
        port: query.port,
        hops,
        datapath: DatapathCheck {
            agreement: "no-recent-flows".into(),
            flows: 0,
            message: String::new(),
        },
    })
}

/// The local endpoint of each hop: (`namespace/pod`, endpoint id).
pub fn hop_endpoints(view: &View, report: &ExplainReport) -> BTreeMap<String, u32> {
    view.names
        .endpoints
        .iter()
        .filter(|(_, name)| report.hops.iter().any(|h| &h.endpoint == *name))
        .map(|(id, name)| (name.clone(), *id))
        .collect()
}

/// Compare each hop with the most recent matching flow of `flows` (oldest first, with the
/// datapath's time of each): only flows the datapath saw since the hop's endpoint last
/// changed in the maps (`since`, by endpoint name), and with the peer identity the
/// explanation used, count. A direction the datapath dropped must be one the explanation
/// drops, and one it passed (forwarded or audited) one it passes.
pub fn check_flows(
    report: &mut ExplainReport,
    flows: &[(u64, Flow)],
    since: &BTreeMap<String, u64>,
) {
    let matching: Vec<&(u64, Flow)> = flows
        .iter()
        .filter(|(_, f)| flow_matches(report, f))
        .collect();
    let mut disagreements = Vec::new();
    let mut observed = 0;
    let mut considered = 0;
    for hop in &mut report.hops {
        let after = since.get(&hop.endpoint).copied().unwrap_or(0);
        let egress = hop.direction == Direction::Egress.to_string();
        let relevant = matching.iter().filter(|(t, f)| {
            let peer = if egress {
                f.destination.identity
            } else {
                f.source.identity
            };
            *t >= after
                && f.direction == hop.direction
                && f.endpoint == hop.endpoint
                && peer == hop.peer_identity
        });
        let mut latest = None;
        for (_, flow) in relevant {
            considered += 1;
            latest = Some(flow);
        }
        let Some(flow) = latest else {
            continue;
        };
        observed += 1;
        let dropped = flow.verdict == "dropped";
        let agrees = dropped == hop.drops;
        if !agrees {
            disagreements.push(format!(
                "{} {}: explained {}, the datapath {} it ({})",
                hop.endpoint,
                hop.direction,
                if hop.drops { "drop" } else { "pass" },
                if dropped { "dropped" } else { "passed" },
                flow.drop_reason.as_deref().unwrap_or("no drop reason"),
            ));
        }
        hop.observed = Some(ObservedFlow {
            time: flow.time.clone(),
            verdict: flow.verdict.clone(),
            drop_reason: flow.drop_reason.clone(),
            agrees,
        });
    }
    report.datapath = if observed == 0 {
        DatapathCheck {
            agreement: "no-recent-flows".into(),
            flows: considered,
            message:
                "no matching flow since the endpoints' policy last changed: nothing to compare"
                    .into(),
        }
    } else if disagreements.is_empty() {
        DatapathCheck {
            agreement: "agrees".into(),
            flows: considered,
            message: format!(
                "the datapath's latest flow agrees in {observed} of {} direction(s)",
                report.hops.len()
            ),
        }
    } else {
        DatapathCheck {
            agreement: "disagrees".into(),
            flows: considered,
            message: disagreements.join("; "),
        }
    };
}

fn flow_matches(report: &ExplainReport, flow: &Flow) -> bool {
    if flow.protocol != report.protocol
        || !report.from.addresses.contains(&flow.source.ip)
        || !report.to.addresses.contains(&flow.destination.ip)
    {
        return false;
    }
    match flow.icmp.as_deref() {
        // ICMP: `type/code`; the explained type with any code.
        Some(icmp) => icmp
            .split_once('/')
            .is_some_and(|(ty, _)| ty == report.port.to_string()),
        None => flow.destination.port == Some(report.port),
    }
}

fn parse_protocol(name: &str) -> Result<u8, ApiError> {
    match name.to_ascii_lowercase().as_str() {
        "tcp" => Ok(IPPROTO_TCP),
        "udp" => Ok(IPPROTO_UDP),
        "sctp" => Ok(IPPROTO_SCTP),
        "icmp" => Ok(IPPROTO_ICMP),
        "icmpv6" => Ok(IPPROTO_ICMPV6),
        _ => Err(ApiError::new(
            ErrorCode::Invalid,
            format!("unknown protocol {name:?}: use tcp, udp, sctp, icmp or icmpv6"),
        )),
    }
}

/// The policy state of the (at most two) local endpoints involved, as the maps hold it.
fn local_state(view: &View, endpoints: [Option<u32>; 2]) -> DesiredState {
    let desired = &view.plan.desired;
    let mut state = DesiredState::default();
    for id in endpoints.into_iter().flatten() {
        if let Some(spec) = desired.endpoints.values().find(|e| e.endpoint_id == id) {
            state.endpoints.insert(id, spec.policy);
        }
        state.entries.extend(
            desired
                .policy
                .range(PolicyMapKey::first_of(id)..)
                .take_while(|(k, _)| k.endpoint_id == id)
                .map(|(k, e)| (*k, e.clone())),
        );
        for direction in [Direction::Egress, Direction::Ingress] {
            if let Some(by) = view.plan.isolated_by.get(&(id, direction)) {
                state.isolated_by.insert((id, direction), by.clone());
            }
        }
    }
    state
}

fn resolve_end(view: &View, query: &str) -> Result<End, ApiError> {
    if let Ok(ip) = query.parse::<IpAddr>() {
        return Ok(resolve_address(view, query, ip));
    }
    let (namespace, name) = match query.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, query),
    };
    let local: Vec<_> = view
        .endpoints
        .iter()
        .filter(|e| e.pod_name == name && namespace.is_none_or(|ns| e.pod_namespace == ns))
        .collect();
    match local.as_slice() {
        [record] => {
            let identity = view
                .plan
                .endpoint_identity
                .get(&record.id)
                .copied()
                .unwrap_or(weft_policy::identity::UNMANAGED);
            return Ok(End {
                report: ExplainEnd {
                    query: query.to_owned(),
                    name: record.pod(),
                    addresses: record.addresses.iter().map(IpNet::addr).collect(),
                    identity,
                    local: true,
                },
                endpoint_id: Some(record.id),
            });
        }
        [] => {}
        several => {
            let names: Vec<String> = several.iter().map(|r| r.pod()).collect();
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "pod {query:?} is ambiguous ({}): name it namespace/name",
                    names.join(", ")
                ),
            ));
        }
    }
    // A pod of another node: by its addresses, whose identity the ipcache holds.
    let mut remote: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for (ip, pod) in &view.plan.remote_pods {
        let matches = match namespace {
            Some(_) => pod.pod == query,
            None => pod.pod.rsplit_once('/').is_some_and(|(_, n)| n == name),
        };
        if matches {
            remote.entry(pod.pod.clone()).or_default().push(*ip);
        }
    }
    match remote.len() {
        0 => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no pod {query:?} on this node or in the cluster this node knows"),
        )),
        1 => {
            let (pod, addresses) = remote.into_iter().next().expect("one entry");
            let identity = ipcache_identity(view, addresses[0]).0;
            Ok(End {
                report: ExplainEnd {
                    query: query.to_owned(),
                    name: pod,
                    addresses,
                    identity,
                    local: false,
                },
                endpoint_id: None,
            })
        }
        _ => Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "pod {query:?} is ambiguous ({}): name it namespace/name",
                remote.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

fn resolve_address(view: &View, query: &str, ip: IpAddr) -> End {
    if let Some(record) = view
        .endpoints
        .iter()
        .find(|e| e.addresses.iter().any(|a| a.addr() == ip))
    {
        let identity = view
            .plan
            .endpoint_identity
            .get(&record.id)
            .copied()
            .unwrap_or(weft_policy::identity::UNMANAGED);
        return End {
            report: ExplainEnd {
                query: query.to_owned(),
                name: record.pod(),
                addresses: vec![ip],
                identity,
                local: true,
            },
            endpoint_id: Some(record.id),
        };
    }
    let (identity, prefix) = ipcache_identity(view, ip);
    let name = view
        .names
        .addresses
        .get(&ip)
        .map(|(pod, _)| pod.clone())
        .or_else(|| reserved_identity_name(identity).map(str::to_owned))
        .or_else(|| prefix.map(|p| format!("cidr:{p}")))
        .unwrap_or_else(|| format!("identity:{identity}"));
    End {
        report: ExplainEnd {
            query: query.to_owned(),
            name,
            addresses: vec![ip],
            identity,
            local: false,
        },
        endpoint_id: None,
    }
}

/// The identity the datapath's ipcache gives `ip` (longest prefix; `world` when none), and
/// the prefix that matched.
fn ipcache_identity(view: &View, ip: IpAddr) -> (u32, Option<IpNet>) {
    view.plan
        .desired
        .ipcache
        .iter()
        .filter(|(net, _)| net.contains(&ip))
        .max_by_key(|(net, _)| net.prefix_len())
        .map_or((WORLD, None), |(net, spec)| (spec.identity, Some(*net)))
}

fn hop_row(view: &View, hop: &Hop) -> ExplainHop {
    let (decided_by, rules, isolated_by) = match &hop.reason {
        Reason::NotIsolated => ("not-isolated", Vec::new(), Vec::new()),
        Reason::Rules(rules) => ("rules", rules.clone(), Vec::new()),
        Reason::DefaultDeny { isolated_by } => ("default-deny", Vec::new(), isolated_by.clone()),
        Reason::AuditDefault { isolated_by } => ("audit-default", Vec::new(), isolated_by.clone()),
    };
    ExplainHop {
        endpoint: view
            .names
            .endpoints
            .get(&hop.endpoint_id)
            .cloned()
            .unwrap_or_else(|| format!("endpoint:{}", hop.endpoint_id)),
        direction: hop.direction.to_string(),
        peer_identity: hop.peer_identity,
        verdict: verdict_name(hop.verdict).into(),
        drops: hop.drops(),
        decided_by: decided_by.into(),
        rules,
        isolated_by,
        entry: hop.key.map(|k| k.to_string()),
        audit: hop.audit.as_ref().map(|a| ExplainAudit {
            verdict: verdict_name(a.verdict).into(),
            change: a.change.map(|c| {
                match c {
                    AuditChange::WouldDeny => "would-drop",
                    AuditChange::WouldAllow => "would-allow",
                }
                .into()
            }),
            rules: a.rules.clone(),
        }),
        observed: None,
    }
}

#[cfg(test)]
mod tests {
    use weft_api::FlowPeer;

    use super::*;

    fn report(drops: bool) -> ExplainReport {
        let end = |name: &str, ip: &str, identity| ExplainEnd {
            query: ip.into(),
            name: name.into(),
            addresses: vec![ip.parse().expect("ip")],
            identity,
            local: true,
        };
        ExplainReport {
            from: end("x/a", "100.64.1.2", 300),
            to: end("x/b", "100.64.1.3", 301),
            protocol: "TCP".into(),
            port: 80,
            verdict: if drops { "dropped" } else { "allowed" }.into(),
            hops: vec![ExplainHop {
                endpoint: "x/b".into(),
                direction: "ingress".into(),
                peer_identity: 300,
                verdict: if drops { "default-deny" } else { "allow" }.into(),
                drops,
                decided_by: "rules".into(),
                rules: Vec::new(),
                isolated_by: Vec::new(),
                entry: None,
                audit: None,
                observed: None,
            }],
            datapath: DatapathCheck {
                agreement: String::new(),
                flows: 0,
                message: String::new(),
            },
        }
    }

    fn flow(verdict: &str, source_identity: u32, port: u16) -> Flow {
        let peer = |ip: &str, port, identity| FlowPeer {
            ip: ip.parse().expect("ip"),
            port: Some(port),
            identity,
            name: String::new(),
            labels: Vec::new(),
            node: None,
        };
        Flow {
            time: String::new(),
            verdict: verdict.into(),
            drop_reason: (verdict == "dropped").then(|| "policy-denied".into()),
            direction: "ingress".into(),
            endpoint: "x/b".into(),
            protocol: "TCP".into(),
            source: peer("100.64.1.2", 40000, source_identity),
            destination: peer("100.64.1.3", port, 301),
            tcp_flags: Vec::new(),
            icmp: None,
            notes: Vec::new(),
            suppressed: 0,
            http: None,
        }
    }

    fn since(t: u64) -> BTreeMap<String, u64> {
        BTreeMap::from([("x/b".to_owned(), t)])
    }

    #[test]
    fn only_flows_since_the_endpoints_change_and_with_the_explained_peer_count() {
        let mut r = report(true);
        let flows = vec![
            (10, flow("forwarded", 300, 80)), // before the change: met other entries
            (30, flow("forwarded", 999, 80)), // another peer identity (the ipcache changed)
            (40, flow("forwarded", 300, 81)), // another port
            (50, flow("dropped", 300, 80)),
        ];
        check_flows(&mut r, &flows, &since(20));
        assert_eq!(r.datapath.agreement, "agrees", "{:?}", r.datapath);
        assert_eq!(r.datapath.flows, 1);
        assert!(r.hops[0].observed.as_ref().is_some_and(|o| o.agrees));
    }

    #[test]
    fn a_datapath_that_passed_what_is_explained_as_dropped_disagrees() {
        let mut r = report(true);
        check_flows(&mut r, &[(50, flow("forwarded", 300, 80))], &since(20));
        assert_eq!(r.datapath.agreement, "disagrees");
        assert!(
            r.datapath.message.contains("explained drop"),
            "{}",
            r.datapath.message
        );
        let mut r = report(false);
        check_flows(&mut r, &[(50, flow("dropped", 300, 80))], &since(20));
        assert_eq!(r.datapath.agreement, "disagrees");
    }

    #[test]
    fn nothing_recent_is_said_so() {
        let mut r = report(false);
        check_flows(&mut r, &[(10, flow("forwarded", 300, 80))], &since(20));
        assert_eq!(r.datapath.agreement, "no-recent-flows");
        assert!(r.hops[0].observed.is_none());
    }
}
