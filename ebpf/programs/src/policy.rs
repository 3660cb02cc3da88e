//! Policy decision for a new flow: isolation, the two-step LPM lookup (exact peer identity,
//! then the wildcard identity) and the mapping of entry verdicts to pass/drop/audit.
//!
//! Precedence: the agent puts every wildcard deny into each exact-identity entry set, so the
//! first lookup that hits is authoritative (no deny-beats-allow work here). Verdicts this
//! datapath cannot honour yet fail closed, and so does `redirect-l7` while the L7 filter is
//! not ready (the entry then has no proxy port).

use aya_ebpf::maps::lpm_trie::Key;
use weft_common::{
    DropReason, EndpointInfo, POLICY_KEY_BITS, PolicyKey, auth_type, direction, endpoint_flags,
    identity, verdict,
};

use crate::maps::{Aligned, POLICY};

/// Outcome of the policy stage.
#[derive(Clone, Copy)]
pub struct Decision {
    /// The packet goes on (allowed, or a would-be drop in audit mode).
    pub pass: bool,
    /// Passed only because of audit mode.
    pub audit: bool,
    /// Why it was (or, with audit, would have been) dropped; `None` when allowed.
    pub reason: DropReason,
    /// The `verdict` recorded in the conntrack entry.
    pub verdict: u8,
    /// `redirect-l7` with the filter ready: its port (host order); 0 otherwise.
    pub proxy_port: u16,
}

impl Decision {
    const ALLOW: Self = Self {
        pass: true,
        audit: false,
        reason: DropReason::None,
        verdict: verdict::ALLOW,
        proxy_port: 0,
    };

    #[inline(always)]
    const fn redirect(proxy_port: u16) -> Self {
        Self {
            pass: true,
            audit: false,
            reason: DropReason::None,
            verdict: verdict::REDIRECT_L7,
            proxy_port,
        }
    }

    #[inline(always)]
    pub const fn drop(reason: DropReason) -> Self {
        Self {
            pass: false,
            audit: false,
            reason,
            verdict: verdict::DENY,
            proxy_port: 0,
        }
    }

    #[inline(always)]
    const fn audit(reason: DropReason) -> Self {
        Self {
            pass: true,
            audit: true,
            reason,
            verdict: verdict::AUDIT_DENY,
            proxy_port: 0,
        }
    }
}

/// Decides a new flow of `ep` with a peer of identity `peer` in direction `dir`.
/// `port` is the policy port (network order, `[type, code]` for ICMP).
#[inline(always)]
pub fn decide(ep: &EndpointInfo, peer: u32, dir: u8, protocol: u8, port: u16) -> Decision {
    let (isolated, audit_default) = if dir == direction::EGRESS {
        (
            endpoint_flags::EGRESS_ISOLATED,
            endpoint_flags::EGRESS_AUDIT,
        )
    } else {
        (
            endpoint_flags::INGRESS_ISOLATED,
            endpoint_flags::INGRESS_AUDIT,
        )
    };
    if ep.flags & isolated == 0 {
        return Decision::ALLOW;
    }
    let mut key = Aligned(Key::new(
        POLICY_KEY_BITS,
        PolicyKey {
            endpoint_id: ep.endpoint_id,
            identity: peer,
            direction: dir,
            protocol,
            dport: port,
        },
    ));
    let mut hit = POLICY.get(&key.0);
    if hit.is_none() {
        key.0.data.identity = identity::ANY;
        hit = POLICY.get(&key.0);
    }
    match hit {
        None if ep.flags & audit_default != 0 => Decision::audit(DropReason::PolicyDenied),
        None => Decision::drop(DropReason::PolicyDenied),
        // Not implemented yet: fail closed rather than skip the authentication.
        Some(entry) if entry.auth_type != auth_type::NONE && entry.verdict != verdict::DENY => {
            Decision::drop(DropReason::AuthRequired)
        }
        Some(entry) => match entry.verdict {
            verdict::ALLOW => Decision::ALLOW,
            verdict::DENY => Decision::drop(DropReason::PolicyDenyRule),
            verdict::AUDIT_DENY => Decision::audit(DropReason::PolicyDenyRule),
            verdict::DEFAULT_DENY => Decision::drop(DropReason::PolicyDenied),
            // Through the L7 filter; the agent writes its port only while it is ready, so
            // without one the flow fails closed.
            verdict::REDIRECT_L7 if entry.proxy_port != 0 => Decision::redirect(entry.proxy_port),
            verdict::REDIRECT_L7 => Decision::drop(DropReason::L7Unavailable),
            // Not implemented yet: fail closed rather than skip the authentication.
            verdict::REQUIRE_AUTH => Decision::drop(DropReason::AuthRequired),
            // An entry from a newer agent that this datapath does not know: fail closed.
            _ => Decision::drop(DropReason::PolicyDenied),
        },
    }
}
