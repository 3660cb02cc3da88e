//! `weft-wg-bench`: TCP stream throughput and CPU per GB through WireGuard between two
//! network namespaces, for weft's device, wireguard-go and boringtun-cli, each configured the
//! same way (by `wg`, through its UAPI socket), interleaved and repeated, printed as medians
//! and ratios against wireguard-go.
//!
//! ```sh
//! cargo build --release -p weft-wg && sudo target/release/weft-wg-bench --seconds 8 --repeats 3
//! ```
//!
//! Throughput is iperf3's received rate (one TCP stream, unpinned). CPU is the WireGuard
//! processes' own user+system time from `/proc/<pid>/stat` (both nodes), divided by the bytes
//! moved; "machine" CPU adds everything else the machine did (`/proc/stat`, so it includes
//! iperf3, the kernel's TCP stack and other load on a shared machine). Namespaces, links and
//! processes carry a per-run prefix and are removed on exit, also on error.
//!
//! `weft-wg-bench device <ifname>` is the weft side: a [`weft_wg::Device`] in the current
//! namespace with its UAPI socket at `/var/run/wireguard/<ifname>.sock`, until killed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use weft_wg::{Device, DeviceConfig, PrivateKey};

const UAPI_DIR: &str = "/var/run/wireguard";
const PORT: u16 = 51871;

#[derive(Debug, Parser)]
#[command(about = "WireGuard throughput and CPU per GB: weft vs wireguard-go vs boringtun-cli")]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 8)]
    seconds: u32,
    /// Runs per implementation (interleaved round-robin).
    #[arg(long, default_value_t = 3)]
    repeats: u32,
    /// Implementations to compare.
    #[arg(long, value_enum, value_delimiter = ',',
          default_values_t = [Impl::Weft, Impl::WireguardGo, Impl::BoringtunCli])]
    impls: Vec<Impl>,
    /// Where boringtun-cli is installed (`cargo install --root`); built there when missing.
    #[arg(long)]
    tools_dir: Option<PathBuf>,
    /// weft without offloads (one packet per system call), for comparison.
    #[arg(long)]
    weft_plain: bool,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Run one weft device in the current network namespace until killed.
    Device {
        ifname: String,
        #[arg(long)]
        plain: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Impl {
    Weft,
    WireguardGo,
    BoringtunCli,
}

impl Impl {
    fn label(self) -> &'static str {
        match self {
            Self::Weft => "weft",
            Self::WireguardGo => "wireguard-go",
            Self::BoringtunCli => "boringtun-cli",
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Sub::Device { ifname, plain }) = &cli.command {
        return run_device(ifname, *plain);
    }
    ensure!(
        nix_is_root(),
        "weft-wg-bench needs root (network namespaces, tun)"
    );
    let boringtun = if cli.impls.contains(&Impl::BoringtunCli) {
        Some(boringtun_cli(cli.tools_dir.clone())?)
    } else {
        None
    };
    let net = Net::new()?;
    let mut results: Vec<(Impl, Vec<Run>)> = cli.impls.iter().map(|i| (*i, Vec::new())).collect();
    for round in 0..cli.repeats {
        for (which, runs) in &mut results {
            let run = net
                .measure(*which, &cli, boringtun.as_deref())
                .with_context(|| format!("{} run {}", which.label(), round + 1))?;
            eprintln!(
                "  {:<14} run {}: {:6.2} Gbit/s, {:5.2} CPU s/GB (impl), {:5.2} CPU s/GB (machine)",
                which.label(),
                round + 1,
                run.gbits(),
                run.impl_cpu_per_gb(),
                run.machine_cpu_per_gb()
            );
            runs.push(run);
        }
    }
    print_summary(&results, &cli);
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
    })
}

fn run_device(ifname: &str, plain: bool) -> anyhow::Result<()> {
    let socket = Path::new(UAPI_DIR).join(format!("{ifname}.sock"));
    let mut config = DeviceConfig::new(ifname, PrivateKey::generate(), socket);
    config.offload = !plain;
    let device = Device::create(config).context("creating the weft device")?;
    eprintln!("{device:?} offloads {:?}", device.offloads());
    loop {
        std::thread::park();
    }
}

// === tools ===

