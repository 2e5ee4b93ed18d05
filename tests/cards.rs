//! The model cards as data and `mfac-lab card`: every card's recipe is the table's (num_grads,
//! epochs, lr 1e-4, damp 1e-6, batch 32, seq 128), the command prints it without training on
//! `--dry_run`, and SQuAD v2 is refused with the reason.

use std::process::Command;

use mfac_lab::cards::{all_cards, find, recipe};
use mfac_lab::optim::{AdamWConfig, MFacConfig, OptimKind, OptimizerSpec};

#[test]
fn every_cards_recipe_is_the_tables() {
    for card in all_cards() {
        let (specs, train) = recipe(&card);
        assert_eq!(
            specs[0],
            OptimizerSpec::new(AdamWConfig {
                lr: 1e-4,
                ..Default::default()
            })
        );
        match specs[1].kind() {
            OptimKind::MFac(c) => assert_eq!(
                *c,
                MFacConfig {
                    lr: 1e-4,
                    num_grads: card.num_grads,
                    damp: 1e-6,
                    ..MFacConfig::default()
                }
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!((train.batch_size, train.max_seq_length), (32, 128));
        assert_eq!(train.num_train_epochs, card.epochs);
    }
    // The table's windows and epochs.
    assert_eq!(find("mrpc", "bert-tiny").unwrap().num_grads, 512);
    assert_eq!(find("stsb", "bert-mini").unwrap().num_grads, 512);
    assert_eq!(find("qqp", "bert-mini").unwrap().num_grads, 1024);
    assert_eq!(find("sst2", "bert-mini").unwrap().epochs, 3.0);
}

fn card(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mfac-lab"))
        .arg("card")
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_card_command_prints_the_card_and_its_recipe() {
    let (ok, stdout, stderr) = card(&["--task", "mrpc", "--model", "bert-mini", "--dry_run"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("| M-FAC (card) | 85.06 ± 1.63 | 78.87 ± 2.33 |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| AdamW (card) | 84.57 | 76.57 |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("num_grads 512), lr 1e-4, batch 32, max_seq_length 128, 5 epochs"),
        "{stdout}"
    );
    assert!(stdout.contains("seeds [42, 43, 44, 45, 46]"), "{stdout}");
    let (ok, stdout, _) = card(&[
        "--task",
        "sst2",
        "--model",
        "bert-mini",
        "--dry_run",
        "--seeds",
        "1,2",
    ]);
    assert!(ok && stdout.contains("3 epochs, seeds [1, 2]"), "{stdout}");
}

#[test]
fn squad_v2_and_cards_that_do_not_exist_are_refused_by_name() {
    let (ok, _, stderr) = card(&["--task", "squad_v2"]);
    assert!(!ok);
    assert!(
        stderr.contains("not supported yet") && stderr.contains("not a GLUE task"),
        "{stderr}"
    );
    let (ok, _, stderr) = card(&["--task", "sst2", "--model", "bert-tiny"]);
    assert!(!ok);
    assert!(
        stderr.contains("no card for prajjwal1/bert-tiny on sst2"),
        "{stderr}"
    );
    assert!(stderr.contains("prajjwal1/bert-mini"), "{stderr}");
}

/// `card --density 0.01` runs the card's recipe with the sparse window and says so beside the
/// card (here on `--dry_run`: the card, the recipe with `M-FAC m=1024 1%`, and the note with
/// both memory figures); without `--density` no such note.
#[test]
fn card_density_runs_the_sparse_window_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mfac-lab"))
            .args(["card", "--dry_run"])
            .args(extra)
            .current_dir(dir.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let sparse = run(&["--density", "0.01"]);
    assert!(
        sparse.contains("Model card (prajjwal1/bert-tiny on mnli"),
        "{sparse}"
    );
    assert!(sparse.contains("AdamW and M-FAC m=1024 1%"), "{sparse}");
    assert!(
        sparse.contains("Not the card's window: M-FAC m=1024 1% keeps the top 1%")
            && sparse.contains("0.34 GB of optimizer state")
            && sparse.contains("needs 18.0 GB"),
        "{sparse}"
    );
    let dense = run(&[]);
    assert!(
        dense.contains("AdamW and M-FAC m=1024 (") && !dense.contains("Not the card's window"),
        "{dense}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "a dry run writes nothing"
    );
}
