//! The per-packet sequence shared by both hooks, parameterised by the policy direction:
//! parse, conntrack fast path, then (on a miss) endpoint, peer identity, policy, conntrack
//! entry, flow event and counters. `from_pod`/`to_pod` only pick the direction.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, generated::bpf_redirect_peer},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use aya_log_ebpf::{debug, warn};
use weft_common::{
    CtKey, DropReason, EndpointInfo, FlowEvent, IPCACHE_KEY_BITS, IpcacheKey, direction,
    flow_verdict, identity, metrics_index,
};

use crate::{
    conntrack, events,
    maps::{Aligned, ENDPOINTS, IPCACHE},
    parse::{self, MAX_PARSE_LEN, Packet, Parsed, addr_bytes},
    policy,
};

/// Runs the datapath for one packet seen in direction `dir` (relative to the endpoint).
/// `Ok` carries the tc action of a passed packet, `Err` that of a dropped one.
#[inline(always)]
pub fn process(ctx: &TcContext, dir: u8) -> Result<i32, i32> {
    let len = ctx.len();
    let pkt = match parse::parse(ctx) {
        Ok(Parsed::Ip(pkt)) => pkt,
        Ok(Parsed::Pass) => return Ok(TC_ACT_OK),
        // Headers beyond the linear part of the skb: pull them in and parse again. Rare, so
        // the common path never pays for bpf_skb_pull_data (which copies cloned heads).
        Err(parse::Malformed) => match pull_headers(ctx, len).and_then(|()| parse::parse(ctx)) {
            Ok(Parsed::Ip(pkt)) => pkt,
            Ok(Parsed::Pass) => return Ok(TC_ACT_OK),
            Err(parse::Malformed) => return Err(drop_malformed(ctx, dir, len)),
        },
    };
    let key = conntrack::key(&pkt, dir);
    // The coarse clock (one tick of resolution) is all conntrack lifetimes need, and it is a
    // plain read, unlike the clocksource behind bpf_ktime_get_ns.
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(redirect) = conntrack::refresh(&key.0, dir, pkt.tcp_flags, len, now) {
        events::count(metrics_index(DropReason::None as u8, dir, false), len);
        // A local pod-to-pod flow leaving its pod: straight into the other pod. (Only tc
        // ingress can redirect to a peer; `to_pod` never needs to.)
        if redirect != 0 && dir == direction::EGRESS {
            return Ok(redirect_peer(redirect));
        }
        return Ok(TC_ACT_OK);
    }
    new_flow(ctx, dir, &pkt, &key.0, len, now)
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

/// Pull the headers we parse into the linear part; `Malformed` when the packet has no more
/// than its linear part (it is truncated, not fragmented). Out of line and returning no
/// struct: BPF subprograms cannot hand back pointers into their own stack.
#[inline(never)]
fn pull_headers(ctx: &TcContext, len: u32) -> Result<(), parse::Malformed> {
    let linear = (ctx.data_end() - ctx.data()) as u32;
    if len <= linear {
        return Err(parse::Malformed);
    }
    let want = if len < MAX_PARSE_LEN {
        len
    } else {
        MAX_PARSE_LEN
    };
    ctx.pull_data(want).map_err(|_| parse::Malformed)
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: ctx.skb.skb is the program's context pointer; ifindex is readable at tc.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Slow path: a packet without a live conntrack entry.
#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    dir: u8,
    pkt: &Packet,
    key: &CtKey,
    len: u32,
    now: u64,
) -> Result<i32, i32> {
    let ifindex = ifindex(ctx);
    let mut event = flow_event(pkt, dir, ifindex, len, now);

    // Fail closed: an interface we are attached to but know nothing about drops everything.
    let Some(ep) = ENDPOINTS.get_ptr(ifindex) else {
        return Err(drop_unknown_endpoint(ctx, &mut event, dir, len, ifindex));
    };
    // SAFETY: non-null value pointer from bpf_map_lookup_elem; copied out at once.
    let ep: EndpointInfo = unsafe { *ep };

    let remote = Aligned(Key::new(
        IPCACHE_KEY_BITS,
        IpcacheKey {
            addr: key.remote_addr,
        },
    ));
    let (peer, peer_ifindex) = match IPCACHE.get(&remote.0) {
        Some(entry) => (entry.identity, entry.ifindex),
        None => (identity::WORLD, 0),
    };
    event.endpoint_id = ep.endpoint_id;
    if dir == direction::EGRESS {
        event.src_identity = ep.identity;
        event.dst_identity = peer;
    } else {
        event.src_identity = peer;
        event.dst_identity = ep.identity;
    }

    let decision = policy::decide(&ep, peer, dir, pkt.protocol, pkt.policy_port);
    if !decision.pass {
        return Err(drop(&mut event, dir, len, decision.reason));
    }
    report_pass(&mut event, &decision, dir, len);
    // To a pod of this node, seen leaving its source: the destination's ingress policy is
    // decided here too, and the packet is delivered into it directly.
    let redirect = if dir == direction::EGRESS && peer_ifindex != 0 {
        deliver_local(pkt, &mut event, peer_ifindex, ifindex, len, now)?
    } else {
        0
    };
    conntrack::create(
        key,
        dir,
        len,
        now,
        &decision,
        peer,
        ep.endpoint_id,
        redirect,
    );
    if redirect != 0 {
        return Ok(redirect_peer(redirect));
    }
    Ok(TC_ACT_OK)
}

/// The destination side of a new local pod-to-pod flow: its ingress verdict (reported as an
/// ingress event of that pod, reusing the source's `event`) and its conntrack entry, which
/// points back at the source so that replies are delivered the same way. Returns the
/// destination's host ifindex to redirect to, or 0 when it has no endpoint entry (then the
/// packet takes the routed path and meets `to_pod` there).
#[inline(always)]
fn deliver_local(
    pkt: &Packet,
    event: &mut FlowEvent,
    dst_ifindex: u32,
    src_ifindex: u32,
    len: u32,
    now: u64,
) -> Result<u32, i32> {
    let Some(dst) = ENDPOINTS.get_ptr(dst_ifindex) else {
        return Ok(0);
    };
    // SAFETY: non-null value pointer from bpf_map_lookup_elem; copied out at once.
    let dst: EndpointInfo = unsafe { *dst };
    let src_identity = event.src_identity;
    event.direction = direction::INGRESS;
    event.endpoint_id = dst.endpoint_id;
    event.ifindex = dst_ifindex;
    let decision = policy::decide(
        &dst,
        src_identity,
        direction::INGRESS,
        pkt.protocol,
        pkt.policy_port,
    );
    if !decision.pass {
        return Err(drop(event, direction::INGRESS, len, decision.reason));
    }
    report_pass(event, &decision, direction::INGRESS, len);
    let key = conntrack::key(pkt, direction::INGRESS);
    conntrack::create(
        &key.0,
        direction::INGRESS,
        len,
        now,
        &decision,
        src_identity,
        dst.endpoint_id,
        src_ifindex,
    );
    Ok(dst_ifindex)
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

/// Reports and counts a drop; returns the tc action.
#[inline(always)]
fn drop(event: &mut FlowEvent, dir: u8, len: u32, reason: DropReason) -> i32 {
    event.verdict = flow_verdict::DROPPED;
    event.drop_reason = reason as u8;
    events::emit(event);
    events::count(metrics_index(reason as u8, dir, false), len);
    TC_ACT_SHOT
}

/// A packet on an interface without an endpoint entry (a stale attachment or an agent bug):
/// dropped, and logged through aya-log. Out of line: rare, and the log call is large.
#[inline(never)]
fn drop_unknown_endpoint(
    ctx: &TcContext,
    event: &mut FlowEvent,
    dir: u8,
    len: u32,
    ifindex: u32,
) -> i32 {
    warn!(
        ctx,
        "no endpoint for ifindex {}: dropped (fail closed)", ifindex
    );
    drop(event, dir, len, DropReason::UnknownEndpoint)
}

/// A packet whose headers could not be parsed: no flow fields, only where and how long.
/// Inline on purpose: as its own BPF subprogram (plus the memset it calls) it pushed the
/// combined stack of `from_pod` past 512 bytes on 6.1, whose verifier rounds every frame up
/// to 32 bytes.
#[inline(always)]
fn drop_malformed(ctx: &TcContext, dir: u8, len: u32) -> i32 {
    debug!(
        ctx,
        "malformed packet of {} bytes on ifindex {}",
        len,
        ifindex(ctx)
    );
    let mut event = FlowEvent {
        // SAFETY: helper without arguments.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        ifindex: ifindex(ctx),
        packet_len: len,
        direction: dir,
        ..FlowEvent::default()
    };
    drop(&mut event, dir, len, DropReason::Malformed)
}

/// The event of `pkt` with everything known before the endpoint lookup filled in.
#[inline(always)]
fn flow_event(pkt: &Packet, dir: u8, ifindex: u32, len: u32, now: u64) -> FlowEvent {
    FlowEvent {
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
        protocol: pkt.protocol,
        direction: dir,
        verdict: 0,
        drop_reason: 0,
        ip_version: pkt.ip_version,
        tcp_flags: pkt.tcp_flags,
        _pad: [0; 2],
    }
}
