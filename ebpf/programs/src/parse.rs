//! Header parsing: Ethernet, IPv4 (options, fragments), IPv6 (the common extension headers,
//! fragments), TCP/UDP/SCTP ports and ICMP/ICMPv6 type, code and echo id, into a [`Packet`];
//! and the packet an ICMP error quotes, for relating the error to its flow.
//!
//! Reads only what the datapath needs, each read bounds-checked against `data_end` (direct
//! packet access). Owns no map and makes no verdict beyond "malformed" and "not for us".

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use weft_common::{
    CtKey, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, direction,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPV6_HLEN: usize = 40;
const IPV4_MIN_HLEN: usize = 20;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const SCTP_COMMON_HLEN: usize = 12;
const ICMP_HLEN: usize = 8;

/// Linear bytes the parser may need: Ethernet, IP with options or extension headers, an
/// ICMP error's header and the start of the packet it quotes. Packets whose headers are not
/// linear are pulled up to this length first (the rare path).
pub const MAX_PARSE_LEN: u32 = 256;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// Router solicitation .. redirect: neighbour discovery, always passed.
const ICMPV6_NDP_FIRST: u8 = 133;
const ICMPV6_NDP_LAST: u8 = 137;
/// Multicast listener query, report, done (MLDv1) and MLDv2 report: link-local control
/// traffic the kernel sends on every link, always passed like neighbour discovery.
const ICMPV6_MLD_FIRST: u8 = 130;
const ICMPV6_MLD_LAST: u8 = 132;
const ICMPV6_MLD2_REPORT: u8 = 143;

/// IPv6 extension headers the parser walks past.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
/// How many extension headers are walked; a packet with more is policy's protocol "the
/// next header" (no ports), which no port rule allows.
const IPV6_MAX_EXT_HEADERS: usize = 4;

const IPV4_MF: u16 = 0x2000;
const IPV4_OFFSET_MASK: u16 = 0x1fff;

/// Whether and how a packet is a fragment.
pub mod frag {
    /// Not fragmented.
    pub const NONE: u8 = 0;
    /// The first fragment: carries the L4 header.
    pub const FIRST: u8 = 1;
    /// A later fragment: no L4 header, ports come from the first one.
    pub const LATER: u8 = 2;
}

/// The flow tuple of one packet, as the packet carries it (source and destination, not yet
/// relative to the endpoint).
#[derive(Clone, Copy)]
pub struct Packet {
    /// Source address as four words holding the 16 address bytes in network order (so that
    /// it is copied with word moves); IPv4 as `::ffff:a.b.c.d`. See [`addr_bytes`].
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// IP identification of a fragmented datagram (see [`frag`]).
    pub frag_id: u32,
    /// Conntrack ports, network byte order: L4 ports, or the ICMP echo id in both, or 0.
    pub sport: u16,
    pub dport: u16,
    /// The policy "port", network byte order: the destination port, or `[type, code]` for
    /// ICMP/ICMPv6, or 0.
    pub policy_port: u16,
    /// For an ICMP error: offset of the quoted IP header; 0 otherwise.
    pub icmp_error_off: u16,
    pub protocol: u8,
    /// 4 or 6.
    pub ip_version: u8,
    /// Raw TCP flags byte (FIN, SYN, RST, ...), 0 when not TCP.
    pub tcp_flags: u8,
    /// One of [`frag`].
    pub frag: u8,
}

/// What the parser found ([`parse_into`]'s answer).
pub mod parsed {
    /// An IP packet to run through conntrack and policy.
    pub const IP: u8 = 0;
    /// Not subject to policy: non-IP ethertypes (ARP, ...) and IPv6 neighbour discovery.
    pub const PASS: u8 = 1;
    /// A header is truncated or inconsistent.
    pub const MALFORMED: u8 = 2;
}

impl Packet {
    pub const EMPTY: Packet = Packet {
        src: [0; 4],
        dst: [0; 4],
        frag_id: 0,
        sport: 0,
        dport: 0,
        policy_port: 0,
        icmp_error_off: 0,
        protocol: 0,
        ip_version: 0,
        tcp_flags: 0,
        frag: frag::NONE,
    };
}

/// A header is truncated or inconsistent.
pub struct Malformed;

/// The packet's bounds, read once per parse. Read with volatile loads inside the function
/// that uses them: otherwise LLVM passes `data`/`data_end` into an out-of-line parse as
/// plain integers (argument promotion), and the verifier refuses arithmetic on `data_end`.
pub struct Bounds {
    start: usize,
    end: usize,
}

impl Bounds {
    #[inline(always)]
    fn of(ctx: &TcContext) -> Self {
        // SAFETY: the program's context pointer; data and data_end are readable at tc.
        unsafe {
            let skb = ctx.skb.skb;
            Bounds {
                start: core::ptr::read_volatile(&raw const (*skb).data) as usize,
                end: core::ptr::read_volatile(&raw const (*skb).data_end) as usize,
            }
        }
    }
}

/// Returns a pointer to a `T` at `offset` from the start of the packet when all of it lies
/// before `data_end`.
///
/// At least two bytes are checked: for one byte LLVM turns `p + 1 > end` into `p >= end`,
/// from which the verifier derives no readable range for a pointer with a variable offset.
#[inline(always)]
fn ptr_at<T>(ctx: &Bounds, offset: usize) -> Result<*const T, Malformed> {
    let start = ctx.start;
    let end = ctx.end;
    let size = if size_of::<T>() < 2 {
        2
    } else {
        size_of::<T>()
    };
    if start + offset + size > end {
        return Err(Malformed);
    }
    Ok((start + offset) as *const T)
}

/// Loads a `T` at `offset` with one load instruction.
///
/// Headers behind a 14-byte Ethernet header are usually 2- but not 4-byte aligned. BPF has
/// no alignment traps and the verifier allows unaligned *packet* access wherever the kernel
/// has efficient unaligned access (x86_64, arm64: the targets weft supports), exactly as C
/// datapaths read `iph->saddr`. An unaligned Rust read would instead be split into byte
/// loads by LLVM (several times the instructions), so this reads with `T`'s alignment.
#[inline(always)]
fn load<T: Copy>(ctx: &Bounds, offset: usize) -> Result<T, Malformed> {
    // SAFETY: ptr_at checked that the whole T lies inside the packet; see above for
    // alignment.
    Ok(unsafe { *ptr_at::<T>(ctx, offset)? })
}

/// Parse the packet of `ctx` into `pkt`; one of [`parsed`]. Out of line, taking the
/// context and filling the caller's packet: it is called again after a pull, and as one
/// subprogram its stack is not part of the caller's frame.
#[inline(never)]
pub fn parse_into(ctx: &TcContext, pkt: &mut Packet) -> u8 {
    let b = Bounds::of(ctx);
    let result = match load::<u16>(&b, 12).map(u16::from_be) {
        Ok(ETH_P_IP) => parse_ipv4(&b, pkt),
        Ok(ETH_P_IPV6) => parse_ipv6(&b, pkt),
        Ok(_) => return parsed::PASS,
        Err(Malformed) => return parsed::MALFORMED,
    };
    match result {
        Ok(true) => parsed::PASS,
        Ok(false) => parsed::IP,
        Err(Malformed) => parsed::MALFORMED,
    }
}

/// `Ok(true)`: not subject to policy.
#[inline(always)]
fn parse_ipv4(ctx: &Bounds, pkt: &mut Packet) -> Result<bool, Malformed> {
    let ver_ihl: u8 = load(ctx, ETH_HLEN)?;
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ver_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Err(Malformed);
    }
    // The fixed header first, with constant offsets: the verifier cannot derive these
    // bounds from the variable-length check below.
    ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, ETH_HLEN)?;
    let id = u16::from_be(load::<u16>(ctx, ETH_HLEN + 4)?);
    let frag_word = u16::from_be(load::<u16>(ctx, ETH_HLEN + 6)?);
    let protocol: u8 = load(ctx, ETH_HLEN + 9)?;
    let saddr: u32 = load(ctx, ETH_HLEN + 12)?;
    let daddr: u32 = load(ctx, ETH_HLEN + 16)?;
    // The options must be there too, though we skip them.
    ptr_at::<u8>(ctx, ETH_HLEN + ihl - 1)?;

    *pkt = Packet::EMPTY;
    pkt.src = v4_mapped(saddr);
    pkt.dst = v4_mapped(daddr);
    pkt.protocol = protocol;
    pkt.ip_version = 4;
    let offset = frag_word & IPV4_OFFSET_MASK;
    if offset != 0 {
        // A later fragment carries no L4 header: the ports come from the first one.
        pkt.frag = frag::LATER;
        pkt.frag_id = u32::from(id);
        return Ok(false);
    }
    if frag_word & IPV4_MF != 0 {
        pkt.frag = frag::FIRST;
        pkt.frag_id = u32::from(id);
    }
    // Neighbour discovery is ICMPv6 only: the result is always false here.
    parse_l4(ctx, ETH_HLEN + ihl, IPPROTO_ICMP, pkt)
}

