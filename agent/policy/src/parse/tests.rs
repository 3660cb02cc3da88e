use super::*;
use crate::model::Enforcement;
use crate::ports::PortPrefix;

const FILE: &str = "policies/api.yaml";

fn errors(yaml: &str) -> Vec<String> {
    match parse_documents(FILE, yaml) {
        Ok(objs) => panic!("expected an error, got {} objects", objs.len()),
        Err(e) => e.to_string().lines().map(str::to_string).collect(),
    }
}

/// A `WeftNetworkPolicy shop/api-ingress` with `body` as its spec (indented by the caller).
fn wnp(body: &str) -> String {
    format!(
        "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\n\
         metadata: {{name: api-ingress, namespace: shop}}\nspec:\n  \
         endpointSelector: {{matchLabels: {{app: api}}}}\n{body}"
    )
}

fn one_policy(yaml: &str) -> Policy {
    let objs = parse_documents(FILE, yaml).expect("valid policy");
    match objs.into_iter().next() {
        Some(Object::Policy(p)) => *p,
        other => panic!("expected a policy, got {other:?}"),
    }
}

const OBJ: &str = "policies/api.yaml: WeftNetworkPolicy shop/api-ingress: ";

/// Each row: the spec body, and the start of the expected message after `file: object: `.
#[test]
#[expect(clippy::too_many_lines, reason = "a table: one row per rejected input")]
fn validation_errors_name_file_object_and_field() {
    let rows: &[(&str, &str)] = &[
        (
            "  ingress:\n  - toPorts: [{ports: [{port: \"80\"}, {port: \"99999\"}]}]\n",
            "spec.ingress[0].toPorts[0].ports[1].port: \"99999\" is not a port (1-65535)",
        ),
        (
            "  ingress:\n  - toPorts: [{ports: [{port: HTTP}]}]\n",
            "spec.ingress[0].toPorts[0].ports[0].port: \"HTTP\" is neither a port number nor a port name (hint: a port name (IANA_SVC_NAME)",
        ),
        (
            "  ingress:\n  - toPorts: [{ports: [{port: http, endPort: 90}]}]\n",
            "spec.ingress[0].toPorts[0].ports[0].endPort: endPort needs a numbered port",
        ),
        (
            "  egress:\n  - toPorts: [{ports: [{port: dns, protocol: ICMP}]}]\n",
            "spec.egress[0].toPorts[0].ports[0].port: ICMP has no ports, got \"dns\"",
        ),
        (
            "  ingress:\n  - icmps: [{fields: [{type: EchoRequests}]}]\n",
            "spec.ingress[0].icmps[0].fields[0].type: \"EchoRequests\" is not an IPv4 ICMP type name (hint: write a type number 0-255 or one of the IPv4 names: EchoReply, DestinationUnreachable,",
        ),
        (
            "  ingress:\n  - icmps: [{fields: [{type: PacketTooBig}]}]\n",
            "spec.ingress[0].icmps[0].fields[0].type: \"PacketTooBig\" is not an IPv4 ICMP type name",
        ),
        (
            "  ingress:\n  - icmps: [{fields: [{type: Redirect, family: IPv6}]}]\n",
            "spec.ingress[0].icmps[0].fields[0].type: \"Redirect\" is not an IPv6 ICMP type name (hint: write a type number 0-255 or one of the IPv6 names: DestinationUnreachable, PacketTooBig,",
        ),
        (
            "  ingress:\n  - icmps: [{fields: [{type: \"256\"}]}]\n",
            "spec.ingress[0].icmps[0].fields[0].type: 256 is not an ICMP type (0-255)",
        ),
        (
            "  ingress:\n  - toPorts: [{ports: [{port: \"9000\", endPort: 8000}]}]\n",
            "spec.ingress[0].toPorts[0].ports[0].endPort: endPort 8000 is below port 9000",
        ),
        (
            "  ingress:\n  - toPorts: [{ports: [{port: \"0\", endPort: 8000}]}]\n",
            "spec.ingress[0].toPorts[0].ports[0].endPort: endPort needs a port",
        ),
        (
            "  egress:\n  - toPorts: [{ports: [{port: \"8\", protocol: ICMP}]}]\n",
            "spec.egress[0].toPorts[0].ports[0].port: ICMP has no ports",
        ),
        (
            "  ingress:\n  - toPorts: [{ports: [{port: \"53\", protocol: UDP}], rules: {http: [{method: GET}]}}]\n",
            "spec.ingress[0].toPorts[0].ports[0].protocol: HTTP rules need TCP, but this port is UDP",
        ),
        (
            "  ingress:\n  - toPorts: [{ports: [{port: \"80\", protocol: TCP}], rules: {http: [{path: \"/orders(\"}]}}]\n",
            "spec.ingress[0].toPorts[0].rules.http[0].path: \"/orders(\" is not a valid regular expression",
        ),
        (
            "  ingress:\n  - toPorts: [{ports: [{port: \"80\"}], rules: {http: [{headers: [\"X Tenant: a\"]}]}}]\n",
            "spec.ingress[0].toPorts[0].rules.http[0].headers[0]: \"X Tenant: a\" is not a header rule",
        ),
        (
            "  egress:\n  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [192.168.0.0/16]}]\n",
            "spec.egress[0].toCIDRSet[0].except[0]: \"192.168.0.0/16\" is not inside cidr 10.0.0.0/8",
        ),
        (
            "  egress:\n  - toCIDR: [10.0.0.0/33]\n",
            "spec.egress[0].toCIDR[0]: \"10.0.0.0/33\" is not a CIDR",
        ),
        (
            "  ingressDeny:\n  - fromCIDRSet: [{cidr: nope}]\n",
            "spec.ingressDeny[0].fromCIDRSet[0].cidr: \"nope\" is not a CIDR",
        ),
        (
            "  ingress:\n  - fromEntities: [wrld]\n",
            "spec.ingress[0].fromEntities[0]: unknown variant `wrld`",
        ),
        (
            "  ingress:\n  - fromEndpoint: [{}]\n",
            "spec.ingress[0].fromEndpoint: unknown field `fromEndpoint`",
        ),
        (
            "  ingressDeny:\n  - toPorts: [{ports: [{port: \"80\"}], rules: {http: [{method: GET}]}}]\n",
            "spec.ingressDeny[0].toPorts[0].rules: unknown field `rules`",
        ),
        (
            "  ingressDeny:\n  - authentication: {mode: required}\n",
            "spec.ingressDeny[0].authentication: unknown field `authentication`",
        ),
        (
            "  ingress:\n  - authentication: {mode: sometimes}\n",
            "spec.ingress[0].authentication.mode: unknown variant `sometimes`",
        ),
        (
            "  enforcement: dry-run\n",
            "spec.enforcement: unknown variant `dry-run`, expected `enforce` or `audit`",
        ),
        (
            "  ingress:\n  - toPorts: [{ports: [{port: \"80\", protocol: TPC}]}]\n",
            "spec.ingress[0].toPorts[0].ports[0].protocol: unknown variant `TPC`",
        ),
        (
            "  ingress:\n  - fromEndpoints: [{matchExpressions: [{key: app, operator: In}]}]\n",
            "spec.ingress[0].fromEndpoints[0].matchExpressions[0].values: operator In needs at least one value",
        ),
        (
            "  ingress:\n  - fromEndpoints: [{matchExpressions: [{key: app, operator: Exists, values: [x]}]}]\n",
            "spec.ingress[0].fromEndpoints[0].matchExpressions[0].values: operator Exists takes no values",
        ),
        (
            "  ingress:\n  - fromEndpoints: [{matchExpressions: [{key: app, operator: Matches, values: [x]}]}]\n",
            "spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator: unknown variant `Matches`",
        ),
        (
            "  egress:\n  - toEntities: [world]\n    authentication: {mode: required}\n",
            "spec.egress[0].authentication: authentication is required, but toCIDR/toCIDRSet/world peers",
        ),
        (
            "  ingress:\n  - icmps: [{fields: [{type: 300}]}]\n",
            "spec.ingress[0].icmps[0].fields[0].type: 300 is not an ICMP type (0-255)",
        ),
    ];
    for (body, want) in rows {
        let errs = errors(&wnp(body));
        let want = format!("{OBJ}{want}");
        assert!(
            errs.iter().any(|e| e.starts_with(&want)),
            "for spec\n{body}\nwanted a line starting with\n  {want}\ngot\n  {}",
            errs.join("\n  ")
        );
    }
}

