//! Running one matrix row: a command whose output (stdout and stderr, merged) streams to the
//! terminal and into a log file while it is read for libtest's progress, under a deadline
//! after which the command and every process below it (qemu included) are killed.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use weft_tests::process;

/// The line the guest script prints once the kernel has booted and the script starts.
pub const READY_MARKER: &str = "weft-vm: ready";

/// What the output said, read as it streams.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Since the start, when the ready marker was printed.
    pub ready_after: Option<Duration>,
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
    /// Test binaries that reported a result line.
    pub result_lines: u64,
    pub failed_tests: Vec<String>,
    /// The test that started and has not finished (libtest runs one at a time here).
    pub running: Option<String>,
    /// The test binary the guest script said it is running.
    pub binary: Option<String>,
    partial: String,
}

impl Progress {
    /// Feed output text; lines may arrive in pieces.
    pub fn feed(&mut self, text: &str, elapsed: Duration) {
        self.partial.push_str(text);
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            self.line(line.trim_end_matches(['\n', '\r']), elapsed);
        }
        // libtest prints `test name ... ` and only the result ends the line.
        if let Some(name) = started_test(&self.partial) {
            self.running = Some(name.to_string());
        }
    }

    fn line(&mut self, line: &str, elapsed: Duration) {
        if line.starts_with(READY_MARKER) && self.ready_after.is_none() {
            self.ready_after = Some(elapsed);
        }
        if let Some(binary) = line.strip_prefix("weft-vm: running ") {
            self.binary = Some(binary.trim().to_string());
        }
        if let Some(result) = line.strip_prefix("test result: ") {
            self.result_lines += 1;
            let counts = result
                .strip_prefix("ok. ")
                .or_else(|| result.strip_prefix("FAILED. "))
                .unwrap_or(result);
            let number = |label: &str| -> u64 {
                counts
                    .split(';')
                    .filter_map(|part| part.trim().strip_suffix(label))
                    .filter_map(|n| n.trim().parse::<u64>().ok())
                    .sum()
            };
            self.passed += number(" passed");
            self.failed += number(" failed");
            self.skipped += number(" ignored");
            return;
        }
        if let Some(name) = started_test(line) {
            let outcome = line.rsplit(" ... ").next().unwrap_or("").trim();
            if outcome.starts_with("FAILED") {
                self.failed_tests.push(name.to_string());
            }
            // Anything but a result after ` ... ` is output printed while the test runs.
            let finished =
                outcome == "ok" || outcome.starts_with("FAILED") || outcome.starts_with("ignored");
            self.running = (!finished).then(|| name.to_string());
        } else if self.running.is_some() {
            // The result of a test whose start was printed on an earlier (partial) line.
            let outcome = line.trim();
            if outcome == "ok" || outcome.starts_with("ignored") {
                self.running = None;
            } else if outcome == "FAILED" {
                self.failed_tests.extend(self.running.take());
            }
        }
    }
}

/// `test <name> ... ` at the start of a libtest line (not the `test result:` summary).
fn started_test(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("test ")?;
    let (name, _) = rest.split_once(" ... ")?;
    (!name.contains(' ')).then_some(name)
}

/// How a row's command ended.
#[derive(Debug)]
pub struct Outcome {
    /// None when it was killed at the deadline.
    pub status: Option<ExitStatus>,
    pub wall: Duration,
    pub progress: Progress,
    /// Processes still alive after the command ended that had to be killed.
    pub leftovers_killed: usize,
}