#[inline(always)]
fn parse_ipv6(ctx: &Bounds, pkt: &mut Packet) -> Result<bool, Malformed> {
    let ver: u8 = load(ctx, ETH_HLEN)?;
    if ver >> 4 != 6 {
        return Err(Malformed);
    }
    let src: [u32; 4] = load(ctx, ETH_HLEN + 8)?;
    let dst: [u32; 4] = load(ctx, ETH_HLEN + 24)?;
    let mut protocol: u8 = load(ctx, ETH_HLEN + 6)?;
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut frag_offset: u16 = 0;
    let mut frag_more = false;
    let mut frag_id: u32 = 0;
    let mut fragmented = false;
    // Bounded walk over the extension headers, unrolled: each adds at most 2 KiB.
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match protocol {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let [next, units]: [u8; 2] = load(ctx, off)?;
                protocol = next;
                off += (usize::from(units) + 1) * 8;
            }
            IPV6_AUTH => {
                let [next, units]: [u8; 2] = load(ctx, off)?;
                protocol = next;
                off += (usize::from(units) + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let h: [u8; 8] = load(ctx, off)?;
                protocol = h[0];
                let word = u16::from_be_bytes([h[2], h[3]]);
                frag_offset = word >> 3;
                frag_more = word & 1 != 0;
                frag_id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                fragmented = true;
                off += 8;
            }
            _ => break,
        }
    }
    *pkt = Packet::EMPTY;
    pkt.src = src;
    pkt.dst = dst;
    pkt.protocol = protocol;
    pkt.ip_version = 6;
    if fragmented && frag_offset != 0 {
        pkt.frag = frag::LATER;
        pkt.frag_id = frag_id;
        return Ok(false);
    }
    // An "atomic" fragment (offset 0, no more) is a whole datagram.
    if fragmented && frag_more {
        pkt.frag = frag::FIRST;
        pkt.frag_id = frag_id;
    }
    parse_l4(ctx, off, IPPROTO_ICMPV6, pkt)
}

