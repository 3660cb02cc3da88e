//! Same-node socket redirection: `weft_sock_ops` (cgroup v2 of the node's pods) puts an
//! established TCP socket into the socket map when both ends are local endpoints and its
//! flow's conntrack entries say plain allow; `weft_sk_msg` (on that map) hands each message
//! straight to the peer socket's receive queue.
//!
//! Fail closed: the socket path is only a shortcut for what tc already allowed. Every message
//! checks its side's conntrack entry (one lookup, plus the inlined policy revision): a flow
//! checked against an older policy revision, revoked, closing or gone goes to the normal path,
//! where tc checks it again and drops what the new policy denies. A side that went back never
//! returns to the socket path (`SOCK_FALLBACK`): bytes of one direction never take both paths
//! with the later ones overtaking the earlier ones.

use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    bindings::{BPF_F_INGRESS, BPF_NOEXIST, sk_action},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{sk_msg, sock_ops},
    programs::{SkMsgContext, SockOpsContext},
};
use weft_common::{
    CT_REFRESH_NS, CtEntry, CtKey, FlowEvent, IPCACHE_KEY_BITS, IPPROTO_TCP, IpcacheEntry,
    IpcacheKey, config_flags, ct_flags, ct_lifetime_ns, direction, endpoint_flags, event_notes,
    flow_verdict, ipcache_flags, metrics_slot, verdict,
};

use crate::{
    events,
    maps::{self, Aligned, CONFIG, CONNTRACK, ENDPOINTS, IPCACHE, SOCK_SCRATCH, SOCKHASH},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;

/// Flags that keep a flow off the socket path: it is checked or steered per packet at tc
/// (audit, L7 filter), going away, or one side already went back to the normal path.
const NOT_REDIRECTABLE: u32 = ct_flags::REVOKED
    | ct_flags::AUDIT
    | ct_flags::PROXY_REDIRECT
    | ct_flags::CLOSING
    | ct_flags::SOCK_FALLBACK;

#[inline(always)]
fn clock() -> u64 {
    if maps::use_coarse_clock() {
        // SAFETY: helper without arguments.
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        // SAFETY: helper without arguments.
        unsafe { bpf_ktime_get_ns() }
    }
}

/// The node's config: (policy revision, redirection switched on).
#[inline(always)]
fn config() -> (u32, bool) {
    match CONFIG.get(0) {
        Some(c) => (
            c.policy_revision,
            c.flags & config_flags::SOCKET_REDIRECT != 0,
        ),
        None => (0, false),
    }
}

#[inline(always)]
fn v4_mapped(addr: u32) -> [u8; 16] {
    let a = addr.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

#[inline(always)]
fn v6_bytes(addr: [u32; 4]) -> [u8; 16] {
    // SAFETY: same size, every bit pattern is a valid [u8; 16].
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(addr) }
}

/// `key` seen from the other end.
#[inline(always)]
fn mirror(key: &CtKey) -> Aligned<CtKey> {
    Aligned(CtKey {
        local_addr: key.remote_addr,
        remote_addr: key.local_addr,
        local_port: key.remote_port,
        remote_port: key.local_port,
        protocol: key.protocol,
        _pad: [0; 3],
    })
}

/// Whether the conntrack entry says the flow may take the socket path now.
///
/// # Safety
/// `entry` must be a value pointer from a conntrack lookup of this program run.
#[inline(always)]
unsafe fn plainly_allowed(entry: *const CtEntry, revision: u32, now: u64) -> bool {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let flags = (*entry).flags;
        now.saturating_sub((*entry).last_seen_ns) <= ct_lifetime_ns(IPPROTO_TCP, flags)
            && (*entry).revision == revision
            && flags & NOT_REDIRECTABLE == 0
            && (*entry).verdict == verdict::ALLOW
            && (*entry).redirect_ifindex != 0
    }
}

/// The local pod at `addr` when its endpoint has no audit-mode policy in either direction.
#[inline(always)]
fn local_endpoint(addr: [u8; 16]) -> Option<IpcacheEntry> {
    let key = Aligned(Key::new(IPCACHE_KEY_BITS, IpcacheKey { addr }));
    let entry = *IPCACHE.get(&key.0)?;
    if entry.flags & ipcache_flags::LOCAL_POD == 0 || entry.ifindex == 0 {
        return None;
    }
    // SAFETY: a copy out of the value pointer, taken at once.
    let ep = unsafe { *ENDPOINTS.get(&entry.ifindex)? };
    if ep.flags & (endpoint_flags::INGRESS_AUDIT | endpoint_flags::EGRESS_AUDIT) != 0 {
        return None;
    }
    Some(entry)
}

