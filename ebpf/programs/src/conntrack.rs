//! Connection tracking: the key relative to the endpoint, the fast path that updates a live
//! entry in place, and the entry created when a new flow passes.
//!
//! The fast path does one map lookup (plus the inlined read of the policy revision) and no
//! other: no endpoint, ipcache or policy lookup and no event. It never decides a drop; a
//! miss, an expired entry, or an entry checked against an older policy revision goes to the
//! slow path.

use weft_common::{
    CT_REFRESH_NS, CtEntry, CtKey, IPPROTO_TCP, ct_flags, ct_lifetime_ns, direction, metrics_slot,
};

use crate::{
    events,
    maps::{Aligned, CONNTRACK, CT_SCRATCH},
    parse::{Packet, TCP_FIN, TCP_RST, addr_bytes},
    policy::Decision,
};

/// The key of `pkt` as seen by the endpoint on the `dir` side: `local` is the pod's side,
/// the source for egress, the destination for ingress. Both directions of a connection
/// therefore map to the same key.
#[inline(always)]
pub fn key(pkt: &Packet, dir: u8) -> Aligned<CtKey> {
    Aligned(if dir == direction::EGRESS {
        CtKey {
            local_addr: addr_bytes(pkt.src),
            remote_addr: addr_bytes(pkt.dst),
            local_port: pkt.sport,
            remote_port: pkt.dport,
            protocol: pkt.protocol,
            _pad: [0; 3],
        }
    } else {
        CtKey {
            local_addr: addr_bytes(pkt.dst),
            remote_addr: addr_bytes(pkt.src),
            local_port: pkt.dport,
            remote_port: pkt.sport,
            protocol: pkt.protocol,
            _pad: [0; 3],
        }
    })
}

/// What the fast path found.
pub enum Hit {
    /// A live entry checked against the current policy: pass, delivering to this ifindex
    /// when non-zero, or to the L7 filter when the flow goes through it.
    Live(u32, bool, u16),
    /// A live [`ct_flags::ENCRYPTED`] entry seen entering the pod: pass if the packet came
    /// in through the encryption device.
    Tunnel,
    /// A live entry last checked against an older policy revision: check it again.
    Stale(*mut CtEntry),
    /// A flow the current policy revoked: drop, reported with the
    /// [`weft_common::DropReason`] that revoked it.
    Revoked(u8),
    /// No entry (`true`), or an expired one, which [`create`] writes over if the flow is
    /// still allowed.
    Miss(bool),
}

/// Fast path: when `key` has a live entry of the current policy `revision`, accounts the
/// packet on it.
#[inline(always)]
pub fn lookup(key: &CtKey, dir: u8, tcp_flags: u8, len: u32, now: u64, revision: u32) -> Hit {
    let Some(entry) = CONNTRACK.get_ptr_mut(key) else {
        return Hit::Miss(true);
    };
    // SAFETY: a non-null value pointer from bpf_map_lookup_elem, valid for this program run.
    // Other CPUs may update the same entry concurrently; lost counter increments are
    // accepted (plain adds, as in Cilium).
    unsafe {
        let flags = (*entry).flags;
        let last_seen = (*entry).last_seen_ns;
        // saturating: another CPU may have stored a later timestamp than our `now`.
        let idle = now.saturating_sub(last_seen);
        if idle > ct_lifetime_ns(key.protocol, flags) {
            return Hit::Miss(false);
        }
        if (*entry).revision != revision {
            return Hit::Stale(entry);
        }
        account(entry, key.protocol, dir, tcp_flags, len, now);
        if flags & ct_flags::REVOKED != 0 {
            return Hit::Revoked((*entry).revoked_reason);
        }
        if dir == direction::INGRESS && flags & ct_flags::ENCRYPTED != 0 {
            return Hit::Tunnel;
        }
        Hit::Live(
            (*entry).redirect_ifindex,
            flags & ct_flags::PROXY_REDIRECT != 0,
            (*entry).proxy_port,
        )
    }
}

/// Counts a packet on a live entry and updates its flags and last-seen time.
///
/// # Safety
/// `entry` must be a value pointer from a conntrack lookup of this program run.
#[inline(always)]
pub unsafe fn account(
    entry: *mut CtEntry,
    protocol: u8,
    dir: u8,
    tcp_flags: u8,
    len: u32,
    now: u64,
) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        (*entry).packets += 1;
        (*entry).bytes += u64::from(len);
        let flags = (*entry).flags;
        let against_origin = if dir == direction::EGRESS {
            ct_flags::ORIGIN_INGRESS
        } else {
            ct_flags::ORIGIN_EGRESS
        };
        let mut new_flags = flags;
        if flags & against_origin != 0 {
            new_flags |= ct_flags::REPLY_SEEN;
        }
        if protocol == IPPROTO_TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            new_flags |= ct_flags::CLOSING;
        }
        if new_flags != flags {
            (*entry).flags = new_flags;
        }
        if now.saturating_sub((*entry).last_seen_ns) > CT_REFRESH_NS {
            (*entry).last_seen_ns = now;
        }
    }
}

