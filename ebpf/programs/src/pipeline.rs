//! The per-packet sequence shared by both hooks, parameterised by the policy direction:
//! parse, fragments, conntrack fast path, then (on a miss) ICMP errors of known flows,
//! endpoint, peer identity, policy, conntrack entry, flow event and counters; and the check
//! of an established flow against a newer policy. `from_pod`/`to_pod` only pick the
//! direction.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, generated::bpf_redirect_peer},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use aya_log_ebpf::{debug, warn};
use weft_common::{
    CtEntry, CtKey, DropReason, EndpointInfo, FlowEvent, FragEntry, FragKey, IPCACHE_KEY_BITS,
    IpcacheEntry, IpcacheKey, cluster_flags, ct_flags, direction, event_notes, flow_verdict,
    identity, ipcache_flags, metrics_index, metrics_slot, node_flags,
};

use crate::{
    conntrack::{self, Hit, NewFlow},
    events,
    maps::{
        self, Aligned, CLUSTER, ENDPOINTS, FRAGMENTS, IPCACHE, LPM_SCRATCH, NODES, SCRATCH,
        STRICT_OFF,
    },
    parse::{self, MAX_PARSE_LEN, Packet, addr_bytes, frag, parsed},
    policy, proxy,
};

/// Runs the datapath for one packet seen in direction `dir` (relative to the endpoint);
/// returns the tc action.
///
/// Only the fast path is inline: the slow paths (new flows, flows checked again, drops) are
/// subprograms of their own, so that their stack is never part of this frame (6.1's verifier
/// adds up the frames of a call chain against 512 bytes, each rounded up to 32).
#[inline(always)]
pub fn process(ctx: &TcContext, dir: u8) -> i32 {
    let len = ctx.len();
    let mut pkt = Packet::EMPTY;
    let mut status = parse::parse_into(ctx, &mut pkt);
    // Headers beyond the linear part of the skb: pull them in and parse again. Rare, so
    // the common path never pays for bpf_skb_pull_data (which copies cloned heads).
    if status == parsed::MALFORMED && pull_headers(ctx, len) == 0 {
        status = parse::parse_into(ctx, &mut pkt);
    }
    if status == parsed::PASS {
        return TC_ACT_OK;
    }
    if status != parsed::IP {
        return drop_malformed(ctx, dir, len);
    }
    let mut seen = Seen {
        now: clock(),
        len,
        revision: maps::policy_revision(),
        dir,
        new_key: true,
    };
    if pkt.frag != frag::NONE && !fragment_ports(&mut pkt) {
        return drop_fragment_unknown(ctx, &pkt, &seen);
    }
    let key = conntrack::key(&pkt, dir);
    match conntrack::lookup(&key.0, dir, pkt.tcp_flags, len, seen.now, seen.revision) {
        // A flow with another node's pod under strict encryption: what enters the pod must
        // have come out of the tunnel (plaintext cannot join the flow).
        Hit::Tunnel => {
            if !from_tunnel(ctx) {
                return drop_unencrypted_live(ctx, &pkt, &key.0, &seen);
            }
            events::count(metrics_index(DropReason::None as u8, dir, false), len);
            return TC_ACT_OK;
        }
        Hit::Live(redirect, proxied, proxy_port) => {
            // Through the L7 filter: leaving the pod, to the filter's socket.
            if proxied && dir == direction::EGRESS {
                return steer_live(ctx, &pkt, &key.0, &seen, STEER | i32::from(proxy_port));
            }
            events::count(metrics_index(DropReason::None as u8, dir, false), len);
            // A local pod-to-pod flow leaving its pod: straight into the other pod. (Only tc
            // ingress can redirect to a peer; `to_pod` never needs to.)
            if redirect != 0 && dir == direction::EGRESS {
                return redirect_peer(redirect);
            }
            return TC_ACT_OK;
        }
        Hit::Stale(entry) => {
            // The strict check runs here, not inside `recheck`: that call chain has no
            // stack to spare for one more frame.
            // Strict encryption first. Leaving the pod: a peer whose key went away stops
            // the flow, revoked until it is a peer again. Entering it outside the tunnel:
            // only this packet is dropped, the flow stays for the real peer's packets (a
            // forged packet must not end someone else's connection).
            if maps::strict_ifindex() != STRICT_OFF {
                let action = strict_stale(ctx, &pkt, &key.0, entry, &seen);
                if action != CONTINUE {
                    return action;
                }
            }
            let action = recheck(ctx, &pkt, &key.0, entry, &seen);
            return steer_if_asked(ctx, &pkt, &key.0, &seen, action);
        }
        Hit::Revoked(reason) => return drop_revoked(ctx, &pkt, &key.0, &seen, reason),
        Hit::Miss(new_key) => seen.new_key = new_key,
    }
    // Strict encryption: checked here, not inside `new_flow`, whose call chain has no
    // stack to spare for one more frame.
    let strict_ifindex = maps::strict_ifindex();
    let strict = if strict_ifindex == STRICT_OFF {
        STRICT_LOCAL
    } else {
        strict_check_flow(ctx, &key.0, dir, strict_ifindex)
    };
    let action = new_flow(ctx, &pkt, &key.0, &seen, strict);
    steer_if_asked(ctx, &pkt, &key.0, &seen, action)
}

