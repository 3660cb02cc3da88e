//! Security labels: which labels of a pod decide its identity, and the label keys weft adds
//! (`weft.io/namespace`, `weft.io/serviceaccount`, `weft.io/ns.<key>`).
//!
//! Pure functions over label maps; never allocates identities (that is `identity`).

use std::collections::BTreeMap;

/// A set of labels, `key -> value`, ordered so that equal sets compare and hash equal.
pub type Labels = BTreeMap<String, String>;

/// The namespace of a pod. Selectors that name this key escape namespace scoping.
pub const NAMESPACE_LABEL: &str = "weft.io/namespace";
/// The service account of a pod.
pub const SERVICE_ACCOUNT_LABEL: &str = "weft.io/serviceaccount";
/// Prefix under which the labels of a pod's namespace are copied onto the pod.
pub const NAMESPACE_LABELS_PREFIX: &str = "weft.io/ns.";
/// Prefix reserved for labels weft computes; a pod's own labels under it are dropped so that
/// a pod cannot claim another namespace or service account.
pub const RESERVED_PREFIX: &str = "weft.io/";
/// Label the API server puts on every namespace (the local source adds it too).
pub const K8S_NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Pod labels that change with every rollout and say nothing about security; keeping them
/// would give each `ReplicaSet` generation its own identity (Cilium filters the same ones).
pub const IGNORED_POD_LABELS: [&str; 7] = [
    "pod-template-hash",
    "pod-template-generation",
    "controller-revision-hash",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
];

/// The security labels of a pod: its own labels (minus [`IGNORED_POD_LABELS`] and anything
/// under `weft.io/`), plus its namespace, service account and its namespace's labels.
#[must_use]
pub fn security_labels(
    pod_labels: &Labels,
    namespace: &str,
    service_account: &str,
    namespace_labels: &Labels,
) -> Labels {
    let mut out: Labels = pod_labels
        .iter()
        .filter(|(k, _)| {
            !k.starts_with(RESERVED_PREFIX) && !IGNORED_POD_LABELS.contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.insert(NAMESPACE_LABEL.into(), namespace.into());
    out.insert(SERVICE_ACCOUNT_LABEL.into(), service_account.into());
    for (k, v) in namespace_labels {
        out.insert(format!("{NAMESPACE_LABELS_PREFIX}{k}"), v.clone());
    }
    out
}

/// `k=v,k2=v2` (a label with an empty value prints as just its key).
#[must_use]
pub fn format_labels(labels: &Labels) -> String {
    label_strings(labels).join(",")
}

/// Each label as `k=v` (or `k` when the value is empty), in key order.
#[must_use]
pub fn label_strings(labels: &Labels) -> Vec<String> {
    labels
        .iter()
        .map(|(k, v)| {
            if v.is_empty() {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn adds_namespace_serviceaccount_and_namespace_labels() {
        let got = security_labels(
            &labels(&[("app", "api"), ("pod-template-hash", "abc123")]),
            "shop",
            "api-sa",
            &labels(&[("team", "payments"), (K8S_NAMESPACE_NAME_LABEL, "shop")]),
        );
        assert_eq!(
            got,
            labels(&[
                ("app", "api"),
                ("weft.io/namespace", "shop"),
                ("weft.io/serviceaccount", "api-sa"),
                ("weft.io/ns.team", "payments"),
                ("weft.io/ns.kubernetes.io/metadata.name", "shop"),
            ])
        );
    }

    #[test]
    fn a_pod_cannot_claim_another_namespace() {
        let got = security_labels(
            &labels(&[
                ("weft.io/namespace", "kube-system"),
                ("weft.io/ns.team", "x"),
            ]),
            "shop",
            "default",
            &Labels::new(),
        );
        assert_eq!(got.get(NAMESPACE_LABEL).map(String::as_str), Some("shop"));
        assert!(!got.contains_key("weft.io/ns.team"));
    }

    #[test]
    fn replicas_of_one_deployment_share_labels() {
        let a = security_labels(
            &labels(&[("app", "api"), ("pod-template-hash", "1")]),
            "shop",
            "default",
            &Labels::new(),
        );
        let b = security_labels(
            &labels(&[("app", "api"), ("pod-template-hash", "2")]),
            "shop",
            "default",
            &Labels::new(),
        );
        assert_eq!(a, b);
    }
}
