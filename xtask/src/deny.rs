//! `cargo xtask deny`: licences, bans and sources of every dependency with cargo-deny
//! (`deny.toml`), installed once into weft's cache. Advisories need the `RustSec` database,
//! which is fetched from GitHub: `--advisories` adds that check where GitHub is reachable.

use std::process::Command;

use anyhow::Context;
use clap::Args;

use crate::{cmd, setup};

const CARGO_DENY_VERSION: &str = "0.20.2";

#[derive(Debug, Args)]
pub struct Options {
    /// Also check the `RustSec` advisories (needs access to GitHub).
    #[arg(long)]
    pub advisories: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let root = setup::home()?
        .join(".cache/weft")
        .join(format!("cargo-deny-{CARGO_DENY_VERSION}"));
    let binary = root.join("bin/cargo-deny");
    if !cmd::succeeds(Command::new(&binary).arg("--version")) {
        eprintln!("deny: installing cargo-deny {CARGO_DENY_VERSION} (a few minutes, once)");
        cmd::run(
            Command::new("cargo")
                .args(["install", "cargo-deny", "--locked", "--force"])
                .args(["--version", CARGO_DENY_VERSION])
                .arg("--root")
                .arg(&root),
        )
        .context("installing cargo-deny")?;
    }
    let mut check = Command::new(&binary);
    check
        .current_dir(cmd::workspace_root())
        .args(["check", "licenses", "bans", "sources"]);
    if opts.advisories {
        check.arg("advisories");
    }
    cmd::run(&mut check)
}