/// What the slow paths answer instead of a tc action when the packet goes to the L7 filter
/// (with its port in the low 16 bits): the steering runs in a frame of its own next to
/// theirs, not below them (the call chain's stack stays under 512 bytes).
const STEER: i32 = 1 << 30;
/// With [`STEER`]: the packet was counted already.
const COUNTED: i32 = 1 << 29;

#[inline(always)]
fn steer_if_asked(ctx: &TcContext, pkt: &Packet, key: &CtKey, seen: &Seen, action: i32) -> i32 {
    if action > 0 && action & STEER != 0 {
        return steer_live(ctx, pkt, key, seen, action);
    }
    action
}

/// The time conntrack and events use: the coarse clock (one tick of resolution, a plain
/// read) where the kernel has it, else the precise one. Which one is decided at load time.
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

/// Deliver the packet into the pod behind the host-side interface `ifindex`, past that
/// interface's own hooks and the node's routing (as Cilium's local delivery does). The frame
/// keeps its MAC addresses: the pod's stack takes it as addressed to it (the redirect marks it
/// PACKET_HOST), and leaving it unwritten spares copying cloned TCP heads.
#[inline(always)]
fn redirect_peer(ifindex: u32) -> i32 {
    // SAFETY: helper taking scalars only.
    unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
}

/// Pull the headers we parse into the linear part; 0 when it did, non-zero when the packet
/// has no more than its linear part (it is truncated, not fragmented) or the pull failed.
/// Out of line and returning no struct: BPF subprograms cannot hand back pointers into their
/// own stack.
#[inline(never)]
fn pull_headers(ctx: &TcContext, len: u32) -> i32 {
    let linear = (ctx.data_end() - ctx.data()) as u32;
    if len <= linear {
        return 1;
    }
    let want = if len < MAX_PARSE_LEN {
        len
    } else {
        MAX_PARSE_LEN
    };
    match ctx.pull_data(want) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: ctx.skb.skb is the program's context pointer; ifindex is readable at tc.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The interface the packet came into the node's namespace by (`skb->skb_iif`): the
/// encryption device for packets out of the tunnel (the kernel module and the userspace
/// device both hand decrypted packets to the stack on `weft_wg0`), the underlay interface
/// for packets off the wire, a pod's host-side veth for packets from a local pod, and 0 for
/// packets the node's own stack sent. Nothing a sender puts in a packet changes it.
#[inline(always)]
fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer; ingress_ifindex is readable at tc.
    unsafe { (*ctx.skb.skb).ingress_ifindex }
}

/// Whether the packet came in through the encryption device, or strict encryption is off
/// (then nothing is asked of it). Out of line: only packets of flows with other nodes'
/// pods under strict encryption pay for it, and the fast path's frame stays as it was.
#[inline(never)]
fn from_tunnel(ctx: &TcContext) -> bool {
    let strict = maps::strict_ifindex();
    strict == STRICT_OFF || (strict != 0 && ingress_ifindex(ctx) == strict)
}

/// What [`strict_check`] answers.
const STRICT_LOCAL: i8 = 0;
const STRICT_TUNNEL: i8 = 1;
const STRICT_DROP: i8 = -1;