/// Fills ports, policy port and TCP flags from the L4 header at `off`. Returns true for
/// IPv6 neighbour discovery, which bypasses the datapath.
///
/// `off` is variable (IPv4 options, IPv6 extension headers), so each protocol checks its
/// header length once and reads every field through that one checked pointer: the verifier
/// tracks packet bounds per pointer, and a pointer recomputed from `data + off` would carry
/// no bounds.
#[inline(always)]
fn parse_l4(ctx: &Bounds, off: usize, icmp_proto: u8, pkt: &mut Packet) -> Result<bool, Malformed> {
    match pkt.protocol {
        IPPROTO_TCP => {
            let h = ptr_at::<[u8; TCP_MIN_HLEN]>(ctx, off)?.cast::<u8>();
            // SAFETY: all reads lie inside the checked header; alignment as in `load`.
            unsafe {
                set_ports(pkt, h);
                pkt.tcp_flags = *h.add(13);
            }
        }
        IPPROTO_UDP => {
            let h = ptr_at::<[u8; UDP_HLEN]>(ctx, off)?.cast::<u8>();
            // SAFETY: as above.
            unsafe { set_ports(pkt, h) };
        }
        IPPROTO_SCTP => {
            let h = ptr_at::<[u8; SCTP_COMMON_HLEN]>(ctx, off)?.cast::<u8>();
            // SAFETY: as above.
            unsafe { set_ports(pkt, h) };
        }
        p if p == icmp_proto => {
            let h = ptr_at::<[u8; ICMP_HLEN]>(ctx, off)?.cast::<u8>();
            // SAFETY: as above.
            let (ty, code, id) = unsafe { (*h, *h.add(1), *h.add(4).cast::<u16>()) };
            let v6 = icmp_proto == IPPROTO_ICMPV6;
            if v6
                && ((ICMPV6_NDP_FIRST..=ICMPV6_NDP_LAST).contains(&ty)
                    || (ICMPV6_MLD_FIRST..=ICMPV6_MLD_LAST).contains(&ty)
                    || ty == ICMPV6_MLD2_REPORT)
            {
                return Ok(true);
            }
            pkt.policy_port = u16::from_ne_bytes([ty, code]);
            let (echo, error) = if v6 {
                (
                    ty == ICMPV6_ECHO_REQUEST || ty == ICMPV6_ECHO_REPLY,
                    (ICMPV6_DEST_UNREACH..=ICMPV6_PARAMETER_PROBLEM).contains(&ty),
                )
            } else {
                (
                    ty == ICMP_ECHO_REQUEST || ty == ICMP_ECHO_REPLY,
                    ty == ICMP_DEST_UNREACH
                        || ty == ICMP_TIME_EXCEEDED
                        || ty == ICMP_PARAMETER_PROBLEM,
                )
            };
            if echo {
                pkt.sport = id;
                pkt.dport = id;
            }
            if error && pkt.frag == frag::NONE {
                // Offsets stay far below 64 KiB (see MAX_PARSE_LEN and the bounded walk).
                pkt.icmp_error_off = (off + ICMP_HLEN) as u16;
            }
        }
        _ => {}
    }
    Ok(false)
}

