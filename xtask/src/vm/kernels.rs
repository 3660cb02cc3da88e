//! Debian kernels for the VM matrix: find the newest package of a series, download it with
//! `apt-get download`, and unpack kernel and modules into a cache under `target/vm/kernels`.
//!
//! A cached kernel is used without asking apt anything, so a second run needs no network.
//! `--refresh` asks apt for the newest package again. Kernels of another Debian release than
//! the host's (5.10 from bullseye) come through a private apt configuration under the cache
//! (its own sources, lists and package cache, on the host's Debian mirror), so the host's apt
//! sources are never changed.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::cmd;

/// Marks a cache entry whose unpacking finished (a half-unpacked one is never used).
const COMPLETE_MARKER: &str = ".weft-complete";

/// A family of Debian kernel packages: `<prefix><number><suffix>`, newest = highest number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Series {
    pub label: &'static str,
    prefix: &'static str,
    suffix: &'static str,
    /// The Debian release to fetch from when it is not the host's (bookworm's suites are in
    /// the default sources).
    release: Option<&'static str>,
}

/// Debian bullseye's 5.10 LTS kernel (bullseye main and bullseye-security), e.g.
/// linux-image-5.10.0-46-amd64-unsigned.
pub const LINUX_5_10: Series = Series {
    label: "5.10",
    prefix: "linux-image-5.10.0-",
    suffix: "-amd64-unsigned",
    release: Some("bullseye"),
};

/// Debian bookworm's 6.1 LTS kernel (bookworm-security), e.g. linux-image-6.1.0-56-amd64-unsigned.
pub const LINUX_6_1: Series = Series {
    label: "6.1",
    prefix: "linux-image-6.1.0-",
    suffix: "-amd64-unsigned",
    release: None,
};

/// Debian's 6.12 kernel built for bookworm, e.g. linux-image-6.12.117+deb12-amd64-unsigned.
pub const LINUX_6_12: Series = Series {
    label: "6.12",
    prefix: "linux-image-6.12.",
    suffix: "+deb12-amd64-unsigned",
    release: None,
};

impl Series {
    /// The package's position in the series, or None when `package` is not of this series.
    fn number(&self, package: &str) -> Option<u64> {
        let middle = package
            .strip_prefix(self.prefix)?
            .strip_suffix(self.suffix)?;
        if middle.is_empty() || !middle.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        middle.parse().ok()
    }

    /// The newest package of this series among `packages`.
    fn newest<'a>(&self, packages: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
        packages
            .into_iter()
            .filter_map(|p| self.number(p).map(|n| (n, p)))
            .max_by_key(|(n, _)| *n)
            .map(|(_, p)| p)
    }
}

/// An unpacked kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `uname -r` of the kernel.
    pub release: String,
    /// `boot/vmlinux` when it could be extracted (boots faster), else `boot/vmlinuz-*`.
    pub image: PathBuf,
}

/// The newest cached kernel of `series`, or (when none is cached, or `refresh`) the newest
/// one apt knows, downloaded and unpacked into `cache`.
pub fn ensure(series: Series, cache: &Path, refresh: bool) -> anyhow::Result<Kernel> {
    let cached = cached_packages(cache)?;
    if !refresh && let Some(package) = series.newest(cached.iter().map(String::as_str)) {
        eprintln!("vm-test: using cached {package}");
        return open(&cache.join(package));
    }
    let apt = match series.release {
        None => Apt::Host,
        Some(release) => Apt::private(release, cache)?,
    };
    let package = newest_in_apt(series, &apt)?;
    if !cached.contains(&package) {
        fetch(&package, cache, &apt).with_context(|| format!("fetching {package}"))?;
    }
    open(&cache.join(&package))
}

