//! `cargo xtask vm-test`: the integration tests on several kernels.
//!
//! The host kernel runs the suite natively; Debian's 6.1 and 6.12 kernels run it in qemu
//! through virtme-ng, which shows the guest the host's filesystem read-only (with tmpfs
//! overlays), so the guest runs the very test binaries and agent the host just built. Each
//! row streams its console to the terminal, keeps it in `target/vm/logs/<row>.log`, and ends
//! at a deadline that kills the VM. One more row boots 6.1 with the clsact qdisc's module
//! blacklisted and checks that the agent refuses to start with a clear message.

mod kernels;
mod runner;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use crate::{build, cmd, setup};

/// Packages for booting kernels: qemu, virtme-ng's needs (busybox, kmod, udev), the venv
/// virtme-ng is installed into, and the decompressors for extracting vmlinux.
const VM_APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "udev",
    "python3-venv",
    "xz-utils",
    "zstd",
];

const VIRTME_NG_VERSION: &str = "1.42";

/// Modules the datapath and tests need; Debian builds them as modules.
const GUEST_MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf", "tun"];

/// Modules the guest must not load: udev would spend seconds on them under TCG, and kvm's
/// would try nested virtualisation.
const BOOT_BLACKLIST: &[&str] = &[
    "kvm",
    "kvm_amd",
    "kvm_intel",
    "ccp",
    "ahci",
    "libahci",
    "libata",
    "sr_mod",
    "cdrom",
    "psmouse",
    "iTCO_wdt",
    "i2c_i801",
    "lpc_ich",
    "pcspkr",
    "serio_raw",
    "evdev",
    "aesni_intel",
    "sha512_ssse3",
    "sha256_ssse3",
    "sha1_ssse3",
    "ghash_clmulni_intel",
    "crc32_pclmul",
    "crct10dif_pclmul",
    "powernow_k8",
    "acpi_cpufreq",
];

/// The test that proves a missing kernel feature is refused clearly (it is `#[ignore]`d
/// elsewhere because only a kernel without the clsact qdisc can run it).
const REFUSAL_TEST_BINARY: &str = "kernel";
const REFUSAL_TEST: &str = "agent_refuses_to_start_without_clsact";
/// Boot plus one agent start; far less than a suite.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KernelChoice {
    /// The kernel this machine runs, natively.
    Host,
    /// Debian's newest linux-image-6.1.0-*-amd64-unsigned, in a VM.
    #[value(name = "6.1")]
    V6_1,
    /// Debian's newest linux-image-6.12.*+deb12-amd64-unsigned, in a VM.
    #[value(name = "6.12")]
    V6_12,
    /// host, 6.1 and 6.12.
    All,
}

#[derive(Debug, Args)]
pub struct Options {
    /// Kernels to test on (comma-separated or repeated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    pub kernel: Vec<KernelChoice>,
    /// Integration test binaries to run (default: all of weft-tests), e.g. `--test policy`.
    #[arg(long = "test", value_name = "NAME")]
    pub tests: Vec<String>,
    /// Per-row deadline in seconds; the VM is killed and the running test reported.
    #[arg(long, default_value_t = 1200)]
    pub timeout: u64,
    /// Ask apt for newer kernels instead of using the cached ones.
    #[arg(long)]
    pub refresh: bool,
    /// Use the binaries already built.
    #[arg(long)]
    pub skip_build: bool,
    /// Arguments for every test binary (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

/// One line of the matrix.
struct Row {
    name: String,
    boot: Boot,
    /// Test binaries and their arguments.
    runs: Vec<(String, PathBuf, Vec<String>)>,
    modules: Vec<&'static str>,
    /// A deadline shorter than `--timeout`, for rows that run a single short test.
    timeout: Option<Duration>,
}

enum Boot {
    Native,
    Vm {
        kernel: kernels::Kernel,
        blacklist: Vec<&'static str>,
    },
}

struct RowResult {
    name: String,
    outcome: runner::Outcome,
    /// Why the row failed, when it did.
    failure: Option<String>,
    native: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let choices = expand(&opts.kernel);
    let wants_vm = choices.iter().any(|c| *c != KernelChoice::Host);
    setup::run(&setup::Options::default())?;
    let vng = if wants_vm {
        setup::ensure_apt_packages(VM_APT_PACKAGES).context("installing the VM packages")?;
        Some(virtme_ng().context("providing virtme-ng")?)
    } else {
        None
    };
    if !opts.skip_build {
        build::run(&build::Options { release: false })?;
    }
    let binaries = test_binaries(&opts.tests)?;
    let root = cmd::workspace_root();
    let vm_dir = root.join("target/vm");
    let logs = vm_dir.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;