/// Strict encryption, for a flow the slow path checks: whether its peer (`key.remote_addr`,
/// whose ipcache entry is packed in `place`, see [`pack_place`]) is a pod of another node
/// and the packet travels through the tunnel ([`STRICT_TUNNEL`]), is not a pod of another
/// node ([`STRICT_LOCAL`]), or would travel (or came) in plaintext ([`STRICT_DROP`]).
///
/// Egress (`from_pod`): to a pod of another node, or to any address in another node's pod
/// CIDRs or in the configured cluster ranges (pods this node has not learned), the node
/// must be a peer of the device with its key (`node_flags::ENCRYPT`; the agent sets it
/// once the peer and its routes are in place, and clears it before they go).
/// Ingress (`to_pod`): from such an address, the packet must have come in through the
/// device; from a pod of this node, through that pod's own interface (an underlay packet
/// forging a local pod's address is not that pod); from an unknown address of this node's
/// pod CIDRs, only from the node's own stack.
///
/// Out of line, with scalars and a pointer to the caller's key only: the new-flow frame
/// stays small. Only called when strict encryption is on.
#[inline(never)]
fn strict_check(ctx: &TcContext, key: &CtKey, dir: u8, strict_ifindex: u32, place: u64) -> i8 {
    let flags = (place & 0xff) as u8;
    let mut node_id = ((place >> 8) & 0xffff) as u32;
    let pod_ifindex = (place >> 32) as u32;
    if flags & ipcache_flags::LOCAL_POD != 0 {
        if dir == direction::INGRESS {
            let iif = ingress_ifindex(ctx);
            if iif != 0 && iif != pod_ifindex {
                return STRICT_DROP;
            }
        }
        return STRICT_LOCAL;
    }
    if flags & ipcache_flags::REMOTE_POD == 0 {
        let Some(lpm) = LPM_SCRATCH.get_ptr_mut(0) else {
            return STRICT_DROP;
        };
        // SAFETY: this CPU's scratch slot, valid for this program run (tc programs do not
        // nest on one CPU).
        let lpm = unsafe {
            lpm.write(Key::new(
                IPCACHE_KEY_BITS,
                IpcacheKey {
                    addr: key.remote_addr,
                },
            ));
            &*lpm
        };
        let Some(range) = CLUSTER.get(lpm) else {
            // Outside the cluster's pod CIDRs: not pod traffic between nodes.
            return STRICT_LOCAL;
        };
        if range.flags & cluster_flags::LOCAL != 0 {
            // An address of this node's pod CIDRs that is no pod of it: it can only have
            // come from the wire forging one.
            if dir == direction::INGRESS && ingress_ifindex(ctx) != 0 {
                return STRICT_DROP;
            }
            return STRICT_LOCAL;
        }
        node_id = u32::from(range.node_id);
    }
    if dir == direction::INGRESS {
        if strict_ifindex != 0 && ingress_ifindex(ctx) == strict_ifindex {
            return STRICT_TUNNEL;
        }
        return STRICT_DROP;
    }
    if node_id == 0 {
        return STRICT_DROP;
    }
    match NODES.get_ptr(node_id) {
        // SAFETY: a value pointer from bpf_map_lookup_elem, valid for this program run.
        Some(node) if unsafe { (*node).flags } & node_flags::ENCRYPT != 0 => STRICT_TUNNEL,
        _ => STRICT_DROP,
    }
}

/// [`strict_check`] for a flow whose ipcache entry the caller does not have.
#[inline(never)]
fn strict_check_flow(ctx: &TcContext, key: &CtKey, dir: u8, strict_ifindex: u32) -> i8 {
    let place = pack_place(lookup_ipcache(key.remote_addr).as_ref());
    strict_check(ctx, key, dir, strict_ifindex, place)
}

/// An ipcache entry's place as one scalar for [`strict_check`]: flags, node id, ifindex.
#[inline(always)]
fn pack_place(entry: Option<&IpcacheEntry>) -> u64 {
    match entry {
        Some(e) => u64::from(e.flags) | (u64::from(e.node_id) << 8) | (u64::from(e.ifindex) << 32),
        None => 0,
    }
}

/// Fragments: the first one leaves its ports for the rest of its datagram; a later one takes
/// them (then it meets conntrack and policy like the first). `false` when a later fragment's
/// datagram is unknown: its first fragment never came this way.
#[inline(never)]
fn fragment_ports(pkt: &mut Packet) -> bool {
    let key = Aligned(FragKey {
        src_addr: addr_bytes(pkt.src),
        dst_addr: addr_bytes(pkt.dst),
        id: pkt.frag_id,
        protocol: pkt.protocol,
        _pad: [0; 3],
    });
    if pkt.frag == frag::FIRST {
        let ports = FragEntry {
            sport: pkt.sport,
            dport: pkt.dport,
            policy_port: pkt.policy_port,
            _pad: 0,
        };
        // A full LRU evicts the oldest datagram, whose later fragments are then dropped.
        let _ = FRAGMENTS.insert(&key.0, ports, 0);
        return true;
    }
    match FRAGMENTS.get_ptr(&key.0) {
        Some(ports) => {
            // SAFETY: a value pointer from bpf_map_lookup_elem, valid for this program run.
            let ports: FragEntry = unsafe { *ports };
            pkt.sport = ports.sport;
            pkt.dport = ports.dport;
            pkt.policy_port = ports.policy_port;
            true
        }
        None => false,
    }
}

