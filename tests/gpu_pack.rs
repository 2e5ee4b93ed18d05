//! The GPU check's plumbing, checked here without a GPU: the pack's file list
//! (scripts/gpu-pack.files) exists in ../shared and fits the 64 MiB that travels, every fixture
//! path scripts/gpu-check.sh reads is in the pack, and both scripts parse.

mod common;

use std::path::PathBuf;

fn crate_file(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn pack_list() -> Vec<String> {
    std::fs::read_to_string(crate_file("scripts/gpu-pack.files"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

#[test]
fn the_packed_fixtures_exist_and_leave_room_for_the_binaries() {
    let list = pack_list();
    assert!(list.len() >= 5, "{list:?}");
    let mut total = 0u64;
    for f in &list {
        let p = common::fixture(f.split('/').next().unwrap()).join(f.split_once('/').unwrap().1);
        let meta = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        total += meta.len();
    }
    // The pack is ≤ 60 MiB (the checkout takes the rest of 64 MiB); the xz'd gpu_check is
    // ~14 MB, gpu_pass_check ~8 MB and the CLI ~15 MB, so the fixtures must stay small.
    assert!(total < 15 << 20, "fixtures take {total} bytes");
    // The golden cases the check names are all there (a–d, the f64 references).
    for c in ["a", "b", "c", "d"] {
        assert!(list.contains(&format!("mfac/case_{c}.safetensors")));
    }
}

#[test]
fn every_fixture_the_gpu_check_reads_is_packed() {
    let script = ["scripts/gpu-check.sh", "scripts/gpu-check-pass.sh"]
        .map(|s| std::fs::read_to_string(crate_file(s)).unwrap())
        .join("\n");
    let list = pack_list();
    let mut seen = 0;
    // Paths are written "$F/<path>" (F = gpu-pack/fixtures).
    for piece in script.split("\"$F/").skip(1) {
        let path = piece.split('"').next().unwrap();
        seen += 1;
        assert!(
            list.iter()
                .any(|f| f == path || f.starts_with(&format!("{path}/"))),
            "a GPU check script reads $F/{path}, which scripts/gpu-pack.files does not pack"
        );
    }
    assert!(seen >= 3, "found only {seen} fixture paths in gpu-check.sh");
}

#[test]
fn the_scripts_parse() {
    for s in [
        "scripts/gpu-check.sh",
        "scripts/gpu-check-pass.sh",
        "scripts/gpu-check-lib.sh",
        "scripts/gpu-pack.sh",
    ] {
        let out = std::process::Command::new("bash")
            .arg("-n")
            .arg(crate_file(s))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{s}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// gpu-check.sh run here with stand-ins for the three binaries (shell scripts that log how they
/// were called): every stage must reach the binary that has it. (The first GPU run found the
/// pass's stages leaving `$G` pointing at gpu_pass_check, so e2e and the M-FAC step went to
/// the wrong binary and failed as "unknown stage".)
#[test]
fn every_stage_of_the_gpu_check_reaches_its_own_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir_all(root.join("scripts")).unwrap();
    for s in ["gpu-check.sh", "gpu-check-pass.sh", "gpu-check-lib.sh"] {
        std::fs::copy(
            crate_file(&format!("scripts/{s}")),
            root.join("scripts").join(s),
        )
        .unwrap();
    }
    let bin = root.join("gpu-pack/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(root.join("gpu-pack/fixtures")).unwrap();
    let calls = root.join("calls");
    for name in ["gpu_check", "gpu_pass_check", "mfac-lab"] {
        let stand_in = bin.join(name);
        std::fs::write(
            &stand_in,
            format!("#!/bin/sh\necho \"{name} $1\" >> '{}'\n", calls.display()),
        )
        .unwrap();
        let gz = std::process::Command::new("gzip")
            .arg("-f")
            .arg(&stand_in)
            .status()
            .unwrap();
        assert!(gz.success());
    }
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/gpu-check.sh"))
        .env("OUT", root.join("out"))
        .env("GPU_CHECK_BUDGET", "200")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{log}");
    let calls = std::fs::read_to_string(&calls).unwrap();
    let calls: Vec<&str> = calls.lines().collect();
    let want = [
        "gpu_check golden",
        "gpu_check sparse",
        "gpu_pass_check parity",
        "gpu_check replay",
        "gpu_check e2e",
        "gpu_check mfac",
        "gpu_pass_check bench",
        "gpu_check train",
        "gpu_check bf16",
        "gpu_pass_check dropout",
        "gpu_pass_check replay",
        "gpu_check mfac",
        "mfac-lab compare",
        "gpu_check copy",
        "gpu_check table",
    ];
    assert_eq!(calls, want, "{log}");
}
