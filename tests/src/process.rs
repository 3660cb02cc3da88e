//! Child processes of tests, the demo, the bench and the VM runner: started in a process
//! group of their own, waited for with a bound, and stopped so that nothing below them runs
//! on. One helper for all of them.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Start `command` as the leader of a new process group (so that a terminal's Ctrl-C does
/// not reach it twice, and its whole group can be signalled at once).
pub fn spawn_in_group(command: &mut Command) -> io::Result<Child> {
    command.process_group(0).spawn()
}

/// Run `command` to completion, killing it (and everything below it) after `limit`.
///
/// # Errors
/// When it cannot start, or with `TimedOut` when it ran out of time.
pub fn run_bounded(command: &mut Command, limit: Duration) -> io::Result<Output> {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = spawn_in_group(command)?;
    // Read the pipes on threads so that a chatty child never blocks on a full pipe.
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_reader = std::thread::spawn(move || read_all(stdout.as_mut()));
    let err_reader = std::thread::spawn(move || read_all(stderr.as_mut()));
    let status = wait_until(&mut child, Instant::now() + limit)?;
    if status.is_none() {
        kill_tree(child.id());
        let _ = child.wait();
    }
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "{} did not finish within {limit:?}: {}",
                command.get_program().display(),
                String::from_utf8_lossy(&stderr)
            ),
        )),
    }
}

fn read_all(pipe: Option<&mut impl io::Read>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(p) = pipe {
        let _ = p.read_to_end(&mut buf);
    }
    buf
}

/// Wait for `child` until `deadline`; `None` when it is still running then.
///
/// # Errors
/// When waiting fails.
pub fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ask `child` to stop (SIGTERM), wait up to `timeout`, then kill it and everything below
/// it; always reaps it.
pub fn stop_child(mut child: Child, timeout: Duration) {
    let pid = pid_of(child.id());
    let _ = kill(pid, Signal::SIGTERM);
    if let Ok(Some(_)) = wait_until(&mut child, Instant::now() + timeout) {
        return;
    }
    eprintln!("process {pid} ignored SIGTERM for {timeout:?}; killing it");
    kill_tree(child.id());
    let _ = child.wait();
}

/// Kill `root` and every process below it so that none of them runs in between: first
/// everything is stopped (SIGSTOP, the root first, then each generation found below, until
/// no new process appears: a stopped process cannot fork), then killed. Returns how many
/// processes other than `root` there were.
pub fn kill_tree(root: u32) -> usize {
    let mut frozen = vec![root];
    let _ = kill(pid_of(root), Signal::SIGSTOP);
    loop {
        let found: Vec<u32> = descendants(root)
            .into_iter()
            .filter(|p| !frozen.contains(p))
            .collect();
        if found.is_empty() {
            break;
        }
        for pid in &found {
            let _ = kill(pid_of(*pid), Signal::SIGSTOP);
        }
        frozen.extend(found);
    }
    for pid in &frozen {
        let _ = kill(pid_of(*pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && frozen.iter().skip(1).any(|p| process_alive(*p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    frozen.len() - 1
}

#[allow(clippy::cast_possible_wrap, reason = "pids fit in i32")]
fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(pid as i32)
}

/// Whether `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat_fields(&stat).map(|(state, _)| state != 'Z'))
        .unwrap_or(false)
}

/// Every live process below `root`, children before grandchildren.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if let Some((state, ppid)) = stat_fields(&stat)
                && state != 'Z'
            {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        for child in children.get(&pid).into_iter().flatten() {
            found.push(*child);
            queue.push(*child);
        }
    }
    found
}

/// State and parent pid from `/proc/<pid>/stat` (the command name may contain spaces).
pub fn stat_fields(stat: &str) -> Option<(char, u32)> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_spaces_in_the_name() {
        assert_eq!(
            stat_fields("42 (qemu system x86) S 7 42 42 0"),
            Some(('S', 7))
        );
    }

    /// The parent must not run on once its child is killed: the tree is frozen first.
    #[test]
    fn killing_a_tree_lets_nothing_below_the_root_run_on() {
        let marker = std::env::temp_dir().join(format!("weft-kill-tree-{}", std::process::id()));
        let _ = fs::remove_file(&marker);
        for _ in 0..20 {
            let mut command = Command::new("sh");
            command.args([
                "-c",
                &format!("sleep 30 & sleep 30; echo ran-on > {}", marker.display()),
            ]);
            let mut child = spawn_in_group(&mut command).expect("sh");
            // Wait until both sleeps exist.
            let deadline = Instant::now() + Duration::from_secs(5);
            while descendants(child.id()).len() < 2 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let below = descendants(child.id());
            assert_eq!(kill_tree(child.id()), 2);
            let _ = child.wait();
            assert!(
                below.iter().all(|p| !process_alive(*p)),
                "children are gone"
            );
            assert!(!marker.exists(), "the parent ran on after its child died");
        }
    }

    #[test]
    fn a_bounded_run_that_overruns_is_killed_with_its_children() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo started; sleep 31.5 & sleep 31.5"]);
        let err = run_bounded(&mut command, Duration::from_millis(300)).expect_err("times out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let left: Vec<String> = fs::read_dir("/proc")
            .expect("proc")
            .flatten()
            .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.starts_with("sleep 31.5"))
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}