fn boringtun_cli(tools_dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = tools_dir.unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| PathBuf::from("target"), PathBuf::from)
            .join("weft-wg-bench-tools")
    });
    let bin = dir.join("bin/boringtun-cli");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!("installing boringtun-cli into {} (once)", dir.display());
    let status = Command::new("cargo")
        .args(["install", "boringtun-cli", "--locked", "--root"])
        .arg(&dir)
        .status()
        .context("running cargo install boringtun-cli")?;
    ensure!(status.success(), "cargo install boringtun-cli failed");
    Ok(bin)
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {line}"))?;
    if !out.status.success() {
        bail!("{line}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn in_ns(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program]);
    cmd
}

// === network ===

/// Two namespaces joined by a veth pair, removed on drop.
struct Net {
    prefix: String,
    ns: [String; 2],
}

const UNDERLAY: [&str; 2] = ["100.65.9.1", "100.65.9.2"];
const INNER: [&str; 2] = ["100.64.9.1", "100.64.9.2"];

impl Net {
    fn new() -> anyhow::Result<Self> {
        let prefix = format!("wgb{:04x}", std::process::id() & 0xffff);
        let ns = [format!("{prefix}-1"), format!("{prefix}-2")];
        let net = Self {
            prefix: prefix.clone(),
            ns: ns.clone(),
        };
        for n in &ns {
            run(Command::new("ip").args(["netns", "add", n]))?;
            run(in_ns(n, "ip").args(["link", "set", "lo", "up"]))?;
        }
        let (va, vb) = (format!("{prefix}v1"), format!("{prefix}v2"));
        run(in_ns(&ns[0], "ip").args([
            "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns", &ns[1],
        ]))?;
        for (i, v) in [&va, &vb].into_iter().enumerate() {
            run(in_ns(&ns[i], "ip").args([
                "addr",
                "add",
                &format!("{}/24", UNDERLAY[i]),
                "dev",
                v,
            ]))?;
            run(in_ns(&ns[i], "ip").args(["link", "set", v, "up"]))?;
        }
        Ok(net)
    }

    fn measure(&self, which: Impl, cli: &Cli, boringtun: Option<&Path>) -> anyhow::Result<Run> {
        let ifnames = [format!("{}w1", self.prefix), format!("{}w2", self.prefix)];
        let mut procs = Procs(Vec::new());
        for (i, ifname) in ifnames.iter().enumerate() {
            let socket = Path::new(UAPI_DIR).join(format!("{ifname}.sock"));
            let _ = std::fs::remove_file(&socket);
            let mut cmd = match which {
                Impl::Weft => {
                    let mut c = in_ns(&self.ns[i], &std::env::current_exe()?.to_string_lossy());
                    c.args(["device", ifname]);
                    if cli.weft_plain {
                        c.arg("--plain");
                    }
                    c
                }
                Impl::WireguardGo => {
                    let mut c = in_ns(&self.ns[i], "wireguard-go");
                    c.args(["-f", ifname]);
                    c
                }
                Impl::BoringtunCli => {
                    let bin = boringtun.context("boringtun-cli path")?;
                    let mut c = in_ns(&self.ns[i], &bin.to_string_lossy());
                    c.args(["-f", "--disable-drop-privileges", ifname]);
                    c
                }
            };
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
            procs.0.push((
                cmd.spawn().context("starting the WireGuard process")?,
                socket,
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while procs.0.iter().any(|(_, s)| !s.exists()) {
            ensure!(Instant::now() < deadline, "UAPI sockets did not appear");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Keys and peers through `wg`, the same for every implementation.
        let keys: Vec<PrivateKey> = (0..2).map(|_| PrivateKey::generate()).collect();
        for i in 0..2 {
            let other = 1 - i;
            let key_file = std::env::temp_dir().join(format!("{}-{i}.key", self.prefix));
            write_private(&key_file, &keys[i].to_base64())?;
            let result = run(in_ns(&self.ns[i], "wg").args([
                "set",
                &ifnames[i],
                "listen-port",
                &PORT.to_string(),
                "private-key",
                &key_file.to_string_lossy(),
                "peer",
                &keys[other].public_key().to_string(),
                "endpoint",
                &format!("{}:{PORT}", UNDERLAY[other]),
                "allowed-ips",
                &format!("{}/32", INNER[other]),
            ]));
            let _ = std::fs::remove_file(&key_file);
            result?;
            run(in_ns(&self.ns[i], "ip").args(["link", "set", &ifnames[i], "mtu", "1420", "up"]))?;
            run(in_ns(&self.ns[i], "ip").args([
                "addr",
                "add",
                &format!("{}/24", INNER[i]),
                "dev",
                &ifnames[i],
            ]))?;
        }
        let mut up = false;
        for _ in 0..10 {
            if in_ns(&self.ns[0], "ping")
                .args(["-c", "1", "-W", "1", INNER[1]])
                .stdout(Stdio::null())
                .status()?
                .success()
            {
                up = true;
                break;
            }
        }
        ensure!(up, "no connectivity through the tunnel");
        let mut server = in_ns(&self.ns[1], "iperf3")
            .args(["-s", "-1", "-B", INNER[1]])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?;
        std::thread::sleep(Duration::from_millis(300));
        let pids: Vec<u32> = procs.0.iter().map(|(c, _)| c.id()).collect();
        let impl_pids: Vec<u32> = pids.iter().flat_map(|p| descendants_and_self(*p)).collect();
        let cpu0 = process_cpu(&impl_pids);
        let machine0 = machine_busy();
        let out = run(in_ns(&self.ns[0], "iperf3").args([
            "-c",
            INNER[1],
            "-t",
            &cli.seconds.to_string(),
            "-J",
        ]));
        let cpu = process_cpu(&impl_pids) - cpu0;
        let machine = machine_busy() - machine0;
        let _ = server.kill();
        let _ = server.wait();
        let json: serde_json::Value = serde_json::from_str(&out?).context("iperf3 JSON")?;
        let bytes = json["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
        let seconds = json["end"]["sum_received"]["seconds"]
            .as_f64()
            .unwrap_or(0.0);
        ensure!(bytes > 0.0, "iperf3 moved nothing");
        Ok(Run {
            bytes,
            seconds,
            impl_cpu: cpu,
            machine_cpu: machine,
        })
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// The WireGuard processes of one run, killed (and their sockets removed) on drop.
struct Procs(Vec<(Child, PathBuf)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (child, socket) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(socket);
        }
    }
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    writeln!(f, "{text}")?;
    Ok(())
}

/// `pid` and every process below it (`ip netns exec` execs in place, but be safe).
fn descendants_and_self(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat"))
                    && stat_field(&stat, 3) == Some(parent)
                    && !out.contains(&p)
                {
                    out.push(p);
                }
            }
        }
        i += 1;
    }
    out
}

/// Field `n` (0-based, after the `(comm)`) of a `/proc/<pid>/stat` line as a number.
fn stat_field(stat: &str, n: usize) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(n - 2)?.parse().ok()
}

/// `/proc` counts in `USER_HZ`, which is 100 on Linux whatever the kernel's HZ.
fn clock_ticks() -> f64 {
    100.0
}

/// User + system seconds of `pids` (all their threads).
fn process_cpu(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|stat| {
            let rest = &stat[stat.rfind(')').unwrap_or(0) + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
                + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            ticks / clock_ticks()
        })
        .sum()
}

/// Busy CPU seconds of the whole machine (all CPUs, everything but idle and iowait).
fn machine_busy() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle) / clock_ticks()
}

