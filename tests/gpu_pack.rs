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
    // The pack is ≤ 60 MiB (the checkout takes the rest of 64 MiB); the gzipped gpu_check is
    // ~20 MB and the CLI ~27 MB, so the fixtures must stay small.
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
