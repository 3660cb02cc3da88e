//! `weft`: the operator CLI. Talks to the node's agent over its unix socket; links neither
//! aya nor the agent.
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use weft_api::features::summary as feature_summary;
use weft_api::flow::format_flow;
use weft_api::{
    Client, EncryptionReport, EndpointRow, ExplainQuery, ExplainReport, Flow, IdentityRow, NodeRow,
    PolicyReport, Request, StatusReport, WaitReport, default_socket_path,
};

#[derive(Parser)]
#[command(
    name = "weft",
    version,
    about = "Inspect and operate the weft mesh on this node"
)]
struct Cli {
    /// The agent's socket (default: /var/run/weft/<node>/agent.sock).
    #[arg(long, global = true, env = "WEFT_SOCKET")]
    socket: Option<String>,
    /// Node name, to find the default socket.
    #[arg(long, global = true, env = "WEFT_NODE")]
    node: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Agent health, datapath mode, map sizes, counters.
    Status,
    /// Local endpoints (pods) with identities and isolation.
    #[command(subcommand)]
    Endpoint(EndpointCommand),
    /// Identities known to this agent.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Nodes of the cluster as this agent knows them.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Policies and the map entries they produced.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Show flows with verdicts and drop reasons.
    Observe(ObserveArgs),
    /// Node-to-node encryption (WireGuard).
    #[command(subcommand)]
    Encryption(EncryptionCommand),
}

#[derive(Subcommand)]
enum EncryptionCommand {
    /// The device, its key's age, and each peer: endpoint, last handshake, bytes each way.
    Status,
    /// Replace this node's WireGuard key; peers learn the new one from its `Node` object,
    /// and connections keep going.
    Rotate,
}

#[derive(Subcommand)]
enum EndpointCommand {
    List,
}

#[derive(Subcommand)]
enum IdentityCommand {
    List,
}

