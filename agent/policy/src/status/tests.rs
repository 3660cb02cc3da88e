use super::*;
use crate::identity::IdentityAllocator;
use crate::labels::{Labels, security_labels};
use crate::parse::{Object, parse_documents};
use crate::ports::NamedPorts;
use crate::repository::Repository;
use crate::resolve::{LocalEndpoint, ResolveOptions};

const HTTP_POLICY: &str = "apiVersion: weft.io/v1alpha1
kind: WeftNetworkPolicy
metadata: {name: api-l7, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts:
    - ports: [{port: \"8080\", protocol: TCP}]
      rules: {http: [{method: GET}]}
---
apiVersion: weft.io/v1alpha1
kind: WeftNetworkPolicy
metadata: {name: dry-run, namespace: shop}
spec:
  endpointSelector: {}
  enforcement: audit
  egress: []
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: shop}
spec: {}
";

fn reports(yaml: &str, options: ResolveOptions) -> BTreeMap<PolicyId, PolicyStatusReport> {
    let mut repo = Repository::new();
    for obj in parse_documents("s.yaml", yaml).expect("valid") {
        if let Object::Policy(p) = obj {
            repo.upsert(*p);
        }
    }
    let mut ids = IdentityAllocator::new();
    let endpoints: Vec<LocalEndpoint> = [("api", 1), ("web", 2)]
        .into_iter()
        .map(|(app, id)| {
            let labels = security_labels(
                &Labels::from([("app".to_string(), app.to_string())]),
                "shop",
                "default",
                &Labels::new(),
            );
            LocalEndpoint {
                endpoint_id: id,
                namespace: "shop".into(),
                name: app.into(),
                identity: ids.allocate(&labels).expect("identity"),
                labels,
                ports: NamedPorts::new(),
            }
        })
        .collect();
    policy_status(&ResolveInput {
        repository: &repo,
        endpoints: &endpoints,
        identities: ids.pod_identities(),
        cidr_identities: &BTreeMap::new(),
        named_ports: &BTreeMap::new(),
        options,
    })
}

fn by_name<'a>(
    r: &'a BTreeMap<PolicyId, PolicyStatusReport>,
    name: &str,
) -> &'a PolicyStatusReport {
    r.values()
        .find(|s| s.object.ends_with(&format!("/{name}")))
        .expect("policy reported")
}

#[test]
fn http_rules_without_the_l7_filter_are_never_accepted_silently() {
    let r = reports(HTTP_POLICY, ResolveOptions::default());
    let s = by_name(&r, "api-l7");
    assert_eq!(s.valid.status, ConditionStatus::True);
    let e = s.enforced.as_ref().expect("enforced condition");
    assert_eq!(
        (e.status, e.reason),
        (ConditionStatus::True, "EnforcedWithWarnings")
    );
    assert_eq!(s.selected_endpoints, 1);
    assert_eq!(s.warnings.len(), 1);
    assert_eq!(s.warnings[0].field, "spec.ingress[0].toPorts[0].rules.http");
    assert_eq!(
        s.warnings[0].message,
        "rules.http on ingress[0].toPorts[0] needs the L7 filter, which is not running on this node: the port is closed to those peers until it runs"
    );
    assert!(
        e.message.starts_with(
            "selects 1 endpoint on this node; spec.ingress[0].toPorts[0].rules.http: rules.http on"
        ),
        "{}",
        e.message
    );

    let with_l7 = reports(
        HTTP_POLICY,
        ResolveOptions {
            l7_available: true,
            ..ResolveOptions::default()
        },
    );
    let s = by_name(&with_l7, "api-l7");
    assert!(s.warnings.is_empty());
    assert_eq!(s.enforced.as_ref().expect("enforced").reason, "Enforced");
}

#[test]
fn audit_network_policy_and_disabled_enforcement() {
    let r = reports(HTTP_POLICY, ResolveOptions::default());
    let audit = by_name(&r, "dry-run").enforced.clone().expect("enforced");
    assert_eq!(
        (audit.status, audit.reason),
        (ConditionStatus::False, "AuditMode")
    );
    assert!(
        audit
            .message
            .ends_with("(selects 2 endpoints on this node)")
    );
    let np = by_name(&r, "deny-all");
    assert_eq!(np.object, "NetworkPolicy shop/deny-all");
    assert_eq!(
        np.enforced.as_ref().expect("enforced").message,
        "selects 2 endpoints on this node"
    );

    let never = reports(
        HTTP_POLICY,
        ResolveOptions {
            enforcement_mode: EnforcementMode::Never,
            ..ResolveOptions::default()
        },
    );
    for s in never.values() {
        let e = s.enforced.as_ref().expect("enforced");
        assert_eq!(
            (e.status, e.reason),
            (ConditionStatus::False, "EnforcementDisabled")
        );
    }
}

#[test]
fn conditions_have_the_metav1_shape() {
    let r = reports(HTTP_POLICY, ResolveOptions::default());
    let c = by_name(&r, "deny-all").conditions();
    let rows: Vec<(&str, &str, &str)> = c
        .iter()
        .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
        .collect();
    assert_eq!(
        rows,
        vec![("Valid", "True", "Valid"), ("Enforced", "True", "Enforced")]
    );
}

#[test]
fn rejected_objects_carry_the_field_path() {
    let yaml = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: shop}
spec:
  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]
---
apiVersion: weft.io/v1alpha1
kind: WeftNetworkPolicy
metadata: {name: fine, namespace: shop}
spec: {endpointSelector: {}}
";
    let err = parse_documents("bad.yaml", yaml).expect_err("invalid");
    let reports = rejected_file(&err);
    assert_eq!(reports.len(), 1, "only the bad object is named");
    let s = &reports[0];
    assert_eq!(s.object, "NetworkPolicy shop/bad");
    assert_eq!(s.valid.status, ConditionStatus::False);
    assert_eq!(s.valid.reason, "Invalid");
    assert_eq!(s.problems[0].field, "spec.ingress[0].from[0].ipBlock.cidr");
    assert!(
        s.valid.message.starts_with(
            "spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0.0/33\" is not a valid CIDR"
        ),
        "{}",
        s.valid.message
    );
    assert!(s.enforced.is_none());
    let c = s.conditions();
    assert_eq!(c.len(), 1);
    assert_eq!(
        (c[0].type_.as_str(), c[0].status.as_str()),
        ("Valid", "False")
    );
    assert!(
        s.to_string()
            .contains("invalid: spec.ingress[0].from[0].ipBlock.cidr")
    );
}
