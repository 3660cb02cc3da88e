//! `cargo xtask vm-test`: the integration tests on several kernels.
//!
//! The host kernel runs the suite natively; Debian's 5.10, 6.1 and 6.12 kernels run it in qemu
//! through virtme-ng, which shows the guest the host's filesystem read-only (with tmpfs
//! overlays), so the guest runs the very test binaries and agent the host just built. Each
//! row streams its console to the terminal, keeps it in `target/vm/logs/<row>.log`, and ends
//! at a deadline that kills the VM. One more row boots 6.1 with the clsact qdisc's module
//! blacklisted and checks that the agent refuses to start with a clear message.

mod kernels;
mod runner;

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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

/// What each VM row runs by default: the tests whose outcome depends on the kernel (loading
/// and attaching the datapath, its verdicts on real packets, pinned state across restarts,
/// map types and helpers), as (test binary, exact test names). Everything else (file parsing,
/// API bounds, CNI argument handling, the harness) is agent logic the host row proves once.
/// `--test` or arguments after `--` replace this table with the given selection on every row.
pub const VM_ROW_TESTS: &[(&str, &[&str])] = &[
    // The probes and the attach mode the agent chose on this kernel.
    ("kernel", &["status_reports_kernel_features"]),
    // Every datapath test: conntrack, revocation, ICMP errors, fragments, spoofing, the
    // ring buffer's drop reports.
    (
        "datapath",
        &[
            "revoked_access_stops_established_flows_in_both_directions",
            "icmp_errors_of_a_flow_reach_an_isolated_pod_and_path_mtu_discovery_works",
            "icmp_errors_for_flows_that_do_not_exist_are_no_way_in",
            "fragmented_datagrams_are_classified_by_their_first_fragment",
            "a_pod_cannot_send_from_an_address_that_is_not_its_own",
            "a_drop_flood_is_reported_once_per_flow_and_second_and_counted",
        ],
    ),
    (
        "policy",
        &[
            // Isolation and an allowed port through the policy map.
            "selection_isolates_and_an_allow_opens_exactly_its_port",
            // Other protocols and address families in the parser.
            "udp_icmp_and_ipv6_are_enforced",
            // The maps' BTF as bpftool reads it from this kernel.
            "bpftool_shows_named_fields_of_the_policy_map",
            // Pinned programs, maps and links across an agent restart (links differ by kernel:
            // TCX from 6.6, netlink clsact filters before).
            "a_restarted_agent_adopts_pinned_state_without_a_gap",
            // The node's own and routed traffic, checked at to_pod.
            "the_node_reaches_its_isolated_pods_and_routed_traffic_is_checked_at_to_pod",
        ],
    ),
    (
        "failclosed",
        &[
            // LRU eviction behaviour differs between kernels.
            "a_full_conntrack_evicts_the_coldest_flows_counts_them_and_keeps_enforcing",
            // Locks on bpffs pins and repair of removed pins and entries.
            "a_second_agent_refuses_and_the_first_repairs_what_was_removed",
        ],
    ),
    // bpf_sk_assign at tc steering flows to the L7 filter, and the verifier's stack bound
    // on the steering path.
    (
        "l7",
        &["same_node_http_rules_pass_get_and_answer_delete_403_per_request"],
    ),
    // sock_ops on a cgroup v2 link and sk_msg on the socket map: the verifier of each
    // kernel, the payload off the veths, and revocation through the sk_msg fallback (the
    // restart test stays on the host: the pinned cgroup link is the same on every kernel
    // from 5.7, and each VM test costs minutes under emulation).
    (
        "sockmap",
        &[
            "same_node_transfer_is_redirected_both_ways_without_payload_on_the_veths",
            "a_flow_allowed_then_denied_stops_within_a_second",
        ],
    ),
];

