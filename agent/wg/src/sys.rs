//! The raw Linux calls the device needs and `std`/`nix` do not offer: the tun device
//! (`TUNSETIFF`, `TUNSETOFFLOAD`), interface MTU and flags, socket options, `poll`, and the
//! batched UDP calls (`sendmsg` with `UDP_SEGMENT`, `recvmsg` with `UDP_GRO`).
//!
//! This is the crate's only module with `unsafe`: each block is one system call on a buffer the
//! caller owns for the duration of the call. Nothing here keeps state or allocates per packet.

#![allow(
    unsafe_code,
    reason = "ioctls and batched socket calls have no safe wrapper"
)]

use std::ffi::c_void;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TUN: i16 = 0x0001;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_USO4: u32 = 0x20;
pub const TUN_F_USO6: u32 = 0x40;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

#[repr(C)]
struct IfReqMtu {
    name: [u8; libc::IFNAMSIZ],
    mtu: i32,
    _pad: [u8; 20],
}

fn ifname(name: &str) -> io::Result<[u8; libc::IFNAMSIZ]> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name must be 1 to 15 bytes without NUL",
        ));
    }
    let mut out = [0u8; libc::IFNAMSIZ];
    out[..bytes.len()].copy_from_slice(bytes);
    Ok(out)
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Open `/dev/net/tun` as a layer-3 tun named `name` (created in the calling thread's network
/// namespace). With `vnet_hdr`, every read and write starts with a `virtio_net_hdr`, and the
/// offloads in `offload` (`TUN_F_*`) are requested; returns the offloads the kernel accepted.
pub fn open_tun(name: &str, vnet_hdr: bool, offload: u32) -> io::Result<(File, u32)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    let mut req = IfReqFlags {
        name: ifname(name)?,
        flags: IFF_TUN | IFF_NO_PI | if vnet_hdr { IFF_VNET_HDR } else { 0 },
        _pad: [0; 22],
    };
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is laid out as.
    check(unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &raw mut req) })?;
    let mut accepted = 0;
    if vnet_hdr {
        let size: libc::c_int = 10;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        check(unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &raw const size) })?;
        // Older kernels lack USO: fall back to TSO only.
        for flags in [offload, offload & !(TUN_F_USO4 | TUN_F_USO6), 0] {
            // SAFETY: TUNSETOFFLOAD takes its argument by value.
            let ret =
                unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
            if ret == 0 {
                accepted = flags;
                break;
            }
        }
    }
    Ok((file, accepted))
}

/// Length of the `virtio_net_hdr` in front of each tun packet when `IFF_VNET_HDR` is on.
pub const VNET_HDR_LEN: usize = 10;

fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Set the MTU of interface `name` and bring it up (in the calling thread's namespace).
pub fn set_mtu_and_up(name: &str, mtu: u32) -> io::Result<()> {
    let sock = ioctl_socket()?;
    let mut req = IfReqMtu {
        name: ifname(name)?,
        mtu: i32::try_from(mtu).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        _pad: [0; 20],
    };
    // SAFETY: SIOCSIFMTU reads one `struct ifreq` with `ifr_mtu` set.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &raw mut req) })?;
    let mut flags = IfReqFlags {
        name: ifname(name)?,
        flags: 0,
        _pad: [0; 22],
    };
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read/write one `struct ifreq` with `ifr_flags`.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut flags) })?;
    flags.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as i16;
    // SAFETY: as above.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &raw mut flags) })?;
    Ok(())
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is one int that outlives the call.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast::<c_void>(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// `SO_MARK` on a socket (0 clears it).
pub fn set_mark(fd: RawFd, mark: u32) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_MARK, mark.cast_signed())
}

/// Larger socket buffers (best effort: `SO_*BUFFORCE` needs `CAP_NET_ADMIN`).
pub fn set_buffers(fd: RawFd, bytes: i32) {
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(fd, libc::SOL_SOCKET, force, bytes).is_err() {
            let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, bytes);
        }
    }
}

/// Ask for UDP GRO on receive: the kernel then hands over trains of same-sized datagrams
/// in one buffer, with the segment size in a control message.
pub fn enable_udp_gro(fd: RawFd) -> bool {
    setsockopt_int(fd, libc::SOL_UDP, UDP_GRO, 1).is_ok()
}

/// Wait up to `timeout_ms` for `fd` to be readable.
pub fn poll_readable(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd that outlives the call.
    let n = unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(err);
    }
    Ok(n > 0)
}

/// Read one packet from a tun fd (non-blocking after `poll_readable`).
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n.cast_unsigned())
    }
}

/// Write one packet to a tun fd.
pub fn write_fd(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n.cast_unsigned())
    }
}

