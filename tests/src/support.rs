//! What most integration tests need besides nodes and pods: bounded polling, object YAML,
//! JSON from the CLI.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::node::Node;

/// How long a test waits for a change to be enforced. Changes take milliseconds; the bound
/// is generous so that a loaded CI machine or an emulated VM (10-20 times slower) does not
/// make tests flaky. Polling returns as soon as the condition holds, so a large bound costs
/// nothing when things work; no timing is asserted.
pub const CONVERGE: Duration = Duration::from_secs(20);

/// Poll `check` every 100 ms until it holds; panics naming `what` after [`CONVERGE`].
pub fn eventually(what: &str, check: impl FnMut() -> bool) {
    eventually_within(what, CONVERGE, check);
}

/// [`eventually`] with another bound.
pub fn eventually_within(what: &str, bound: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    loop {
        if check() {
            return;
        }
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A `WeftNetworkPolicy` named `name` in `namespace` with `spec` (indented YAML).
pub fn policy_yaml(name: &str, namespace: &str, spec: &str) -> String {
    format!(
        "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{spec}"
    )
}

/// Parse `text` as JSON, panicking with the text.
pub fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

impl Node {
    /// `weft -o json <args>` as JSON.
    pub fn weft_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        json(&self.weft_ok(&all))
    }

    /// Flows from `weft -o json observe --last 4096 <args>` (recent ones, no follow).
    pub fn observed(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["-o", "json", "observe", "--last", "4096"];
        all.extend_from_slice(args);
        self.weft_ok(&all)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(json)
            .collect()
    }

    /// Poll `weft observe <args>` until a flow satisfies `wanted`; every flow seen then.
    pub fn observed_until(
        &self,
        args: &[&str],
        what: &str,
        wanted: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let flows = self.observed(args);
            if flows.iter().any(&wanted) {
                return flows;
            }
            if Instant::now() >= deadline {
                let shown: Vec<String> = flows.iter().rev().take(5).map(Value::to_string).collect();
                panic!(
                    "never happened: {what}; the last {} of {} flows seen:\n{}",
                    shown.len(),
                    flows.len(),
                    shown.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The identity of local pod `pod` from `weft endpoint list`.
    pub fn identity_of(&self, pod: &str) -> u64 {
        let rows = self.weft_json(&["endpoint", "list"]);
        rows.as_array()
            .expect("endpoint list is an array")
            .iter()
            .find(|r| r["pod"] == pod)
            .unwrap_or_else(|| panic!("no endpoint {pod} in {rows}"))["identity"]
            .as_u64()
            .expect("identity is a number")
    }

    /// `weft policy wait`: returns once the agent enforces every object file written before.
    pub fn policy_wait(&self) -> Value {
        self.weft_json(&["policy", "wait", "--timeout", "30"])
    }
}
