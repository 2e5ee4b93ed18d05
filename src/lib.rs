//! # mfac-lab
//!
//! Fine-tune BERT-tiny on GLUE/MNLI with the M-FAC second-order optimizer and compare it with
//! Adam, on candle (CPU or CUDA), from a Jupyter notebook (evcxr) or the command line.
//!
//! The modules follow the pipeline: [`hub`] → data → [`model`] → [`optim`] → train → compare →
//! plot. Notebooks start with `use mfac_lab::prelude::*;`.
//!
//! ```
//! use mfac_lab::prelude::*;
//! let model = BertClassifier::random(&BertConfig::bert_tiny(), 3, 42, &Device::Cpu, DType::F32)?;
//! assert_eq!(model.vars().len(), 41);
//! # Ok::<(), mfac_lab::Error>(())
//! ```

pub mod cards;
pub mod cli;
pub mod compare;
pub mod data;
pub mod error;
pub mod gpu;
pub mod hub;
pub mod io;
pub mod model;
pub mod optim;
pub mod plot;
pub mod rng;
pub mod train;

pub use error::{Error, Result};

/// Everything a notebook needs, in one import.
pub mod prelude {
    pub use crate::compare::{
        compare_optimizers, default_specs, demo_specs, CompareConfig, Comparison, ModelSource,
    };
    pub use crate::data::{load_glue, load_glue_dir, load_mnli, mnli_sample, GlueData, GlueTask};
    pub use crate::error::{Error, Result};
    pub use crate::hub::Hub;
    pub use crate::model::{
        best_device, describe_device, device_report, load_bert_tiny, Batch, BertClassifier,
        BertConfig, LoadOptions, LoadReport, PairTokenizer,
    };
    pub use crate::optim::{
        clip_grad_norm, AdamW, AdamWConfig, LinearSchedule, MFac, MFacConfig, OptimizerSpec, Sgd,
        SgdConfig,
    };
    pub use crate::plot::Figure;
    pub use crate::train::{Progress, ReportTo, RunCost, RunHistory, TrainConfig, Trainer};
    pub use candle_core::{DType, Device, Tensor, Var};
    pub use candle_nn::Optimizer;
}
