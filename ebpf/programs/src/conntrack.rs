//! Connection tracking: the key relative to the endpoint, the fast path that updates a live
//! entry in place, and the entry created when a new flow passes.
//!
//! The fast path does one map lookup and no other: no endpoint, ipcache or policy lookup and
//! no event. It never decides a drop; a miss or an expired entry goes to the slow path.

use weft_common::{
    CT_REFRESH_NS, CtEntry, CtKey, IPPROTO_TCP, ct_flags, ct_lifetime_ns, direction,
};

use crate::{
    maps::{Aligned, CONNTRACK},
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

/// Fast path. When `key` has a live entry, accounts the packet on it and returns the
/// entry's `redirect_ifindex` (0: no redirect). `None` on a miss or when the entry has
/// outlived its lifetime (it is then overwritten by [`create`] if the flow is still allowed).
#[inline(always)]
pub fn refresh(key: &CtKey, dir: u8, tcp_flags: u8, len: u32, now: u64) -> Option<u32> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a non-null value pointer from bpf_map_lookup_elem, valid for this program run.
    // Other CPUs may update the same entry concurrently; lost counter increments are
    // accepted (plain adds, as in Cilium).
    unsafe {
        let flags = (*entry).flags;
        let last_seen = (*entry).last_seen_ns;
        // saturating: another CPU may have stored a later timestamp than our `now`.
        let idle = now.saturating_sub(last_seen);
        if idle > ct_lifetime_ns(key.protocol, flags) {
            return None;
        }
        (*entry).packets += 1;
        (*entry).bytes += u64::from(len);

        let against_origin = if dir == direction::EGRESS {
            ct_flags::ORIGIN_INGRESS
        } else {
            ct_flags::ORIGIN_EGRESS
        };
        let mut new_flags = flags;
        if flags & against_origin != 0 {
            new_flags |= ct_flags::REPLY_SEEN;
        }
        if key.protocol == IPPROTO_TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            new_flags |= ct_flags::CLOSING;
        }
        if new_flags != flags {
            (*entry).flags = new_flags;
        }
        if idle > CT_REFRESH_NS {
            (*entry).last_seen_ns = now;
        }
        Some((*entry).redirect_ifindex)
    }
}

/// Records a new flow that `decision` let pass (possibly only in audit mode) at `dir`.
/// `redirect_ifindex` is the other pod's host-side ifindex for a local pod-to-pod flow.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn create(
    key: &CtKey,
    dir: u8,
    len: u32,
    now: u64,
    decision: &Decision,
    peer_identity: u32,
    endpoint_id: u32,
    redirect_ifindex: u32,
) {
    let mut flags = if dir == direction::EGRESS {
        ct_flags::ORIGIN_EGRESS
    } else {
        ct_flags::ORIGIN_INGRESS
    };
    if decision.audit {
        flags |= ct_flags::AUDIT;
    }
    if redirect_ifindex != 0 {
        // Replies go straight into this pod and never pass one of its hooks.
        flags |= ct_flags::REPLY_SEEN;
    }
    // CtEntry is 8-byte aligned already (u64 fields): no `Aligned` wrapper needed.
    let entry = CtEntry {
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: u64::from(len),
        flags,
        peer_identity,
        endpoint_id,
        verdict: decision.verdict,
        _pad: [0; 3],
        redirect_ifindex,
        _pad2: 0,
    };
    // A full LRU evicts; any other failure only costs a policy lookup on the next packet.
    let _ = CONNTRACK.insert(key, entry, 0);
}