    let mut user_args: Vec<String> = vec!["--test-threads".into(), "1".into()];
    user_args.extend(opts.test_args.iter().cloned());
    let suite: Vec<(String, PathBuf, Vec<String>)> = binaries
        .iter()
        .map(|(name, path)| (name.clone(), path.clone(), user_args.clone()))
        .collect();

    let mut rows = Vec::new();
    for choice in &choices {
        match choice {
            KernelChoice::Host => rows.push(Row {
                name: format!("host {}", host_release()),
                boot: Boot::Native,
                runs: suite.clone(),
                modules: Vec::new(),
                timeout: None,
            }),
            KernelChoice::V6_1 | KernelChoice::V6_12 => {
                let series = if *choice == KernelChoice::V6_1 {
                    kernels::LINUX_6_1
                } else {
                    kernels::LINUX_6_12
                };
                let kernel = kernels::ensure(series, &vm_dir.join("kernels"), opts.refresh)?;
                rows.push(Row {
                    name: kernel.release.clone(),
                    boot: Boot::Vm {
                        kernel: kernel.clone(),
                        blacklist: BOOT_BLACKLIST.to_vec(),
                    },
                    runs: suite.clone(),
                    modules: GUEST_MODULES.to_vec(),
                    timeout: None,
                });
                // Kernels before 6.6 attach through clsact; without it the agent must refuse.
                let refusal_binary = binaries.iter().find(|(n, _)| n == REFUSAL_TEST_BINARY);
                if *choice == KernelChoice::V6_1
                    && opts.test_args.is_empty()
                    && let Some((name, path)) = refusal_binary
                {
                    let mut blacklist = BOOT_BLACKLIST.to_vec();
                    blacklist.push("sch_ingress");
                    rows.push(Row {
                        name: format!("{} without sch_ingress", kernel.release),
                        boot: Boot::Vm { kernel, blacklist },
                        runs: vec![(
                            name.clone(),
                            path.clone(),
                            vec!["--ignored".into(), "--exact".into(), REFUSAL_TEST.into()],
                        )],
                        modules: GUEST_MODULES
                            .iter()
                            .copied()
                            .filter(|m| *m != "sch_ingress")
                            .collect(),
                        timeout: Some(REFUSAL_TIMEOUT.min(Duration::from_secs(opts.timeout))),
                    });
                }
            }
            KernelChoice::All => unreachable!("expanded"),
        }
    }

    let mut results = Vec::new();
    for row in &rows {
        let slug = slug(&row.name);
        let script = vm_dir.join(format!("{slug}.sh"));
        fs::write(&script, guest_script(row))
            .with_context(|| format!("writing {}", script.display()))?;
        let log = logs.join(format!("{slug}.log"));
        eprintln!("\n=== vm-test: {} (log: {}) ===", row.name, log.display());
        let command = match &row.boot {
            Boot::Native => {
                let mut c = Command::new("sh");
                c.arg(&script).current_dir(&root);
                c
            }
            Boot::Vm { kernel, blacklist } => vm_command(
                vng.as_deref().context("virtme-ng was not set up")?,
                kernel,
                blacklist,
                &script,
                &root,
            ),
        };
        let timeout = row.timeout.unwrap_or(Duration::from_secs(opts.timeout));
        let outcome = runner::run(command, &log, timeout)?;
        let failure = judge(&outcome, row.runs.len(), timeout);
        if let Some(why) = &failure {
            eprintln!("=== vm-test: {}: {why} ===", row.name);
        }
        results.push(RowResult {
            name: row.name.clone(),
            outcome,
            failure,
            native: matches!(row.boot, Boot::Native),
        });
    }

    let table = summary(&results);
    println!("\n{table}");
    fs::write(logs.join("summary.txt"), &table)?;
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| r.failure.is_some())
        .map(|r| r.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("vm-test failed on: {}", failed.join(", "));
    }
    Ok(())
}

