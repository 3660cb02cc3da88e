//! HTTP rules as the L7 filter applies them: what the compiled policy carries per (endpoint,
//! direction, peer identity, port), and the matcher (pure, no HTTP library).
//!
//! Semantics (Cilium's `PortRuleHTTP`): a request passes when any rule matches all of its
//! fields. `method`, `path` and `host` are regular expressions matched against the whole
//! value (`path` against the request target as sent, query included, as Envoy's `:path`;
//! `host` against the `Host` header or `:authority`, port included when sent); a header rule is
//! `"Name"` (present) or `"Name: value"` (some value of that header equals `value` exactly).
//! A rule with no field matches every request: that is what an L4 allow without HTTP rules on
//! the same port contributes (Cilium: a selector without L7 rules on a proxied port allows all).

use std::sync::Arc;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::model::HttpRule;

/// The HTTP rules of one policy map entry whose verdict is `RedirectL7`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct L7Policy {
    /// Passes when any of them matches; empty denies everything.
    pub rules: Vec<HttpAllow>,
}

/// One allow rule and the policy rule it came from (`WeftNetworkPolicy shop/api ingress[0]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpAllow {
    pub rule: HttpRule,
    pub derived_from: String,
}

/// A header rule, split: `"Name"` or `"Name: value"`. `None` when it is not a rule (the
/// parser rejects those with the field path).
#[must_use]
pub fn split_header_rule(rule: &str) -> Option<(&str, Option<&str>)> {
    let (name, value) = match rule.split_once(':') {
        Some((n, v)) => (n.trim(), Some(v.trim())),
        None => (rule.trim(), None),
    };
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return None;
    }
    // A header value: visible ASCII, spaces and tabs, obs-text; no control characters.
    if value.is_some_and(|v| v.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)) {
        return None;
    }
    Some((name, value))
}

/// `^(?:re)$`: rules match the whole value.
pub fn anchored(re: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{re})$"))
}

/// What the matcher needs to know of a request.
pub trait RequestView {
    fn method(&self) -> &str;
    /// The request target as sent (origin form: path and query).
    fn path(&self) -> &str;
    /// `Host` or `:authority`, if any.
    fn host(&self) -> Option<&str>;
    /// Whether the header is present (`value: None`) or has a value equal to `value`.
    fn has_header(&self, name: &str, value: Option<&str>) -> bool;
}

/// Why an [`L7Policy`] could not be compiled (the parser rejects such rules first, so only a
/// configuration that did not come from the policy core sees it).
#[derive(Debug, thiserror::Error)]
pub enum HttpRuleError {
    /// A `method`, `path` or `host` is not a regular expression.
    #[error("rule {index} ({derived_from}): {field} {pattern:?} is not a valid regular expression")]
    Regex {
        index: usize,
        derived_from: String,
        field: &'static str,
        pattern: String,
        #[source]
        source: regex::Error,
    },
    /// A header rule is neither `"Name"` nor `"Name: value"`.
    #[error("rule {index} ({derived_from}): {header:?} is not a header rule")]
    Header {
        index: usize,
        derived_from: String,
        header: String,
    },
}

/// An [`L7Policy`] compiled for matching.
#[derive(Clone, Debug)]
pub struct HttpMatcher {
    rules: Arc<[CompiledRule]>,
}

#[derive(Debug)]
struct CompiledRule {
    method: Option<Regex>,
    path: Option<Regex>,
    host: Option<Regex>,
    headers: Vec<(String, Option<String>)>,
    derived_from: String,
}

impl CompiledRule {
    fn matches(&self, req: &impl RequestView) -> bool {
        self.method
            .as_ref()
            .is_none_or(|re| re.is_match(req.method()))
            && self.path.as_ref().is_none_or(|re| re.is_match(req.path()))
            && self
                .host
                .as_ref()
                .is_none_or(|re| req.host().is_some_and(|h| re.is_match(h)))
            && self
                .headers
                .iter()
                .all(|(n, v)| req.has_header(n, v.as_deref()))
    }
}

