//! `cargo xtask gen-crds [--check]`: write the CRD YAML generated from the policy model's
//! kube-derive types into `crds/`; with `--check`, fail when the checked-in files are stale.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;

#[derive(Debug, Args)]
pub struct Options {
    /// Only compare; exit non-zero when `crds/` differs from the model.
    #[arg(long)]
    pub check: bool,
}

fn crds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds")
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let dir = crds_dir();
    let crds = weft_policy::model::crd_yamls().context("generating CRD YAML")?;
    let mut stale = Vec::new();
    for (name, yaml) in crds {
        let text = format!(
            "# Generated from agent/policy/src/model.rs by `cargo xtask gen-crds`; do not edit.\n{yaml}"
        );
        let path = dir.join(format!("{name}.yaml"));
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current == text {
            continue;
        }
        if opts.check {
            stale.push(path.display().to_string());
        } else {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    if !stale.is_empty() {
        bail!(
            "CRDs are stale (run `cargo xtask gen-crds` and commit): {}",
            stale.join(", ")
        );
    }
    Ok(())
}