/// The words of a socket's context that make its key, read as they are in the context.
struct SockWords {
    family: u32,
    local_ip4: u32,
    remote_ip4: u32,
    local_ip6: [u32; 4],
    remote_ip6: [u32; 4],
    /// Host order.
    local_port: u32,
    /// Network order, in the upper 16 bits.
    remote_port: u32,
}

/// Read every field unconditionally, one whole word at a constant offset each (volatile):
/// the verifier accepts context reads only in that form, and refuses both narrower reads and
/// a pointer LLVM would pick between two fields.
macro_rules! sock_words {
    ($ctx:expr) => {{
        let c = $ctx;
        // SAFETY: the context pointer the kernel passed, valid for this program run.
        unsafe {
            let w = |p: *const u32| core::ptr::read_volatile(p);
            SockWords {
                family: w(&raw const (*c).family),
                local_ip4: w(&raw const (*c).local_ip4),
                remote_ip4: w(&raw const (*c).remote_ip4),
                local_ip6: [
                    w(&raw const (*c).local_ip6[0]),
                    w(&raw const (*c).local_ip6[1]),
                    w(&raw const (*c).local_ip6[2]),
                    w(&raw const (*c).local_ip6[3]),
                ],
                remote_ip6: [
                    w(&raw const (*c).remote_ip6[0]),
                    w(&raw const (*c).remote_ip6[1]),
                    w(&raw const (*c).remote_ip6[2]),
                    w(&raw const (*c).remote_ip6[3]),
                ],
                local_port: w(&raw const (*c).local_port),
                remote_port: w(&raw const (*c).remote_port),
            }
        }
    }};
}

/// The socket's own conntrack key (local side first).
#[inline(always)]
fn key_of(w: &SockWords) -> Option<Aligned<CtKey>> {
    let (local_addr, remote_addr) = if w.family == AF_INET {
        (v4_mapped(w.local_ip4), v4_mapped(w.remote_ip4))
    } else if w.family == AF_INET6 {
        (v6_bytes(w.local_ip6), v6_bytes(w.remote_ip6))
    } else {
        return None;
    };
    Some(Aligned(CtKey {
        local_addr,
        remote_addr,
        local_port: (w.local_port as u16).to_be(),
        remote_port: (w.remote_port >> 16) as u16,
        protocol: IPPROTO_TCP,
        _pad: [0; 3],
    }))
}

/// The socket's key, from the sock_ops context. Out of line: the sk_msg context has the same
/// fields at other offsets, and one instruction must not read both.
#[inline(never)]
fn sock_ops_key(ctx: &SockOpsContext) -> Option<Aligned<CtKey>> {
    key_of(&sock_words!(ctx.ops))
}

/// The sending socket's key, from the sk_msg context (see [`sock_ops_key`]).
#[inline(never)]
fn sk_msg_key(ctx: &SkMsgContext) -> Option<Aligned<CtKey>> {
    key_of(&sock_words!(ctx.msg))
}

#[sock_ops]
pub fn weft_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        established(&ctx, op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB);
    }
    // sock_ops return values only matter for a few ops (none of these).
    1
}

