//! The fixture most policy and datapath tests share: one node with three pods of namespace
//! `shop` — `server` (app=server: TCP echo on 8080 and 9090, a TCP ticker on 7070, UDP echo
//! on 5353 and 5354), `client` (app=client) and `other` (app=other).

use crate::{Node, Pod, TestPrefix, skip_unless_privileged};

/// Fields drop in order: the pods (CNI DEL inside the node's namespace) before the node.
pub struct Shop {
    pub client: Pod,
    pub server: Pod,
    pub other: Pod,
    pub node: Node,
}

/// The [`Shop`] for `test`, or `None` where the test cannot run (and may skip).
#[must_use]
pub fn shop(test: &str) -> Option<Shop> {
    if skip_unless_privileged(test) {
        return None;
    }
    let prefix = TestPrefix::new();
    let node = Node::start(&prefix, "n1");
    let server = node.add_pod("server", "shop", &[("app", "server")]);
    let client = node.add_pod("client", "shop", &[("app", "client")]);
    let other = node.add_pod("other", "shop", &[("app", "other")]);
    server.spawn_tcp_echo(8080);
    server.spawn_tcp_echo(9090);
    server.spawn_tcp_ticker(7070);
    server.spawn_udp_echo(5353);
    server.spawn_udp_echo(5354);
    Some(Shop {
        client,
        server,
        other,
        node,
    })
}