/// Tests of `VM_ROW_TESTS` the 5.10 row leaves out: 5.10 attaches through clsact like 6.1,
/// which runs them, and these exercise nothing 5.10 does differently (its differences are
/// the precise clock, which conntrack, eviction and the drop reports' rate limit read, and
/// its older verifier, which every agent start meets). Under TCG each test costs minutes,
/// and CI's time is bounded.
pub const OLDEST_ROW_OMITS: &[&str] = &[
    "icmp_errors_for_flows_that_do_not_exist_are_no_way_in",
    "a_pod_cannot_send_from_an_address_that_is_not_its_own",
    "bpftool_shows_named_fields_of_the_policy_map",
    "the_node_reaches_its_isolated_pods_and_routed_traffic_is_checked_at_to_pod",
    "a_second_agent_refuses_and_the_first_repairs_what_was_removed",
];

/// `suite` without the tests the oldest kernel's row omits (binaries left empty are dropped).
fn without_omitted(
    suite: &[(String, PathBuf, Vec<String>)],
) -> Vec<(String, PathBuf, Vec<String>)> {
    suite
        .iter()
        .filter_map(|(name, path, args)| {
            let kept: Vec<String> = args
                .iter()
                .filter(|a| !OLDEST_ROW_OMITS.contains(&a.as_str()))
                .cloned()
                .collect();
            let has_tests = kept
                .iter()
                .enumerate()
                .any(|(i, a)| !a.starts_with("--") && (i == 0 || kept[i - 1] != "--test-threads"));
            has_tests.then(|| (name.clone(), path.clone(), kept))
        })
        .collect()
}