/// Whether an ICMP error (destination unreachable, packet too big, time exceeded, parameter
/// problem) quotes a packet of a live flow of this endpoint: then it is part of that flow
/// (path MTU discovery must work for isolated pods). Errors about flows that do not exist
/// take the policy path like any other packet.
#[inline(always)]
fn related(ctx: &TcContext, pkt: &Packet, dir: u8, now: u64) -> bool {
    let mut quoted = Aligned(CtKey::default());
    parse::quoted_flow(ctx, pkt, dir, &mut quoted.0) && conntrack::is_live(&quoted.0, now)
}

/// The identity (and node) of a remote address, `world` when the ipcache does not know it.
#[inline(always)]
fn lookup_ipcache(addr: [u8; 16]) -> Option<IpcacheEntry> {
    let key = Aligned(Key::new(IPCACHE_KEY_BITS, IpcacheKey { addr }));
    IPCACHE.get(&key.0).copied()
}

/// What the slow paths know about the packet besides its headers.
struct Seen {
    now: u64,
    len: u32,
    revision: u32,
    dir: u8,
    /// Conntrack has no entry for the flow, not even an expired one.
    new_key: bool,
}

/// Slow path: a packet without a live conntrack entry.
#[inline(never)]
fn new_flow(ctx: &TcContext, pkt: &Packet, key: &CtKey, seen: &Seen, strict: i8) -> i32 {
    match try_new_flow(ctx, pkt, key, seen, strict) {
        Ok(action) | Err(action) => action,
    }
}

#[inline(always)]
fn try_new_flow(
    ctx: &TcContext,
    pkt: &Packet,
    key: &CtKey,
    seen: &Seen,
    strict: i8,
) -> Result<i32, i32> {
    let (dir, len, now, revision) = (seen.dir, seen.len, seen.now, seen.revision);
    let ifindex = ifindex(ctx);
    // Fail closed without room for the event (the slot always exists).
    let event = flow_event(pkt, dir, ifindex, len, now).ok_or(TC_ACT_SHOT)?;
    if pkt.icmp_error_off != 0 && related(ctx, pkt, dir, now) && strict != STRICT_DROP {
        events::count(metrics_slot::ICMP_RELATED, len);
        events::count(metrics_index(DropReason::None as u8, dir, false), len);
        return Ok(TC_ACT_OK);
    }

    // Fail closed: an interface we are attached to but know nothing about drops everything.
    let Some(ep) = ENDPOINTS.get_ptr(ifindex) else {
        return Err(drop_unknown_endpoint(ctx, event, key, ifindex));
    };
    // SAFETY: non-null value pointer from bpf_map_lookup_elem; copied out at once.
    let ep: EndpointInfo = unsafe { *ep };
    event.endpoint_id = ep.endpoint_id;

    // A pod may only send from its own addresses: a forged source would borrow another
    // identity (and, through conntrack, its connections).
    if dir == direction::EGRESS {
        let own = lookup_ipcache(key.local_addr)
            .is_some_and(|e| e.ifindex == ifindex && e.flags & ipcache_flags::LOCAL_POD != 0);
        if !own {
            event.src_identity = identity::WORLD;
            event.dst_identity = identity::ANY;
            return Err(drop(event, key, DropReason::SpoofedSource));
        }
    }

    let (peer, peer_ifindex, peer_node) = match lookup_ipcache(key.remote_addr) {
        Some(entry) => (entry.identity, entry.ifindex, entry.node_id),
        None => (identity::WORLD, 0, 0),
    };
    event.remote_node_id = peer_node;
    if dir == direction::EGRESS {
        event.src_identity = ep.identity;
        event.dst_identity = peer;
    } else {
        event.src_identity = peer;
        event.dst_identity = ep.identity;
    }
    if strict == STRICT_DROP {
        return Err(drop(event, key, DropReason::Unencrypted));
    }

    let decision = policy::decide(&ep, peer, dir, pkt.protocol, pkt.policy_port);
    if !decision.pass {
        return Err(drop(event, key, decision.reason));
    }
    report_pass(event, &decision, dir, len);
    // To a pod of this node, seen leaving its source: the destination's ingress policy is
    // decided here too, and the packet is delivered into it directly (or to the L7 filter
    // when either side's rule says so).
    let (redirect, proxy_port) = if dir == direction::EGRESS && peer_ifindex != 0 {
        deliver_local(
            pkt,
            event,
            peer_ifindex,
            ifindex,
            revision,
            decision.proxy_port,
        )?
    } else {
        (0, decision.proxy_port)
    };
    let mut proxied = proxy_port != 0;
    if dir == direction::INGRESS {
        // Only the filter's own upstream connection may pass a `redirect-l7` entry here
        // (tc egress cannot steer): the filter has decided. Its replies go back to it.
        let from_filter = proxy::from_filter(ctx);
        if proxied && !from_filter {
            return Err(drop(event, key, DropReason::L7Unavailable));
        }
        proxied = from_filter;
    }
    let flow = NewFlow {
        peer_identity: peer,
        endpoint_id: ep.endpoint_id,
        redirect_ifindex: redirect,
        policy_port: pkt.policy_port,
        revision,
        new_key: seen.new_key,
        proxied,
        proxy_port: if dir == direction::EGRESS {
            proxy_port
        } else {
            0
        },
        encrypted: strict == STRICT_TUNNEL,
    };
    conntrack::create(key, dir, len, now, &decision, &flow);
    if proxied && dir == direction::EGRESS {
        return Ok(STEER | COUNTED | i32::from(proxy_port));
    }
    if redirect != 0 {
        return Ok(redirect_peer(redirect));
    }
    Ok(TC_ACT_OK)
}