fn expand(choices: &[KernelChoice]) -> Vec<KernelChoice> {
    let mut out = Vec::new();
    for c in choices {
        let add: &[KernelChoice] = match c {
            KernelChoice::All => &[KernelChoice::Host, KernelChoice::V6_1, KernelChoice::V6_12],
            one => std::slice::from_ref(one),
        };
        for a in add {
            if !out.contains(a) {
                out.push(*a);
            }
        }
    }
    out
}

/// Why a row failed: its exit status, missing results, a timeout (naming the test), or a
/// process left behind.
fn judge(outcome: &runner::Outcome, binaries: usize, timeout: Duration) -> Option<String> {
    let p = &outcome.progress;
    let Some(status) = outcome.status else {
        let test = match (&p.binary, &p.running) {
            (Some(b), Some(t)) => format!("{b}::{t}"),
            (None, Some(t)) => t.clone(),
            (Some(b), None) => format!("{b} (between tests)"),
            (None, None) => "before any test started (boot?)".to_string(),
        };
        return Some(format!(
            "timed out after {}s, killed; running: {test}",
            timeout.as_secs()
        ));
    };
    if !status.success() {
        let mut why = format!("exit status {}", status.code().unwrap_or(-1));
        if !p.failed_tests.is_empty() {
            let _ = write!(why, "; failed: {}", p.failed_tests.join(", "));
        }
        return Some(why);
    }
    if (p.result_lines as usize) < binaries {
        return Some(format!(
            "{} of {binaries} test binaries reported results",
            p.result_lines
        ));
    }
    if outcome.leftovers_killed > 0 {
        return Some(format!(
            "{} processes outlived the run and were killed",
            outcome.leftovers_killed
        ));
    }
    None
}

fn summary(results: &[RowResult]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<36} {:>7} {:>7} {:>7} {:>8} {:>8}  result",
        "kernel", "boot", "passed", "failed", "skipped", "wall"
    );
    for r in results {
        let p = &r.outcome.progress;
        let boot = if r.native {
            "native".to_string()
        } else {
            p.ready_after
                .map_or("-".to_string(), |d| format!("{:.1}s", d.as_secs_f64()))
        };
        let wall = r.outcome.wall.as_secs();
        let _ = writeln!(
            t,
            "{:<36} {:>7} {:>7} {:>7} {:>8} {:>8}  {}",
            r.name,
            boot,
            p.passed,
            p.failed,
            p.skipped,
            format!("{}m{:02}s", wall / 60, wall % 60),
            r.failure.as_deref().unwrap_or("ok"),
        );
    }
    t
}

