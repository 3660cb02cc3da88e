//! A cluster of N nodes on one machine: each node a network namespace with its own agent
//! and pod subnets, joined by an underlay (a veth per node into a bridge that lives in a
//! namespace of its own, never the host's), all agents reading one shared source directory.
//!
//! Addresses: node `i` (0-based) is `100.65.0.<i+1>/24` and `fd00:65::<i+1>/64` on the
//! underlay; its pods get `100.64.<s>.0/24` and `fd00:64:0:<s>::/64` (`s` its subnet
//! index). Each node routes the other nodes' pod subnets to them over the underlay (plain
//! routing; with `encryption`, each agent replaces those routes with routes through its
//! WireGuard device). Each agent publishes its node's
//! `Node` object into the shared source (name, underlay addresses, pod CIDRs) from the
//! `--node-address` and `--pod-cidr` flags the harness gives it.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::netns::{NetNs, run_ok};
use crate::node::{Node, NodeOptions, apply_file};
use crate::prefix::TestPrefix;

/// How to build a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: usize,
    /// Start an agent on every node.
    pub agents: bool,
    /// The cluster's directory (default: `weft-<prefix>-cl` in the temp dir).
    pub dir: Option<PathBuf>,
    /// Extra flags for every agent.
    pub agent_args: Vec<String>,
    /// Encrypt pod traffic between nodes (`--encryption wireguard` on every agent).
    pub encryption: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 2,
            agents: true,
            dir: None,
            agent_args: Vec::new(),
            encryption: false,
        }
    }
}

pub struct Cluster {
    /// Dropped before the underlay.
    nodes: Vec<Node>,
    /// Underlay slot of each node (its addresses), parallel to `nodes`.
    slots: Vec<usize>,
    underlay: Option<NetNs>,
    /// Flags every agent gets (nodes added later too).
    agent_args: Vec<String>,
    source_dir: PathBuf,
    dir: PathBuf,
    keep: bool,
}