#[test]
fn every_problem_of_a_file_is_reported_and_nothing_half_applies() {
    let yaml = format!(
        "{}---\n{}",
        wnp("  ingress:\n  - toPorts: [{ports: [{port: \"99999\"}, {port: \"1\", endPort: 0}]}]\n"),
        "apiVersion: weft.io/v1alpha1\nkind: Endpoint\nmetadata: {name: api-0, namespace: shop}\nspec: {}\n"
    );
    let err = parse_documents(FILE, &yaml).expect_err("invalid file");
    assert_eq!(err.file, FILE);
    assert_eq!(err.problems.len(), 2, "{err}");
}

#[test]
fn document_level_errors() {
    let rows: &[(&str, &str)] = &[
        (
            "apiVersion: weft.io/v1alpha1\nkind: WeftPolicy\nmetadata: {name: x}\n",
            "policies/api.yaml: WeftPolicy x: unknown kind weft.io/v1alpha1/WeftPolicy (hint: known kinds:",
        ),
        (
            "metadata: {name: x}\n",
            "policies/api.yaml: document 1: missing apiVersion or kind",
        ),
        (
            "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {namespace: shop}\nspec: {endpointSelector: {}}\n",
            "policies/api.yaml: WeftNetworkPolicy shop/: metadata.name: is required",
        ),
        (
            "apiVersion: weft.io/v1alpha1\nkind: WeftClusterwideNetworkPolicy\nmetadata: {name: x, namespace: shop}\nspec: {endpointSelector: {}}\n",
            "policies/api.yaml: WeftClusterwideNetworkPolicy x: metadata.namespace: a cluster-scoped policy has no namespace",
        ),
        (
            "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {name: x}\nspec: {}\n",
            "policies/api.yaml: WeftNetworkPolicy default/x: spec: missing field `endpointSelector`",
        ),
        ("kind: [\n", "policies/api.yaml: document 1: not valid YAML"),
        (
            "apiVersion: weft.io/v1alpha1\nkind: Endpoint\nmetadata: {name: a}\nspec: {serviceAcount: x}\n",
            "policies/api.yaml: Endpoint default/a: spec.serviceAcount: unknown field `serviceAcount`",
        ),
        (
            "apiVersion: weft.io/v1alpha1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDRs: [10.1.0.0/333]}\n",
            "policies/api.yaml: Node n1: spec.podCIDRs[0]:",
        ),
    ];
    for (yaml, want) in rows {
        let errs = errors(yaml);
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "for\n{yaml}\nwanted a line starting with\n  {want}\ngot\n  {}",
            errs.join("\n  ")
        );
    }
}

