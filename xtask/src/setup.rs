//! `cargo xtask setup`: make a fresh Debian machine ready to build and test weft.
//!
//! Idempotent and cheap when nothing is missing: each step checks first and only then acts.
//! Steps: apt packages (with Debian's non-free component for netperf), rustfmt and clippy,
//! `rust-src` for the nightly toolchain, bpf-linker built against nightly's own libLLVM
//! (cached per LLVM major and nightly commit), and bpffs mounted at `/sys/fs/bpf`.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::Args;

use crate::cmd;

/// Debian packages the build, the tests, the demo and the benchmarks use.
const APT_PACKAGES: &[&str] = &[
    "containernetworking-plugins",
    "bpftool",
    "iproute2",
    "iptables",
    "socat",
    "curl",
    "nghttp2-client",
    "nginx",
    "wrk",
    "iputils-ping",
    "netperf",
    "iperf3",
    "procps",
    "python3",
    "util-linux",
    "kmod",
    // The WireGuard tests and bench: `wg` configures wireguard-go and reads weft's UAPI
    // socket; tcpdump checks that the underlay carries only WireGuard.
    "wireguard-tools",
    "tcpdump",
];

/// The wireguard-go the interop test and the bench compare against: bookworm-backports'
/// 0.0.20231211, which has upstream's UDP GSO/GRO and TUN offload batching (bookworm's own
/// 0.0.20220316 has neither). Its binary still says v0.0.20230223 in `--version`.
const WIREGUARD_GO: &str = "wireguard-go";

/// Our apt source for Debian's non-free component (netperf lives there).
const NON_FREE_SOURCES: &str = "/etc/apt/sources.list.d/weft-non-free.sources";
/// The name a by-hand set-up used on some machines; treated as equivalent.
const NON_FREE_SOURCES_ALT: &str = "/etc/apt/sources.list.d/weft-nonfree.sources";

const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/weft-backports.sources";
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, Default, Args)]
pub struct Options {
    /// Skip the apt step (for machines where packages are managed elsewhere).
    #[arg(long)]
    pub skip_apt: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if opts.skip_apt {
        eprintln!("setup: apt packages skipped (--skip-apt)");
    } else {
        ensure_apt_packages(APT_PACKAGES).context("installing apt packages")?;
        backports_wireguard_go().context("installing wireguard-go from backports")?;
    }
    stable_components().context("installing rustfmt and clippy")?;
    nightly_rust_src().context("installing rust-src for the nightly toolchain")?;
    bpf_linker().context("providing bpf-linker")?;
    mount_bpffs().context("mounting bpffs")?;
    eprintln!("setup: done");
    Ok(())
}

// === apt ===

