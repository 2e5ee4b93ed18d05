//! The `mfac-lab` command line. The training commands (`glue`, `compare`) arrive with the trainer;
//! for now it can fetch and inspect a model.

use anyhow::Result;
use mfac_lab::prelude::*;

const USAGE: &str = "mfac-lab — fine-tune BERT-tiny with M-FAC vs Adam (candle)

USAGE:
    mfac-lab info [MODEL]     load MODEL (a local HF folder or a hub id; default prajjwal1/bert-tiny)
                              and print its architecture and parameter count
    mfac-lab help             this text

Environment: HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE=1 (cache only), HF_TOKEN.
The `glue` and `compare` commands are not implemented yet.";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("help") | Some("--help") | Some("-h") => {
            println!("{USAGE}");
            Ok(())
        }
        Some("info") => {
            let src = args
                .get(1)
                .map(String::as_str)
                .unwrap_or(mfac_lab::model::BERT_TINY_REPO);
            let model = BertClassifier::from_pretrained(src, &LoadOptions::default())?;
            println!("{model:?}");
            println!("{:#?}", model.load_report());
            Ok(())
        }
        Some(other) => {
            eprintln!("{USAGE}");
            anyhow::bail!("unknown command {other:?}")
        }
    }
}
