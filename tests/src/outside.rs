//! A network outside the cluster, reached through a router: node -> router -> far host. The
//! router's link towards the far host has a smaller MTU than the rest, so packets a pod sends
//! there at full size meet a router that answers "fragmentation needed" / "packet too big"
//! from an address outside the cluster (identity `world`): what path-MTU discovery needs to
//! reach an isolated pod.
//!
//! Addresses (S = the node's subnet index): node side 10.200.S.1 / `fd00:200:S::1`, router
//! 10.200.S.2 / `fd00:200:S::2` and 10.201.S.1 / `fd00:201:S::1`, far host 10.201.S.2 /
//! `fd00:201:S::2`. Everything is removed on drop.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::{NetNs, enter_netns, in_netns, run_ok};
use crate::node::Node;

/// The MTU of the router's link towards the far host.
pub const NARROW_MTU: u32 = 1280;

pub struct Outside {
    pub router: NetNs,
    pub far: NetNs,
    pub far_v4: IpAddr,
    pub far_v6: IpAddr,
    /// The router's addresses (the source of its ICMP errors to the node's pods).
    pub router_v4: IpAddr,
    pub router_v6: IpAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Outside {
    /// Build it next to `node`.
    pub fn attach(node: &Node) -> Self {
        let s = node.subnet_index();
        let prefix = node.prefix();
        let router = NetNs::create(&prefix.name("rtr"));
        let far = NetNs::create(&prefix.name("far"));
        let out = Self {
            router,
            far,
            far_v4: format!("10.201.{s}.2").parse().expect("v4"),
            far_v6: format!("fd00:201:{s:x}::2").parse().expect("v6"),
            router_v4: format!("10.200.{s}.2").parse().expect("v4"),
            router_v6: format!("fd00:200:{s:x}::2").parse().expect("v6"),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        for ns in [&out.router, &out.far] {
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
        }
        out.router.sysctl("net.ipv4.ip_forward", "1");
        out.router.sysctl("net.ipv6.conf.all.forwarding", "1");
        let node_ns = node.netns().name().to_owned();
        let (up_node, up_router) = (prefix.name("up0"), prefix.name("up1"));
        let (dn_router, dn_far) = (prefix.name("dn0"), prefix.name("dn1"));
        let ip = |args: &[&str]| run_ok(std::process::Command::new("ip").args(args));
        // node <-> router, full MTU
        ip(&[
            "-n",
            &node_ns,
            "link",
            "add",
            &up_node,
            "type",
            "veth",
            "peer",
            "name",
            &up_router,
            "netns",
            out.router.name(),
        ]);
        // router <-> far: the router's end is narrow, the far host's is not (so the far
        // host advertises a full-size MSS and the pod's packets meet the narrow link).
        ip(&[
            "-n",
            out.router.name(),
            "link",
            "add",
            &dn_router,
            "mtu",
            &NARROW_MTU.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            &dn_far,
            "netns",
            out.far.name(),
        ]);
        let n = node.netns();
        n.run_ok(
            "ip",
            &["addr", "add", &format!("10.200.{s}.1/24"), "dev", &up_node],
        );
        n.run_ok(
            "ip",
            &[
                "addr",
                "add",
                &format!("fd00:200:{s:x}::1/64"),
                "dev",
                &up_node,
            ],
        );
        n.run_ok("ip", &["link", "set", &up_node, "up"]);
        n.run_ok(
            "ip",
            &[
                "route",
                "add",
                &format!("10.201.{s}.0/24"),
                "via",
                &format!("10.200.{s}.2"),
            ],
        );
        n.run_ok(
            "ip",
            &[
                "route",
                "add",
                &format!("fd00:201:{s:x}::/64"),
                "via",
                &format!("fd00:200:{s:x}::2"),
            ],
        );
        let r = &out.router;
        r.run_ok(
            "ip",
            &[
                "addr",
                "add",
                &format!("10.200.{s}.2/24"),
                "dev",
                &up_router,
            ],
        );
        r.run_ok(
            "ip",
            &[
                "addr",
                "add",
                &format!("fd00:200:{s:x}::2/64"),
                "dev",
                &up_router,
            ],
        );
        r.run_ok(
            "ip",
            &[
                "addr",
                "add",
                &format!("10.201.{s}.1/24"),
                "dev",
                &dn_router,
            ],
        );
        r.run_ok(
            "ip",
            &[
                "addr",
                "add",
                &format!("fd00:201:{s:x}::1/64"),
                "dev",
                &dn_router,
            ],
        );
        for dev in [&up_router, &dn_router] {
            r.run_ok("ip", &["link", "set", dev, "up"]);
        }
        r.run_ok(
            "ip",
            &[
                "route",
                "add",
                &node.pod_subnet_v4(),
                "via",
                &format!("10.200.{s}.1"),
            ],
        );
        r.run_ok(
            "ip",
            &[
                "route",
                "add",
                &node.pod_subnet_v6(),
                "via",
                &format!("fd00:200:{s:x}::1"),
            ],
        );
        let f = &out.far;
        f.run_ok(
            "ip",
            &["addr", "add", &format!("10.201.{s}.2/24"), "dev", &dn_far],
        );
        f.run_ok(
            "ip",
            &[
                "addr",
                "add",
                &format!("fd00:201:{s:x}::2/64"),
                "dev",
                &dn_far,
            ],
        );
        f.run_ok("ip", &["link", "set", &dn_far, "up"]);
        f.run_ok(
            "ip",
            &["route", "add", "default", "via", &format!("10.201.{s}.1")],
        );
        f.run_ok(
            "ip",
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:201:{s:x}::1"),
            ],
        );
        out
    }

    /// Serve a TCP sink on `[::]:port` in the far host: it reads until the peer shuts down
    /// its side and answers `<bytes received>\n`.
    pub fn spawn_tcp_sink(&mut self, port: u16) {
        let listener = in_netns(self.far.name(), || TcpListener::bind(("::", port)))
            .unwrap_or_else(|e| panic!("far host: cannot listen on {port}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = self.stop.clone();
        let far = self.far.name().to_owned();
        self.threads.push(std::thread::spawn(move || {
            enter_netns(&far);
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        std::thread::spawn(move || {
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                            let mut total = 0usize;
                            let mut buf = vec![0u8; 65536];
                            while let Ok(n) = stream.read(&mut buf) {
                                if n == 0 {
                                    break;
                                }
                                total += n;
                            }
                            let _ = stream.write_all(format!("{total}\n").as_bytes());
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }));
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The namespaces go with their veths (the node's end goes with its peer).
    }
}