/// The test that proves a missing kernel feature is refused clearly (it is `#[ignore]`d
/// elsewhere because only a kernel without the clsact qdisc can run it).
const REFUSAL_TEST_BINARY: &str = "kernel";
const REFUSAL_TEST: &str = "agent_refuses_to_start_without_clsact";
/// Boot plus one agent start; far less than a suite.
const REFUSAL_TIMEOUT: Duration = Duration::from_mins(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KernelChoice {
    /// The kernel this machine runs, natively.
    Host,
    /// Debian bullseye's newest linux-image-5.10.0-*-amd64-unsigned, in a VM.
    #[value(name = "5.10")]
    V5_10,
    /// Debian's newest linux-image-6.1.0-*-amd64-unsigned, in a VM.
    #[value(name = "6.1")]
    V6_1,
    /// Debian's newest linux-image-6.12.*+deb12-amd64-unsigned, in a VM.
    #[value(name = "6.12")]
    V6_12,
    /// host, 5.10, 6.1 and 6.12.
    All,
}

#[derive(Debug, Args)]
pub struct Options {
    /// Kernels to test on (comma-separated or repeated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    pub kernel: Vec<KernelChoice>,
    /// Integration test binaries to run on every row, e.g. `--test policy` (default: all of
    /// weft-tests on the host, `VM_ROW_TESTS` in VMs).
    #[arg(long = "test", value_name = "NAME")]
    pub tests: Vec<String>,
    /// Per-row deadline in seconds; the VM is killed and the running test reported.
    #[arg(long, default_value_t = 2100)]
    pub timeout: u64,
    /// Ask apt for newer kernels instead of using the cached ones.
    #[arg(long)]
    pub refresh: bool,
    /// Rows to run at the same time (each TCG guest keeps about one host core busy); their
    /// output is printed row by row as each ends. 1 streams the console live.
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Use the binaries already built.
    #[arg(long)]
    pub skip_build: bool,
    /// Arguments for every test binary on every row (after `--`), e.g. a test name filter;
    /// replaces `VM_ROW_TESTS` like `--test` does.
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
    /// For VM rows: the staged binaries (`stage_guest_binaries`) the guest copies and runs.
    stage: Option<PathBuf>,
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
        // A machine whose qemu-utils comes from backports (it Breaks the stable
        // qemu-system-common) needs qemu-system-x86 from there too.
        let release = match setup::installed_version("qemu-utils") {
            Some(v) if v.contains("bpo") => Some(setup::ensure_backports_source()?),
            _ => None,
        };
        setup::ensure_apt_packages_from(VM_APT_PACKAGES, release.as_deref())
            .context("installing the VM packages")?;
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
    // A selection given on the command line runs on every row; else VM rows run the table.
    let table_suite = opts.tests.is_empty() && opts.test_args.is_empty();
    let vm_suite = if table_suite {
        vm_row_suite(&binaries)?
    } else {
        suite.clone()
    };
    let stage = vm_dir.join("stage");
    if wants_vm {
        let mut staged = vm_suite.clone();
        staged.extend(
            binaries
                .iter()
                .filter(|(n, _)| n == REFUSAL_TEST_BINARY)
                .map(|(n, p)| (n.clone(), p.clone(), Vec::new())),
        );
        stage_guest_binaries(&stage, &root.join("target/debug"), &staged)?;
    }

    let mut rows = Vec::new();
    for choice in &choices {
        match choice {
            KernelChoice::Host => rows.push(Row {
                name: format!("host {}", host_release()),
                boot: Boot::Native,
                runs: suite.clone(),
                modules: Vec::new(),
                timeout: None,
                stage: None,
            }),
            KernelChoice::V5_10 | KernelChoice::V6_1 | KernelChoice::V6_12 => {
                let series = match choice {
                    KernelChoice::V5_10 => kernels::LINUX_5_10,
                    KernelChoice::V6_1 => kernels::LINUX_6_1,
                    _ => kernels::LINUX_6_12,
                };
                let kernel = kernels::ensure(series, &vm_dir.join("kernels"), opts.refresh)?;
                rows.push(Row {
                    name: kernel.release.clone(),
                    boot: Boot::Vm {
                        kernel: kernel.clone(),
                        blacklist: BOOT_BLACKLIST.to_vec(),
                    },
                    runs: if *choice == KernelChoice::V5_10 && table_suite {
                        without_omitted(&vm_suite)
                    } else {
                        vm_suite.clone()
                    },
                    modules: GUEST_MODULES.to_vec(),
                    timeout: None,
                    stage: Some(stage.clone()),
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
                        stage: Some(stage.clone()),
                    });
                }
            }
            KernelChoice::All => unreachable!("expanded"),
        }
    }

    let vng = vng.as_deref();
    let run_row = |row: &Row, echo: bool| -> anyhow::Result<RowResult> {
        let slug = slug(&row.name);
        let script = vm_dir.join(format!("{slug}.sh"));
        fs::write(&script, guest_script(row))
            .with_context(|| format!("writing {}", script.display()))?;
        let log = logs.join(format!("{slug}.log"));
        eprintln!("\n=== vm-test: {} (log: {}) ===", row.name, log.display());
        eprint!("{}", describe_runs(&row.runs));
        let command = match &row.boot {
            Boot::Native => {
                let mut c = Command::new("sh");
                c.arg(&script).current_dir(&root);
                c
            }
            Boot::Vm { kernel, blacklist } => vm_command(
                vng.context("virtme-ng was not set up")?,
                kernel,
                blacklist,
                &script,
                &root,
            ),
        };
        let timeout = row.timeout.unwrap_or(Duration::from_secs(opts.timeout));
        let outcome = runner::run(command, &log, timeout, echo)?;
        if !echo {
            // Rows running side by side print their whole output once they end, so the
            // console (and CI's log) reads one row at a time.
            let text = fs::read(&log).with_context(|| format!("reading {}", log.display()))?;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "\n=== vm-test: output of {} ===", row.name);
            let _ = out.write_all(&text);
            let _ = out.flush();
        }
        let failure = judge(&outcome, row.runs.len(), timeout);
        match &failure {
            Some(why) => eprintln!("=== vm-test: {}: {why} ===", row.name),
            None => eprintln!(
                "=== vm-test: {}: ok after {}s ===",
                row.name,
                outcome.wall.as_secs()
            ),
        }
        Ok(RowResult {
            name: row.name.clone(),
            outcome,
            failure,
            native: matches!(row.boot, Boot::Native),
        })
    };
    let started = Instant::now();
    let jobs = opts.jobs.clamp(1, rows.len().max(1));
    let results: Vec<RowResult> = if jobs == 1 {
        rows.iter()
            .map(|row| run_row(row, true))
            .collect::<anyhow::Result<_>>()?
    } else {
        eprintln!("vm-test: {jobs} rows at a time; each row's output follows when it ends");
        // The native row first, beside the oldest kernel's VM: two TCG guests booting at
        // once left 5.10 without a console line for minutes (seen twice). Then the full VM
        // rows, oldest kernel first, and the short single-test rows last.
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| {
            let row = &rows[i];
            (!matches!(row.boot, Boot::Native), row.timeout.is_some())
        });
        let next = AtomicUsize::new(0);
        let done: Mutex<Vec<Option<anyhow::Result<RowResult>>>> =
            Mutex::new(rows.iter().map(|_| None).collect());
        std::thread::scope(|scope| {
            for _ in 0..jobs {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(&i) = order.get(i) else { break };
                        let row = &rows[i];
                        let result = run_row(row, false);
                        done.lock().expect("no worker panics")[i] = Some(result);
                    }
                });
            }
        });
        done.into_inner()
            .expect("no worker panics")
            .into_iter()
            .map(|r| r.expect("every row ran"))
            .collect::<anyhow::Result<_>>()?
    };
    let total = started.elapsed().as_secs();

    let mut table = summary(&results);
    let _ = writeln!(
        table,
        "matrix wall time {}m{:02}s ({jobs} row{} at a time)",
        total / 60,
        total % 60,
        if jobs == 1 { "" } else { "s" }
    );
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

