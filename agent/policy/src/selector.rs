//! Compiled label selectors and their matching against label sets, including namespace
//! scoping of namespaced policies.
//!
//! A [`Selector`] is validated plain data (built by `parse` from a `LabelSelector`); matching
//! is a pure function of a label set. Which label sets exist is not this module's business.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;

use crate::labels::{Labels, NAMESPACE_LABEL};
use crate::model::{LabelSelector, SelectorOperator};

/// One requirement on one label key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Requirement {
    /// The key is present with one of the values (`matchLabels` is `In` with one value).
    In(String, BTreeSet<String>),
    /// The key is absent or has none of the values (Kubernetes semantics).
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    #[must_use]
    pub fn key(&self) -> &str {
        match self {
            Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::DoesNotExist(k) => k,
        }
    }

    #[must_use]
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::In(k, values) => labels.get(k).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(k, values) => labels.get(k).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// Why a `LabelSelector` is not a valid selector; `field` is relative to the selector.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SelectorError {
    pub field: String,
    pub message: String,
}

/// A conjunction of requirements; the empty selector matches every label set.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    /// Compile a wire selector, checking operator/values consistency.
    ///
    /// # Errors
    /// `In`/`NotIn` without values, `Exists`/`DoesNotExist` with values, or an empty key.
    pub fn compile(wire: &LabelSelector) -> Result<Selector, SelectorError> {
        let mut requirements = Vec::new();
        for (k, v) in &wire.match_labels {
            if k.is_empty() {
                return Err(SelectorError {
                    field: "matchLabels".into(),
                    message: "a label key must not be empty".into(),
                });
            }
            requirements.push(Requirement::In(k.clone(), BTreeSet::from([v.clone()])));
        }
        for (i, expr) in wire.match_expressions.iter().enumerate() {
            let field = format!("matchExpressions[{i}]");
            if expr.key.is_empty() {
                return Err(SelectorError {
                    field: format!("{field}.key"),
                    message: "a label key must not be empty".into(),
                });
            }
            let values: BTreeSet<String> = expr.values.iter().cloned().collect();
            let key = expr.key.clone();
            let req = match expr.operator {
                SelectorOperator::In | SelectorOperator::NotIn if values.is_empty() => {
                    return Err(SelectorError {
                        field: format!("{field}.values"),
                        message: format!(
                            "operator {:?} needs at least one value (use Exists to match any value)",
                            expr.operator
                        ),
                    });
                }
                SelectorOperator::Exists | SelectorOperator::DoesNotExist if !values.is_empty() => {
                    return Err(SelectorError {
                        field: format!("{field}.values"),
                        message: format!(
                            "operator {:?} takes no values (use In/NotIn to compare values)",
                            expr.operator
                        ),
                    });
                }
                SelectorOperator::In => Requirement::In(key, values),
                SelectorOperator::NotIn => Requirement::NotIn(key, values),
                SelectorOperator::Exists => Requirement::Exists(key),
                SelectorOperator::DoesNotExist => Requirement::DoesNotExist(key),
            };
            requirements.push(req);
        }
        Ok(Selector { requirements })
    }

    #[must_use]
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether any requirement is about `key` (used for namespace scoping).
    #[must_use]
    pub fn names_key(&self, key: &str) -> bool {
        self.requirements.iter().any(|r| r.key() == key)
    }

    /// This selector limited to endpoints of `namespace`.
    #[must_use]
    pub fn scoped_to(mut self, namespace: &str) -> Selector {
        self.requirements.push(Requirement::In(
            NAMESPACE_LABEL.into(),
            BTreeSet::from([namespace.to_string()]),
        ));
        self
    }

    /// Peer selector scoping of a namespaced policy: limited to the policy's namespace unless
    /// the selector itself says which namespace(s) it means by naming `weft.io/namespace`.
    #[must_use]
    pub fn scoped_peer(self, namespace: Option<&str>) -> Selector {
        match namespace {
            Some(ns) if !self.names_key(NAMESPACE_LABEL) => self.scoped_to(ns),
            _ => self,
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return write!(f, "{{}}");
        }
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|r| match r {
                Requirement::In(k, v) if v.len() == 1 => {
                    format!("{k}={}", v.iter().next().map_or("", String::as_str))
                }
                Requirement::In(k, v) => format!("{k} in ({})", join(v)),
                Requirement::NotIn(k, v) => format!("{k} notin ({})", join(v)),
                Requirement::Exists(k) => k.clone(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            })
            .collect();
        write!(f, "{}", parts.join(","))
    }
}

