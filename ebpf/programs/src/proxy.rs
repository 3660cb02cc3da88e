//! Steering to the node's L7 filter: `from_pod` hands a packet of a `redirect-l7` flow to the
//! filter's socket with `bpf_sk_assign` (tc ingress only) and marks it so that the node's
//! routing delivers it locally (`l7_mark::TO_PROXY`). A packet of a connection the filter
//! already has goes to that socket (the client's connection to the filter, or the server's
//! answers on the filter's upstream connection); a new one to the listener on
//! 127.0.0.1:`proxy_port`, whose accepted socket then has the original destination as its
//! local address. IPv4 only for now (the listener is IPv4).

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    },
    helpers::generated::{bpf_sk_assign, bpf_sk_lookup_tcp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use weft_common::{IPPROTO_TCP, l7_mark};

use crate::parse::Packet;

const TCP_LISTEN: u32 = 10;
const LOOPBACK: u32 = u32::from_be_bytes([127, 0, 0, 1]);

/// Hand the packet to the filter; `false` when there is no socket of it to take it (the
/// filter is down): the caller drops the packet. Inline: a frame of its own would push
/// the new-flow call chain past 512 bytes of stack.
#[inline(always)]
pub fn steer(ctx: &TcContext, pkt: &Packet, proxy_port: u16) -> bool {
    if pkt.ip_version != 4 || pkt.protocol != IPPROTO_TCP {
        return false;
    }
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: pkt.src[3],
                daddr: pkt.dst[3],
                sport: pkt.sport,
                dport: pkt.dport,
            },
        },
    };
    let size = core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
    let skb = ctx.skb.skb.cast();
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: helper calls with a valid context and a tuple on our stack; every socket
    // reference taken is released before return.
    unsafe {
        let sk = bpf_skc_lookup_tcp(skb, &raw mut tuple, size, netns, 0);
        if !sk.is_null() {
            // A listener on the pod's port in the node's namespace is not the filter.
            if (*sk).state != TCP_LISTEN {
                return assign(ctx, sk);
            }
            bpf_sk_release(sk.cast());
        }
        if proxy_port == 0 {
            return false;
        }
        tuple.__bindgen_anon_1.ipv4.daddr = LOOPBACK.to_be();
        tuple.__bindgen_anon_1.ipv4.dport = proxy_port.to_be();
        let sk = bpf_sk_lookup_tcp(skb, &raw mut tuple, size, netns, 0);
        if sk.is_null() {
            return false;
        }
        assign(ctx, sk)
    }
}

/// Assign and release `sk`; mark the packet for local delivery.
#[inline(always)]
unsafe fn assign(ctx: &TcContext, sk: *mut bpf_sock) -> bool {
    // SAFETY: `sk` is a referenced socket from a lookup of this program run.
    let ret = unsafe { bpf_sk_assign(ctx.skb.skb.cast(), sk.cast(), 0) };
    unsafe { bpf_sk_release(sk.cast()) };
    if ret != 0 {
        return false;
    }
    ctx.set_mark(l7_mark::TO_PROXY);
    true
}

/// Whether the packet comes from one of the filter's upstream connections.
#[inline(always)]
pub fn from_filter(ctx: &TcContext) -> bool {
    // SAFETY: the context pointer; `mark` is readable at tc.
    unsafe { (*ctx.skb.skb).mark == l7_mark::FROM_PROXY }
}