/// Source and destination port, the first four bytes of TCP, UDP and SCTP headers; kept in
/// network order.
///
/// # Safety
/// `h` must point to at least four readable header bytes.
#[inline(always)]
unsafe fn set_ports(pkt: &mut Packet, h: *const u8) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        pkt.sport = *h.cast::<u16>();
        pkt.dport = *h.add(2).cast::<u16>();
    }
    pkt.policy_port = pkt.dport;
}

/// The conntrack key of the flow an ICMP error quotes, relative to the endpoint on the `dir`
/// side, when the quoted packet belongs to that endpoint: the error reaches the pod
/// (ingress) about a packet the pod sent, or leaves it (egress) about a packet it received.
/// `None` when the quoted packet cannot be read or concerns someone else.
///
/// Out of line: only ICMP errors pay for it.
#[inline(never)]
pub fn quoted_flow(ctx: &TcContext, pkt: &Packet, dir: u8, key: &mut CtKey) -> bool {
    let b = Bounds::of(ctx);
    let off = usize::from(pkt.icmp_error_off);
    // Bounded for the verifier (a packet pointer's variable offset must stay far below
    // 64 KiB); the quoted header lies within the parsed length anyway.
    if off > MAX_PARSE_LEN as usize {
        return false;
    }
    let parsed = if pkt.ip_version == 4 {
        quoted_v4(&b, off)
    } else {
        quoted_v6(&b, off)
    };
    let Ok((src, dst, sport, dport, protocol)) = parsed else {
        return false;
    };
    // The quoted packet went the other way: for an error arriving at the pod, the pod sent
    // it (its source is the error's destination), and the other way round.
    let (local, remote, local_port, remote_port, outer_local) = if dir == direction::INGRESS {
        (src, dst, sport, dport, pkt.dst)
    } else {
        (dst, src, dport, sport, pkt.src)
    };
    if local != outer_local {
        return false;
    }
    key.local_addr = addr_bytes(local);
    key.remote_addr = addr_bytes(remote);
    key.local_port = local_port;
    key.remote_port = remote_port;
    key.protocol = protocol;
    true
}

