//! `cargo xtask bench --tests policy-scale`: the policy core at cluster scale, no kernel
//! needed. A generated cluster with realistic label shapes (namespaces with team and env
//! labels, apps with tiers, replicas sharing an identity, named container ports): 10,000
//! endpoints, 2,000 identities, 1,000 policies (half Kubernetes `NetworkPolicy`, half weft),
//! all resolved to `policy` map entries as the agent's plan does, then the changes an agent
//! sees all day: one policy edited, a pod added, a pod relabelled.
//!
//! Each figure is the median of a few runs, printed with the stages it is made of (parse,
//! resolve, diff, capacity check) and the target of issue 11. Two paths are measured for each
//! change: `full` (resolve every endpoint again and diff, what the agent's controller does
//! today) and `scoped` (resolve only the endpoints the change can affect — those the old or
//! new policy selects, or the one pod — and diff those), which is what the targets need.
//! Resident memory is this process's, after the state is built (the core's data, not the
//! agent's whole footprint).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ipnet::IpNet;
use weft_policy::identity::{FIRST_CIDR_IDENTITY, FIRST_POD_IDENTITY};
use weft_policy::model::{ContainerPort, ContainerProtocol};
use weft_policy::{
    CapacityLimits, DesiredState, EntrySets, Labels, LocalEndpoint, Object, Repository,
    ResolveInput, ResolveOptions, capacity_refusals, diff, parse_documents, security_labels,
};

const NAMESPACES: usize = 50;
const APPS_PER_NAMESPACE: usize = 40;
const REPLICAS: usize = 5;
const POLICIES_PER_NAMESPACE: usize = 20;
/// How many times each measurement runs (the median is reported).
const RUNS: usize = 5;
/// The agent's default per-endpoint share of the policy map, and the map's size.
const PER_ENDPOINT: usize = 4096;
const MAP_TOTAL: usize = 1 << 20;

/// The generated cluster.
struct Cluster {
    yaml: String,
    identities: BTreeMap<u32, Labels>,
    endpoints: Vec<LocalEndpoint>,
    ports: Vec<ContainerPort>,
}

fn tier(app: usize) -> &'static str {
    ["frontend", "backend", "db", "cache"][app % 4]
}

fn namespace_labels(ns: usize) -> Labels {
    let mut labels = Labels::new();
    labels.insert("team".into(), format!("team-{}", ns % 10));
    labels.insert(
        "env".into(),
        if ns.is_multiple_of(3) {
            "staging"
        } else {
            "prod"
        }
        .into(),
    );
    labels.insert("kubernetes.io/metadata.name".into(), format!("ns-{ns}"));
    labels
}

fn pod_labels(app: usize) -> Labels {
    let mut labels = Labels::new();
    labels.insert("app".into(), format!("app-{app}"));
    labels.insert("tier".into(), tier(app).into());
    labels.insert("version".into(), format!("v{}", app % 3));
    labels
}

fn generate() -> Cluster {
    let ports = vec![
        ContainerPort {
            name: Some("http".into()),
            container_port: 8080,
            protocol: ContainerProtocol::TCP,
        },
        ContainerPort {
            name: Some("metrics".into()),
            container_port: 9090,
            protocol: ContainerProtocol::TCP,
        },
        ContainerPort {
            name: Some("dns".into()),
            container_port: 5353,
            protocol: ContainerProtocol::UDP,
        },
    ];
    let mut identities = BTreeMap::new();
    let mut endpoints = Vec::new();
    let mut next_identity = FIRST_POD_IDENTITY;
    for ns in 0..NAMESPACES {
        let namespace = format!("ns-{ns}");
        for app in 0..APPS_PER_NAMESPACE {
            let labels = security_labels(
                &pod_labels(app),
                &namespace,
                "default",
                &namespace_labels(ns),
            );
            let identity = next_identity;
            next_identity += 1;
            identities.insert(identity, labels.clone());
            for replica in 0..REPLICAS {
                endpoints.push(LocalEndpoint {
                    endpoint_id: u32::try_from(endpoints.len() + 1).unwrap_or(u32::MAX),
                    namespace: namespace.clone(),
                    name: format!("app-{app}-{replica}"),
                    identity,
                    labels: labels.clone(),
                    ports: weft_policy::ports::named_ports(&ports),
                });
            }
        }
    }
    let mut yaml = String::new();
    for ns in 0..NAMESPACES {
        for i in 0..POLICIES_PER_NAMESPACE {
            let _ = writeln!(yaml, "---");
            yaml.push_str(&policy_yaml(ns, i));
        }
    }
    Cluster {
        yaml,
        identities,
        endpoints,
        ports,
    }
}