#[inline(always)]
fn established(ctx: &SockOpsContext, active: bool) {
    let (revision, on) = config();
    if !on || revision == 0 {
        return;
    }
    let Some(mut key) = sock_ops_key(ctx) else {
        return;
    };
    let Some(local) = local_endpoint(key.0.local_addr) else {
        return;
    };
    let Some(remote) = local_endpoint(key.0.remote_addr) else {
        return;
    };
    let now = clock();
    let Some(own) = CONNTRACK.get_ptr_mut(&key.0) else {
        return;
    };
    let peer_key = mirror(&key.0);
    let Some(peer) = CONNTRACK.get_ptr(&peer_key.0) else {
        return;
    };
    // SAFETY: value pointers from bpf_map_lookup_elem, valid for this program run.
    let allowed =
        unsafe { plainly_allowed(own, revision, now) && plainly_allowed(peer, revision, now) };
    if !allowed {
        return;
    }
    // SAFETY: the context pointer the kernel passed, valid for this program run.
    let ops = unsafe { &mut *ctx.ops };
    // Never over an entry already there: a socket elsewhere with the same 4-tuple (another
    // namespace of a privileged pod) must not take over a redirected connection's slot.
    if SOCKHASH
        .update(&mut key.0, ops, u64::from(BPF_NOEXIST))
        .is_err()
    {
        return;
    }
    // SAFETY: as above.
    let endpoint_id = unsafe {
        (*own).flags |= ct_flags::SOCK_REDIRECT;
        (*own).endpoint_id
    };
    events::count(metrics_slot::SOCK_REDIRECT_SOCKETS, 0);
    // One event per socket, from its endpoint's side; the client is the source.
    let (src, dst, sport, dport, src_id, dst_id, dir) = if active {
        (
            key.0.local_addr,
            key.0.remote_addr,
            key.0.local_port,
            key.0.remote_port,
            local.identity,
            remote.identity,
            direction::EGRESS,
        )
    } else {
        (
            key.0.remote_addr,
            key.0.local_addr,
            key.0.remote_port,
            key.0.local_port,
            remote.identity,
            local.identity,
            direction::INGRESS,
        )
    };
    let v4 = key.0.local_addr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    let Some(slot) = SOCK_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, valid for this program run. Only sock_ops writes it; a
    // sock_ops run nested on this CPU could at worst garble this one event.
    let event = unsafe { &mut *slot };
    *event = FlowEvent {
        timestamp_ns: now,
        src_addr: src,
        dst_addr: dst,
        src_port: u16::from_be(sport),
        dst_port: u16::from_be(dport),
        src_identity: src_id,
        dst_identity: dst_id,
        endpoint_id,
        ifindex: local.ifindex,
        packet_len: 0,
        suppressed: 0,
        protocol: IPPROTO_TCP,
        direction: dir,
        verdict: flow_verdict::FORWARDED,
        drop_reason: 0,
        ip_version: if v4 { 4 } else { 6 },
        tcp_flags: 0,
        notes: event_notes::SOCK_REDIRECT,
        _pad: 0,
        remote_node_id: 0,
        _pad2: 0,
    };
    events::emit(event);
}

#[sk_msg]
pub fn weft_sk_msg(ctx: SkMsgContext) -> u32 {
    match redirect(&ctx) {
        Some(verdict) => verdict,
        None => sk_action::SK_PASS,
    }
}

/// `Some(verdict)` when the message was redirected, `None` for the normal path.
#[inline(always)]
fn redirect(ctx: &SkMsgContext) -> Option<u32> {
    let key = sk_msg_key(ctx)?;
    let own = CONNTRACK.get_ptr_mut(&key.0)?;
    let (revision, on) = config();
    let now = clock();
    // SAFETY: a value pointer from bpf_map_lookup_elem, valid for this program run.
    let allowed = on
        && unsafe {
            plainly_allowed(own, revision, now) && (*own).flags & ct_flags::SOCK_REDIRECT != 0
        };
    if !allowed {
        fall_back(own);
        return None;
    }
    let mut peer = mirror(&key.0);
    let verdict = SOCKHASH.redirect_msg(ctx, &mut peer.0, u64::from(BPF_F_INGRESS));
    if verdict != i64::from(sk_action::SK_PASS) {
        // The peer socket is not in the map (yet, or any more).
        fall_back(own);
        return None;
    }
    events::count(metrics_slot::SOCK_REDIRECT_MSGS, ctx.size());
    // Redirected payload sends no packet tc would see: keep both entries alive here.
    // SAFETY: as above; a lost update from another CPU only delays the refresh.
    unsafe {
        if now.saturating_sub((*own).last_seen_ns) > CT_REFRESH_NS {
            (*own).last_seen_ns = now;
            if let Some(other) = CONNTRACK.get_ptr_mut(&peer.0) {
                (*other).last_seen_ns = now;
            }
        }
    }
    Some(sk_action::SK_PASS)
}

/// Sends this side of the connection back to the normal path for good.
#[inline(always)]
fn fall_back(entry: *mut CtEntry) {
    // SAFETY: a value pointer from bpf_map_lookup_elem, valid for this program run.
    unsafe {
        let flags = (*entry).flags;
        if flags & ct_flags::SOCK_FALLBACK == 0 {
            (*entry).flags = flags | ct_flags::SOCK_FALLBACK;
            if flags & ct_flags::SOCK_REDIRECT != 0 {
                events::count(metrics_slot::SOCK_REDIRECT_FALLBACK, 0);
            }
        }
    }
}