impl HttpMatcher {
    pub fn compile(policy: &L7Policy) -> Result<Self, HttpRuleError> {
        let mut rules = Vec::with_capacity(policy.rules.len());
        for (index, allow) in policy.rules.iter().enumerate() {
            let re = |field: &'static str, p: &Option<String>| {
                p.as_deref()
                    .map(|p| {
                        anchored(p).map_err(|source| HttpRuleError::Regex {
                            index,
                            derived_from: allow.derived_from.clone(),
                            field,
                            pattern: p.to_string(),
                            source,
                        })
                    })
                    .transpose()
            };
            let mut headers = Vec::new();
            for h in &allow.rule.headers {
                let Some((n, v)) = split_header_rule(h) else {
                    return Err(HttpRuleError::Header {
                        index,
                        derived_from: allow.derived_from.clone(),
                        header: h.clone(),
                    });
                };
                headers.push((n.to_string(), v.map(str::to_string)));
            }
            rules.push(CompiledRule {
                method: re("method", &allow.rule.method)?,
                path: re("path", &allow.rule.path)?,
                host: re("host", &allow.rule.host)?,
                headers,
                derived_from: allow.derived_from.clone(),
            });
        }
        Ok(HttpMatcher {
            rules: rules.into(),
        })
    }

    /// The rule that allows the request (its `derived_from`), or `None`: denied.
    pub fn allowed_by(&self, req: &impl RequestView) -> Option<&str> {
        self.rules
            .iter()
            .find(|r| r.matches(req))
            .map(|r| r.derived_from.as_str())
    }

    /// The policies whose rules are in this matcher, for naming a deny.
    pub fn policies(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.derived_from.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Req {
        method: &'static str,
        path: &'static str,
        host: Option<&'static str>,
        headers: &'static [(&'static str, &'static str)],
    }

    impl RequestView for Req {
        fn method(&self) -> &str {
            self.method
        }
        fn path(&self) -> &str {
            self.path
        }
        fn host(&self) -> Option<&str> {
            self.host
        }
        fn has_header(&self, name: &str, value: Option<&str>) -> bool {
            self.headers
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case(name) && value.is_none_or(|x| x == *v))
        }
    }

    fn req(method: &'static str, path: &'static str) -> Req {
        Req {
            method,
            path,
            host: Some("deathstar.empire.svc"),
            headers: &[("X-Tenant", "blue"), ("Accept", "*/*")],
        }
    }

    fn policy(rules: &[HttpRule]) -> HttpMatcher {
        HttpMatcher::compile(&L7Policy {
            rules: rules
                .iter()
                .enumerate()
                .map(|(i, r)| HttpAllow {
                    rule: r.clone(),
                    derived_from: format!("p ingress[{i}]"),
                })
                .collect(),
        })
        .expect("valid")
    }

    fn rule(method: Option<&str>, path: Option<&str>) -> HttpRule {
        HttpRule {
            method: method.map(Into::into),
            path: path.map(Into::into),
            ..HttpRule::default()
        }
    }

    #[test]
    fn star_wars() {
        let m = policy(&[rule(Some("POST"), Some("/v1/request-landing"))]);
        assert_eq!(
            m.allowed_by(&req("POST", "/v1/request-landing")),
            Some("p ingress[0]")
        );
        assert_eq!(m.allowed_by(&req("PUT", "/v1/exhaust-port")), None);
        assert_eq!(m.allowed_by(&req("GET", "/v1/request-landing")), None);
    }

    #[test]
    fn regexes_match_the_whole_value() {
        let m = policy(&[rule(Some("GET|HEAD"), Some("/orders(/.*)?"))]);
        for (method, path, ok) in [
            ("GET", "/orders", true),
            ("HEAD", "/orders/7", true),
            ("GET", "/orders7", false),
            ("GET", "/x/orders", false),
            ("GETX", "/orders", false),
            ("XGET", "/orders", false),
            ("GET", "/orders?all=1", false),
        ] {
            assert_eq!(
                m.allowed_by(&req(method, path)).is_some(),
                ok,
                "{method} {path}"
            );
        }
    }

    #[test]
    fn any_rule_all_fields() {
        let m = policy(&[
            HttpRule {
                method: Some("POST".into()),
                headers: vec!["X-Tenant: blue".into(), "Accept".into()],
                ..HttpRule::default()
            },
            HttpRule {
                host: Some("deathstar\\..*".into()),
                path: Some("/public".into()),
                ..HttpRule::default()
            },
        ]);
        assert_eq!(m.allowed_by(&req("POST", "/a")), Some("p ingress[0]"));
        assert_eq!(m.allowed_by(&req("GET", "/public")), Some("p ingress[1]"));
        assert_eq!(m.allowed_by(&req("GET", "/a")), None);
        let other_tenant = Req {
            headers: &[("X-Tenant", "red"), ("Accept", "*/*")],
            ..req("POST", "/a")
        };
        assert_eq!(m.allowed_by(&other_tenant), None, "header values are exact");
        let no_host = Req {
            host: None,
            ..req("GET", "/public")
        };
        assert_eq!(m.allowed_by(&no_host), None, "a host rule needs a host");
    }

    #[test]
    fn empty_rule_allows_all_and_empty_policy_denies_all() {
        assert!(
            policy(&[HttpRule::default()])
                .allowed_by(&req("DELETE", "/"))
                .is_some()
        );
        assert!(policy(&[]).allowed_by(&req("GET", "/")).is_none());
    }

    #[test]
    fn header_rules() {
        assert_eq!(split_header_rule("X-Tenant"), Some(("X-Tenant", None)));
        assert_eq!(
            split_header_rule(" X-Tenant:  blue "),
            Some(("X-Tenant", Some("blue")))
        );
        assert_eq!(split_header_rule("X Tenant: a"), None);
        assert_eq!(split_header_rule(": a"), None);
        assert_eq!(split_header_rule("X-A: a\rb"), None);
        assert_eq!(split_header_rule("X(A)"), None);
    }

    #[test]
    fn invalid_rules_are_errors() {
        let bad = L7Policy {
            rules: vec![HttpAllow {
                rule: rule(None, Some("/orders(")),
                derived_from: "p".into(),
            }],
        };
        assert!(matches!(
            HttpMatcher::compile(&bad),
            Err(HttpRuleError::Regex { field: "path", .. })
        ));
        let bad = L7Policy {
            rules: vec![HttpAllow {
                rule: HttpRule {
                    headers: vec!["a b".into()],
                    ..HttpRule::default()
                },
                derived_from: "p".into(),
            }],
        };
        assert!(matches!(
            HttpMatcher::compile(&bad),
            Err(HttpRuleError::Header { .. })
        ));
    }
}
