//! The corpus of invalid objects (`tests/invalid/*.yaml`, both policy dialects and
//! `Endpoint` ports): each file is rejected, with a problem at the field path its
//! `# expect:` line names, for the object its `# object:` line names; a rejected file changes
//! nothing in force; and a file mixing valid and invalid objects is rejected whole, naming
//! only the bad object.

use std::path::{Path, PathBuf};

use weft_policy::{Object, Repository, parse_documents};

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/invalid exists")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The value of a leading `# key: value` comment.
fn header<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .take_while(|l| l.starts_with('#'))
        .find_map(|l| l.strip_prefix(&format!("# {key}:")))
        .map_or_else(|| panic!("no `# {key}:` line"), str::trim)
}

#[test]
fn every_invalid_object_is_rejected_at_its_field() {
    let files = corpus();
    assert!(files.len() >= 40, "only {} cases", files.len());
    let mut dialects = [0usize; 3];
    for path in &files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 name");
        let text = std::fs::read_to_string(path).expect("readable");
        let field = header(&text, "expect");
        let object = header(&text, "object");
        let err = match parse_documents(name, &text) {
            Ok(objs) => panic!(
                "{name}: accepted ({} objects), expected rejection",
                objs.len()
            ),
            Err(e) => e,
        };
        assert_eq!(err.file, name);
        assert!(
            err.problems
                .iter()
                .any(|p| p.problem.field == field && p.object.as_deref() == Some(object)),
            "{name}: wanted a problem of {object} at {field:?}, got:\n{err}"
        );
        // Every line names the file and the object, and the message is not empty.
        for line in err.to_string().lines() {
            assert!(
                line.starts_with(&format!("{name}: {object}: ")),
                "{name}: {line}"
            );
        }
        match object.split(' ').next() {
            Some("NetworkPolicy") => dialects[1] += 1,
            Some("Endpoint") => dialects[2] += 1,
            _ => dialects[0] += 1,
        }
    }
    assert!(
        dialects.iter().all(|n| *n >= 5),
        "weft, NetworkPolicy, Endpoint cases: {dialects:?}"
    );
}

const GOOD: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: good, namespace: shop}
spec:
  podSelector: {}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]
";

#[test]
fn a_rejected_file_changes_nothing_in_force() {
    // What a source does: apply a file's objects only if the whole file parses.
    let mut repo = Repository::new();
    for obj in parse_documents("good.yaml", GOOD).expect("valid") {
        if let Object::Policy(p) = obj {
            repo.upsert(*p);
        }
    }
    let before = (repo.revision(), repo.len());
    for path in corpus() {
        let text = std::fs::read_to_string(&path).expect("readable");
        if let Ok(objs) = parse_documents("x.yaml", &text) {
            for obj in objs {
                if let Object::Policy(p) = obj {
                    repo.upsert(*p);
                }
            }
        }
    }
    assert_eq!((repo.revision(), repo.len()), before);
}

#[test]
fn a_mixed_file_is_rejected_whole_and_names_the_bad_object() {
    let bad = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/invalid/33-np-ip-block-and-selector.yaml"),
    )
    .expect("corpus file");
    let endpoint = "apiVersion: weft.io/v1alpha1
kind: Endpoint
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec: {ports: [{name: http, containerPort: 80}]}
";
    let mixed = format!("{GOOD}---\n{bad}---\n{endpoint}");
    let err = parse_documents("mixed.yaml", &mixed).expect_err("a bad object rejects the file");
    let objects: Vec<&str> = err
        .problems
        .iter()
        .filter_map(|p| p.object.as_deref())
        .collect();
    assert!(!objects.is_empty());
    assert!(
        objects.iter().all(|o| *o == "NetworkPolicy shop/bad"),
        "only the bad object is named: {objects:?}"
    );
    assert!(
        err.to_string()
            .starts_with("mixed.yaml: NetworkPolicy shop/bad: spec.ingress[0].from[1]: may not specify both ipBlock and another peer"),
        "{err}"
    );
    // The same objects without the bad one are fine.
    assert_eq!(
        parse_documents("fixed.yaml", &format!("{GOOD}---\n{endpoint}"))
            .expect("valid")
            .len(),
        2
    );
}
