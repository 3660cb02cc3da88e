//! Per-policy status: the `Valid` and `Enforced` conditions of every policy object, as plain
//! data for `weft policy get`, the log, and (through [`PolicyStatusReport::conditions`]) a
//! Kubernetes `status.conditions` list.
//!
//! The point is that nothing is accepted silently: a rule that this node cannot enforce as
//! written (HTTP rules while the L7 filter is not running), a section that has no effect, a
//! port name no pod defines, a disabled enforcement mode: each becomes a warning or a false
//! condition here. Pure: computed from the same [`ResolveInput`] that `resolve` reads; no
//! clock (the caller stamps `lastTransitionTime`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use crate::model::{Enforcement, PolicyCondition};
use crate::parse::{FieldProblem, ParseError, ValidationError};
use crate::repository::{Policy, PolicyId, Rule, Section, WrittenSpec};
use crate::resolve::{EnforcementMode, ResolveInput, selects};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ConditionType {
    /// The object passed validation (else: field path and reason).
    Valid,
    /// The policy is in force on this node (selected endpoints, warnings).
    Enforced,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ConditionStatus {
    True,
    False,
}

/// One condition, shaped like `metav1.Condition` (minus time and generation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Condition {
    pub type_: ConditionType,
    pub status: ConditionStatus,
    /// CamelCase, machine-readable: `Valid`, `Invalid`, `Enforced`, `EnforcedWithWarnings`,
    /// `AuditMode`, `EnforcementDisabled`.
    pub reason: &'static str,
    pub message: String,
}

/// Status of one policy object on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyStatusReport {
    /// `Kind namespace/name`.
    pub object: String,
    pub valid: Condition,
    /// Why the object is invalid (empty when valid).
    pub problems: Vec<FieldProblem>,
    /// `None` for an invalid object (it is not in force; the last good version may be).
    pub enforced: Option<Condition>,
    /// Local endpoints the policy selects.
    pub selected_endpoints: usize,
    /// What holds but deserves attention, each with the field it is about.
    pub warnings: Vec<FieldProblem>,
}

impl PolicyStatusReport {
    /// The conditions as `status.conditions` entries (the Kubernetes source adds
    /// `lastTransitionTime` and `observedGeneration`).
    #[must_use]
    pub fn conditions(&self) -> Vec<PolicyCondition> {
        std::iter::once(&self.valid)
            .chain(&self.enforced)
            .map(|c| PolicyCondition {
                type_: format!("{:?}", c.type_),
                status: format!("{:?}", c.status),
                reason: c.reason.to_string(),
                message: c.message.clone(),
                last_transition_time: None,
                observed_generation: None,
            })
            .collect()
    }
}

impl fmt::Display for PolicyStatusReport {
    /// `Kind ns/name: Valid=True; Enforced=True (Enforced): selects 2 endpoints on this node`
    /// and one line per problem or warning.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: Valid={:?}", self.object, self.valid.status)?;
        if let Some(e) = &self.enforced {
            write!(f, "; Enforced={:?} ({}): {}", e.status, e.reason, e.message)?;
        }
        for p in &self.problems {
            write!(f, "\n  invalid: {p}")?;
        }
        for w in &self.warnings {
            write!(f, "\n  warning: {w}")?;
        }
        Ok(())
    }
}

/// The status of every policy in the repository, on this node.
#[must_use]
pub fn policy_status(input: &ResolveInput<'_>) -> BTreeMap<PolicyId, PolicyStatusReport> {
    input
        .repository
        .iter()
        .map(|p| (p.id.clone(), status_of(input, p)))
        .collect()
}

