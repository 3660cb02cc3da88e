//! Developer tasks for weft: `cargo xtask <command>`.
//!
//! One module per command. eBPF build logic does not live here: the agent's `build.rs` builds
//! the eBPF object, so `build` and `test` only drive cargo.

#![forbid(unsafe_code)]

mod build;
mod cmd;
mod gen_crds;
mod setup;
mod test;

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
    /// Set up, build the agent binaries, then run the whole workspace's tests.
    Test(test::Options),
    /// Regenerate `crds/` from the policy model (`--check`: fail when stale).
    GenCrds(gen_crds::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup(opts) => setup::run(&opts),
        Command::Build(opts) => build::run(&opts),
        Command::Test(opts) => test::run(&opts),
        Command::GenCrds(opts) => gen_crds::run(&opts),
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
