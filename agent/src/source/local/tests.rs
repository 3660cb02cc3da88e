use std::fs;

use std::io::Write as _;

use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, ModifyKind, RemoveKind};
use notify::{Event, EventKind};

use super::*;

struct Dir {
    root: PathBuf,
}

impl Dir {
    fn new(name: &str) -> Self {
        let root = std::env::temp_dir().join(format!("weft-local-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("source")).expect("source dir");
        fs::create_dir_all(root.join("state")).expect("state dir");
        Self { root }
    }

    fn source(&self) -> LocalSource {
        LocalSource::new(&self.root.join("source"), &self.root.join("state")).expect("source")
    }

    fn write(&self, name: &str, text: &str) {
        fs::write(self.root.join("source").join(name), text).expect("write");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join("source").join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn policy(name: &str, port: u32) -> String {
    format!(
        "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  endpointSelector: {{matchLabels: {{app: api}}}}\n  ingress:\n  - toPorts: [{{ports: [{{port: \"{port}\"}}]}}]\n"
    )
}

/// The rejections after `batch`, given those before (`None` in a batch: unchanged).
fn rejections(batch: &SourceBatch, before: &[Rejection]) -> Vec<Rejection> {
    batch.rejected.clone().unwrap_or_else(|| before.to_vec())
}

fn keys(batch: &SourceBatch) -> Vec<String> {
    batch.upserts.iter().map(Sourced::key).collect()
}

#[test]
fn an_emptied_file_is_rejected_and_keeps_its_last_good_content() {
    let dir = Dir::new("empty");
    dir.write("p.yaml", &policy("a", 80));
    let mut source = dir.source();
    let first = source.initial().expect("initial");
    assert_eq!(keys(&first), ["WeftNetworkPolicy shop/a"]);
    let mut current = Vec::new();
    for text in ["", "# nothing but a comment\n", "---\n"] {
        dir.write("p.yaml", text);
        let batch = source.sync_now();
        assert!(
            batch.deletes.is_empty(),
            "{text:?} must not delete the policy"
        );
        current = rejections(&batch, &current);
        assert_eq!(current.len(), 1, "{text:?}");
        assert!(
            current[0].message.contains("holds no object")
                && current[0]
                    .message
                    .contains("keeps its last good content: 1"),
            "{:?}",
            current[0]
        );
    }
    fs::remove_file(dir.path("p.yaml")).expect("remove");
    let batch = source.sync_now();
    assert_eq!(
        batch.deletes,
        ["WeftNetworkPolicy shop/a"],
        "deleting the file removes it"
    );
    assert_eq!(batch.rejected, Some(Vec::new()), "the rejection is gone");
}

#[test]
fn a_file_being_written_keeps_its_last_good_content_until_closed() {
    let dir = Dir::new("writing");
    dir.write("p.yaml", &policy("a", 80));
    let mut source = dir.source();
    source.initial().expect("initial");
    let path = dir.path("p.yaml");
    // `>` truncates and writes in pieces; the file stays open for writing meanwhile.
    let mut writer = fs::File::create(&path).expect("truncate");
    writer
        .write_all(b"apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\n")
        .expect("half");
    let modify =
        Event::new(EventKind::Modify(ModifyKind::Data(DataChange::Any))).add_path(path.clone());
    let mut scanner = source.scanner();
    let dirty = Scanner::note_events([&modify].into_iter());
    let (batch, changed) = scanner.scan(dirty.as_ref());
    assert!(
        !changed,
        "nothing changes while the writer is busy: {batch:?}"
    );
    // A barrier scan (policy wait) does not read it either.
    let (batch, _) = scanner.scan(None);
    assert!(
        batch.upserts.is_empty() && batch.deletes.is_empty() && rejections(&batch, &[]).is_empty()
    );
    drop(scanner);
    // The writer finishes and closes: now it counts.
    drop(writer);
    fs::write(&path, policy("a", 443)).expect("final content");
    let close = Event::new(EventKind::Access(AccessKind::Close(AccessMode::Write))).add_path(path);
    let mut scanner = source.scanner();
    let dirty = Scanner::note_events([&close].into_iter());
    let (batch, changed) = scanner.scan(dirty.as_ref());
    assert!(changed);
    assert_eq!(
        keys(&batch),
        ["WeftNetworkPolicy shop/a"],
        "the new version is taken"
    );
}

#[test]
fn a_new_file_is_read_once_it_is_closed() {
    let dir = Dir::new("create");
    let mut source = dir.source();
    source.initial().expect("initial");
    let path = dir.path("new.yaml");
    let mut writer = fs::File::create(&path).expect("create");
    writer
        .write_all(b"apiVersion: weft.io/v1alpha1\n")
        .expect("write");
    let create = Event::new(EventKind::Create(CreateKind::File)).add_path(path.clone());
    let mut scanner = source.scanner();
    let dirty = Scanner::note_events([&create].into_iter());
    let (_, changed) = scanner.scan(dirty.as_ref());
    assert!(
        !changed,
        "a half-written new file is neither read nor rejected"
    );
    drop(scanner);
    drop(writer);
    dir.write("new.yaml", &policy("n", 80));
    let close =
        Event::new(EventKind::Access(AccessKind::Close(AccessMode::Write))).add_path(path.clone());
    let mut scanner = source.scanner();
    let dirty = Scanner::note_events([&close].into_iter());
    let (batch, _) = scanner.scan(dirty.as_ref());
    assert_eq!(keys(&batch), ["WeftNetworkPolicy shop/n"]);
    drop(scanner);
    fs::remove_file(&path).expect("rm");
    let remove = Event::new(EventKind::Remove(RemoveKind::File)).add_path(path);
    let mut scanner = source.scanner();
    let dirty = Scanner::note_events([&remove].into_iter());
    let (batch, _) = scanner.scan(dirty.as_ref());
    assert_eq!(batch.deletes, ["WeftNetworkPolicy shop/n"]);
}

#[test]
fn the_file_that_defined_an_object_first_keeps_it() {
    let dir = Dir::new("dup");
    // `b` sorts after `a`, but `z` is seen first: `z` keeps the object.
    dir.write("z.yaml", &policy("same", 80));
    let mut source = dir.source();
    let first = source.initial().expect("initial");
    assert_eq!(first.upserts[0].origin, "z.yaml");
    dir.write("a.yaml", &policy("same", 9999));
    let batch = source.sync_now();
    assert!(
        batch.upserts.is_empty(),
        "the newcomer changes nothing: {batch:?}"
    );
    assert_eq!(rejections(&batch, &[]).len(), 1);
    let all = rejections(&batch, &[]);
    let r = &all[0];
    assert_eq!(r.origin, "a.yaml");
    assert!(
        r.message.contains("a.yaml") && r.message.contains("z.yaml"),
        "both files named: {}",
        r.message
    );
    // The order survives a restart.
    drop(source);
    let mut source = dir.source();
    let again = source.initial().expect("initial after restart");
    assert_eq!(again.upserts.len(), 1);
    assert_eq!(again.upserts[0].origin, "z.yaml");
    assert_eq!(rejections(&again, &[]).len(), 1);
    // Once the first file lets go, the other one's copy is in force.
    fs::remove_file(dir.path("z.yaml")).expect("rm");
    let batch = source.sync_now();
    assert_eq!(batch.upserts.len(), 1);
    assert_eq!(batch.upserts[0].origin, "a.yaml");
    assert!(rejections(&batch, &[]).is_empty());
}

#[test]
fn oversized_and_binary_files_are_rejected_like_any_other() {
    let dir = Dir::new("big");
    dir.write("ok.yaml", &policy("ok", 80));
    let big = format!("{}\n# {}\n", policy("big", 80), "x".repeat(2 << 20));
    dir.write("big.yaml", &big);
    fs::write(dir.path("bin.yaml"), [0xff, 0xfe, 0x00, 0x81]).expect("binary");
    let mut source = dir.source();
    let batch = source.initial().expect("initial");
    assert_eq!(keys(&batch), ["WeftNetworkPolicy shop/ok"]);
    let all = rejections(&batch, &[]);
    let messages: Vec<&str> = all.iter().map(|r| r.message.as_str()).collect();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("big.yaml: is larger than 1024 KiB")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("bin.yaml: is not UTF-8")),
        "{messages:?}"
    );
}

#[test]
fn a_broken_file_keeps_its_last_good_content_across_restarts() {
    let dir = Dir::new("restart");
    dir.write("p.yaml", &policy("a", 80));
    let mut source = dir.source();
    source.initial().expect("initial");
    dir.write("p.yaml", &policy("a", 99999));
    let batch = source.sync_now();
    assert_eq!(rejections(&batch, &[]).len(), 1);
    let all = rejections(&batch, &[]);
    let r = &all[0];
    assert_eq!(r.object.as_deref(), Some("WeftNetworkPolicy shop/a"));
    assert_eq!(
        r.field.as_deref(),
        Some("spec.ingress[0].toPorts[0].ports[0].port")
    );
    drop(source);
    let mut source = dir.source();
    let batch = source.initial().expect("initial");
    assert_eq!(
        keys(&batch),
        ["WeftNetworkPolicy shop/a"],
        "the last good copy is used"
    );
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p).expect("stat").permissions().mode() & 0o777
    };
    let last_good = dir.root.join("state/last-good");
    assert_eq!(mode(&last_good), 0o700);
    assert_eq!(mode(&last_good.join("p.yaml")), 0o600);
}