type Quoted = ([u32; 4], [u32; 4], u16, u16, u8);

#[inline(always)]
fn quoted_v4(ctx: &Bounds, off: usize) -> Result<Quoted, Malformed> {
    let ver_ihl: u8 = load(ctx, off)?;
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ver_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Err(Malformed);
    }
    let h = ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, off)?.cast::<u8>();
    // SAFETY: reads inside the checked 20-byte header; alignment as in `load`.
    let (protocol, saddr, daddr) = unsafe {
        (
            *h.add(9),
            *h.add(12).cast::<u32>(),
            *h.add(16).cast::<u32>(),
        )
    };
    let (sport, dport) = quoted_ports(ctx, off + ihl, protocol, IPPROTO_ICMP)?;
    Ok((v4_mapped(saddr), v4_mapped(daddr), sport, dport, protocol))
}

#[inline(always)]
fn quoted_v6(ctx: &Bounds, off: usize) -> Result<Quoted, Malformed> {
    let h = ptr_at::<[u8; IPV6_HLEN]>(ctx, off)?.cast::<u8>();
    // SAFETY: reads inside the checked 40-byte header; alignment as in `load`.
    let (ver, protocol, src, dst) = unsafe {
        (
            *h,
            *h.add(6),
            *h.add(8).cast::<[u32; 4]>(),
            *h.add(24).cast::<[u32; 4]>(),
        )
    };
    if ver >> 4 != 6 {
        return Err(Malformed);
    }
    let (sport, dport) = quoted_ports(ctx, off + IPV6_HLEN, protocol, IPPROTO_ICMPV6)?;
    Ok((src, dst, sport, dport, protocol))
}

/// Conntrack ports of a quoted packet: the first 8 bytes of its L4 header are all an ICMP
/// error is guaranteed to carry.
#[inline(always)]
fn quoted_ports(
    ctx: &Bounds,
    off: usize,
    protocol: u8,
    icmp_proto: u8,
) -> Result<(u16, u16), Malformed> {
    let h = ptr_at::<[u8; 8]>(ctx, off)?.cast::<u8>();
    // SAFETY: reads inside the checked 8 bytes; alignment as in `load`.
    unsafe {
        match protocol {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
                Ok((*h.cast::<u16>(), *h.add(2).cast::<u16>()))
            }
            p if p == icmp_proto => {
                let id = *h.add(4).cast::<u16>();
                Ok((id, id))
            }
            _ => Err(Malformed),
        }
    }
}

/// `::ffff:a.b.c.d` (the form `IpcacheKey` and `CtKey` use for IPv4) from the address as
/// read from the packet.
#[inline(always)]
fn v4_mapped(addr: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), addr]
}

/// The 16 address bytes in network order, as map keys and events carry them.
#[inline(always)]
pub fn addr_bytes(addr: [u32; 4]) -> [u8; 16] {
    // SAFETY: same size, every bit pattern is a valid [u8; 16].
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(addr) }
}
