//! Turning a verifier refusal into one sentence an operator can act on. The full log is
//! hundreds of lines of instructions; the reason is usually one of a few known messages.

use super::features::{helper_by_id, helper_min_kernel};

/// The verifier's stack limit for a program's deepest call chain.
const STACK_LIMIT_BYTES: u32 = 512;

/// Why the verifier refused a program, as found in its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The kernel does not offer a helper (at all, or to this program type).
    Helper {
        name: Option<String>,
        id: Option<u32>,
    },
    /// "combined stack size of N calls is M. Too large".
    Stack { calls: u32, bytes: u32 },
    /// The program exceeded the verifier's instruction or state budget.
    Complexity { line: String },
    /// Anything else: the last line that is not statistics.
    Other { line: Option<String> },
}

/// Find the reason in a verifier log.
pub fn classify(log: &str) -> Refusal {
    let lines: Vec<&str> = log.lines().map(str::trim).collect();
    for line in &lines {
        for marker in [
            "unknown func ",
            "invalid func ",
            "program of this type cannot use helper ",
        ] {
            if let Some(at) = line.find(marker) {
                let (name, id) = parse_helper(&line[at + marker.len()..]);
                return Refusal::Helper { name, id };
            }
        }
        if let Some(rest) = line.strip_prefix("combined stack size of ")
            && let Some((calls, rest)) = rest.split_once(" calls is ")
            && let Some(bytes) = rest.split('.').next()
            && let (Ok(calls), Ok(bytes)) = (calls.trim().parse(), bytes.trim().parse())
        {
            return Refusal::Stack { calls, bytes };
        }
        if line.contains("BPF program is too large")
            || line.contains("is too complex")
            || line.contains("too many states")
        {
            return Refusal::Complexity {
                line: (*line).to_owned(),
            };
        }
    }
    let line = lines
        .iter()
        .rev()
        .find(|l| !l.is_empty() && !is_statistics(l))
        .map(|l| (*l).to_owned());
    Refusal::Other { line }
}

/// `bpf_redirect_peer#155` or `unknown#155` -> name (when known) and number.
fn parse_helper(text: &str) -> (Option<String>, Option<u32>) {
    let token = text.split_whitespace().next().unwrap_or_default();
    let (name, id) = match token.split_once('#') {
        Some((name, id)) => (name, id.parse::<u32>().ok()),
        None => (token, None),
    };
    let name = match name {
        "" | "unknown" => id.and_then(helper_by_id).map(|(n, _)| n.to_owned()),
        name => Some(name.to_owned()),
    };
    (name, id)
}

/// The summary lines the verifier appends to every log.
fn is_statistics(line: &str) -> bool {
    line.starts_with("verification time")
        || line.starts_with("stack depth")
        || line.starts_with("processed ")
}