/// Where a VM guest finds the staged binaries: a tmpfs of its own, filled at boot.
const GUEST_BIN_ROOT: &str = "/run/weft-vm";
/// The agent's and the CLI's binaries (and the L7 filter's, once built) a guest runs.
const STAGED_BINARIES: &[&str] = &["weft", "weft-agent", "weft-cni", "weft-l7"];
/// The reference CNI plugins the harness chains.
const STAGED_CNI_PLUGINS: &[&str] = &["loopback", "ptp", "host-local"];

/// Copy what VM guests execute, without debug info, into `stage` (`bin/`, `cni/`, `tests/`).
/// The guest's root is the host's over 9p without a page cache: every exec of a 180 MB
/// debug binary read it again (5 s per `weft` call under TCG, measured), so each guest copies
/// this small stage into a tmpfs once at boot and runs everything from there.
fn stage_guest_binaries(
    stage: &Path,
    bin_dir: &Path,
    runs: &[(String, PathBuf, Vec<String>)],
) -> anyhow::Result<()> {
    let _ = fs::remove_dir_all(stage);
    for sub in ["bin", "cni", "tests"] {
        fs::create_dir_all(stage.join(sub))
            .with_context(|| format!("creating {}", stage.join(sub).display()))?;
    }
    let strip = |from: &Path, to: &Path| {
        cmd::run(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(from)
                .arg(to),
        )
    };
    for name in STAGED_BINARIES {
        let from = bin_dir.join(name);
        if from.exists() {
            strip(&from, &stage.join("bin").join(name))?;
        }
    }
    for name in STAGED_CNI_PLUGINS {
        let from = Path::new(weft_tests::CNI_PLUGIN_DIR).join(name);
        fs::copy(&from, stage.join("cni").join(name))
            .with_context(|| format!("copying {}", from.display()))?;
    }
    for (_, path, _) in runs {
        let file = path
            .file_name()
            .context("test binary without a file name")?;
        let to = stage.join("tests").join(file);
        if !to.exists() {
            strip(path, &to)?;
        }
    }
    Ok(())
}

