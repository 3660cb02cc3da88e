//! The packet loops: tun → encrypt → UDP and UDP → decrypt → tun. One thread each; buffers are
//! allocated once per thread, so the per-packet path does not allocate.

use std::os::fd::AsRawFd;

use crate::device::Shared;
use crate::offload;
use crate::sys::{self, VNET_HDR_LEN};

const POLL_MS: i32 = 100;
/// Largest tun read: a 64 KiB GSO super-packet plus its virtio header.
pub(crate) const TUN_BUF: usize = 65536 + VNET_HDR_LEN;
/// Tun reads per wake-up before the batch is flushed.
const TUN_READS_PER_WAKE: usize = 64;

pub(crate) fn tun_loop(shared: &Shared) {
    let fd = shared.tun.as_raw_fd();
    let mut buf = vec![0u8; TUN_BUF];
    let mut tx = offload::TxBatch::new();
    while !shared.stopped() {
        match sys::poll_readable(fd, POLL_MS) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::error!(error = %e, "tun poll failed; device stops sending");
                return;
            }
        }
        // With offloads, drain what is queued (up to a bound) before sending, so packets the
        // kernel did not merge (forwarded pod traffic, ACKs) still leave in GSO batches.
        let reads = if shared.vnet_hdr {
            TUN_READS_PER_WAKE
        } else {
            1
        };
        for _ in 0..reads {
            let n = match sys::read_fd(fd, &mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "tun read failed; device stops sending");
                    return;
                }
            };
            if shared.vnet_hdr {
                offload::outgoing(shared, &mut buf[..n], &mut tx);
            } else {
                tx.push_packet(shared, &buf[..n]);
            }
        }
        tx.flush(shared);
    }
}

pub(crate) fn udp_loop(shared: &Shared) {
    let fd = shared.udp.as_raw_fd();
    let mut rx = offload::RxBatch::new();
    while !shared.stopped() {
        match sys::poll_readable(fd, POLL_MS) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::error!(error = %e, "UDP poll failed; device stops receiving");
                return;
            }
        }
        rx.receive(shared);
    }
}