/// The script a row runs (in the guest, or natively): prepare the kernel, then run each
/// test binary in turn; its exit status is the first failing binary's.
fn guest_script(row: &Row) -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         # Written by `cargo xtask vm-test`; regenerated on every run.\n\
         set -u\n",
    );
    let _ = writeln!(
        s,
        "echo \"{} after $(cut -d' ' -f1 /proc/uptime)s of uptime, Linux $(uname -r)\"",
        runner::READY_MARKER
    );
    if !row.modules.is_empty() {
        // virtme-ng mounts neither bpffs nor cgroup2, and loads no modules by itself.
        s.push_str(
            "grep -qs ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf\n\
             grep -qs ' /sys/fs/cgroup cgroup2 ' /proc/mounts || mount -t cgroup2 none /sys/fs/cgroup\n\
             mkdir -p /var/run/netns\n",
        );
        let _ = writeln!(
            s,
            "for m in {}; do modprobe \"$m\" || echo \"weft-vm: module $m did not load\"; done",
            row.modules.join(" ")
        );
    }
    // The harness runs the reference plugins from here; the guest sees the host's copy.
    let _ = writeln!(
        s,
        "for p in loopback ptp host-local; do [ -x {dir}/$p ] || echo \"weft-vm: CNI plugin {dir}/$p missing\"; done",
        dir = weft_tests::CNI_PLUGIN_DIR
    );
    s.push_str("export RUST_BACKTRACE=1\nstatus=0\n");
    for (name, path, args) in &row.runs {
        let _ = writeln!(s, "echo 'weft-vm: running {name}'");
        let _ = writeln!(
            s,
            "{} {}\nrc=$?; [ \"$status\" -ne 0 ] || status=$rc",
            shell_quote(&path.to_string_lossy()),
            args.iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    s.push_str("echo \"weft-vm: finished, status $status\"\nexit \"$status\"\n");
    s
}

fn vm_command(
    vng: &Path,
    kernel: &kernels::Kernel,
    blacklist: &[&str],
    script: &Path,
    root: &Path,
) -> Command {
    let mut c = Command::new(vng.join("vng"));
    // vng starts virtme-run through PATH.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![vng.to_path_buf()];
    paths.extend(std::env::split_paths(&path));
    c.env(
        "PATH",
        std::env::join_paths(paths).expect("PATH entries without ':'"),
    );
    c.arg("--run").arg(&kernel.image);
    if !kvm_usable() {
        c.arg("--disable-kvm");
    }
    c.args(["--force-9p", "--cpus", "2", "--memory", "2G"])
        .arg("--append")
        .arg(format!("modprobe.blacklist={}", blacklist.join(",")))
        .arg("--exec")
        .arg(format!("sh {}", shell_quote(&script.to_string_lossy())))
        .current_dir(root);
    c
}

/// KVM works for qemu unless /dev/kvm is missing or is the nested PVM kind, on which qemu
/// aborts (see the VM-MATRIX notes); then qemu emulates (TCG). `WEFT_VM_ACCEL=tcg|kvm` decides.
fn kvm_usable() -> bool {
    match std::env::var("WEFT_VM_ACCEL").as_deref() {
        Ok("tcg") => return false,
        Ok("kvm") => return true,
        _ => {}
    }
    let writable = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    writable && !Path::new("/sys/module/kvm_pvm").exists()
}

/// virtme-ng in its own venv under `~/.cache/weft`, installed once; returns its `bin`.
fn virtme_ng() -> anyhow::Result<PathBuf> {
    let venv = setup::home()?
        .join(".cache/weft")
        .join(format!("virtme-ng-{VIRTME_NG_VERSION}"));
    // Written last: a venv whose install was interrupted is never used.
    let complete = venv.join(".weft-complete");
    let bin = venv.join("bin");
    if complete.exists() {
        eprintln!("vm-test: virtme-ng {VIRTME_NG_VERSION} present");
        return Ok(bin);
    }
    let _ = fs::remove_dir_all(&venv);
    cmd::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    cmd::run(
        Command::new(bin.join("pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")),
    )?;
    fs::write(&complete, "")?;
    Ok(bin)
}

/// The integration test binaries of weft-tests, built now: (target name, executable).
fn test_binaries(only: &[String]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut cargo = cmd::cargo();
    cargo.args([
        "test",
        "-p",
        "weft-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    let out = cmd::output(&mut cargo)?;
    let mut found = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        if only.is_empty() || only.iter().any(|o| o == name) {
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    for o in only {
        if !found.iter().any(|(n, _)| n == o) {
            bail!("weft-tests has no test binary named {o}");
        }
    }
    found.sort();
    Ok(found)
}

fn host_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// A file-name-safe form of a row's name.
fn slug(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `s` as one POSIX shell word.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=+:,".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_means_host_and_both_vm_kernels_once() {
        assert_eq!(
            expand(&[KernelChoice::V6_1, KernelChoice::All]),
            [KernelChoice::V6_1, KernelChoice::Host, KernelChoice::V6_12]
        );
    }

    #[test]
    fn shell_quoting_keeps_words_whole() {
        assert_eq!(
            shell_quote("target/debug/policy-1f"),
            "target/debug/policy-1f"
        );
        assert_eq!(shell_quote("it's a test"), r"'it'\''s a test'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn guest_script_runs_each_binary_and_keeps_the_first_failure() {
        let row = Row {
            name: "6.1.0-56-amd64".into(),
            boot: Boot::Native,
            runs: vec![
                (
                    "cni".into(),
                    "/t/cni-1".into(),
                    vec!["--test-threads".into(), "1".into()],
                ),
                ("policy".into(), "/t/policy-2".into(), vec!["a b".into()]),
            ],
            modules: vec!["veth"],
            timeout: None,
        };
        let script = guest_script(&row);
        assert!(script.contains("/t/cni-1 --test-threads 1\n"));
        assert!(script.contains("/t/policy-2 'a b'\n"));
        assert!(script.contains("for m in veth; do modprobe"));
        assert!(script.ends_with("exit \"$status\"\n"));
        // The script is valid sh.
        assert!(cmd::succeeds(
            Command::new("sh").args(["-n", "-c", &script])
        ));
    }
}