/// The path a guest runs a staged test binary from.
fn guest_test_path(path: &Path) -> PathBuf {
    let file = path.file_name().unwrap_or_default();
    Path::new(GUEST_BIN_ROOT).join("tests").join(file)
}

/// The VM rows' runs: each binary of [`VM_ROW_TESTS`] with its exact test names.
fn vm_row_suite(
    binaries: &[(String, PathBuf)],
) -> anyhow::Result<Vec<(String, PathBuf, Vec<String>)>> {
    VM_ROW_TESTS
        .iter()
        .map(|(name, tests)| {
            let (_, path) = binaries
                .iter()
                .find(|(n, _)| n == name)
                .with_context(|| format!("VM_ROW_TESTS names {name}, which weft-tests lacks"))?;
            let mut args: Vec<String> = vec!["--test-threads".into(), "1".into(), "--exact".into()];
            args.extend(tests.iter().map(|t| (*t).to_string()));
            Ok(((*name).to_string(), path.clone(), args))
        })
        .collect()
}

/// Which tests a row runs, one line per binary, for the console.
fn describe_runs(runs: &[(String, PathBuf, Vec<String>)]) -> String {
    let mut out = String::new();
    for (name, _, args) in runs {
        let exact = args.iter().any(|a| a == "--exact");
        let names: Vec<&str> = args
            .iter()
            .enumerate()
            .filter(|(i, a)| !a.starts_with("--") && (*i == 0 || args[i - 1] != "--test-threads"))
            .map(|(_, a)| a.as_str())
            .collect();
        let what = match (names.is_empty(), exact) {
            (true, _) => "all tests".to_string(),
            (false, true) => names.join(", "),
            (false, false) => format!("tests matching {}", names.join(" or ")),
        };
        let _ = writeln!(out, "vm-test:   {name}: {what}");
    }
    out
}

