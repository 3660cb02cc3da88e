//! `cargo xtask build`: build the agent crate; its `build.rs` builds and embeds the eBPF object.

use clap::Args;

use crate::cmd;

#[derive(Debug, Args)]
pub struct Options {
    /// Build with the release profile.
    #[arg(long)]
    pub release: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let mut cargo = cmd::cargo();
    cargo.args(["build", "-p", "weft-agent", "--bins"]);
    if opts.release {
        cargo.arg("--release");
    }
    cmd::run(&mut cargo)
}
