//! The notebooks' set-up (scripts/notebook-setup.sh), checked without running a kernel (CI's
//! scripts/run-notebooks.sh runs the real one): the lock check fails on a build whose versions
//! differ from Cargo.lock, the compile folder the set-up pre-builds is the one evcxr.toml names,
//! and every notebook starts with the cell the set-up pre-builds and trains on `best_device()`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn crate_file(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn lock_check(ours: &Path, build: &Path) -> Output {
    Command::new("bash")
        .arg(crate_file("scripts/notebook-lock-check.sh"))
        .arg(ours)
        .arg(build)
        .output()
        .expect("bash runs")
}

/// Cargo.lock with the first registry package's version changed to `9999.0.0`; returns the
/// edited text and the package's name and original version.
fn edit_one_version(lock: &str) -> (String, String, String) {
    let blocks: Vec<&str> = lock.split("[[package]]").collect();
    let (i, block) = blocks
        .iter()
        .enumerate()
        .find(|(_, b)| b.contains("source = \"registry+"))
        .expect("a registry package");
    let field = |key: &str| {
        block
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
            .and_then(|v| v.strip_suffix('"'))
            .unwrap()
            .to_string()
    };
    let (name, version) = (field("name"), field("version"));
    let mut out: Vec<String> = blocks.iter().map(|b| b.to_string()).collect();
    out[i] = block.replacen(
        &format!("version = \"{version}\""),
        "version = \"9999.0.0\"",
        1,
    );
    (out.join("[[package]]"), name, version)
}

#[test]
fn the_lock_check_fails_when_the_notebook_build_has_other_versions() {
    let dir = tempfile::tempdir().unwrap();
    let ours = crate_file("Cargo.lock");
    let lock = std::fs::read_to_string(&ours).unwrap();

    // The same versions: passes, and says how many packages it compared.
    let same = dir.path().join("same.lock");
    std::fs::write(&same, &lock).unwrap();
    let out = lock_check(&ours, &same);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("crates.io packages of the notebook build are Cargo.lock's versions"));

    // One version changed, as evcxr's own resolution does when a crate has a newer release.
    let (edited, name, version) = edit_one_version(&lock);
    let drifted = dir.path().join("drifted.lock");
    std::fs::write(&drifted, edited).unwrap();
    let out = lock_check(&ours, &drifted);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{name} 9999.0.0 (Cargo.lock: {version})")),
        "the difference is named: {err}"
    );
    assert!(err.contains("1 of"), "{err}");

    // A build that never reached our crate proves nothing: refused.
    let pruned = dir.path().join("pruned.lock");
    std::fs::write(
        &pruned,
        "version = 4\n\n[[package]]\nname = \"ctx\"\nversion = \"1.0.0\"\n",
    )
    .unwrap();
    let out = lock_check(&ours, &pruned);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no mfac-lab"));

    // A missing lock (no set-up yet) is a usage error that says what to run.
    let out = lock_check(&ours, &dir.path().join("absent.lock"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("scripts/notebook-setup.sh"));
}

#[test]
fn the_setup_prebuilds_the_compile_folder_that_evcxr_toml_names() {
    let toml = std::fs::read_to_string(crate_file("notebooks/evcxr.toml")).unwrap();
    let value = |key: &str| {
        toml.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|l| l.trim().strip_prefix('='))
            .map(|v| v.trim().trim_matches('"').to_string())
            .unwrap_or_else(|| panic!("evcxr.toml has no {key}"))
    };
    // evcxr resolves a relative tmpdir against the kernel's folder, notebooks/.
    assert_eq!(value("tmpdir"), "../target/notebook-build/evcxr");
    let env = std::fs::read_to_string(crate_file("scripts/notebook-env.sh")).unwrap();
    assert!(
        env.contains("BUILD_ROOT=\"$ROOT/target/notebook-build\""),
        "{env}"
    );
    assert!(env.contains("COMPILE_DIR=\"$BUILD_ROOT/evcxr\""), "{env}");
    // candle, gemm and our crate need opt-level ≥ 2 (docs/PERFORMANCE.md, "Notebooks").
    let opt: u32 = value("opt_level").parse().unwrap();
    assert!(opt >= 2, "opt_level {opt}");
    // Both scripts parse.
    for s in [
        "notebook-setup.sh",
        "run-notebooks.sh",
        "notebook-lock-check.sh",
    ] {
        let ok = Command::new("bash")
            .arg("-n")
            .arg(crate_file(&format!("scripts/{s}")))
            .status()
            .unwrap()
            .success();
        assert!(ok, "{s} does not parse");
    }
}

/// The code cells of a notebook, as text.
fn code_cells(name: &str) -> Vec<String> {
    let nb: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(crate_file(name)).unwrap()).unwrap();
    nb["cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["cell_type"] == "code")
        .map(|c| match &c["source"] {
            serde_json::Value::Array(lines) => lines.iter().map(|l| l.as_str().unwrap()).collect(),
            s => s.as_str().unwrap().to_string(),
        })
        .collect()
}

#[test]
fn every_notebook_opens_on_the_prebuilt_cell_and_trains_on_the_best_device() {
    let setup = std::fs::read_to_string(crate_file("scripts/notebook-setup.sh")).unwrap();
    // The line the set-up pre-builds (bash-quoted there).
    assert!(setup.contains(r#"cells=(":dep mfac-lab = { path = \"..\" }")"#));
    assert!(setup.contains(r#"":dep mfac-lab = { path = \"..\", features = [\"cuda\"] }""#));
    let mut names: Vec<String> = std::fs::read_dir(crate_file("notebooks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".ipynb"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    for name in names {
        let cells = code_cells(&format!("notebooks/{name}"));
        // Anything else in the first cell would make evcxr build another configuration than the
        // pre-built one (minutes instead of seconds).
        let commands: Vec<&str> = cells[0]
            .lines()
            .filter(|l| !l.trim_start().starts_with("//") && !l.trim().is_empty())
            .collect();
        assert_eq!(commands, [r#":dep mfac-lab = { path = ".." }"#], "{name}");
        assert!(
            cells[0].contains(r#"// :dep mfac-lab = { path = "..", features = ["cuda"] }"#),
            "{name}: the GPU line is shown"
        );
        assert!(cells[1].contains("let device = best_device();"), "{name}");
        // The device as the cell's result (a final println! can be lost: DeviceReport's doc).
        assert_eq!(
            cells[1].lines().last(),
            Some("device_report(&device)"),
            "{name}"
        );
        for (i, c) in cells.iter().enumerate() {
            assert!(
                !c.contains("Device::Cpu"),
                "{name}: code cell {i} pins the CPU"
            );
        }
    }
}