fn expand(choices: &[KernelChoice]) -> Vec<KernelChoice> {
    let mut out = Vec::new();
    for c in choices {
        let add: &[KernelChoice] = match c {
            KernelChoice::All => &[
                KernelChoice::Host,
                KernelChoice::V5_10,
                KernelChoice::V6_1,
                KernelChoice::V6_12,
            ],
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
    if row.stage.is_some() {
        // Why a boot was slow (clocksource fallbacks, entropy waits, RCU stalls under TCG):
        // the kernel log of a guest that took over a minute to get here.
        s.push_str(
            "echo \"weft-vm: clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>/dev/null)\"\n\
             if [ \"$(cut -d. -f1 /proc/uptime)\" -gt 60 ]; then dmesg | tail -n 60 | sed 's/^/weft-vm: dmesg: /'; fi\n",
        );
    }
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
    if let Some(stage) = &row.stage {
        let _ = writeln!(
            s,
            "mkdir -p {root} && mount -t tmpfs -o size=512m weft-vm {root} && cp -r {stage}/. {root}/ \
             || echo 'weft-vm: staging binaries into {root} failed'\n\
             export WEFT_BIN_DIR={root}/bin WEFT_CNI_PLUGIN_DIR={root}/cni",
            root = GUEST_BIN_ROOT,
            stage = shell_quote(&stage.to_string_lossy()),
        );
    }
    s.push_str("export RUST_BACKTRACE=1\nstatus=0\n");
    // The guest does not inherit the host's environment: carry CI's "nothing may skip".
    if weft_tests::ci() {
        s.push_str("export CI=true\n");
    }
    // How busy the guest's CPUs were during each binary: tells waiting from emulation cost.
    s.push_str("cpu_sample() { awk '/^cpu /{print $2+$3+$4+$7+$8, $5+$6; exit}' /proc/stat; }\n");
    for (name, path, args) in &row.runs {
        let _ = writeln!(s, "echo 'weft-vm: running {name}'");
        s.push_str("set -- $(cpu_sample); busy0=$1; idle0=$2; t0=$(cut -d' ' -f1 /proc/uptime)\n");
        let _ = writeln!(
            s,
            "{} {}\nrc=$?; [ \"$status\" -ne 0 ] || status=$rc\n\
             set -- $(cpu_sample)\n\
             echo \"weft-vm: {name} took $(echo \"$(cut -d' ' -f1 /proc/uptime) $t0\" | awk '{{printf \"%.0f\", $1-$2}}')s, guest CPUs $(echo \"$1 $2 $busy0 $idle0\" | awk '{{b=$1-$3; t=b+$2-$4; if (t > 0) printf \"%.0f\", 100*b/t; else printf \"0\"}}')% busy\"",
            shell_quote(
                &if row.stage.is_some() {
                    guest_test_path(path)
                } else {
                    path.clone()
                }
                .to_string_lossy()
            ),
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
        .arg(format!(
            "modprobe.blacklist={} clocksource=tsc tsc=reliable",
            blacklist.join(",")
        ))
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
        .map_or_else(|_| "unknown".to_string(), |r| r.trim().to_string())
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
    fn all_means_host_and_every_vm_kernel_once() {
        assert_eq!(
            expand(&[KernelChoice::V6_1, KernelChoice::All]),
            [
                KernelChoice::V6_1,
                KernelChoice::Host,
                KernelChoice::V5_10,
                KernelChoice::V6_12
            ]
        );
    }

    #[test]
    fn vm_row_tests_name_existing_tests() {
        // `--exact` with a name that no longer exists would run nothing and pass.
        for (binary, tests) in VM_ROW_TESTS {
            let file = cmd::workspace_root().join(format!("tests/tests/{binary}.rs"));
            let source = fs::read_to_string(&file).expect("reading the test source");
            for test in *tests {
                assert!(
                    source.contains(&format!("fn {test}()")),
                    "{} has no test {test}",
                    file.display()
                );
            }
        }
    }

    #[test]
    fn the_oldest_row_omits_only_tests_of_the_table() {
        let all: Vec<&str> = VM_ROW_TESTS
            .iter()
            .flat_map(|(_, t)| t.iter().copied())
            .collect();
        for omitted in OLDEST_ROW_OMITS {
            assert!(all.contains(omitted), "{omitted} is not in VM_ROW_TESTS");
        }
        let suite: Vec<(String, PathBuf, Vec<String>)> = VM_ROW_TESTS
            .iter()
            .map(|(name, tests)| {
                let mut args: Vec<String> =
                    vec!["--test-threads".into(), "1".into(), "--exact".into()];
                args.extend(tests.iter().map(|t| (*t).to_string()));
                (
                    (*name).to_string(),
                    PathBuf::from(format!("/t/{name}")),
                    args,
                )
            })
            .collect();
        let kept = without_omitted(&suite);
        let names: Vec<&str> = kept
            .iter()
            .flat_map(|(_, _, args)| args.iter().skip(3).map(String::as_str))
            .collect();
        assert_eq!(names.len(), all.len() - OLDEST_ROW_OMITS.len());
        assert!(names.iter().all(|n| !OLDEST_ROW_OMITS.contains(n)));
        assert!(names.contains(&"status_reports_kernel_features"));
    }

    #[test]
    fn describe_runs_names_the_selection() {
        let runs = vec![
            (
                "kernel".to_string(),
                PathBuf::from("/t/kernel-1"),
                vec![
                    "--test-threads".into(),
                    "1".into(),
                    "--exact".into(),
                    "a".into(),
                    "b".into(),
                ],
            ),
            (
                "cni".to_string(),
                PathBuf::from("/t/cni-1"),
                vec!["--test-threads".into(), "1".into()],
            ),
        ];
        assert_eq!(
            describe_runs(&runs),
            "vm-test:   kernel: a, b\nvm-test:   cni: all tests\n"
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
            stage: None,
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