/// The destination side of a new local pod-to-pod flow: its ingress verdict (reported as an
/// ingress event of that pod, reusing the source's `event`) and its conntrack entry, which
/// points back at the source so that replies are delivered the same way. Returns the
/// destination's host ifindex to redirect to, or 0 when it has no endpoint entry (then the
/// packet takes the routed path and meets `to_pod` there); and the L7 filter's port when
/// the source's (`src_proxy`) or the destination's rule sends the flow through it (then
/// there is no entry for the destination: the filter's upstream connection gets its own).
#[inline(always)]
fn deliver_local(
    pkt: &Packet,
    event: &mut FlowEvent,
    dst_ifindex: u32,
    src_ifindex: u32,
    revision: u32,
    src_proxy: u16,
) -> Result<(u32, u16), i32> {
    let Some(dst) = ENDPOINTS.get_ptr(dst_ifindex) else {
        return Ok((0, src_proxy));
    };
    // SAFETY: non-null value pointer from bpf_map_lookup_elem; copied out at once.
    let dst: EndpointInfo = unsafe { *dst };
    let src_identity = event.src_identity;
    let len = event.packet_len;
    let now = event.timestamp_ns;
    event.direction = direction::INGRESS;
    event.endpoint_id = dst.endpoint_id;
    event.ifindex = dst_ifindex;
    let key = conntrack::key(pkt, direction::INGRESS);
    let decision = policy::decide(
        &dst,
        src_identity,
        direction::INGRESS,
        pkt.protocol,
        pkt.policy_port,
    );
    if !decision.pass {
        return Err(drop(event, &key.0, decision.reason));
    }
    report_pass(event, &decision, direction::INGRESS, len);
    let proxy_port = if src_proxy != 0 {
        src_proxy
    } else {
        decision.proxy_port
    };
    if proxy_port != 0 {
        return Ok((0, proxy_port));
    }
    let flow = NewFlow {
        peer_identity: src_identity,
        endpoint_id: dst.endpoint_id,
        redirect_ifindex: src_ifindex,
        policy_port: pkt.policy_port,
        revision,
        new_key: maps::CONNTRACK.get_ptr(&key.0).is_none(),
        proxied: false,
        proxy_port: 0,
        encrypted: false,
    };
    conntrack::create(&key.0, direction::INGRESS, len, now, &decision, &flow);
    Ok((dst_ifindex, 0))
}

/// An established flow last checked against an older policy revision: check it again, in
/// the direction that opened it, with the peer's current identity (and, for a local
/// pod-to-pod flow, the other pod's side too, since its hook never sees this endpoint's
/// packets). Still allowed: the entry is stamped with the current revision and the packet
/// goes on as on the fast path. Revoked: the entry goes and the packet is dropped, in
/// whichever direction it travels, so revoked access stops established connections too.
#[inline(never)]
fn recheck(ctx: &TcContext, pkt: &Packet, key: &CtKey, entry: *mut CtEntry, seen: &Seen) -> i32 {
    match try_recheck(ctx, pkt, key, entry, seen) {
        Ok(action) | Err(action) => action,
    }
}

