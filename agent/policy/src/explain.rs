//! `weft policy explain`: the verdict for one connection in each direction that this node
//! enforces, and which policies and rules decided it.
//!
//! Computed from the resolved [`DesiredState`] (the same value whose entries fill the
//! `policy` map) through [`DesiredState::decide`], the datapath's lookup simulated: the
//! explanation is the entry the datapath would hit, so it cannot disagree with the maps
//! (Cilium's `policy trace` evaluates rules separately and has disagreed with its datapath,
//! cilium#5327). Resolving a pod name or an address to an endpoint or identity (endpoint
//! table, ipcache) is the caller's part.

use std::fmt;

use serde::Serialize;

use crate::mapstate::{AuditChange, Decision, DesiredState, Direction, PolicyMapKey, Verdict};
use crate::ports::protocol_name;

/// One end of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Peer {
    /// An endpoint of this node: its direction of the connection is enforced here.
    Local { endpoint_id: u32, identity: u32 },
    /// Anything else, by identity (a remote pod's, `world`, a CIDR identity, `host`, ...).
    Remote { identity: u32 },
}

impl Peer {
    fn identity(self) -> u32 {
        match self {
            Peer::Local { identity, .. } | Peer::Remote { identity } => identity,
        }
    }
}

/// Why one direction decided as it did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Reason {
    /// No policy isolates the endpoint in this direction.
    NotIsolated,
    /// A map entry matched: the rules it was derived from (allow rules, deny rules, the
    /// host exemption, or a default-deny text).
    Rules(Vec<String>),
    /// Isolated, no entry matched: default deny, by these policies (or the mode).
    DefaultDeny { isolated_by: Vec<String> },
    /// Only audit policies isolate this direction and no entry matched: passes, reported as
    /// a would-be drop.
    AuditDefault { isolated_by: Vec<String> },
}

/// What the audit policies would make of the same packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditExplanation {
    pub verdict: Verdict,
    pub rules: Vec<String>,
    /// A would-be drop or would-be allow, when the audit policies change the outcome.
    pub change: Option<AuditChange>,
}

/// The decision of one direction (egress of a local source, ingress of a local destination).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Hop {
    pub endpoint_id: u32,
    pub direction: Direction,
    pub peer_identity: u32,
    /// The enforced verdict, normalized as [`Decision::enforced_verdict`].
    pub verdict: Verdict,
    /// The entry hit, if any.
    pub key: Option<PolicyMapKey>,
    pub reason: Reason,
    pub audit: Option<AuditExplanation>,
}

impl Hop {
    #[must_use]
    pub fn drops(&self) -> bool {
        self.verdict.drops()
    }
}

/// The whole connection: every hop this node enforces, in packet order (the source's egress,
/// then the destination's ingress).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub protocol: u8,
    pub port: u16,
    pub hops: Vec<Hop>,
}

impl Explanation {
    /// Whether the connection passes L3/L4 on this node (L7 and authentication may still
    /// stop it: see each hop's verdict).
    #[must_use]
    pub fn allowed(&self) -> bool {
        self.hops.iter().all(|h| !h.drops())
    }
}

/// Explain the connection `from -> to` on `protocol`/`port` (the destination port; for ICMP,
/// `type << 8 | code`). A hop is listed for each local end; two remote ends give no hop.
#[must_use]
pub fn explain(state: &DesiredState, from: Peer, to: Peer, protocol: u8, port: u16) -> Explanation {
    let mut hops = Vec::new();
    if let Peer::Local { endpoint_id, .. } = from {
        hops.push(hop(
            state,
            endpoint_id,
            Direction::Egress,
            to.identity(),
            protocol,
            port,
        ));
    }
    if let Peer::Local { endpoint_id, .. } = to {
        hops.push(hop(
            state,
            endpoint_id,
            Direction::Ingress,
            from.identity(),
            protocol,
            port,
        ));
    }
    Explanation {
        protocol,
        port,
        hops,
    }
}

fn hop(
    state: &DesiredState,
    endpoint_id: u32,
    direction: Direction,
    peer: u32,
    protocol: u8,
    port: u16,
) -> Hop {
    let decision = state.decide(endpoint_id, direction, peer, protocol, port);
    let isolated_by = || -> Vec<String> {
        state
            .isolated_by
            .get(&(endpoint_id, direction))
            .map(|by| {
                let mut v: Vec<String> = by.enforcing.iter().map(ToString::to_string).collect();
                v.extend(by.audit.iter().map(|p| format!("{p} (audit)")));
                if by.mode_always {
                    v.push("enforcement mode always".into());
                }
                v
            })
            .unwrap_or_default()
    };
    let (key, reason, audit_rules) = match &decision {
        Decision::Open => (None, Reason::NotIsolated, Vec::new()),
        Decision::Entry(k, e) => (
            Some(**k),
            if e.verdict == Verdict::DefaultDeny {
                // A key kept for the audit verdict's sake: the enforced side is the default.
                Reason::DefaultDeny {
                    isolated_by: isolated_by(),
                }
            } else {
                Reason::Rules(e.derived_from.iter().cloned().collect())
            },
            e.audit
                .as_ref()
                .map(|a| a.derived_from.iter().cloned().collect())
                .unwrap_or_default(),
        ),
        Decision::Default(crate::mapstate::Isolation::Audit) => {
            let by = isolated_by();
            (
                None,
                Reason::AuditDefault {
                    isolated_by: by.clone(),
                },
                vec![format!(
                    "default deny: {direction} isolated by {}",
                    by.join(", ")
                )],
            )
        }
        Decision::Default(_) => (
            None,
            Reason::DefaultDeny {
                isolated_by: isolated_by(),
            },
            Vec::new(),
        ),
    };
    let audit = decision.audit_verdict().map(|verdict| AuditExplanation {
        verdict,
        rules: audit_rules,
        change: decision.audit_change(),
    });
    Hop {
        endpoint_id,
        direction,
        peer_identity: peer,
        verdict: decision.enforced_verdict(),
        key,
        reason,
        audit,
    }
}

impl fmt::Display for Explanation {
    /// One paragraph per hop, for the CLI.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed() { "allowed" } else { "dropped" };
        writeln!(
            f,
            "{}/{}: {verdict}",
            protocol_name(self.protocol),
            self.port
        )?;
        if self.hops.is_empty() {
            writeln!(
                f,
                "  neither end is an endpoint of this node: nothing is enforced here"
            )?;
        }
        for h in &self.hops {
            write!(
                f,
                "  endpoint {} {} (peer identity {}): {:?}",
                h.endpoint_id, h.direction, h.peer_identity, h.verdict
            )?;
            match &h.reason {
                Reason::NotIsolated => writeln!(f, ", not isolated: no policy selects it")?,
                Reason::Rules(rules) => writeln!(f, ", by {}", rules.join(", "))?,
                Reason::DefaultDeny { isolated_by } => {
                    writeln!(f, ", default deny: isolated by {}", isolated_by.join(", "))?;
                }
                Reason::AuditDefault { isolated_by } => writeln!(
                    f,
                    ", not enforced: only audit policies isolate it ({})",
                    isolated_by.join(", ")
                )?,
            }
            if let Some(a) = &h.audit {
                let change = match a.change {
                    Some(AuditChange::WouldDeny) => " (would be dropped)",
                    Some(AuditChange::WouldAllow) => " (would be allowed)",
                    None => "",
                };
                writeln!(
                    f,
                    "    audit: {:?}{change}, by {}",
                    a.verdict,
                    a.rules.join(", ")
                )?;
            }
        }
        Ok(())
    }
}