/// One sentence for a refused program: the reason, and where the full log is.
pub fn explain(program: &str, io_error: &str, log: &str) -> String {
    let reason = match classify(log) {
        Refusal::Helper { name, id } => {
            let helper = match (&name, id) {
                (Some(name), _) => name.clone(),
                (None, Some(id)) => format!("#{id}"),
                (None, None) => "(unnamed)".to_owned(),
            };
            let needs = name
                .as_deref()
                .and_then(helper_min_kernel)
                .map(|min| format!(" (needs Linux >= {min})"))
                .unwrap_or_default();
            format!("this kernel does not offer helper {helper} to tc programs{needs}")
        }
        Refusal::Stack { calls, bytes } => format!(
            "its deepest call chain ({calls} calls) needs {bytes} bytes of stack, over the \
             verifier's {STACK_LIMIT_BYTES}-byte limit on this kernel"
        ),
        Refusal::Complexity { line } => {
            format!("it is too complex for this kernel's verifier ({line})")
        }
        Refusal::Other { line: Some(line) } => format!("{io_error}: {line}"),
        Refusal::Other { line: None } => format!("{io_error} (the verifier left no log)"),
    };
    format!(
        "the kernel refused the eBPF program {program}: {reason}; run the agent with --verbose \
         for the full verifier log"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end of `from_pod`'s log on Linux 6.1 before its stack was trimmed.
    const STACK_6_1: &str = "combined stack size of 3 calls is 544. Too large\n\
        verification time 825891 usec\n\
        stack depth 408+0+40+0+80\n\
        processed 24979 insns (limit 1000000) max_states_per_insn 10 total_states 1549 \
        peak_states 563 mark_read 31\n";

    #[test]
    fn stack_limit() {
        assert_eq!(
            classify(STACK_6_1),
            Refusal::Stack {
                calls: 3,
                bytes: 544
            }
        );
        assert_eq!(
            explain("from_pod", "Permission denied (os error 13)", STACK_6_1),
            "the kernel refused the eBPF program from_pod: its deepest call chain (3 calls) \
             needs 544 bytes of stack, over the verifier's 512-byte limit on this kernel; run \
             the agent with --verbose for the full verifier log"
        );
    }

    #[test]
    fn helper_known_by_name_but_not_offered() {
        // Kernels that know the helper's number but not for this program type.
        let log = "0: R1=ctx() R10=fp0\n\
            0: (85) call bpf_ktime_get_coarse_ns#160\n\
            unknown func bpf_ktime_get_coarse_ns#160\n\
            processed 1 insns (limit 1000000)\n";
        assert_eq!(
            explain("to_pod", "Invalid argument (os error 22)", log),
            "the kernel refused the eBPF program to_pod: this kernel does not offer helper \
             bpf_ktime_get_coarse_ns to tc programs (needs Linux >= 5.11); run the agent with \
             --verbose for the full verifier log"
        );
    }

    #[test]
    fn helper_unknown_to_the_kernel_is_named_from_its_number() {
        // Kernels older than the helper only know its number.
        let log = "; let now = unsafe { bpf_ktime_get_coarse_ns() };\n\
            42: (85) call unknown#155\n\
            invalid func unknown#155\n\
            processed 40 insns (limit 1000000) max_states_per_insn 0\n";
        assert_eq!(
            classify(log),
            Refusal::Helper {
                name: Some("bpf_redirect_peer".into()),
                id: Some(155)
            }
        );
        assert!(
            explain("from_pod", "Invalid argument (os error 22)", log)
                .contains("helper bpf_redirect_peer to tc programs (needs Linux >= 5.10)")
        );
    }

    #[test]
    fn helper_not_for_this_program_type() {
        let log = "program of this type cannot use helper bpf_probe_read#4\n";
        let text = explain("from_pod", "Invalid argument (os error 22)", log);
        assert!(text.contains("does not offer helper bpf_probe_read to tc programs;"));
    }

    #[test]
    fn complexity_limit() {
        let log = "1000: (bf) r1 = r6\n\
            BPF program is too large. Processed 1000001 insn\n\
            processed 1000001 insns (limit 1000000) max_states_per_insn 4\n";
        assert_eq!(
            explain("from_pod", "Argument list too long (os error 7)", log),
            "the kernel refused the eBPF program from_pod: it is too complex for this kernel's \
             verifier (BPF program is too large. Processed 1000001 insn); run the agent with \
             --verbose for the full verifier log"
        );
    }

    #[test]
    fn anything_else_quotes_the_last_line_that_is_not_statistics() {
        let log = "12: (61) r2 = *(u32 *)(r1 +80)\n\
            R1 invalid mem access 'scalar'\n\
            verification time 12 usec\n\
            stack depth 0\n\
            processed 13 insns (limit 1000000)\n\n";
        assert_eq!(
            explain("to_pod", "Permission denied (os error 13)", log),
            "the kernel refused the eBPF program to_pod: Permission denied (os error 13): R1 \
             invalid mem access 'scalar'; run the agent with --verbose for the full verifier log"
        );
        assert!(explain("to_pod", "Invalid argument", "").contains("left no log"));
    }
}
