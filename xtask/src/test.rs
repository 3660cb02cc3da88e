//! `cargo xtask test`: setup, build the agent binaries the integration tests spawn, run the tests.

use clap::Args;

use crate::{build, cmd, setup};

#[derive(Debug, Args)]
pub struct Options {
    /// Extra arguments for `cargo test` (after `--`), e.g. `-- -p weft-tests --test harness`;
    /// `--workspace` is added unless they pick packages with `-p`.
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    setup::run(&setup::Options::default())?;
    // The integration tests (tests/) spawn weft-agent, weft and weft-cni from the target dir.
    build::run(&build::Options { release: false })?;
    let mut cargo = cmd::cargo();
    cargo.arg("test");
    // `-p <crate>` narrows the run; otherwise test everything.
    let picks_packages = opts
        .cargo_args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-p" || a.starts_with("--package"));
    if !picks_packages {
        cargo.arg("--workspace");
    }
    cargo.args(&opts.cargo_args);
    cmd::run(&mut cargo)
}