impl Cluster {
    /// Build the cluster and start its agents (unless `options.agents` is false).
    pub fn start(prefix: &TestPrefix, options: &ClusterOptions) -> Self {
        assert!(
            (1..=9).contains(&options.nodes),
            "a cluster has 1 to 9 nodes"
        );
        let dir = options
            .dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("weft-{}", prefix.name("cl"))));
        let _ = fs::remove_dir_all(&dir);
        let source_dir = dir.join("source");
        fs::create_dir_all(&source_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", source_dir.display()));
        let mut cluster = Self {
            nodes: Vec::new(),
            slots: Vec::new(),
            underlay: None,
            agent_args: Vec::new(),
            source_dir: source_dir.clone(),
            dir: dir.clone(),
            keep: false,
        };
        let underlay = NetNs::create(&prefix.name("ul"));
        underlay.run_ok("ip", &["link", "add", "br0", "type", "bridge"]);
        underlay.run_ok("ip", &["link", "set", "br0", "up"]);
        cluster.underlay = Some(underlay);
        cluster.agent_args.clone_from(&options.agent_args);
        if options.encryption {
            cluster
                .agent_args
                .extend(["--encryption".to_string(), "wireguard".to_string()]);
        }
        for _ in 0..options.nodes {
            cluster.join(prefix, false);
        }
        if options.agents {
            for node in &mut cluster.nodes {
                node.start_agent();
            }
        }
        cluster
    }

    /// Add one more node to the running cluster (next free underlay address, plain routes
    /// both ways) and start its agent; its index.
    pub fn add_node(&mut self, prefix: &TestPrefix) -> usize {
        self.join(prefix, true)
    }

    /// Take node `i` out: its agent stops, its namespace goes, its `Node` object leaves the
    /// shared source and the other nodes' plain routes to it are removed.
    pub fn remove_node(&mut self, i: usize) {
        let node = self.nodes.remove(i);
        let slot = self.slots.remove(i);
        let name = node.name().to_owned();
        let (v4, v6) = (node.pod_subnet_v4(), node.pod_subnet_v6());
        drop(node);
        self.remove(&format!("node-{name}.yaml"));
        for other in &self.nodes {
            for cidr in [&v4, &v6] {
                // Gone already when an agent had replaced it with its own route.
                let _ = other.netns().exec("ip", &["route", "del", cidr]);
            }
        }
        if let Some(underlay) = &self.underlay {
            let _ = underlay.exec("ip", &["link", "del", &format!("ul{slot}")]);
        }
    }

    /// Create a node on the next free underlay slot, attach it and route pod subnets
    /// between it and every other node.
    fn join(&mut self, prefix: &TestPrefix, start_agent: bool) -> usize {
        let slot = (0..9)
            .find(|s| !self.slots.contains(s))
            .expect("a cluster has at most 9 nodes");
        let mut node = Node::create(
            prefix,
            &format!("n{}", slot + 1),
            &NodeOptions {
                source_dir: Some(self.source_dir.clone()),
                base_dir: Some(self.dir.clone()),
                agent_args: self.agent_args.clone(),
            },
        );
        self.attach(&node, slot);
        let (v4, v6) = underlay_addresses(slot);
        for (other, other_slot) in self.nodes.iter().zip(&self.slots) {
            let (ov4, ov6) = underlay_addresses(*other_slot);
            route(&node, &other.pod_subnet_v4(), ov4);
            route(&node, &other.pod_subnet_v6(), ov6);
            route(other, &node.pod_subnet_v4(), v4);
            route(other, &node.pod_subnet_v6(), v6);
        }
        // The agent publishes its own `Node` object from these.
        node.add_agent_args([
            "--node-address".to_string(),
            format!("{v4},{v6}"),
            "--pod-cidr".to_string(),
            format!("{},{}", node.pod_subnet_v4(), node.pod_subnet_v6()),
        ]);
        if start_agent {
            node.start_agent();
        }
        self.nodes.push(node);
        self.slots.push(slot);
        self.nodes.len() - 1
    }

    /// Join node `i` to the underlay bridge.
    fn attach(&self, node: &Node, i: usize) {
        let underlay = self.underlay.as_ref().expect("underlay");
        let inside = format!("ul{i}");
        run_ok(std::process::Command::new("ip").args([
            "-n",
            underlay.name(),
            "link",
            "add",
            &inside,
            "type",
            "veth",
            "peer",
            "name",
            "ul0",
            "netns",
            node.netns().name(),
        ]));
        underlay.run_ok("ip", &["link", "set", &inside, "master", "br0"]);
        underlay.run_ok("ip", &["link", "set", &inside, "up"]);
        let (v4, v6) = underlay_addresses(i);
        let ns = node.netns();
        ns.run_ok("ip", &["addr", "add", &format!("{v4}/24"), "dev", "ul0"]);
        ns.run_ok("ip", &["addr", "add", &format!("{v6}/64"), "dev", "ul0"]);
        ns.run_ok("ip", &["link", "set", "ul0", "up"]);
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn nodes_mut(&mut self) -> &mut [Node] {
        &mut self.nodes
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// The shared source directory.
    pub fn source_dir(&self) -> &Path {
        &self.source_dir
    }

    /// Write an object file into the shared source (atomically).
    pub fn apply(&self, file_name: &str, yaml: &str) {
        apply_file(&self.source_dir, file_name, yaml);
    }

    pub fn remove(&self, file_name: &str) {
        let _ = fs::remove_file(self.source_dir.join(file_name));
    }

    /// `weft policy wait` on every node.
    pub fn policy_wait(&self) {
        for node in &self.nodes {
            node.policy_wait();
        }
    }

    /// Underlay addresses of the node in underlay slot `i` (node `i` unless nodes were removed).
    pub fn underlay_addresses(i: usize) -> (IpAddr, IpAddr) {
        underlay_addresses(i)
    }

    /// Underlay addresses of node `i`.
    pub fn node_underlay(&self, i: usize) -> (IpAddr, IpAddr) {
        underlay_addresses(self.slots[i])
    }

    /// The underlay bridge's namespace (for captures).
    pub fn underlay(&self) -> &NetNs {
        self.underlay.as_ref().expect("underlay")
    }

    /// Leave everything running (the demo); `cargo xtask down` removes it by its prefix.
    pub fn keep(mut self) {
        self.keep = true;
        for node in std::mem::take(&mut self.nodes) {
            node.keep();
        }
        if let Some(ns) = self.underlay.take() {
            std::mem::forget(ns);
        }
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn route(node: &Node, cidr: &str, via: IpAddr) {
    node.netns()
        .run_ok("ip", &["route", "add", cidr, "via", &via.to_string()]);
}

fn underlay_addresses(i: usize) -> (IpAddr, IpAddr) {
    let host = i + 1;
    (
        format!("100.65.0.{host}").parse().expect("v4"),
        format!("fd00:65::{host:x}").parse().expect("v6"),
    )
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Nodes first (agents, pods, namespaces), then the underlay, then the files.
        self.nodes.clear();
        drop(self.underlay.take());
        if std::env::var_os("WEFT_KEEP").is_none_or(|v| v != "1") {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