#[test]
fn duplicate_objects_in_a_file_are_rejected() {
    let doc = wnp("  ingress: []\n");
    let errs = errors(&format!("{doc}---\n{doc}"));
    assert_eq!(
        errs,
        vec![format!(
            "{OBJ}metadata.name: defined twice in this file (hint: each object needs a unique kind/namespace/name)"
        )]
    );
}

#[test]
fn defaults_are_filled_in_as_the_api_server_would() {
    let yaml = "\
apiVersion: weft.io/v1alpha1
kind: WeftNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {}
  ingress:
  - toPorts: [{ports: [{port: 80}]}]
---
apiVersion: weft.io/v1alpha1
kind: Endpoint
metadata: {name: api-0, labels: {app: api}}
spec: {}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: a}}
---
apiVersion: weft.io/v1alpha1
kind: Node
metadata: {name: n1}
spec: {addresses: [192.0.2.1], podCIDRs: [10.1.0.0/24], wireguardPublicKey: abc}
---
";
    let objs = parse_documents(FILE, yaml).expect("valid file");
    assert_eq!(objs.len(), 4);
    let Object::Policy(p) = &objs[0] else {
        panic!("policy first")
    };
    assert_eq!(p.id.to_string(), "WeftNetworkPolicy default/p");
    assert_eq!(p.enforcement, Enforcement::Enforce);
    let WrittenSpec::Weft(spec) = &p.spec else {
        panic!("a weft spec")
    };
    assert_eq!(
        spec.ingress.as_ref().expect("ingress")[0].to_ports[0].ports[0].protocol,
        crate::model::Protocol::ANY
    );
    let Object::Endpoint(ep) = &objs[1] else {
        panic!("endpoint second")
    };
    assert_eq!(ep.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(ep.spec.service_account, "default");
    let Object::Namespace(ns) = &objs[2] else {
        panic!("namespace third")
    };
    let labels = ns.metadata.labels.as_ref().expect("labels");
    assert_eq!(
        labels.get(K8S_NAMESPACE_NAME_LABEL).map(String::as_str),
        Some("shop")
    );
    assert_eq!(labels.get("team").map(String::as_str), Some("a"));
    let Object::Node(node) = &objs[3] else {
        panic!("node fourth")
    };
    assert_eq!(node.spec.pod_cidrs[0].to_string(), "10.1.0.0/24");
}