// === results ===

struct Run {
    bytes: f64,
    seconds: f64,
    impl_cpu: f64,
    machine_cpu: f64,
}

impl Run {
    fn gbits(&self) -> f64 {
        self.bytes * 8.0 / self.seconds.max(1e-9) / 1e9
    }
    fn impl_cpu_per_gb(&self) -> f64 {
        self.impl_cpu / (self.bytes / 1e9)
    }
    fn machine_cpu_per_gb(&self) -> f64 {
        self.machine_cpu / (self.bytes / 1e9)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn spread(v: &[f64]) -> f64 {
    let m = median(v.to_vec());
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m > 0.0 { (hi - lo) / m * 100.0 } else { 0.0 }
}

fn print_summary(results: &[(Impl, Vec<Run>)], cli: &Cli) {
    let stats: Vec<(Impl, f64, f64, f64, f64)> = results
        .iter()
        .map(|(which, runs)| {
            let g: Vec<f64> = runs.iter().map(Run::gbits).collect();
            let c: Vec<f64> = runs.iter().map(Run::impl_cpu_per_gb).collect();
            let m: Vec<f64> = runs.iter().map(Run::machine_cpu_per_gb).collect();
            (*which, median(g.clone()), spread(&g), median(c), median(m))
        })
        .collect();
    let base = stats
        .iter()
        .find(|s| s.0 == Impl::WireguardGo)
        .map(|s| (s.1, s.3));
    println!(
        "\nTCP_STREAM (iperf3, 1 stream, unpinned) through WireGuard between two netns; \
         median of {} x {} s{}",
        cli.repeats,
        cli.seconds,
        if cli.weft_plain {
            "; weft without offloads"
        } else {
            ""
        }
    );
    println!(
        "{:<14} {:>9} {:>7} {:>12} {:>14} {:>12} {:>12}",
        "impl", "Gbit/s", "spread", "CPU s/GB", "machine s/GB", "tput/wg-go", "CPU/wg-go"
    );
    for (which, g, sp, c, m) in &stats {
        let (rt, rc) = base.map_or((f64::NAN, f64::NAN), |(bg, bc)| (g / bg, c / bc));
        println!(
            "{:<14} {:>9.2} {:>6.0}% {:>12.2} {:>14.2} {:>12.2} {:>12.2}",
            which.label(),
            g,
            sp,
            c,
            m,
            rt,
            rc
        );
    }
}