#[derive(Subcommand)]
enum NodeCommand {
    List,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Policies, their conditions, and every policy-map entry they produced.
    Get,
    /// The verdict for one connection in each direction this node enforces, the policies
    /// and rules that decided it, and whether the datapath's recent flows agree.
    Explain {
        /// Source: a pod (`namespace/name`, or `name` when unique) or an IP address.
        #[arg(long)]
        from: String,
        /// Destination: a pod or an IP address.
        #[arg(long)]
        to: String,
        /// `<port>/<protocol>` (`8080/tcp`, `53/udp`; protocol tcp when omitted); for ICMP
        /// the type: `8/icmp` (echo request), `128/icmpv6`.
        #[arg(long, value_parser = parse_port_protocol)]
        port: (u16, String),
    },
    /// Wait until the maps enforce the configuration as it is now (every object file closed
    /// before this command is in force or rejected), then print the revision.
    Wait {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

#[derive(clap::Args)]
struct ObserveArgs {
    /// Keep streaming new flows.
    #[arg(short, long)]
    follow: bool,
    /// How many recent flows to show first.
    #[arg(long, default_value_t = 100)]
    last: usize,
    /// Only flows with this verdict.
    /// (L7 flows: `forwarded`, `denied`, `malformed`, `upstream-error`.)
    #[arg(long, value_parser = ["forwarded", "dropped", "audit", "denied", "malformed", "upstream-error"])]
    verdict: Option<String>,
    /// Only flows from or to this pod (`name` or `namespace/name`).
    #[arg(long)]
    pod: Option<String>,
    /// Only flows from or to this identity.
    #[arg(long)]
    identity: Option<u32>,
    /// Only flows to this destination port.
    #[arg(long)]
    port: Option<u16>,
    /// Only L7 flows (HTTP requests through the node's filter).
    #[arg(long)]
    http: bool,
    /// Only L7 flows answered with this HTTP status.
    #[arg(long)]
    http_status: Option<u16>,
    /// Only L7 flows of this HTTP method.
    #[arg(long)]
    http_method: Option<String>,
}

impl ObserveArgs {
    fn matches(&self, flow: &Flow) -> bool {
        let pod_matches = |name: &str| {
            self.pod.as_deref().is_none_or(|want| {
                name == want || name.rsplit_once('/').is_some_and(|(_, pod)| pod == want)
            })
        };
        self.verdict.as_deref().is_none_or(|v| flow.verdict == v)
            && (pod_matches(&flow.source.name) || pod_matches(&flow.destination.name))
            && self
                .identity
                .is_none_or(|id| flow.source.identity == id || flow.destination.identity == id)
            && self.port.is_none_or(|p| flow.destination.port == Some(p))
            && self.http_matches(flow)
    }

    fn http_matches(&self, flow: &Flow) -> bool {
        let wants_http = self.http || self.http_status.is_some() || self.http_method.is_some();
        match &flow.http {
            None => !wants_http,
            Some(h) => {
                self.http_status.is_none_or(|s| h.status == s)
                    && self
                        .http_method
                        .as_deref()
                        .is_none_or(|m| h.method.eq_ignore_ascii_case(m))
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn socket_path(cli: &Cli) -> anyhow::Result<String> {
    if let Some(socket) = &cli.socket {
        return Ok(socket.clone());
    }
    let node = match &cli.node {
        Some(node) => node.clone(),
        None => nix::unistd::gethostname()
            .context("reading the host name")?
            .to_string_lossy()
            .into_owned(),
    };
    Ok(default_socket_path(&node))
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let mut client = Client::connect(socket_path(cli)?)?;
    let json = cli.output == Output::Json;
    match &cli.command {
        Command::Status => {
            let status: StatusReport = client.call(&Request::Status)?;
            if json {
                return print_json(&status);
            }
            print_status(&status);
        }
        Command::Endpoint(EndpointCommand::List) => {
            let rows: Vec<EndpointRow> = client.call(&Request::EndpointList)?;
            if json {
                return print_json(&rows);
            }
            println!(
                "{:<5} {:<28} {:<9} {:<9} {:<9} {:<16} ADDRESSES",
                "ID", "POD", "IDENTITY", "INGRESS", "EGRESS", "INTERFACE"
            );
            for r in rows {
                let addrs: Vec<String> = r.addresses.iter().map(ToString::to_string).collect();
                println!(
                    "{:<5} {:<28} {:<9} {:<9} {:<9} {:<16} {}",
                    r.id,
                    format!("{}/{}", r.namespace, r.pod),
                    r.identity,
                    r.ingress,
                    r.egress,
                    r.host_ifname,
                    addrs.join(",")
                );
            }
        }
        Command::Identity(IdentityCommand::List) => {
            let rows: Vec<IdentityRow> = client.call(&Request::IdentityList)?;
            if json {
                return print_json(&rows);
            }
            println!("{:<10} LABELS", "IDENTITY");
            for r in rows {
                println!("{:<10} {}", r.id, r.labels.join(" "));
            }
        }
        Command::Encryption(EncryptionCommand::Status) => {
            let report: EncryptionReport = client.call(&Request::EncryptionStatus)?;
            if json {
                return print_json(&report);
            }
            print_encryption(&report);
        }
        Command::Encryption(EncryptionCommand::Rotate) => {
            let report: EncryptionReport = client.call(&Request::EncryptionRotate)?;
            if json {
                return print_json(&report);
            }
            println!("New public key: {}", report.public_key);
        }
        Command::Node(NodeCommand::List) => {
            let rows: Vec<NodeRow> = client.call(&Request::NodeList)?;
            if json {
                return print_json(&rows);
            }
            println!(
                "{:<24} {:<6} {:<5} {:<40} POD CIDRS",
                "NODE", "LOCAL", "PODS", "ADDRESSES"
            );
            for r in rows {
                let addrs: Vec<String> = r.addresses.iter().map(ToString::to_string).collect();
                let cidrs: Vec<String> = r.pod_cidrs.iter().map(ToString::to_string).collect();
                println!(
                    "{:<24} {:<6} {:<5} {:<40} {}",
                    r.name,
                    if r.local { "yes" } else { "" },
                    r.pods,
                    addrs.join(","),
                    cidrs.join(",")
                );
            }
        }
        Command::Policy(PolicyCommand::Wait { timeout }) => {
            let timeout = Duration::from_secs(*timeout);
            client.set_timeout(Some(timeout + Duration::from_secs(5)))?;
            let report: WaitReport = client.call(&Request::PolicyWait {
                timeout_ms: Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
            })?;
            if json {
                return print_json(&report);
            }
            println!("Revision {} is enforced.", report.applied_revision);
            for r in &report.rejected {
                println!("Rejected: {}", r.message);
            }
            for r in &report.refused {
                println!("Not enforced in full: {r}");
            }
            if !report.rejected.is_empty() || !report.refused.is_empty() {
                anyhow::bail!("some objects are not in force (see above)");
            }
        }
        Command::Policy(PolicyCommand::Explain { from, to, port }) => {
            let report: ExplainReport = client.call(&Request::PolicyExplain(ExplainQuery {
                from: from.clone(),
                to: to.clone(),
                protocol: port.1.clone(),
                port: port.0,
            }))?;
            if json {
                return print_json(&report);
            }
            print_explain(&report);
        }
        Command::Policy(PolicyCommand::Get) => {
            let report: PolicyReport = client.call(&Request::PolicyGet)?;
            if json {
                return print_json(&report);
            }
            print_policy(&report);
        }
        Command::Observe(args) => {
            client.send(&Request::Observe {
                follow: args.follow,
                last: Some(args.last),
            })?;
            if args.follow {
                client.set_timeout(None)?;
            }
            let stdout = std::io::stdout();
            while let Some(flow) = client.read_next::<Flow>()? {
                if !args.matches(&flow) {
                    continue;
                }
                let mut out = stdout.lock();
                let line = if json {
                    serde_json::to_string(&flow)?
                } else {
                    format_flow(&flow)
                };
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    // Reader went away (e.g. piped into head).
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// `8080/tcp`, `53/UDP`, `8/icmp`, or a bare `8080` (TCP).
fn parse_port_protocol(text: &str) -> Result<(u16, String), String> {
    let (port, protocol) = text.split_once('/').unwrap_or((text, "tcp"));
    let port: u16 = port
        .parse()
        .map_err(|e| format!("{port:?} is not a port or ICMP type: {e}"))?;
    let protocol = protocol.to_ascii_lowercase();
    if !["tcp", "udp", "sctp", "icmp", "icmpv6"].contains(&protocol.as_str()) {
        return Err(format!(
            "unknown protocol {protocol:?}: use tcp, udp, sctp, icmp or icmpv6"
        ));
    }
    Ok((port, protocol))
}

fn print_explain(r: &ExplainReport) {
    let end = |e: &weft_api::ExplainEnd| {
        let addrs: Vec<String> = e.addresses.iter().map(ToString::to_string).collect();
        format!(
            "{} ({}; identity {}{})",
            e.name,
            addrs.join(","),
            e.identity,
            if e.local { ", on this node" } else { "" }
        )
    };
    println!("From:     {}", end(&r.from));
    println!("To:       {}", end(&r.to));
    println!("Port:     {}/{}", r.port, r.protocol);
    println!("Verdict:  {}", r.verdict.to_uppercase());
    println!(
        "Datapath: {} ({})",
        r.datapath.agreement, r.datapath.message
    );
    if r.hops.is_empty() {
        println!("Neither end is an endpoint of this node: nothing is enforced here.");
        return;
    }
    println!();
    println!(
        "  {:<24} {:<8} {:<13} {:<14} {:<22} BECAUSE",
        "ENDPOINT", "DIR", "VERDICT", "DECIDED BY", "OBSERVED"
    );
    for h in &r.hops {
        let because = match h.decided_by.as_str() {
            "rules" => h.rules.join("; "),
            "not-isolated" => "no policy selects it in this direction".to_owned(),
            _ => format!("isolated by {}", h.isolated_by.join(", ")),
        };
        let observed = h.observed.as_ref().map_or("-".to_owned(), |o| {
            format!(
                "{}{}",
                o.verdict,
                if o.agrees { "" } else { " (DISAGREES)" }
            )
        });
        println!(
            "  {:<24} {:<8} {:<13} {:<14} {:<22} {because}",
            h.endpoint, h.direction, h.verdict, h.decided_by, observed
        );
        if let Some(a) = &h.audit {
            println!(
                "  {:<24} {:<8} audit: {}{} by {}",
                "",
                "",
                a.verdict,
                a.change
                    .as_deref()
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default(),
                a.rules.join("; ")
            );
        }
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn print_encryption(r: &EncryptionReport) {
    if r.mode == "off" {
        println!("Encryption: off (start the agent with --encryption wireguard)");
        return;
    }
    println!("Encryption:  {}", r.mode);
    println!(
        "Strict mode: {}",
        if r.strict {
            "on (pod traffic between nodes outside the tunnel is dropped as `unencrypted`, both ways)"
        } else {
            "off (start the agent with --encryption-strict to drop pod traffic between nodes outside the tunnel)"
        }
    );
    println!(
        "Device:      {} (`wg show {}`), port {}, MTU {}",
        r.device, r.wg_interface, r.listen_port, r.mtu
    );
    println!("Public key:  {}", r.public_key);
    match r.key_age_seconds {
        Some(age) => println!("Key age:     {age}s"),
        None => println!("Key age:     unknown"),
    }
    println!(
        "{:<24} {:<46} {:<28} {:<12} {:>12} {:>12}  ALLOWED IPS",
        "PEER", "PUBLIC KEY", "ENDPOINT", "HANDSHAKE", "RX BYTES", "TX BYTES"
    );
    for p in &r.peers {
        let handshake = p
            .last_handshake_seconds_ago
            .map_or_else(|| "never".to_owned(), |s| format!("{s}s ago"));
        let allowed: Vec<String> = p.allowed_ips.iter().map(ToString::to_string).collect();
        println!(
            "{:<24} {:<46} {:<28} {:<12} {:>12} {:>12}  {}",
            p.node,
            p.public_key,
            p.endpoint.as_deref().unwrap_or("-"),
            handshake,
            p.rx_bytes,
            p.tx_bytes,
            allowed.join(",")
        );
    }
    if !r.problems.is_empty() {
        println!("Problems:");
        for p in &r.problems {
            println!("  {p}");
        }
    }
}

fn print_status(s: &StatusReport) {
    use std::fmt::Write as _;
    println!("Node:            {}", s.node);
    println!("Version:         {}", s.version);
    println!("Kernel:          {} ({} attach)", s.kernel, s.attach_mode);
    if !s.kernel_features.is_empty() {
        println!("Kernel features: {}", feature_summary(&s.kernel_features));
    }
    println!("Uptime:          {}s", s.uptime_seconds);
    println!("Source:          {}", s.source);
    println!(
        "Datapath:        tc ({}, {}), pinned at {}",
        s.attach_mode, s.datapath_variant, s.pin_dir
    );
    println!("Endpoints:       {}", s.endpoints);
    println!("Identities:      {}", s.identities);
    println!("Policies:        {}", s.policies);
    if !s.encryption.is_empty() {
        println!("Encryption:      {}", s.encryption);
    }
    if !s.socket_redirect.is_empty() {
        println!("Socket redirect: {}", s.socket_redirect);
        let r = &s.sock_redirect;
        if r.sockets + r.messages + r.fallbacks > 0 {
            println!(
                "                 {} sockets, {} messages ({} bytes) redirected, {} sent back to the normal path",
                r.sockets, r.messages, r.bytes, r.fallbacks
            );
        }
    }
    let maps: Vec<String> = s
        .maps
        .iter()
        .map(|m| format!("{} {}/{}", m.name, m.entries, m.capacity))
        .collect();
    println!("Maps:            {}", maps.join(", "));
    let sync = if s.applied_revision == s.config_revision {
        "in force"
    } else {
        "applying"
    };
    println!(
        "Configuration:   revision {} read, revision {} applied ({sync})",
        s.config_revision, s.applied_revision
    );
    match s.last_apply_seconds_ago {
        Some(ago) => println!("Last apply:      {ago}s ago"),
        None => println!("Last apply:      never"),
    }
    println!(
        "Flow events:     {} received, {} lost (ring full), {} rate-limited, {} missed by observers",
        s.events.received, s.events.lost, s.events.rate_limited, s.events.observer_lagged
    );
    let ct = &s.conntrack;
    println!(
        "Conntrack:       {} live of {}; {} created, {} rechecked after a policy change, {} revoked, {} evicted (full map: least recently used first), {} related ICMP errors",
        ct.live, ct.capacity, ct.created, ct.revalidated, ct.revoked, ct.evicted, ct.icmp_related
    );
    println!(
        "Refused:         {} endpoint policies since start did not fit the map (those refused now are under Problems)",
        s.refusals_total
    );
    let l7 = &s.l7_filter;
    let mut filter = format!(
        "{} ({} endpoints with HTTP rules, {} restarts",
        l7.state, l7.endpoints, l7.restarts
    );
    if let Some(pid) = l7.pid {
        let _ = write!(filter, ", pid {pid}");
    }
    if let Some(r) = l7.revision {
        let _ = write!(filter, ", configuration {r}");
    }
    filter.push(')');
    if let Some(e) = &l7.last_error {
        let _ = write!(filter, "; last error: {e}");
    }
    println!("L7 filter:       {filter}");
    if s.rejected.is_empty() {
        println!("Rejected:        none");
    } else {
        println!("Rejected:");
        for r in &s.rejected {
            println!("  - {}", r.message);
        }
    }
    if s.problems.is_empty() {
        println!("Problems:        none");
    } else {
        println!("Problems:");
        for p in &s.problems {
            println!("  - {p}");
        }
    }
    if !s.counters.is_empty() {
        println!("Counters:");
        for c in &s.counters {
            println!(
                "  {:<8} {:<10} {:<18} {:>10} pkts {:>12} bytes",
                c.direction, c.verdict, c.reason, c.packets, c.bytes
            );
        }
    }
}

fn print_policy(report: &PolicyReport) {
    println!("POLICIES");
    for p in &report.policies {
        let name = match &p.namespace {
            Some(ns) => format!("{ns}/{}", p.name),
            None => p.name.clone(),
        };
        println!(
            "  {} {} ({}, from {}) selects: {}",
            p.kind,
            name,
            p.enforcement,
            p.source,
            if p.selects.is_empty() {
                "-".to_owned()
            } else {
                p.selects.join(", ")
            }
        );
        for c in &p.conditions {
            println!("    {}={} {}: {}", c.type_, c.status, c.reason, c.message);
        }
    }
    if !report.rejected.is_empty() {
        println!("REJECTED");
        for r in &report.rejected {
            println!("  {}", r.message);
        }
    }
    println!("MAP ENTRIES");
    println!(
        "  {:<24} {:<8} {:<9} {:<7} {:<12} {:<12} FROM",
        "ENDPOINT", "DIR", "IDENTITY", "PROTO", "PORT", "VERDICT"
    );
    for e in &report.entries {
        println!(
            "  {:<24} {:<8} {:<9} {:<7} {:<12} {:<12} {}",
            e.endpoint,
            e.direction,
            if e.identity == 0 {
                "any".to_owned()
            } else {
                e.identity.to_string()
            },
            e.protocol,
            e.port,
            e.verdict,
            e.derived_from.join("; ")
        );
    }
}