#[test]
fn the_design_example_parses_and_compiles() {
    let p = one_policy(
        "apiVersion: weft.io/v1alpha1
kind: WeftNetworkPolicy
metadata: {name: api-ingress, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  enforcement: enforce
  ingress:
  - fromEndpoints:
    - matchLabels: {app: frontend}
    toPorts:
    - ports: [{port: \"8080\", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: \"/orders(/.*)?\"}
        - {method: POST, path: \"/orders\", headers: [\"X-Tenant: .+\"]}
    authentication: {mode: required}
  ingressDeny:
  - fromEntities: [world]
  egress:
  - toEndpoints: [{matchLabels: {app: db}}]
    toPorts: [{ports: [{port: \"5432\", protocol: TCP}]}]
  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]
",
    );
    let ingress = p.rules(Section::Ingress).expect("ingress");
    assert!(ingress[0].auth_required);
    assert_eq!(
        ingress[0].l4,
        L4::Ports(vec![L4Match {
            protocol: IPPROTO_TCP,
            port: PortPrefix::exact(8080),
            l7: Some(0)
        }])
    );
    let egress = p.rules(Section::Egress).expect("egress");
    assert_eq!(egress[1].l4, L4::Any, "no toPorts: every protocol");
    assert_eq!(
        p.cidr_prefixes()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec!["10.0.0.0/8", "10.96.0.0/12"]
    );
}

#[test]
fn ports_without_protocol_mean_tcp_udp_sctp_never_icmp() {
    let p = one_policy(&wnp(
        "  ingress:\n  - toPorts: [{ports: [{port: \"53\"}]}]\n",
    ));
    let L4::Ports(ms) = &p.rules(Section::Ingress).expect("ingress")[0].l4 else {
        panic!("ports expected")
    };
    let protos: Vec<u8> = ms.iter().map(|m| m.protocol).collect();
    assert_eq!(protos, vec![IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP]);
}

#[test]
fn ranges_icmps_and_implicit_ports() {
    let p = one_policy(&wnp("  ingress:
  - toPorts: [{ports: [{port: \"8080\", endPort: 8083, protocol: TCP}]}]
  - icmps: [{fields: [{type: 8}, {type: 128, family: IPv6}]}]
  - toPorts: [{}]
"));
    let rules = p.rules(Section::Ingress).expect("ingress");
    assert_eq!(
        rules[0].l4,
        L4::Ports(vec![L4Match {
            protocol: IPPROTO_TCP,
            port: PortPrefix::new(8080, 14),
            l7: None
        }])
    );
    assert_eq!(
        rules[1].l4,
        L4::Ports(vec![
            L4Match {
                protocol: IPPROTO_ICMP,
                port: PortPrefix::icmp_type(8),
                l7: None
            },
            L4Match {
                protocol: IPPROTO_ICMPV6,
                port: PortPrefix::icmp_type(128),
                l7: None
            },
        ])
    );
    let L4::Ports(any_port) = &rules[2].l4 else {
        panic!("ports expected")
    };
    assert!(any_port.iter().all(|m| m.port == PortPrefix::ANY));
    assert_eq!(any_port.len(), 3, "TCP, UDP and SCTP, no ICMP");
}

#[test]
fn http_rules_on_any_protocol_apply_to_tcp_only() {
    let p = one_policy(&wnp(
        "  ingress:\n  - toPorts: [{ports: [{port: \"80\"}], rules: {http: [{method: GET}]}}]\n",
    ));
    assert_eq!(
        p.rules(Section::Ingress).expect("ingress")[0].l4,
        L4::Ports(vec![L4Match {
            protocol: IPPROTO_TCP,
            port: PortPrefix::exact(80),
            l7: Some(0)
        }])
    );
}

#[test]
fn present_empty_sections_are_kept_apart_from_absent_ones() {
    let p = one_policy(&wnp("  ingress: []\n"));
    assert_eq!(p.rules(Section::Ingress), Some(&[][..]));
    assert_eq!(p.rules(Section::Egress), None);
}

#[test]
fn clusterwide_policies_compile_unscoped() {
    let p = one_policy(
        "apiVersion: weft.io/v1alpha1
kind: WeftClusterwideNetworkPolicy
metadata: {name: deny-world}
spec:
  endpointSelector: {}
  ingressDeny: [{fromEntities: [world]}]
",
    );
    assert_eq!(p.id.to_string(), "WeftClusterwideNetworkPolicy deny-world");
    assert!(p.subject.requirements.is_empty());
}

#[test]
fn crds_generate() {
    let crds = crate::model::crd_yamls().expect("crds");
    assert_eq!(crds.len(), 2);
    assert!(
        crds[0].1.contains("shortNames:\n    - wnp"),
        "{}",
        crds[0].1
    );
    assert!(crds[0].1.contains("scope: Namespaced"));
    assert!(crds[1].1.contains("scope: Cluster"));
    assert!(
        crds[1].1.contains("endpointSelector"),
        "clusterwide spec is the shared spec"
    );
}

#[test]
fn endpoint_ports_as_a_pod_has_them() {
    let yaml = "apiVersion: weft.io/v1alpha1
kind: Endpoint
metadata: {name: api-0, namespace: shop}
spec:
  ports:
  - {name: http, containerPort: 8080}
  - {name: dns, port: 53, protocol: UDP}
  - {containerPort: 9000, protocol: SCTP}
";
    let objs = parse_documents(FILE, yaml).expect("valid endpoint");
    let Object::Endpoint(ep) = &objs[0] else {
        panic!("an endpoint")
    };
    let named = ep.named_ports();
    assert_eq!(named.len(), 2, "the unnamed port is not a named port");
    let http: Vec<_> = named["http"].iter().copied().collect();
    assert_eq!(
        http,
        vec![crate::ports::ProtoPort {
            protocol: IPPROTO_TCP,
            port: 8080
        }],
        "TCP when no protocol is given"
    );
    assert_eq!(
        named["dns"].iter().next().map(|p| p.protocol),
        Some(IPPROTO_UDP)
    );
}

#[test]
fn named_ports_in_weft_rules_are_kept_by_name() {
    let p = one_policy(&wnp(
        "  ingress:\n  - toPorts: [{ports: [{port: http}, {port: \"80\", protocol: TCP}]}]\n",
    ));
    let rule = &p.rules(Section::Ingress).expect("ingress")[0];
    assert_eq!(
        rule.l4,
        L4::Ports(vec![L4Match {
            protocol: IPPROTO_TCP,
            port: PortPrefix::exact(80),
            l7: None
        }])
    );
    let names: Vec<(&str, u8)> = rule
        .named_ports
        .iter()
        .map(|m| (m.name.as_str(), m.protocol))
        .collect();
    assert_eq!(
        names,
        vec![
            ("http", IPPROTO_TCP),
            ("http", IPPROTO_UDP),
            ("http", IPPROTO_SCTP)
        ],
        "no protocol: any protocol the container port has"
    );
}