/// Policy `i` of namespace `ns`: even ones are `NetworkPolicy` objects, odd ones weft policies, in a
/// few shapes real clusters have (tier to tier on a port, namespace by team, named ports,
/// egress to other namespaces, CIDR egress, deny rules).
fn policy_yaml(ns: usize, i: usize) -> String {
    let app = (i * 2) % APPS_PER_NAMESPACE;
    let peer = (i * 7 + 3) % APPS_PER_NAMESPACE;
    let team = (ns + i) % 10;
    let port = 8000 + i;
    if i.is_multiple_of(2) {
        let spec = match i % 6 {
            0 => format!(
                "  podSelector: {{matchLabels: {{app: app-{app}}}}}\n  ingress:\n  - from:\n    - podSelector: {{matchLabels: {{tier: frontend}}}}\n    - namespaceSelector: {{matchLabels: {{team: team-{team}}}}}\n      podSelector: {{matchLabels: {{app: app-{peer}}}}}\n    ports: [{{port: {port}, protocol: TCP}}, {{port: http}}]\n"
            ),
            2 => format!(
                "  podSelector: {{matchLabels: {{tier: {}}}}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from: [{{podSelector: {{matchExpressions: [{{key: tier, operator: In, values: [frontend, backend]}}]}}}}]\n  egress:\n  - to: [{{namespaceSelector: {{matchLabels: {{env: prod}}}}, podSelector: {{matchLabels: {{app: app-{peer}}}}}}}]\n    ports: [{{port: http}}, {{port: dns, protocol: UDP}}]\n  - to: [{{ipBlock: {{cidr: 10.{}.0.0/16, except: [10.{}.1.0/24]}}}}]\n",
                tier(app),
                i % 200,
                i % 200
            ),
            _ => format!(
                "  podSelector: {{matchLabels: {{app: app-{app}}}}}\n  ingress:\n  - from: [{{namespaceSelector: {{matchLabels: {{team: team-{team}}}}}}}]\n    ports: [{{port: {port}, endPort: {}, protocol: TCP}}]\n",
                port + 15
            ),
        };
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: np-{i}\n  namespace: ns-{ns}\nspec:\n{spec}"
        )
    } else {
        let spec = match i % 4 {
            1 => format!(
                "  endpointSelector: {{matchLabels: {{app: app-{app}}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: app-{peer}}}}}, {{matchLabels: {{tier: frontend}}}}]\n    toPorts: [{{ports: [{{port: \"{port}\", protocol: TCP}}, {{port: metrics}}]}}]\n  ingressDeny:\n  - fromEndpoints: [{{matchLabels: {{version: v2}}}}]\n    toPorts: [{{ports: [{{port: \"9090\", protocol: TCP}}]}}]\n"
            ),
            _ => format!(
                "  endpointSelector: {{matchLabels: {{app: app-{app}}}}}\n  egress:\n  - toEndpoints: [{{matchLabels: {{tier: db}}}}]\n    toPorts: [{{ports: [{{port: \"5432\", protocol: TCP}}]}}]\n  - toCIDR: [\"192.168.{}.0/24\"]\n  - toEndpoints: [{{matchLabels: {{weft.io/namespace: ns-{}}}}}]\n    icmps: [{{fields: [{{type: EchoRequest}}]}}]\n",
                i % 250,
                (ns + 1) % NAMESPACES
            ),
        };
        format!(
            "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata:\n  name: wnp-{i}\n  namespace: ns-{ns}\nspec:\n{spec}"
        )
    }
}