fn status_of(input: &ResolveInput<'_>, policy: &Policy) -> PolicyStatusReport {
    let selected: Vec<_> = input
        .endpoints
        .iter()
        .filter(|ep| selects(policy, ep))
        .collect();
    let mut warnings = policy.warnings.clone();
    if !input.options.l7_available {
        warnings.extend(l7_warnings(policy));
    }
    for (rule, field) in rules_with_fields(policy) {
        let mut missing = BTreeSet::new();
        for m in &rule.named_ports {
            let defined = match rule.section {
                Section::Ingress | Section::IngressDeny => {
                    selected.is_empty() || selected.iter().any(|ep| ep.ports.contains_key(&m.name))
                }
                Section::Egress | Section::EgressDeny => input
                    .named_ports
                    .values()
                    .any(|ports| ports.contains_key(&m.name)),
            };
            if !defined {
                missing.insert(m.name.as_str());
            }
        }
        for name in missing {
            let whose = match rule.section {
                Section::Ingress | Section::IngressDeny => "no selected pod on this node",
                Section::Egress | Section::EgressDeny => "no pod of the cluster",
            };
            warnings.push(FieldProblem {
                field: field.clone(),
                message: format!(
                    "port name {name:?}: {whose} defines it, so it allows nothing (as in Kubernetes, an undefined name does not match)"
                ),
                hint: Some(
                    "name the port in the pod's container ports (an Endpoint's spec.ports)".into(),
                ),
            });
        }
    }
    let n = selected.len();
    let selects_text = format!(
        "selects {n} endpoint{} on this node",
        if n == 1 { "" } else { "s" }
    );
    let enforced = if input.options.enforcement_mode == EnforcementMode::Never {
        Condition {
            type_: ConditionType::Enforced,
            status: ConditionStatus::False,
            reason: "EnforcementDisabled",
            message: format!(
                "policy enforcement mode is never on this node: nothing is enforced ({selects_text})"
            ),
        }
    } else if policy.enforcement == Enforcement::Audit {
        Condition {
            type_: ConditionType::Enforced,
            status: ConditionStatus::False,
            reason: "AuditMode",
            message: format!(
                "enforcement: audit: what it would change is reported, traffic is not ({selects_text})"
            ),
        }
    } else if warnings.is_empty() {
        Condition {
            type_: ConditionType::Enforced,
            status: ConditionStatus::True,
            reason: "Enforced",
            message: selects_text,
        }
    } else {
        let list: Vec<String> = warnings.iter().map(ToString::to_string).collect();
        Condition {
            type_: ConditionType::Enforced,
            status: ConditionStatus::True,
            reason: "EnforcedWithWarnings",
            message: format!("{selects_text}; {}", list.join("; ")),
        }
    };
    PolicyStatusReport {
        object: policy.id.to_string(),
        valid: Condition {
            type_: ConditionType::Valid,
            status: ConditionStatus::True,
            reason: "Valid",
            message: String::new(),
        },
        problems: Vec::new(),
        enforced: Some(enforced),
        selected_endpoints: n,
        warnings,
    }
}

/// Each rule with its field path (`spec.ingress[0]`).
fn rules_with_fields(policy: &Policy) -> impl Iterator<Item = (&Rule, String)> {
    policy
        .sections
        .values()
        .flatten()
        .map(|r| (r, format!("spec.{}", r.path())))
}

/// One warning per port rule with HTTP rules: while the L7 filter is not running, the
/// datapath redirects to nothing and fails closed, so the port is closed to those peers.
fn l7_warnings(policy: &Policy) -> Vec<FieldProblem> {
    let WrittenSpec::Weft(spec) = &policy.spec else {
        return Vec::new();
    };
    let ingress = spec
        .ingress
        .iter()
        .flatten()
        .map(|r| &r.to_ports)
        .enumerate()
        .map(|(i, p)| ("ingress", i, p));
    let egress = spec
        .egress
        .iter()
        .flatten()
        .map(|r| &r.to_ports)
        .enumerate()
        .map(|(i, p)| ("egress", i, p));
    let mut out = Vec::new();
    for (section, i, port_rules) in ingress.chain(egress) {
        for (j, pr) in port_rules.iter().enumerate() {
            if pr.rules.as_ref().is_some_and(|r| !r.http.is_empty()) {
                out.push(FieldProblem {
                    field: format!("spec.{section}[{i}].toPorts[{j}].rules.http"),
                    message: format!(
                        "rules.http on {section}[{i}].toPorts[{j}] needs the L7 filter, which is not running on this node: the port is closed to those peers until it runs"
                    ),
                    hint: Some("remove the HTTP rules to allow the port at L4, or start the L7 filter".into()),
                });
            }
        }
    }
    out
}

/// The status of an object that failed validation: `Valid=False` with every field problem.
#[must_use]
pub fn rejected(err: &ValidationError) -> PolicyStatusReport {
    rejected_object(&err.object, err.problems.clone())
}

/// The status of every object named in a rejected file (the file is rejected whole, so
/// objects without a problem of their own are not listed: they keep their last good state,
/// as the file does). Problems not tied to an object (YAML syntax) are reported under the
/// object `""`.
#[must_use]
pub fn rejected_file(err: &ParseError) -> Vec<PolicyStatusReport> {
    let mut by_object: BTreeMap<String, Vec<FieldProblem>> = BTreeMap::new();
    for p in &err.problems {
        by_object
            .entry(p.object.clone().unwrap_or_default())
            .or_default()
            .push(p.problem.clone());
    }
    by_object
        .into_iter()
        .map(|(object, problems)| rejected_object(&object, problems))
        .collect()
}

fn rejected_object(object: &str, problems: Vec<FieldProblem>) -> PolicyStatusReport {
    let message = problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    PolicyStatusReport {
        object: object.to_string(),
        valid: Condition {
            type_: ConditionType::Valid,
            status: ConditionStatus::False,
            reason: "Invalid",
            message,
        },
        problems,
        enforced: None,
        selected_endpoints: 0,
        warnings: Vec::new(),
    }
}

#[cfg(test)]
mod tests;
