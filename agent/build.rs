//! Builds the eBPF object (ebpf/programs) with the nightly toolchain and bpf-linker, so the
//! agent binary embeds it and one binary is all a node needs. This is the only place that
//! knows how to build the eBPF crate; `cargo xtask build` and `cargo xtask setup` only make
//! sure the toolchain is there.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let ebpf_dir = manifest_dir.join("../ebpf/programs");
    let common_dir = manifest_dir.join("../ebpf/common");
    for dir in [&ebpf_dir, &common_dir] {
        println!("cargo:rerun-if-changed={}", dir.join("src").display());
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("Cargo.toml").display()
        );
    }
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join(".cargo/config.toml").display()
    );
    println!("cargo:rerun-if-env-changed=WEFT_EBPF_OBJ");

    // A prebuilt object (for example from a kernel-matrix runner) can be supplied as is.
    if let Ok(prebuilt) = env::var("WEFT_EBPF_OBJ") {
        println!("cargo:rustc-env=WEFT_EBPF_OBJ={prebuilt}");
        return;
    }

    // Share one eBPF target dir between profiles (debug, release, clippy): OUT_DIR is
    // <target>/<profile>/build/<pkg>/out.
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out_dir
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .and_then(|build| build.parent()?.parent())
        .map_or_else(|| out_dir.join("ebpf-target"), |t| t.join("ebpf"));
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&ebpf_dir)
        .args(["run", "nightly", "cargo", "build", "--release"])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer cargo (and clippy) leak settings meant for the host build; the nested build
    // must not see them.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
        "CARGO_MAKEFLAGS",
        "CARGO",
        "RUSTDOC",
    ] {
        cmd.env_remove(var);
    }
    for (key, _) in env::vars() {
        if key.starts_with("CARGO_PROFILE_") || key.starts_with("CARGO_CFG_") {
            cmd.env_remove(key);
        }
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run `rustup run nightly cargo` to build the eBPF programs: {e}; run `cargo xtask setup`")
    });
    assert!(
        status.success(),
        "building the eBPF programs failed (see above); `cargo xtask setup` installs the nightly \
         toolchain, rust-src and bpf-linker they need"
    );
    let object = target_dir.join("bpfel-unknown-none/release/weft-ebpf");
    assert!(
        object.exists(),
        "eBPF build succeeded but {} is missing",
        object.display()
    );
    println!("cargo:rustc-env=WEFT_EBPF_OBJ={}", object.display());
}