#[inline(always)]
fn try_recheck(
    ctx: &TcContext,
    pkt: &Packet,
    key: &CtKey,
    entry: *mut CtEntry,
    seen: &Seen,
) -> Result<i32, i32> {
    let ifindex = ifindex(ctx);
    let event = flow_event(pkt, seen.dir, ifindex, seen.len, seen.now).ok_or(TC_ACT_SHOT)?;
    let Some(ep) = ENDPOINTS.get_ptr(ifindex) else {
        conntrack::remove(key);
        return Err(drop_unknown_endpoint(ctx, event, key, ifindex));
    };
    // SAFETY: non-null value pointers from bpf_map_lookup_elem, valid for this program run.
    let ep: EndpointInfo = unsafe { *ep };
    let (flags, redirect, port, proxy_port) = unsafe {
        (
            (*entry).flags,
            (*entry).redirect_ifindex,
            (*entry).policy_port,
            (*entry).proxy_port,
        )
    };
    let proxied = flags & ct_flags::PROXY_REDIRECT != 0;
    let origin = if flags & ct_flags::ORIGIN_EGRESS != 0 {
        direction::EGRESS
    } else {
        direction::INGRESS
    };
    let peer = match lookup_ipcache(key.remote_addr) {
        Some(e) => e.identity,
        None => identity::WORLD,
    };
    let mut decision = policy::decide(&ep, peer, origin, key.protocol, port);
    if decision.pass
        && redirect != 0
        && let Some(other) = ENDPOINTS.get_ptr(redirect)
    {
        // SAFETY: as above.
        let other: EndpointInfo = unsafe { *other };
        let other_dir = direction::EGRESS + direction::INGRESS - origin;
        let theirs = policy::decide(&other, ep.identity, other_dir, key.protocol, port);
        if !theirs.pass || theirs.proxy_port != 0 {
            decision = theirs;
        }
    }
    // A direct flow that a newer policy sends through the L7 filter cannot be moved there
    // mid-connection: it ends (the client's next connection is steered), never unfiltered.
    if decision.proxy_port != 0 && !proxied {
        decision = policy::Decision::drop(DropReason::L7Unavailable);
    }
    events::count(metrics_slot::CT_REVALIDATED, seen.len);
    if !decision.pass {
        // SAFETY: the entry pointer of this program run's lookup.
        unsafe { conntrack::revoke(entry, seen.revision, decision.reason as u8) };
        if redirect != 0 {
            conntrack::revoke_mirror(key, seen.revision, decision.reason as u8);
        }
        events::count(metrics_slot::CT_REVOKED, seen.len);
        event.endpoint_id = ep.endpoint_id;
        event.notes = event_notes::REVOKED;
        if seen.dir == direction::EGRESS {
            event.src_identity = ep.identity;
            event.dst_identity = peer;
        } else {
            event.src_identity = peer;
            event.dst_identity = ep.identity;
        }
        return Err(drop(event, key, decision.reason));
    }
    // SAFETY: as above; plain stores into the entry.
    unsafe {
        (*entry).revision = seen.revision;
        (*entry).peer_identity = peer;
        (*entry).verdict = decision.verdict;
        // Allowed again: a revoked flow comes back.
        (*entry).flags &= !ct_flags::REVOKED;
        if decision.audit {
            (*entry).flags |= ct_flags::AUDIT;
        }
        conntrack::account(
            entry,
            key.protocol,
            seen.dir,
            pkt.tcp_flags,
            seen.len,
            seen.now,
        );
    }
    events::count(
        metrics_index(DropReason::None as u8, seen.dir, false),
        seen.len,
    );
    if proxied && seen.dir == direction::EGRESS {
        return Ok(STEER | COUNTED | i32::from(proxy_port));
    }
    if redirect != 0 && seen.dir == direction::EGRESS {
        return Ok(redirect_peer(redirect));
    }
    Ok(TC_ACT_OK)
}

/// A packet of a flow through the L7 filter, leaving its pod: to the filter's socket, or
/// dropped as `l7-unavailable` when the filter has none for it (it died or restarted).
#[inline(never)]
fn steer_live(ctx: &TcContext, pkt: &Packet, key: &CtKey, seen: &Seen, steer: i32) -> i32 {
    if proxy::steer(ctx, pkt, (steer & 0xffff) as u16) {
        if steer & COUNTED == 0 {
            events::count(
                metrics_index(DropReason::None as u8, seen.dir, false),
                seen.len,
            );
        }
        return TC_ACT_OK;
    }
    let Some(event) = flow_event(pkt, seen.dir, ifindex(ctx), seen.len, seen.now) else {
        return TC_ACT_SHOT;
    };
    if let Some(ep) = ENDPOINTS.get_ptr(event.ifindex) {
        // SAFETY: non-null value pointer from bpf_map_lookup_elem; copied out at once.
        let ep: EndpointInfo = unsafe { *ep };
        event.endpoint_id = ep.endpoint_id;
        event.src_identity = ep.identity;
    }
    drop(event, key, DropReason::L7Unavailable)
}

