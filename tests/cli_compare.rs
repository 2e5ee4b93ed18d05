//! The main command as the README gives it: `mfac-lab compare` with no arguments, offline, in a
//! fresh folder. It must exit 0, say it is a demo, and write the summary and the plots.

use std::process::Command;

#[test]
fn compare_with_no_arguments_runs_the_offline_demo() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mfac-lab"))
        .arg("compare")
        .current_dir(dir.path())
        // No network: the demo must not need the hub.
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("Offline demo"), "{stdout}");
    // It says plainly what random weights can show (issue 23).
    assert!(stdout.contains("majority class"), "{stdout}");
    assert!(stdout.contains("--task mnli"), "{stdout}");
    // Each optimizer by its label: the demo's M-FAC keeps 32 gradients with the lr scaled to
    // its window (1e-4 × 1024 / 32).
    assert!(
        stdout.contains("| AdamW (2 seeds) |")
            && stdout.contains("| M-FAC m=32 (lr 3.2e-3) (2 seeds) |"),
        "{stdout}"
    );
    // Third, the card's own M-FAC (1,024 gradients, lr 1e-4) with the sparse window (issue 30).
    assert!(stdout.contains("| M-FAC m=1024 1% (2 seeds) |"), "{stdout}");
    // Offline, the seeded random bert-tiny, said so.
    assert!(
        stdout.contains("Model: a randomly initialised bert-tiny"),
        "{stdout}"
    );
    let res = dir.path().join("mfac-lab-results");
    for f in [
        "summary.md",
        "summary.csv",
        "history.parquet",
        "history.csv",
        "loss.png",
        "loss.svg",
        "accuracy.png",
        "accuracy.svg",
        "loss_time.png",
        "loss_time.svg",
        "accuracy_time.png",
        "accuracy_time.svg",
        "final.png",
        "final.svg",
    ] {
        let p = res.join(f);
        assert!(
            p.is_file() && std::fs::metadata(&p).unwrap().len() > 100,
            "missing {f}"
        );
    }
    let md = std::fs::read_to_string(res.join("summary.md")).unwrap();
    assert!(
        md.contains("validation_matched accuracy") && md.contains("validation_mismatched accuracy")
    );
    assert!(res
        .join("runs/mfac-m32-lr3.2e-3-seed43/eval_results.json")
        .is_file());
    assert!(res.join("runs/adamw-seed42/eval_results.json").is_file());
    assert!(res
        .join("runs/mfac-m1024-1pct-seed42/eval_results.json")
        .is_file());
    // The cost table shows what each held: the sparse window's state is under 0.4 GB although
    // it keeps 1,024 gradients.
    let csv = std::fs::read_to_string(res.join("summary.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "state_bytes").unwrap();
    let state: u64 = csv
        .lines()
        .find(|l| l.starts_with("M-FAC m=1024 1%"))
        .map(|l| l.split(',').nth(col).unwrap().parse().unwrap())
        .unwrap();
    assert!(state > 100_000_000 && state < 400_000_000, "{state}");
    assert!(header.contains(&"steps_to_target"), "{header:?}");
}

#[test]
fn compare_rejects_unknown_flags_without_training() {
    let out = Command::new(env!("CARGO_BIN_EXE_mfac-lab"))
        .args(["compare", "--lr", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unexpected argument '--lr'") && err.contains("--help"),
        "{err}"
    );
    // A near miss gets a suggestion.
    let out = Command::new(env!("CARGO_BIN_EXE_mfac-lab"))
        .args(["compare", "--seed", "3"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--seeds"), "{err}");
}

#[test]
fn every_command_has_help_listing_its_flags() {
    for (cmd, flags) in [
        (vec!["--help"], vec!["compare", "glue", "info"]),
        (vec!["help"], vec!["compare", "glue", "info"]),
        (
            vec!["compare", "--help"],
            vec!["--optim_args", "--seeds", "--output_dir", "--data_dir"],
        ),
        (
            vec!["glue", "--help"],
            vec![
                "--model_name_or_path",
                "--resume_from_checkpoint",
                "--save_steps",
                "--save_total_limit",
                "--overwrite_output_dir",
                "--logging_steps",
                "--optim_args",
            ],
        ),
        (vec!["info", "--help"], vec!["MODEL"]),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_mfac-lab"))
            .args(&cmd)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{cmd:?}: {text}");
        for f in flags {
            assert!(text.contains(f), "{cmd:?} lacks {f}:\n{text}");
        }
    }
}
