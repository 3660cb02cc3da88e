//! `cargo xtask build`: build the binaries a node runs — `weft-agent` (its `build.rs` builds and
//! embeds the eBPF object), `weft` and `weft-cni`.

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
    cargo.args([
        "build",
        "-p",
        "weft-agent",
        "-p",
        "weft-cli",
        "-p",
        "weft-cni",
        "--bins",
    ]);
    if opts.release {
        cargo.arg("--release");
    }
    cmd::run(&mut cargo)
}