/// Install those of `packages` that are missing (root only; a no-op when none are).
pub fn ensure_apt_packages(packages: &[&'static str]) -> anyhow::Result<()> {
    ensure_apt_packages_from(packages, None)
}

/// [`ensure_apt_packages`] from `target_release` (`apt-get -t`), e.g. `bookworm-backports`.
pub fn ensure_apt_packages_from(
    packages: &[&'static str],
    target_release: Option<&str>,
) -> anyhow::Result<()> {
    let missing = missing_packages(packages)?;
    if missing.is_empty() {
        eprintln!("setup: apt packages present");
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    if !is_root() {
        bail!(
            "packages missing ({}) and not running as root; run `cargo xtask setup` as root",
            missing.join(" ")
        );
    }
    if missing.contains(&"netperf") {
        ensure_non_free_source()?;
    }
    cmd::run(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let mut install = Command::new("apt-get");
    install.args(["install", "-y", "-q", "--no-install-recommends"]);
    if let Some(release) = target_release {
        install.args(["-t", release]);
    }
    cmd::run(
        install
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Install wireguard-go from backports unless the installed one came from there.
///
/// The host's apt sources are not changed: when they lack the backports suite, apt runs
/// with a private configuration under `target/apt-backports` (its own sources list naming
/// this release and its backports, its own package lists and cache; the host's dpkg
/// status, since this installs), as `vm/kernels.rs` does for other releases' kernels.
fn backports_wireguard_go() -> anyhow::Result<()> {
    if installed_version(WIREGUARD_GO).is_some_and(|v| v.contains("bpo")) {
        eprintln!("setup: wireguard-go (backports) present");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "wireguard-go from backports missing and not running as root; run `cargo xtask setup` as root"
        );
    }
    let codename = os_release_codename()?;
    let suite = format!("{codename}-backports");
    let options = if apt_sources_text().split_whitespace().any(|w| w == suite) {
        Vec::new()
    } else {
        let dir = cmd::workspace_root().join("target/apt-backports");
        eprintln!(
            "setup: {suite} is not in the host's apt sources: using a private apt \
             configuration in {} (the host's sources stay as they are)",
            dir.display()
        );
        private_apt(&dir, &codename)?
    };
    cmd::run(
        Command::new("apt-get")
            .args(&options)
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    cmd::run(
        Command::new("apt-get")
            .args(&options)
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "-t",
                &suite,
                WIREGUARD_GO,
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// `-o` options for apt with its own sources (`release` and `release`-backports, main),
/// lists and cache under `dir`.
fn private_apt(dir: &Path, release: &str) -> anyhow::Result<Vec<String>> {
    for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
        fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    let mirror = "http://deb.debian.org/debian";
    let sources = dir.join("sources.list");
    fs::write(
        &sources,
        format!(
            "deb [signed-by={keyring}] {mirror} {release} main\n\
             deb [signed-by={keyring}] {mirror} {release}-backports main\n"
        ),
    )
    .with_context(|| format!("writing {}", sources.display()))?;
    let path = |p: PathBuf| p.to_string_lossy().into_owned();
    Ok([
        ("Dir::Etc::SourceList", path(sources)),
        ("Dir::Etc::SourceParts", path(dir.join("sources.list.d"))),
        ("Dir::State::Lists", path(dir.join("lists"))),
        ("Dir::Cache", path(dir.join("cache"))),
        ("APT::Sandbox::User", "root".to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| ["-o".to_string(), format!("{k}={v}")])
    .collect())
}

/// The version of an installed package, `None` when it is not installed.
pub fn installed_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version} ${db:Status-Status}", package])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (version, status) = text.trim().split_once(' ')?;
    (status == "installed").then(|| version.to_owned())
}

/// Add Debian's backports suite for this release unless an apt source has it already;
/// returns the suite name (`bookworm-backports`).
pub fn ensure_backports_source() -> anyhow::Result<String> {
    let codename = os_release_codename()?;
    let suite = format!("{codename}-backports");
    if apt_sources_text().split_whitespace().any(|w| w == suite) {
        return Ok(suite);
    }
    let text = format!(
        "# Added by `cargo xtask setup` (weft): wireguard-go (and the qemu matching a \
         backports qemu-utils) come from backports.\n\
         Types: deb\n\
         URIs: http://deb.debian.org/debian\n\
         Suites: {suite}\n\
         Components: main\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    );
    fs::write(BACKPORTS_SOURCES, text).with_context(|| format!("writing {BACKPORTS_SOURCES}"))?;
    eprintln!("setup: added {BACKPORTS_SOURCES}");
    Ok(suite)
}

fn missing_packages(packages: &[&'static str]) -> anyhow::Result<Vec<&'static str>> {
    // dpkg-query exits 1 when some package is unknown, but still prints the known ones.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Status}\\n"])
        .args(packages)
        .output()
        .context("running dpkg-query (is this a Debian-based system?)")?;
    let listing = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, status)| *status == "installed")
        .map(|(name, _)| name)
        .collect();
    Ok(packages
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect())
}

/// Add Debian's non-free component unless some apt source already has it.
fn ensure_non_free_source() -> anyhow::Result<()> {
    if Path::new(NON_FREE_SOURCES).exists() || Path::new(NON_FREE_SOURCES_ALT).exists() {
        return Ok(());
    }
    if apt_sources_text()
        .split_whitespace()
        .any(|w| w == "non-free")
    {
        return Ok(());
    }
    let codename = os_release_codename()?;
    let text = format!(
        "# Added by `cargo xtask setup` (weft): netperf is in Debian's non-free component.\n\
         Types: deb\n\
         URIs: http://deb.debian.org/debian\n\
         Suites: {codename}\n\
         Components: non-free\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    );
    fs::write(NON_FREE_SOURCES, text).with_context(|| format!("writing {NON_FREE_SOURCES}"))?;
    eprintln!("setup: added {NON_FREE_SOURCES}");
    Ok(())
}

fn apt_sources_text() -> String {
    let mut text = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        for entry in dir.flatten() {
            let path = entry.path();
            let is_source = path
                .extension()
                .is_some_and(|e| e == "list" || e == "sources");
            if is_source {
                text.push('\n');
                text.push_str(&fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    // Drop comments so a commented-out line does not count.
    text.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn os_release_codename() -> anyhow::Result<String> {
    let text = fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .context("/etc/os-release has no VERSION_CODENAME")
}

pub fn is_root() -> bool {
    cmd::output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

// === toolchains ===

/// `.ci/run` runs `cargo fmt` and `cargo clippy`; a minimal rustup profile lacks both.
fn stable_components() -> anyhow::Result<()> {
    let fmt = cmd::succeeds(Command::new("cargo").args(["fmt", "--version"]));
    let clippy = cmd::succeeds(Command::new("cargo").args(["clippy", "--version"]));
    if fmt && clippy {
        eprintln!("setup: rustfmt and clippy present");
        return Ok(());
    }
    cmd::run(Command::new("rustup").args(["component", "add", "rustfmt", "clippy"]))
}

fn nightly_rust_src() -> anyhow::Result<()> {
    if !cmd::succeeds(Command::new("rustc").args(["+nightly", "-V"])) {
        eprintln!("setup: installing the nightly toolchain");
        return cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
            "--component",
            "clippy",
            "--component",
            "rustfmt",
        ]));
    }
    let sysroot = nightly_sysroot()?;
    let has_src = sysroot.join("lib/rustlib/src/rust/library/core").is_dir();
    // CI lints and formats the eBPF crate with the nightly toolchain too.
    let has_clippy = cmd::succeeds(Command::new("cargo").args(["+nightly", "clippy", "--version"]));
    let has_fmt = cmd::succeeds(Command::new("cargo").args(["+nightly", "fmt", "--version"]));
    if has_src && has_clippy && has_fmt {
        eprintln!("setup: nightly rust-src, clippy and rustfmt present");
        return Ok(());
    }
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "clippy",
        "rustfmt",
        "--toolchain",
        "nightly",
    ]))
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let out = cmd::output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    Ok(PathBuf::from(out.trim()))
}

// === bpf-linker ===

/// What the cache key of a bpf-linker build is made of.
struct NightlyLlvm {
    major: String,
    commit_short: String,
    /// The nightly's own `libLLVM.so.<version>` file.
    lib: PathBuf,
}

fn nightly_llvm() -> anyhow::Result<NightlyLlvm> {
    let info = cmd::output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .with_context(|| format!("`rustc +nightly -vV` prints no `{name}`"))
    };
    let llvm = field("LLVM version:")?;
    let major = llvm.split('.').next().unwrap_or_default().to_string();
    let commit = field("commit-hash:")?;
    let commit_short: String = commit.chars().take(9).collect();
    let libdir = nightly_sysroot()?.join("lib");
    let lib = fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .min()
        .with_context(|| format!("no libLLVM.so.* in {}", libdir.display()))?;
    Ok(NightlyLlvm {
        major,
        commit_short,
        lib,
    })
}

pub fn home() -> anyhow::Result<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set")
}

fn cargo_home() -> anyhow::Result<PathBuf> {
    match std::env::var_os("CARGO_HOME") {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => Ok(home()?.join(".cargo")),
    }
}

fn bpf_linker() -> anyhow::Result<()> {
    let llvm = nightly_llvm()?;
    let cache = home()?.join(".cache/weft").join(format!(
        "bpf-linker-llvm{}-{}",
        llvm.major, llvm.commit_short
    ));
    let binary = cache.join("bin/bpf-linker");
    let prefix_lib = cache.join("llvm-prefix/lib");

    // The links are cheap: refresh them every time so a moved toolchain heals itself.
    link_libllvm(&llvm.lib, &prefix_lib)?;

    if cmd::succeeds(Command::new(&binary).arg("--version")) {
        eprintln!("setup: bpf-linker cached at {}", binary.display());
    } else {
        eprintln!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {} of the nightly \
             toolchain (about 70-100 s, once)",
            llvm.major
        );
        let mut install = Command::new("cargo");
        install
            .args(["install", "bpf-linker", "--locked", "--force"])
            .args(["--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{}", llvm.major))
            .arg("--root")
            .arg(&cache)
            .env("LLVM_PREFIX", cache.join("llvm-prefix"))
            // Let cargo install use its own temporary target dir.
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO");
        cmd::run(&mut install)?;
        if !cmd::succeeds(Command::new(&binary).arg("--version")) {
            bail!("the freshly built {} does not run", binary.display());
        }
    }

    // Point cargo's bin dir at the cached binary (replacing any older link or file there).
    let bin_dir = cargo_home()?.join("bin");
    fs::create_dir_all(&bin_dir)?;
    let link = bin_dir.join("bpf-linker");
    if fs::read_link(&link).ok().as_deref() != Some(binary.as_path()) {
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        symlink(&binary, &link).with_context(|| format!("linking {}", link.display()))?;
        eprintln!("setup: {} -> {}", link.display(), binary.display());
    }
    Ok(())
}

/// `llvm-prefix/lib/libLLVM.so` (for bpf-linker's build) and `llvm-prefix/lib/<soname>` (the
/// built binary's RUNPATH points here and it asks for the soname) both point at nightly's lib.
fn link_libllvm(lib: &Path, prefix_lib: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(prefix_lib).with_context(|| format!("creating {}", prefix_lib.display()))?;
    let file_name = lib
        .file_name()
        .context("libLLVM path has no file name")?
        .to_string_lossy()
        .into_owned();
    let soname = soname(lib).unwrap_or_else(|| file_name.clone());
    let mut names = vec!["libLLVM.so".to_string(), soname];
    if !names.contains(&file_name) {
        names.push(file_name);
    }
    for name in names {
        let link = prefix_lib.join(&name);
        if fs::read_link(&link).ok().as_deref() == Some(lib) {
            continue;
        }
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link)?;
        }
        symlink(lib, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(())
}

/// The `DT_SONAME` of a shared library, via `readelf` when it is installed.
fn soname(lib: &Path) -> Option<String> {
    let out = cmd::output(Command::new("readelf").arg("-d").arg(lib)).ok()?;
    out.lines()
        .find(|l| l.contains("(SONAME)"))
        .and_then(|l| l.split('[').nth(1))
        .and_then(|s| s.split(']').next())
        .map(str::to_string)
}

// === bpffs ===

fn mount_bpffs() -> anyhow::Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, target, fstype) = (f.next(), f.next(), f.next());
        target == Some(BPFFS) && fstype == Some("bpf")
    });
    if mounted {
        eprintln!("setup: bpffs mounted at {BPFFS}");
        return Ok(());
    }
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}
