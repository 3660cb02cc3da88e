//! Header parsing: Ethernet, IPv4 (with options and fragments), IPv6 (fixed header only),
//! TCP/UDP/SCTP ports and ICMP/ICMPv6 type, code and echo id, into a [`Packet`].
//!
//! Reads only what the datapath needs, each read bounds-checked against `data_end` (direct
//! packet access). Owns no map and makes no verdict beyond "malformed" and "not for us".

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use weft_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPV6_HLEN: usize = 40;
const IPV4_MIN_HLEN: usize = 20;
const IPV4_MAX_HLEN: usize = 60;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const SCTP_COMMON_HLEN: usize = 12;
const ICMP_HLEN: usize = 8;

/// Linear bytes the parser may read: Ethernet, the longest IPv4 header and a minimal TCP
/// header. Packets whose headers are not linear are pulled up to this length first.
pub const MAX_PARSE_LEN: u32 = (ETH_HLEN + IPV4_MAX_HLEN + TCP_MIN_HLEN) as u32;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
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
/// IPv6 hop-by-hop options header (MLD carries one for its router alert).
const IPV6_HOP_BY_HOP: u8 = 0;

/// The flow tuple of one packet, as the packet carries it (source and destination, not yet
/// relative to the endpoint).
#[derive(Clone, Copy)]
pub struct Packet {
    /// Source address as four words holding the 16 address bytes in network order (so that
    /// it is copied with word moves); IPv4 as `::ffff:a.b.c.d`. See [`addr_bytes`].
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Conntrack ports, network byte order: L4 ports, or the ICMP echo id in both, or 0.
    pub sport: u16,
    pub dport: u16,
    /// The policy "port", network byte order: the destination port, or `[type, code]` for
    /// ICMP/ICMPv6, or 0.
    pub policy_port: u16,
    pub protocol: u8,
    /// 4 or 6.
    pub ip_version: u8,
    /// Raw TCP flags byte (FIN, SYN, RST, ...), 0 when not TCP.
    pub tcp_flags: u8,
}

/// What the parser found.
pub enum Parsed {
    /// An IP packet to run through conntrack and policy.
    Ip(Packet),
    /// Not subject to policy: non-IP ethertypes (ARP, ...) and IPv6 neighbour discovery.
    Pass,
}

/// A header is truncated or inconsistent.
pub struct Malformed;

/// Returns a pointer to a `T` at `offset` from the start of the packet when all of it lies
/// before `data_end`.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Result<*const T, Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
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
fn load<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, Malformed> {
    // SAFETY: ptr_at checked that the whole T lies inside the packet; see above for
    // alignment.
    Ok(unsafe { *ptr_at::<T>(ctx, offset)? })
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Parsed, Malformed> {
    let ethertype = u16::from_be(load::<u16>(ctx, 12)?);
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx),
        ETH_P_IPV6 => parse_ipv6(ctx),
        _ => Ok(Parsed::Pass),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext) -> Result<Parsed, Malformed> {
    let ver_ihl: u8 = load(ctx, ETH_HLEN)?;
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ver_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Err(Malformed);
    }
    // The fixed header first, with constant offsets: the verifier cannot derive these
    // bounds from the variable-length check below.
    ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, ETH_HLEN)?;
    let frag_off = u16::from_be(load::<u16>(ctx, ETH_HLEN + 6)?) & 0x1fff;
    let protocol: u8 = load(ctx, ETH_HLEN + 9)?;
    let saddr: u32 = load(ctx, ETH_HLEN + 12)?;
    let daddr: u32 = load(ctx, ETH_HLEN + 16)?;
    // The options must be there too, though we skip them.
    ptr_at::<u8>(ctx, ETH_HLEN + ihl - 1)?;

    let mut pkt = Packet {
        src: v4_mapped(saddr),
        dst: v4_mapped(daddr),
        sport: 0,
        dport: 0,
        policy_port: 0,
        protocol,
        ip_version: 4,
        tcp_flags: 0,
    };
    // Non-first fragments carry no L4 header: ports stay 0.
    if frag_off == 0 {
        // Neighbour discovery is ICMPv6 only: the result is always false here.
        let _ = parse_l4(ctx, ETH_HLEN + ihl, IPPROTO_ICMP, &mut pkt)?;
    }
    Ok(Parsed::Ip(pkt))
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext) -> Result<Parsed, Malformed> {
    let ver: u8 = load(ctx, ETH_HLEN)?;
    if ver >> 4 != 6 {
        return Err(Malformed);
    }
    // Only a hop-by-hop header is skipped (one level, no loop); any other extension header
    // is the protocol as far as policy goes (ports 0).
    let mut protocol: u8 = load(ctx, ETH_HLEN + 6)?;
    let mut l4_off = ETH_HLEN + IPV6_HLEN;
    if protocol == IPV6_HOP_BY_HOP {
        let [next, units]: [u8; 2] = load(ctx, l4_off)?;
        protocol = next;
        l4_off += (usize::from(units) + 1) * 8;
    }
    let src: [u32; 4] = load(ctx, ETH_HLEN + 8)?;
    let dst: [u32; 4] = load(ctx, ETH_HLEN + 24)?;
    let mut pkt = Packet {
        src,
        dst,
        sport: 0,
        dport: 0,
        policy_port: 0,
        protocol,
        ip_version: 6,
        tcp_flags: 0,
    };
    if parse_l4(ctx, l4_off, IPPROTO_ICMPV6, &mut pkt)? {
        return Ok(Parsed::Pass);
    }
    Ok(Parsed::Ip(pkt))
}

/// Fills ports, policy port and TCP flags from the L4 header at `off`. Returns true for
/// IPv6 neighbour discovery, which bypasses the datapath.
///
/// `off` is variable (IPv4 options), so each protocol checks its header length once and
/// reads every field through that one checked pointer: the verifier tracks packet bounds
/// per pointer, and a pointer recomputed from `data + off` would carry no bounds.
#[inline(always)]
fn parse_l4(
    ctx: &TcContext,
    off: usize,
    icmp_proto: u8,
    pkt: &mut Packet,
) -> Result<bool, Malformed> {
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
            if icmp_proto == IPPROTO_ICMPV6
                && ((ICMPV6_NDP_FIRST..=ICMPV6_NDP_LAST).contains(&ty)
                    || (ICMPV6_MLD_FIRST..=ICMPV6_MLD_LAST).contains(&ty)
                    || ty == ICMPV6_MLD2_REPORT)
            {
                return Ok(true);
            }
            pkt.policy_port = u16::from_ne_bytes([ty, code]);
            let echo = if icmp_proto == IPPROTO_ICMPV6 {
                ty == ICMPV6_ECHO_REQUEST || ty == ICMPV6_ECHO_REPLY
            } else {
                ty == ICMP_ECHO_REQUEST || ty == ICMP_ECHO_REPLY
            };
            if echo {
                pkt.sport = id;
                pkt.dport = id;
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