/// A socket address in the kernel's form, built without allocating.
struct RawAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl RawAddr {
    fn new(addr: SocketAddr) -> Self {
        // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
        let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                // A v4 peer through the dual-stack socket: use the v4-mapped v6 form.
                let mapped = SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0);
                write_v6(&mut storage, mapped)
            }
            SocketAddr::V6(a) => write_v6(&mut storage, a),
        };
        Self { storage, len }
    }

    fn to_std(&self) -> Option<SocketAddr> {
        match i32::from(self.storage.ss_family) {
            libc::AF_INET6 => {
                // SAFETY: the family says the storage holds a sockaddr_in6.
                let sin6: &libc::sockaddr_in6 =
                    unsafe { &*(&raw const self.storage).cast::<libc::sockaddr_in6>() };
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                let port = u16::from_be(sin6.sin6_port);
                Some(match ip.to_ipv4_mapped() {
                    Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                    None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, sin6.sin6_scope_id)),
                })
            }
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in.
                let sin: &libc::sockaddr_in =
                    unsafe { &*(&raw const self.storage).cast::<libc::sockaddr_in>() };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                )))
            }
            _ => None,
        }
    }
}

fn write_v6(storage: &mut libc::sockaddr_storage, a: SocketAddrV6) -> libc::socklen_t {
    // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in6.
    let sin6: &mut libc::sockaddr_in6 =
        unsafe { &mut *(&raw mut *storage).cast::<libc::sockaddr_in6>() };
    sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sin6.sin6_port = a.port().to_be();
    sin6.sin6_addr.s6_addr = a.ip().octets();
    sin6.sin6_flowinfo = 0;
    sin6.sin6_scope_id = a.scope_id();
    size_of::<libc::sockaddr_in6>() as libc::socklen_t
}

/// Send `buf` to `dst` in one call. With `segment > 0` and `buf` longer than it, the kernel
/// (UDP GSO) cuts `buf` into datagrams of `segment` bytes (the last may be shorter).
pub fn send_segments(fd: RawFd, buf: &[u8], segment: u16, dst: SocketAddr) -> io::Result<()> {
    let mut addr = RawAddr::new(dst);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    // Room for one cmsg carrying a u16, 8-byte aligned.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&raw mut addr.storage).cast();
    msg.msg_namelen = addr.len;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if segment > 0 && buf.len() > usize::from(segment) {
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
        // SAFETY: msg_control points at `control`, large enough for one u16 cmsg.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
            libc::CMSG_DATA(cmsg).cast::<u16>().write_unaligned(segment);
        }
    }
    loop {
        // SAFETY: every pointer in `msg` refers to locals alive for the call.
        let n = unsafe { libc::sendmsg(fd, &raw const msg, 0) };
        if n >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// One received buffer: its length, the sender, and the GRO segment size (0: one datagram).
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub len: usize,
    pub from: Option<SocketAddr>,
    pub segment: usize,
}

/// Receive up to `bufs.len()` buffers with one `recvmmsg` (non-blocking). Each may hold a
/// GRO train of datagrams of `segment` bytes. Returns how many buffers were filled.
pub fn recv_batch(fd: RawFd, bufs: &mut [&mut [u8]], out: &mut [Received]) -> io::Result<usize> {
    const MAX: usize = 64;
    let count = bufs.len().min(out.len()).min(MAX);
    // SAFETY: these are plain-data arrays; all-zero is valid.
    let mut addrs: [libc::sockaddr_storage; MAX] = unsafe { zeroed() };
    let mut iovs: [libc::iovec; MAX] = unsafe { zeroed() };
    let mut controls = [[0u64; 8]; MAX];
    let mut msgs: [libc::mmsghdr; MAX] = unsafe { zeroed() };
    for i in 0..count {
        iovs[i].iov_base = bufs[i].as_mut_ptr().cast();
        iovs[i].iov_len = bufs[i].len();
        let hdr = &mut msgs[i].msg_hdr;
        hdr.msg_name = (&raw mut addrs[i]).cast();
        hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        hdr.msg_iov = &raw mut iovs[i];
        hdr.msg_iovlen = 1;
        hdr.msg_control = controls[i].as_mut_ptr().cast();
        hdr.msg_controllen = size_of::<[u64; 8]>();
    }
    // SAFETY: every pointer in `msgs` refers to locals or to `bufs`, alive for the call.
    let n = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            count as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n.cast_unsigned() as usize;
    for i in 0..n {
        let hdr = &msgs[i].msg_hdr;
        let mut segment = 0;
        // SAFETY: walking the control buffer the kernel filled, bounded by msg_controllen.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                    segment = libc::CMSG_DATA(cmsg).cast::<u16>().read_unaligned() as usize;
                }
                cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
            }
        }
        let raw = RawAddr {
            storage: addrs[i],
            len: hdr.msg_namelen,
        };
        out[i] = Received {
            len: msgs[i].msg_len as usize,
            from: raw.to_std(),
            segment,
        };
    }
    Ok(n)
}
