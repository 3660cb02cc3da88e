//! weft's tc datapath: `from_pod` and `to_pod` enforce L3/L4 policy by identity on each
//! pod's host-side veth, keep conntrack, and report flows and counters to the agent.
//!
//! Map and program names, key and value layouts come from `weft-common`, the contract with
//! the agent. Least work per packet: a conntrack hit costs one lookup and a counter.
#![no_std]
#![no_main]
// Keys are passed by reference on purpose: the value must stay in its 8-byte aligned stack
// slot (`maps::Aligned`), a by-value argument would be copied to a less aligned one.
#![allow(clippy::needless_borrows_for_generic_args)]

mod conntrack;
mod events;
mod from_pod;
mod maps;
mod parse;
mod pipeline;
mod policy;
mod proxy;
mod sockops;
mod to_pod;

/// GPL: the programs call GPL-only helpers (ring buffer output, ktime).
#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that can reach this (unbounded loop).
    loop {}
}