/// Reports and counts a passed new flow (allowed, or audited).
#[inline(always)]
fn report_pass(event: &mut FlowEvent, decision: &policy::Decision, dir: u8, len: u32) {
    event.verdict = if decision.audit {
        flow_verdict::AUDIT
    } else {
        flow_verdict::FORWARDED
    };
    event.drop_reason = decision.reason as u8;
    events::emit(event);
    events::count(
        metrics_index(decision.reason as u8, dir, decision.audit),
        len,
    );
}

/// Counts a drop and reports it (at most once per flow and second); returns the tc action.
#[inline(always)]
fn drop(event: &mut FlowEvent, key: &CtKey, reason: DropReason) -> i32 {
    event.verdict = flow_verdict::DROPPED;
    event.drop_reason = reason as u8;
    events::count(
        metrics_index(reason as u8, event.direction, false),
        event.packet_len,
    );
    let held_back = events::drop_event_allowed(key, event.timestamp_ns);
    if held_back != events::HELD_BACK {
        event.suppressed = held_back;
        events::emit(event);
    }
    TC_ACT_SHOT
}

/// A packet on an interface without an endpoint entry (a stale attachment or an agent bug):
/// dropped, and logged through aya-log. Out of line: rare, and the log call is large.
#[inline(never)]
fn drop_unknown_endpoint(ctx: &TcContext, event: &mut FlowEvent, key: &CtKey, ifindex: u32) -> i32 {
    warn!(
        ctx,
        "no endpoint for ifindex {}: dropped (fail closed)", ifindex
    );
    drop(event, key, DropReason::UnknownEndpoint)
}

/// A packet of a flow the current policy revoked (reported at most once a second).
#[inline(never)]
fn drop_revoked(ctx: &TcContext, pkt: &Packet, key: &CtKey, seen: &Seen, reason: u8) -> i32 {
    let Some(event) = flow_event(pkt, seen.dir, ifindex(ctx), seen.len, seen.now) else {
        return TC_ACT_SHOT;
    };
    event.notes |= event_notes::REVOKED;
    if let Some(ep) = ENDPOINTS.get_ptr(event.ifindex) {
        // SAFETY: non-null value pointer from bpf_map_lookup_elem; copied out at once.
        let ep: EndpointInfo = unsafe { *ep };
        event.endpoint_id = ep.endpoint_id;
        let peer = match lookup_ipcache(key.remote_addr) {
            Some(e) => e.identity,
            None => identity::WORLD,
        };
        if seen.dir == direction::EGRESS {
            event.src_identity = ep.identity;
            event.dst_identity = peer;
        } else {
            event.src_identity = peer;
            event.dst_identity = ep.identity;
        }
    }
    let reason = if reason == DropReason::PolicyDenyRule as u8 {
        DropReason::PolicyDenyRule
    } else if reason == DropReason::Unencrypted as u8 {
        DropReason::Unencrypted
    } else {
        DropReason::PolicyDenied
    };
    drop(event, key, reason)
}

/// A packet entering the pod as part of an established flow with another node's pod under
/// strict encryption, that did not come out of the tunnel (reported at most once a second).
/// The flow itself stays: the real peer's packets keep coming through the tunnel.
#[inline(never)]
fn drop_unencrypted_live(ctx: &TcContext, pkt: &Packet, key: &CtKey, seen: &Seen) -> i32 {
    let Some(event) = flow_event(pkt, seen.dir, ifindex(ctx), seen.len, seen.now) else {
        return TC_ACT_SHOT;
    };
    if let Some(ep) = ENDPOINTS.get_ptr(event.ifindex) {
        // SAFETY: non-null value pointer from bpf_map_lookup_elem; copied out at once.
        let ep: EndpointInfo = unsafe { *ep };
        event.endpoint_id = ep.endpoint_id;
        event.dst_identity = ep.identity;
    }
    if let Some(e) = lookup_ipcache(key.remote_addr) {
        event.src_identity = e.identity;
        event.remote_node_id = e.node_id;
    }
    drop(event, key, DropReason::Unencrypted)
}

/// [`strict_stale`]: the packet goes on to `recheck`.
const CONTINUE: i32 = i32::MIN;

