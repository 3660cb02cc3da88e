//! `weft`: the operator CLI. Talks to the node's agent over its unix socket.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use weft_agent::api::{
    Client, EndpointRow, Flow, IdentityRow, PolicyReport, Request, StatusReport,
    default_socket_path, feature_summary,
};
use weft_agent::observe::format_flow;

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
    /// Policies and the map entries they produced.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Show flows with verdicts and drop reasons.
    Observe(ObserveArgs),
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
enum PolicyCommand {
    Get,
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
    #[arg(long, value_parser = ["forwarded", "dropped", "audit"])]
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
            let mut client = if args.follow {
                client.without_timeout()?
            } else {
                client
            };
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

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn print_status(s: &StatusReport) {
    println!("Node:            {}", s.node);
    println!("Version:         {}", s.version);
    println!("Kernel:          {} ({} attach)", s.kernel, s.attach_mode);
    if !s.kernel_features.is_empty() {
        println!("Kernel features: {}", feature_summary(&s.kernel_features));
    }
    println!("Uptime:          {}s", s.uptime_seconds);
    println!("Source:          {}", s.source);
    println!(
        "Datapath:        tc ({}), pinned at {}",
        s.attach_mode, s.pin_dir
    );
    println!("Endpoints:       {}", s.endpoints);
    println!("Identities:      {}", s.identities);
    println!("Policies:        {}", s.policies);
    println!(
        "Maps:            policy {} entries, ipcache {}, conntrack {}",
        s.policy_map_entries, s.ipcache_entries, s.conntrack_entries
    );
    match s.last_apply_seconds_ago {
        Some(ago) => println!("Last apply:      {ago}s ago"),
        None => println!("Last apply:      never"),
    }
    if s.rejected.is_empty() {
        println!("Rejected:        none");
    } else {
        println!("Rejected:");
        for r in &s.rejected {
            println!("  - {r}");
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
    }
    if !report.rejected.is_empty() {
        println!("REJECTED");
        for r in &report.rejected {
            println!("  {r}");
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