/// Whether the flow of `key` is live (an ICMP error quoting it is part of it).
#[inline(always)]
pub fn is_live(key: &CtKey, now: u64) -> bool {
    // A stale revision does not matter here: the error is passed as part of a flow that the
    // flow's own next packet checks again.
    match CONNTRACK.get_ptr(key) {
        // SAFETY: a value pointer from bpf_map_lookup_elem, valid for this program run.
        Some(entry) => unsafe {
            now.saturating_sub((*entry).last_seen_ns)
                <= ct_lifetime_ns(key.protocol, (*entry).flags)
        },
        None => false,
    }
}

/// The parts of a new entry that the policy stage decides.
pub struct NewFlow {
    pub peer_identity: u32,
    pub endpoint_id: u32,
    /// The other pod's host-side ifindex for a local pod-to-pod flow, else 0.
    pub redirect_ifindex: u32,
    pub policy_port: u16,
    pub revision: u32,
    /// No entry had the key (not even an expired one): the map gains one.
    pub new_key: bool,
    /// Through the L7 filter (see [`ct_flags::PROXY_REDIRECT`]); `proxy_port` is the
    /// filter's listener for a flow the source side steers, 0 for its upstream side.
    pub proxied: bool,
    pub proxy_port: u16,
    /// With a pod of another node under strict encryption ([`ct_flags::ENCRYPTED`]).
    pub encrypted: bool,
}

/// Records a new flow that `decision` let pass (possibly only in audit mode) at `dir`.
#[inline(always)]
pub fn create(key: &CtKey, dir: u8, len: u32, now: u64, decision: &Decision, flow: &NewFlow) {
    let mut flags = if dir == direction::EGRESS {
        ct_flags::ORIGIN_EGRESS
    } else {
        ct_flags::ORIGIN_INGRESS
    };
    if decision.audit {
        flags |= ct_flags::AUDIT;
    }
    if flow.redirect_ifindex != 0 {
        // Replies go straight into this pod and never pass one of its hooks.
        flags |= ct_flags::REPLY_SEEN;
    }
    if flow.proxied {
        flags |= ct_flags::PROXY_REDIRECT;
    }
    if flow.encrypted {
        flags |= ct_flags::ENCRYPTED;
    }
    // Built in per-CPU scratch: 64 bytes the new-flow path's stack cannot spare.
    let Some(slot) = CT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let entry = CtEntry {
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: u64::from(len),
        flags,
        peer_identity: flow.peer_identity,
        endpoint_id: flow.endpoint_id,
        revision: flow.revision,
        redirect_ifindex: flow.redirect_ifindex,
        policy_port: flow.policy_port,
        proxy_port: flow.proxy_port,
        verdict: decision.verdict,
        revoked_reason: 0,
        _pad: [0; 6],
    };
    // SAFETY: this CPU's scratch slot, valid for this program run; nothing else uses it
    // meanwhile (tc programs do not nest on one CPU).
    let entry: &CtEntry = unsafe {
        slot.write(entry);
        &*slot
    };
    // A full LRU evicts the least recently used entry to make room (the agent counts
    // evictions from these counts); any other failure only costs a policy lookup on the
    // next packet. An existing key (a flow that expired but was not collected yet) is
    // written over and is not a new entry.
    if CONNTRACK.insert(key, entry, 0).is_ok() && flow.new_key {
        events::count(metrics_slot::CT_CREATED, 0);
    }
}

/// Forgets a flow (its endpoint is gone).
#[inline(always)]
pub fn remove(key: &CtKey) {
    if CONNTRACK.remove(key).is_ok() {
        events::count(metrics_slot::CT_REMOVED, 0);
    }
}

/// Marks the flow of `entry` revoked as of policy `revision`.
///
/// # Safety
/// `entry` must be a value pointer from a conntrack lookup of this program run.
#[inline(always)]
pub unsafe fn revoke(entry: *mut CtEntry, revision: u32, reason: u8) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        (*entry).flags |= ct_flags::REVOKED;
        (*entry).revision = revision;
        (*entry).revoked_reason = reason;
    }
}

/// Marks the other pod's entry of a local flow revoked too: it is `key` seen from the other
/// end (addresses and ports swapped).
#[inline(always)]
pub fn revoke_mirror(key: &CtKey, revision: u32, reason: u8) {
    let mirror = Aligned(CtKey {
        local_addr: key.remote_addr,
        remote_addr: key.local_addr,
        local_port: key.remote_port,
        remote_port: key.local_port,
        protocol: key.protocol,
        _pad: [0; 3],
    });
    if let Some(entry) = CONNTRACK.get_ptr_mut(&mirror.0) {
        // SAFETY: a value pointer from bpf_map_lookup_elem, valid for this program run.
        unsafe { revoke(entry, revision, reason) };
    }
}