fn cached_packages(cache: &Path) -> anyhow::Result<Vec<String>> {
    let Ok(entries) = fs::read_dir(cache) else {
        return Ok(Vec::new());
    };
    let mut packages = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", cache.display()))?;
        if entry.path().join(COMPLETE_MARKER).exists() {
            packages.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(packages)
}

/// Which apt configuration finds a series' packages.
enum Apt {
    /// The host's own sources.
    Host,
    /// Sources for another Debian release, with their own lists and cache: `-o` options.
    Private(Vec<String>),
}

impl Apt {
    /// An apt configuration under `cache` for `release` and `release`-security, main only,
    /// on the mirrors the host's sources use.
    fn private(release: &str, cache: &Path) -> anyhow::Result<Self> {
        let dir = cache.join(format!(".apt-{release}"));
        for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let (main, security) = host_mirrors();
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let sources = dir.join("sources.list");
        fs::write(
            &sources,
            format!(
                "deb [signed-by={keyring}] {main} {release} main\n\
                 deb [signed-by={keyring}] {security} {release}-security main\n"
            ),
        )
        .with_context(|| format!("writing {}", sources.display()))?;
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        let options = [
            ("Dir::Etc::SourceList", path(sources)),
            ("Dir::Etc::SourceParts", path(dir.join("sources.list.d"))),
            ("Dir::State::Lists", path(dir.join("lists"))),
            ("Dir::Cache", path(dir.join("cache"))),
            // No installed packages: this configuration only lists and downloads.
            ("Dir::State::status", "/dev/null".to_string()),
            ("APT::Sandbox::User", "root".to_string()),
        ];
        Ok(Apt::Private(
            options
                .into_iter()
                .flat_map(|(k, v)| ["-o".to_string(), format!("{k}={v}")])
                .collect(),
        ))
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        if let Apt::Private(options) = self {
            c.args(options);
        }
        c
    }
}

/// The host's Debian mirror and security mirror (from its apt sources), or Debian's own.
fn host_mirrors() -> (String, String) {
    let mut main = "http://deb.debian.org/debian".to_string();
    let mut security = "http://deb.debian.org/debian-security".to_string();
    let Ok(targets) = cmd::output(Command::new("apt-get").args([
        "indextargets",
        "--format",
        "$(REPO_URI) $(RELEASE) $(COMPONENT)",
    ])) else {
        return (main, security);
    };
    for line in targets.lines() {
        let mut words = line.split_whitespace();
        let (Some(uri), Some(release), Some("main")) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        if !uri.starts_with("http") {
            continue;
        }
        let uri = uri.trim_end_matches('/').to_string();
        if release.ends_with("-security") {
            security = uri;
        } else if !release.contains('-') {
            main = uri;
        }
    }
    (main, security)
}

fn newest_in_apt(series: Series, apt: &Apt) -> anyhow::Result<String> {
    let list = || cmd::output(apt.command("apt-cache").args(["pkgnames", series.prefix]));
    if matches!(apt, Apt::Host)
        && let Some(p) = series.newest(list()?.lines())
    {
        return Ok(p.to_string());
    }
    // No package lists yet (a fresh machine), or a private configuration (always fetched
    // anew: it is only asked when nothing is cached or on --refresh): update, look again.
    cmd::run(apt.command("apt-get").args(["update", "-q"]))?;
    let names = list()?;
    series
        .newest(names.lines())
        .map(str::to_string)
        .with_context(|| {
            format!(
                "apt knows no {}*{} package; Debian {}'s security suite carries them",
                series.prefix,
                series.suffix,
                series.release.unwrap_or("bookworm")
            )
        })
}

/// Download `package`, unpack it, index its modules and extract an ELF vmlinux; the entry
/// appears under its final name only when all of that worked.
fn fetch(package: &str, cache: &Path, apt: &Apt) -> anyhow::Result<()> {
    let debs = cache.join(".debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    eprintln!("vm-test: downloading {package}");
    cmd::run(
        apt.command("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root", package])
            .current_dir(&debs),
    )?;
    let deb = fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .with_context(|| format!("apt-get download left no {package}_*.deb"))?;

    let partial = cache.join(format!(".{package}.partial"));
    let _ = fs::remove_dir_all(&partial);
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    let release = module_release(&partial)?;
    // Debian's packages leave modules.dep to their postinst; modprobe in the guest needs it.
    cmd::run(Command::new("depmod").arg("-b").arg(&partial).arg(&release))?;
    let compressed = partial.join("boot").join(format!("vmlinuz-{release}"));
    let vmlinux = partial.join("boot/vmlinux");
    match extract_vmlinux(&compressed, &vmlinux) {
        Ok(()) => {}
        // Optional: it saves about a second per boot, a bzImage boots as well.
        Err(e) => eprintln!("vm-test: booting the compressed image ({e:#})"),
    }
    fs::write(partial.join(COMPLETE_MARKER), format!("{package}\n"))?;
    let dest = cache.join(package);
    let _ = fs::remove_dir_all(&dest);
    fs::rename(&partial, &dest)
        .with_context(|| format!("moving {} to {}", partial.display(), dest.display()))?;
    fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    eprintln!("vm-test: cached {package} ({release})");
    Ok(())
}

fn open(dir: &Path) -> anyhow::Result<Kernel> {
    let release = module_release(dir)?;
    let vmlinux = dir.join("boot/vmlinux");
    let image = if vmlinux.exists() {
        vmlinux
    } else {
        dir.join("boot").join(format!("vmlinuz-{release}"))
    };
    if !image.exists() {
        bail!(
            "{} has no kernel image; remove it to fetch again",
            dir.display()
        );
    }
    Ok(Kernel { release, image })
}

/// The kernel release, named by the package's one `lib/modules/<release>` directory.
fn module_release(dir: &Path) -> anyhow::Result<String> {
    let modules = dir.join("lib/modules");
    let mut releases: Vec<String> = fs::read_dir(&modules)
        .with_context(|| format!("listing {}", modules.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match releases.len() {
        1 => Ok(releases.remove(0)),
        n => bail!(
            "expected one kernel release in {}, found {n}",
            modules.display()
        ),
    }
}

/// Compression formats Debian uses for the payload of a bzImage, by magic bytes.
const PAYLOAD_FORMATS: &[(&[u8], &str)] = &[(b"\xFD7zXZ\x00", "xz"), (b"\x28\xB5\x2F\xFD", "zstd")];

/// Find the compressed kernel inside a bzImage and decompress it to an ELF file.
fn extract_vmlinux(bzimage: &Path, out: &Path) -> anyhow::Result<()> {
    let image = fs::read(bzimage).with_context(|| format!("reading {}", bzimage.display()))?;
    for (magic, tool) in PAYLOAD_FORMATS {
        for offset in find_all(&image, magic) {
            let Ok(elf) = decompress(tool, &image[offset..]) else {
                continue;
            };
            if elf.starts_with(b"\x7fELF") {
                fs::write(out, elf).with_context(|| format!("writing {}", out.display()))?;
                return Ok(());
            }
        }
    }
    bail!("no xz or zstd ELF payload found in {}", bzimage.display())
}

fn find_all<'a>(haystack: &'a [u8], needle: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(move |(_, w)| *w == needle)
        .map(|(i, _)| i)
}

/// Decompress `input` with `tool -dc`. Trailing bytes after the stream make the tool exit
/// non-zero after it wrote everything, so its exit status is not consulted.
fn decompress(tool: &str, input: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new(tool)
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {tool}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        // The tool may stop reading at the end of its stream; a broken pipe is expected.
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output()?;
    let _ = writer.join();
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_package_of_a_series_by_number_not_text() {
        let apt = [
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-56-amd64-unsigned",
            "linux-image-6.1.0-56-amd64",
            "linux-image-6.1.0-56-cloud-amd64-unsigned",
            "linux-image-6.12.117+deb12-amd64-unsigned",
            "linux-image-6.12.9+deb12-amd64-unsigned",
            "linux-image-6.12.117+deb12-rt-amd64-unsigned",
        ];
        assert_eq!(
            LINUX_6_1.newest(apt),
            Some("linux-image-6.1.0-56-amd64-unsigned")
        );
        assert_eq!(
            LINUX_6_12.newest(apt),
            Some("linux-image-6.12.117+deb12-amd64-unsigned")
        );
        assert_eq!(LINUX_6_1.newest(["linux-image-amd64"]), None);
        let bullseye = [
            "linux-image-5.10.0-9-amd64-unsigned",
            "linux-image-5.10.0-46-amd64-unsigned",
            "linux-image-5.10.0-46-cloud-amd64-unsigned",
            "linux-image-5.10.0-46-rt-amd64-unsigned",
        ];
        assert_eq!(
            LINUX_5_10.newest(bullseye),
            Some("linux-image-5.10.0-46-amd64-unsigned")
        );
    }

    #[test]
    fn finds_every_magic_offset() {
        let data = b"xx\xFD7zXZ\x00yy\xFD7zXZ\x00";
        assert_eq!(
            find_all(data, PAYLOAD_FORMATS[0].0).collect::<Vec<_>>(),
            [2, 10]
        );
    }
}