/// The resolver's other inputs, derived from the cluster and the repository.
struct Tables {
    cidrs: BTreeMap<IpNet, u32>,
    named_ports: BTreeMap<u32, weft_policy::NamedPorts>,
}

fn tables(cluster: &Cluster, repository: &Repository) -> Tables {
    let cidrs = repository
        .cidr_prefixes()
        .into_iter()
        .zip(FIRST_CIDR_IDENTITY..)
        .collect();
    let named_ports = weft_policy::named_ports_by_identity(
        cluster
            .identities
            .keys()
            .map(|id| (*id, cluster.ports.as_slice())),
    );
    Tables { cidrs, named_ports }
}

fn resolve(
    repository: &Repository,
    endpoints: &[LocalEndpoint],
    identities: &BTreeMap<u32, Labels>,
    tables: &Tables,
) -> DesiredState {
    weft_policy::resolve(&ResolveInput {
        repository,
        endpoints,
        identities,
        cidr_identities: &tables.cidrs,
        named_ports: &tables.named_ports,
        options: ResolveOptions::default(),
    })
}

/// The part of `state` that belongs to `ids`.
fn restrict(state: &DesiredState, ids: &BTreeSet<u32>) -> DesiredState {
    let mut out = DesiredState::default();
    for id in ids {
        if let Some(p) = state.endpoints.get(id) {
            out.endpoints.insert(*id, *p);
        }
        out.entries
            .extend(state.endpoint_entries(*id).map(|(k, e)| (*k, e.clone())));
    }
    out
}

fn capacity_check(old: &DesiredState, new: &DesiredState) -> usize {
    let old_ids: BTreeSet<u32> = old.endpoints.keys().copied().collect();
    let new_ids: BTreeSet<u32> = new.endpoints.keys().copied().collect();
    capacity_refusals(
        EntrySets {
            entries: &old.entries,
            endpoints: &old_ids,
        },
        EntrySets {
            entries: &new.entries,
            endpoints: &new_ids,
        },
        CapacityLimits {
            per_endpoint: PER_ENDPOINT,
            total: MAP_TOTAL,
        },
    )
    .len()
}