/// Run `command` until it exits or `timeout` passes, teeing its output to the terminal (when
/// `echo`) and `log`. Whatever it started is killed before this returns.
pub fn run(
    mut command: Command,
    log: &Path,
    timeout: Duration,
    echo: bool,
) -> anyhow::Result<Outcome> {
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    command
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer);
    let started = Instant::now();
    let mut child = process::spawn_in_group(&mut command)
        .with_context(|| format!("starting {}", command.get_program().display()))?;
    // Our copies of the write end must go, or the reader never sees the end of the output.
    drop(command);

    let mut log_file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let progress = Arc::new(Mutex::new(Progress::default()));
    let tee_progress = Arc::clone(&progress);
    let tee = std::thread::spawn(move || {
        let mut reader = reader;
        let mut buf = [0u8; 8192];
        let mut stdout = std::io::stdout();
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            if echo {
                let _ = stdout.write_all(&buf[..n]);
                let _ = stdout.flush();
            }
            let _ = log_file.write_all(&buf[..n]);
            let text = String::from_utf8_lossy(&buf[..n]);
            if let Ok(mut p) = tee_progress.lock() {
                p.feed(&text, started.elapsed());
            }
        }
    });

    let status =
        process::wait_until(&mut child, started + timeout).context("waiting for the VM")?;
    // On success nothing should remain; after a timeout the VM is still up. Either way,
    // nothing started by this row survives it.
    let leftovers_killed = process::kill_tree(child.id());
    let _ = child.wait();
    // qemu holds the pipe's write end; with it gone the tee thread ends.
    let _ = tee.join();
    let progress = progress.lock().map(|p| p.clone()).unwrap_or_default();
    Ok(Outcome {
        status,
        wall: started.elapsed(),
        progress,
        leftovers_killed,
    })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn feed_all(chunks: &[&str]) -> Progress {
        let mut p = Progress::default();
        for c in chunks {
            p.feed(c, Duration::from_secs(1));
        }
        p
    }

    #[test]
    fn counts_every_binary_result_line() {
        let p = feed_all(&[
            "weft-vm: ready after 4.9s\n",
            "test result: ok. 11 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1s\n",
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s\n",
        ]);
        assert_eq!(
            (p.passed, p.failed, p.skipped, p.result_lines),
            (13, 1, 1, 2)
        );
        assert_eq!(p.ready_after, Some(Duration::from_secs(1)));
    }

    #[test]
    fn a_started_test_without_result_is_the_running_one() {
        let p = feed_all(&[
            "weft-vm: running policy\n",
            "test audit_mode ... ok\n",
            "test deny_wins ... ",
        ]);
        assert_eq!(p.running.as_deref(), Some("deny_wins"));
        assert_eq!(p.binary.as_deref(), Some("policy"));

        let p = feed_all(&["test deny_wins ... ", "ok\n", "test x ... FAILED\n"]);
        assert_eq!(p.running, None);
        assert_eq!(p.failed_tests, ["x"]);
    }

    #[test]
    fn output_printed_while_a_test_runs_does_not_end_it() {
        let p = feed_all(&["test slow ... ", "[agent] some log line\n"]);
        assert_eq!(p.running.as_deref(), Some("slow"));
    }

    #[test]
    fn a_timed_out_command_and_its_children_are_killed() {
        let dir = std::env::temp_dir().join(format!("xtask-runner-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("out.log");
        // A child that outlives its parent's exit is the case that matters (qemu under vng);
        // the odd durations make these sleeps findable.
        let tag = format!(
            "{}.{}",
            900 + std::process::id() % 97,
            std::process::id() % 1000
        );
        let mut command = Command::new("sh");
        command.args([
            "-c",
            &format!("echo started; sleep {tag} & sleep {tag}; echo unreachable"),
        ]);
        let outcome = run(command, &log, Duration::from_millis(500), true).unwrap();
        assert!(outcome.status.is_none(), "must be reported as timed out");
        assert_eq!(outcome.leftovers_killed, 2, "both sleeps were below sh");
        assert_eq!(fs::read_to_string(&log).unwrap(), "started\n");
        let survivors: Vec<_> = fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.starts_with("sleep ") && c.contains(&tag))
            .collect();
        assert!(survivors.is_empty(), "left behind: {survivors:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
