//! `to_pod`: packets entering a pod, checked against the pod's ingress policy with the
//! sender's identity from the ipcache.

use aya_ebpf::{macros::classifier, programs::TcContext};
use weft_common::direction;

use crate::pipeline;

/// Attach point: tc **egress** of the pod's host-side veth, i.e. packets delivered to the pod.
/// Direction: INGRESS of the endpoint; the local side is the packet's destination.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    pipeline::process(&ctx, direction::INGRESS)
}