/// Median of `RUNS` timings of `f` (its last result kept).
fn measure<T>(mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::with_capacity(RUNS);
    let mut last = None;
    for _ in 0..RUNS {
        let start = Instant::now();
        let value = f();
        times.push(start.elapsed());
        last = Some(value);
    }
    times.sort_unstable();
    (times[RUNS / 2], last.expect("RUNS > 0"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// One row of the report.
struct Row {
    what: &'static str,
    target_ms: Option<f64>,
    total: Duration,
    parts: String,
}

#[allow(clippy::too_many_lines, reason = "one measurement after the other")]
pub fn run() -> anyhow::Result<()> {
    let rss_before = rss_kib();
    let cluster = generate();
    let mut rows = Vec::new();

    // Parse and translate every policy (the local source's work on a cold start).
    let (parse_time, objects) = measure(|| parse_documents("scale.yaml", &cluster.yaml));
    let objects = objects.context("the generated policies parse")?;
    let mut repository = Repository::new();
    for object in objects {
        if let Object::Policy(policy) = object {
            repository.upsert(*policy);
        }
    }
    if repository.len() != NAMESPACES * POLICIES_PER_NAMESPACE {
        bail!("generated {} policies, expected 1000", repository.len());
    }
    let tables = tables(&cluster, &repository);

    // Full compile: every endpoint to map entries, then the diff against an empty map (the
    // first apply) and the capacity check.
    let (resolve_time, state) = measure(|| {
        resolve(
            &repository,
            &cluster.endpoints,
            &cluster.identities,
            &tables,
        )
    });
    let empty = DesiredState::default();
    let (diff_time, first_diff) = measure(|| diff(&empty, &state));
    let (capacity_time, refused) = measure(|| capacity_check(&empty, &state));
    rows.push(Row {
        what: "full compile (parse + resolve + diff + capacity)",
        target_ms: Some(1000.0),
        total: parse_time + resolve_time + diff_time + capacity_time,
        parts: format!(
            "parse {:.0} ms, resolve {:.0} ms, diff {:.0} ms ({} upserts), capacity {:.0} ms ({refused} refused)",
            ms(parse_time),
            ms(resolve_time),
            ms(diff_time),
            first_diff.upserts.len(),
            ms(capacity_time)
        ),
    });
    let rss_after = rss_kib();

    // One policy changed: the port of NetworkPolicy np-0 of ns-7.
    let changed_text = policy_yaml(7, 0).replace("port: 8000,", "port: 8100,");
    let changed = match parse_documents("change.yaml", &changed_text)
        .context("the changed policy parses")?
        .pop()
    {
        Some(Object::Policy(p)) => *p,
        _ => bail!("the changed policy is not a policy"),
    };
    let old_version = repository
        .get(&changed.id)
        .cloned()
        .context("np-0 of ns-7 exists")?;
    let mut edited = repository.clone();
    edited.upsert(changed.clone());
    let (full_change, full_diff) = measure(|| {
        let new = resolve(&edited, &cluster.endpoints, &cluster.identities, &tables);
        diff(&state, &new)
    });
    let (scoped_change, scoped_diff) = measure(|| {
        let affected: Vec<LocalEndpoint> = cluster
            .endpoints
            .iter()
            .filter(|ep| {
                weft_policy::resolve::selects(&old_version, ep)
                    || weft_policy::resolve::selects(&changed, ep)
            })
            .cloned()
            .collect();
        let ids: BTreeSet<u32> = affected.iter().map(|e| e.endpoint_id).collect();
        let new = resolve(&edited, &affected, &cluster.identities, &tables);
        (diff(&restrict(&state, &ids), &new), ids.len())
    });
    if scoped_diff.0 != full_diff {
        bail!("the scoped change gives another diff than the full one");
    }
    rows.push(Row {
        what: "one policy changed -> map diff (full)",
        target_ms: None,
        total: full_change,
        parts: format!(
            "resolve all 10,000 endpoints again + diff: {} upserts, {} removals",
            full_diff.upserts.len(),
            full_diff.removals.len()
        ),
    });
    rows.push(Row {
        what: "one policy changed -> map diff (scoped)",
        target_ms: Some(50.0),
        total: scoped_change,
        parts: format!("{} selected endpoints resolved + diff", scoped_diff.1),
    });

    // A new pod of an existing identity (a replica scaled up).
    let mut new_pod = cluster.endpoints[1234].clone();
    new_pod.endpoint_id = u32::try_from(cluster.endpoints.len() + 1).unwrap_or(u32::MAX);
    new_pod.name.push_str("-new");
    let mut with_new = cluster.endpoints.clone();
    with_new.push(new_pod.clone());
    let (full_pod, _) = measure(|| {
        diff(
            &state,
            &resolve(&repository, &with_new, &cluster.identities, &tables),
        )
    });
    let (scoped_pod, pod_diff) = measure(|| {
        let new = resolve(
            &repository,
            std::slice::from_ref(&new_pod),
            &cluster.identities,
            &tables,
        );
        diff(&DesiredState::default(), &new)
    });
    rows.push(Row {
        what: "new pod enforced (full)",
        target_ms: None,
        total: full_pod,
        parts: "resolve all endpoints + diff".into(),
    });
    rows.push(Row {
        what: "new pod enforced (scoped)",
        target_ms: Some(100.0),
        total: scoped_pod,
        parts: format!("its own entries: {} upserts", pod_diff.upserts.len()),
    });

    // A label change that moves a pod to another identity that exists.
    let mut relabelled = cluster.endpoints[4321].clone();
    let target = &cluster.endpoints[4321 + REPLICAS * 3];
    relabelled.labels.clone_from(&target.labels);
    relabelled.identity = target.identity;
    let (scoped_label, label_diff) = measure(|| {
        let ids = BTreeSet::from([relabelled.endpoint_id]);
        let new = resolve(
            &repository,
            std::slice::from_ref(&relabelled),
            &cluster.identities,
            &tables,
        );
        diff(&restrict(&state, &ids), &new)
    });
    rows.push(Row {
        what: "label change, existing identity (scoped)",
        target_ms: Some(100.0),
        total: scoped_label,
        parts: format!(
            "its own entries: {} upserts, {} removals",
            label_diff.upserts.len(),
            label_diff.removals.len()
        ),
    });
    // A label change that makes a new identity: every rule's peer set may gain it, so every
    // endpoint is resolved again.
    let mut fresh = cluster.endpoints[4321].clone();
    fresh.labels.insert("canary".into(), "true".into());
    fresh.identity = FIRST_POD_IDENTITY + u32::try_from(cluster.identities.len()).unwrap_or(0);
    let mut identities = cluster.identities.clone();
    identities.insert(fresh.identity, fresh.labels.clone());
    let mut endpoints = cluster.endpoints.clone();
    endpoints[4321] = fresh;
    let (full_label, new_identity_diff) = measure(|| {
        diff(
            &state,
            &resolve(&repository, &endpoints, &identities, &tables),
        )
    });
    rows.push(Row {
        what: "label change, new identity (full)",
        target_ms: Some(100.0),
        total: full_label,
        parts: format!(
            "resolve all endpoints (peer sets change) + diff: {} upserts, {} removals",
            new_identity_diff.upserts.len(),
            new_identity_diff.removals.len()
        ),
    });

    // Entries per endpoint.
    let mut per_endpoint: BTreeMap<u32, usize> = BTreeMap::new();
    for key in state.entries.keys() {
        *per_endpoint.entry(key.endpoint_id).or_default() += 1;
    }
    let mut counts: Vec<usize> = per_endpoint.values().copied().collect();
    counts.sort_unstable();
    let isolated = state
        .endpoints
        .values()
        .filter(|p| *p != &weft_policy::EndpointPolicy::default())
        .count();

    println!(
        "\npolicy-scale: {} endpoints, {} identities, {} policies ({} NetworkPolicy), {} CIDR identities; median of {RUNS} runs",
        cluster.endpoints.len(),
        cluster.identities.len(),
        repository.len(),
        repository
            .iter()
            .filter(|p| p.id.kind.to_string() == "NetworkPolicy")
            .count(),
        tables.cidrs.len()
    );
    println!(
        "{:<48} {:>10} {:>9} {:>7}  WHERE THE TIME GOES",
        "MEASUREMENT", "MS", "TARGET", ""
    );
    for row in &rows {
        let (target, verdict) = match row.target_ms {
            Some(t) if ms(row.total) < t => (format!("< {t:.0}"), "ok"),
            Some(t) => (format!("< {t:.0}"), "MISSED"),
            None => ("-".to_owned(), ""),
        };
        println!(
            "{:<48} {:>10.1} {:>9} {:>7}  {}",
            row.what,
            ms(row.total),
            target,
            verdict,
            row.parts
        );
    }
    println!(
        "map entries: {} in all; per endpoint (of {} with entries, {isolated} isolated): median {}, p99 {}, max {}",
        state.entries.len(),
        counts.len(),
        counts.get(counts.len() / 2).copied().unwrap_or(0),
        counts
            .get(counts.len().saturating_sub(1) * 99 / 100)
            .copied()
            .unwrap_or(0),
        counts.last().copied().unwrap_or(0)
    );
    println!(
        "resident memory: {} MiB after building the state ({} MiB before generating the cluster; target < 200 MiB for the agent)",
        rss_after / 1024,
        rss_before / 1024
    );
    Ok(())
}
