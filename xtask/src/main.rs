//! Developer tasks for weft: `cargo xtask <command>`.
//!
//! One module per command. eBPF build logic does not live here: the agent's `build.rs` builds
//! the eBPF object, so `build` and `test` only drive cargo.

#![forbid(unsafe_code)]

mod bench;
mod bench_scale;
mod build;
mod chaos;
mod cmd;
mod demo;
mod deny;
mod gen_crds;
mod setup;
mod test;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "weft developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make this machine ready to build and test weft (idempotent; fast on a second run).
    Setup(setup::Options),
    /// Build the agent (which embeds the eBPF object).
    Build(build::Options),
    /// Benchmark pod to pod with netperf: no mesh vs weft (1,000 rules) vs iptables (same
    /// rules), interleaved and repeated; prints medians, spreads, ratios and the targets.
    Bench(bench::Options),
    /// Set up, build the agent binaries, then run the whole workspace's tests.
    Test(test::Options),
    /// Faults and bad input while traffic flows (SIGKILL, bad files, ghost CNI commands, a
    /// second agent, map exhaustion, oversized requests); prints a table, fails on any row
    /// that lets a denied peer through or cuts an allowed connection.
    Chaos(chaos::Options),
    /// Run the integration tests natively on this kernel and in VMs on Debian's 6.1 and 6.12
    /// kernels (qemu via virtme-ng), then print a table per kernel.
    VmTest(vm::Options),
    /// Check the dependencies' licences, bans and sources with cargo-deny (`deny.toml`).
    Deny(deny::Options),
    /// Regenerate `crds/` from the policy model (`--check`: fail when stale).
    GenCrds(gen_crds::Options),
    /// Bring up the demo: a cluster of network namespaces (two nodes on an underlay by default,
    /// one agent each), pods frontend, api and db spread over them, the example policies;
    /// print which connections pass and which are dropped, and why.
    Up(demo::UpOptions),
    /// Remove the demo: processes, CNI attachments, namespaces, pinned objects, files.
    Down,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup(opts) => setup::run(&opts),
        Command::Build(opts) => build::run(&opts),
        Command::Bench(opts) => bench::run(&opts),
        Command::Chaos(opts) => chaos::run(&opts),
        Command::Test(opts) => test::run(&opts),
        Command::VmTest(opts) => vm::run(&opts),
        Command::GenCrds(opts) => gen_crds::run(&opts),
        Command::Deny(opts) => deny::run(&opts),
        Command::Up(opts) => demo::up(&opts),
        Command::Down => demo::down(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_passes_everything_after_the_separator_to_cargo_test() {
        let cli = Cli::try_parse_from([
            "xtask",
            "test",
            "--",
            "-p",
            "weft-tests",
            "--",
            "--nocapture",
        ])
        .expect("parses");
        let Command::Test(opts) = cli.command else {
            panic!("not the test command")
        };
        assert_eq!(opts.cargo_args, ["-p", "weft-tests", "--", "--nocapture"]);
    }

    #[test]
    fn build_release_flag() {
        let cli = Cli::try_parse_from(["xtask", "build", "--release"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Build(build::Options { release: true })
        ));
    }
}