fn join(values: &BTreeSet<String>) -> String {
    values.iter().cloned().collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    fn expr(key: &str, operator: SelectorOperator, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| (*v).to_string()).collect(),
        }
    }

    #[test]
    fn match_table() {
        use SelectorOperator::*;
        let api = labels(&[("app", "api"), ("tier", "backend")]);
        let web = labels(&[("app", "web")]);
        let rows: Vec<(&str, LabelSelector, bool, bool)> = vec![
            ("empty selects all", LabelSelector::default(), true, true),
            (
                "matchLabels",
                LabelSelector {
                    match_labels: labels(&[("app", "api")]),
                    ..Default::default()
                },
                true,
                false,
            ),
            (
                "In",
                LabelSelector {
                    match_expressions: vec![expr("app", In, &["api", "db"])],
                    ..Default::default()
                },
                true,
                false,
            ),
            (
                "NotIn matches a missing key",
                LabelSelector {
                    match_expressions: vec![expr("tier", NotIn, &["frontend"])],
                    ..Default::default()
                },
                true,
                true,
            ),
            (
                "Exists",
                LabelSelector {
                    match_expressions: vec![expr("tier", Exists, &[])],
                    ..Default::default()
                },
                true,
                false,
            ),
            (
                "DoesNotExist",
                LabelSelector {
                    match_expressions: vec![expr("tier", DoesNotExist, &[])],
                    ..Default::default()
                },
                false,
                true,
            ),
            (
                "labels and expressions are ANDed",
                LabelSelector {
                    match_labels: labels(&[("app", "api")]),
                    match_expressions: vec![expr("tier", In, &["frontend"])],
                },
                false,
                false,
            ),
        ];
        for (name, wire, want_api, want_web) in rows {
            let sel = Selector::compile(&wire).expect(name);
            assert_eq!(sel.matches(&api), want_api, "{name} on api");
            assert_eq!(sel.matches(&web), want_web, "{name} on web");
        }
    }

    #[test]
    fn operator_values_consistency() {
        use SelectorOperator::*;
        for (e, field) in [
            (expr("a", In, &[]), "matchExpressions[0].values"),
            (expr("a", NotIn, &[]), "matchExpressions[0].values"),
            (expr("a", Exists, &["x"]), "matchExpressions[0].values"),
            (
                expr("a", DoesNotExist, &["x"]),
                "matchExpressions[0].values",
            ),
            (expr("", Exists, &[]), "matchExpressions[0].key"),
        ] {
            let err = Selector::compile(&LabelSelector {
                match_expressions: vec![e],
                ..Default::default()
            })
            .expect_err("invalid expression must be rejected");
            assert_eq!(err.field, field);
        }
    }

    #[test]
    fn peer_scoping() {
        let in_shop = labels(&[("app", "web"), (NAMESPACE_LABEL, "shop")]);
        let in_other = labels(&[("app", "web"), (NAMESPACE_LABEL, "other")]);
        let web = Selector::compile(&LabelSelector {
            match_labels: labels(&[("app", "web")]),
            ..Default::default()
        })
        .expect("valid");
        let scoped = web.clone().scoped_peer(Some("shop"));
        assert!(scoped.matches(&in_shop));
        assert!(
            !scoped.matches(&in_other),
            "namespaced peer stays in its namespace"
        );
        let clusterwide = web.scoped_peer(None);
        assert!(clusterwide.matches(&in_other), "clusterwide is not scoped");

        let any_ns = Selector::compile(&LabelSelector {
            match_expressions: vec![expr(NAMESPACE_LABEL, SelectorOperator::Exists, &[])],
            ..Default::default()
        })
        .expect("valid")
        .scoped_peer(Some("shop"));
        assert!(
            any_ns.matches(&in_other),
            "naming weft.io/namespace escapes scoping"
        );
    }
}