/// Strict encryption for a flow `recheck` is about to check again: [`CONTINUE`] with the
/// entry's [`ct_flags::ENCRYPTED`] set as the check says, or the tc action of a drop.
#[inline(never)]
fn strict_stale(
    ctx: &TcContext,
    pkt: &Packet,
    key: &CtKey,
    entry: *mut CtEntry,
    seen: &Seen,
) -> i32 {
    let strict = strict_check_flow(ctx, key, seen.dir, maps::strict_ifindex());
    if strict == STRICT_DROP {
        if seen.dir == direction::INGRESS {
            return drop_unencrypted_live(ctx, pkt, key, seen);
        }
        return revoke_unencrypted(ctx, pkt, key, entry, seen);
    }
    // SAFETY: the entry pointer of this program run's lookup.
    unsafe {
        if strict == STRICT_TUNNEL {
            (*entry).flags |= ct_flags::ENCRYPTED;
        } else {
            (*entry).flags &= !ct_flags::ENCRYPTED;
        }
    }
    CONTINUE
}

/// A flow leaving the pod towards another node that no longer counts as encrypted (its
/// peer or key went away): revoked with `unencrypted` until the node is a peer again (the
/// next revision checks it again), this packet dropped.
#[inline(never)]
fn revoke_unencrypted(
    ctx: &TcContext,
    pkt: &Packet,
    key: &CtKey,
    entry: *mut CtEntry,
    seen: &Seen,
) -> i32 {
    let reason = DropReason::Unencrypted as u8;
    // SAFETY: the entry pointer of this program run's lookup.
    unsafe { conntrack::revoke(entry, seen.revision, reason) };
    events::count(metrics_slot::CT_REVOKED, seen.len);
    drop_revoked(ctx, pkt, key, seen, reason)
}

/// A later fragment of a datagram whose first fragment was not seen.
#[inline(never)]
fn drop_fragment_unknown(ctx: &TcContext, pkt: &Packet, seen: &Seen) -> i32 {
    let Some(event) = flow_event(pkt, seen.dir, ifindex(ctx), seen.len, seen.now) else {
        return TC_ACT_SHOT;
    };
    event.notes = event_notes::FRAGMENT;
    let key = conntrack::key(pkt, seen.dir);
    drop(event, &key.0, DropReason::FragmentUnknown)
}

/// A packet whose headers could not be parsed: no flow fields, only where and how long.
/// Out of line: rare, and its frame stays out of the fast path's.
#[inline(never)]
fn drop_malformed(ctx: &TcContext, dir: u8, len: u32) -> i32 {
    let ifindex = ifindex(ctx);
    debug!(
        ctx,
        "malformed packet of {} bytes on ifindex {}", len, ifindex
    );
    let Some(event) = flow_event(&Packet::EMPTY, dir, ifindex, len, clock()) else {
        return TC_ACT_SHOT;
    };
    event.ip_version = 0;
    // Malformed floods are limited per interface: the key holds only the ifindex.
    let mut key = Aligned(CtKey::default());
    key.0.local_port = (ifindex & 0xffff) as u16;
    key.0.remote_port = (ifindex >> 16) as u16;
    key.0.protocol = u8::MAX;
    drop(event, &key.0, DropReason::Malformed)
}

/// The event of `pkt` with everything known before the endpoint lookup filled in, in this
/// CPU's scratch slot; `None` never happens (the slot exists), and callers fail closed if
/// it did.
#[inline(always)]
fn flow_event<'a>(
    pkt: &Packet,
    dir: u8,
    ifindex: u32,
    len: u32,
    now: u64,
) -> Option<&'a mut FlowEvent> {
    let slot = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, valid for this program run; tc programs do not nest.
    let event = unsafe { &mut *slot };
    *event = FlowEvent {
        timestamp_ns: now,
        src_addr: addr_bytes(pkt.src),
        dst_addr: addr_bytes(pkt.dst),
        // Host order; for ICMP the echo id and `type << 8 | code`.
        src_port: u16::from_be(pkt.sport),
        dst_port: u16::from_be(pkt.policy_port),
        src_identity: identity::ANY,
        dst_identity: identity::ANY,
        endpoint_id: 0,
        ifindex,
        packet_len: len,
        suppressed: 0,
        protocol: pkt.protocol,
        direction: dir,
        verdict: 0,
        drop_reason: 0,
        ip_version: pkt.ip_version,
        tcp_flags: pkt.tcp_flags,
        notes: if pkt.frag == frag::NONE {
            0
        } else {
            event_notes::FRAGMENT
        },
        _pad: 0,
        remote_node_id: 0,
        _pad2: 0,
    };
    Some(event)
}
