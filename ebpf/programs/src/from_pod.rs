//! `from_pod`: packets leaving a pod, checked against the pod's egress policy.

use aya_ebpf::{macros::classifier, programs::TcContext};
use weft_common::direction;

use crate::pipeline;

/// Attach point: tc **ingress** of the pod's host-side veth, i.e. packets the pod sends.
/// Direction: EGRESS of the endpoint; the local side is the packet's source.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    pipeline::process(&ctx, direction::EGRESS)
}
