//! The library's error type: every failure is a typed, readable [`Error`], never a panic.

use std::path::PathBuf;

/// Everything that can go wrong in mfac-lab.
///
/// Each variant names the file, tensor, key or repository involved, so the message alone tells
/// the user what to fix.
///
/// ```
/// use mfac_lab::prelude::*;
/// let err = BertClassifier::from_dir("/no/such/folder", 3, &Device::Cpu, DType::F32).unwrap_err();
/// assert!(matches!(err, Error::MissingDir(_)));
/// assert!(err.to_string().contains("/no/such/folder"));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),

    /// A file could not be read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What we were doing ("reading", "writing", ...).
        action: &'static str,
        /// The file or folder involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// The run's checkpoints and final files would not fit on the output folder's disk
    /// (checked before the first step; see [`crate::train::DiskPlan`]).
    #[error("not enough disk space in {} for this run: {detail}", dir.display())]
    NotEnoughDisk {
        /// The output folder.
        dir: PathBuf,
        /// What it needs at its worst moment and why, what is free, and the fixes.
        detail: String,
    },

    /// A file could not be written (e.g. the disk filled up); nothing half-written is left.
    #[error("cannot write {}: {message}{}", path.display(), free.as_ref().map(|f| format!(" ({f} free on its disk)")).unwrap_or_default())]
    CannotWrite {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
        /// Free space left on its disk, when known.
        free: Option<String>,
    },

    /// Writing a checkpoint failed; the previous complete checkpoint is untouched.
    #[error("writing checkpoint {step} failed: {source}; {last}")]
    CheckpointWrite {
        /// The step of the checkpoint being written.
        step: usize,
        /// Why.
        #[source]
        source: Box<Error>,
        /// Where the last complete checkpoint is (or that there is none yet).
        last: String,
    },

    /// The model folder does not exist.
    #[error("model folder {} does not exist", .0.display())]
    MissingDir(PathBuf),

    /// The data folder (`--data_dir`, `load_glue_dir`) does not exist.
    #[error(
        "data folder {} does not exist: give --data_dir a folder with the task's parquet or TSV files (e.g. train.tsv, validation_matched.tsv), or leave it out to load the task from the hub",
        .0.display()
    )]
    MissingDataDir(PathBuf),

    /// A required file is not in the model folder.
    #[error("{} has no {file}{hint}", dir.display())]
    MissingFile {
        /// The folder searched.
        dir: PathBuf,
        /// The file (or the alternatives) that was expected.
        file: String,
        /// Extra advice, starting with "; " or empty.
        hint: String,
    },

    /// config.json is not valid or describes a model we cannot build.
    #[error("bad config {}: {message}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// An invalid argument was passed (e.g. `num_labels = 0`).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A weights file could not be parsed.
    #[error("cannot read weights {}: {message}", path.display())]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// What went wrong, with the fix when we know it.
        message: String,
    },

    /// A tensor required by the model is not in the weights file.
    #[error("weights {} have no tensor {name} (also looked for it without the `bert.` prefix)", path.display())]
    MissingTensor {
        /// The weights file.
        path: PathBuf,
        /// The HF name of the missing tensor.
        name: String,
    },

    /// A tensor in the weights file has a shape that does not match config.json.
    #[error("tensor {name} has shape {found:?} but the config implies {expected:?}")]
    ShapeMismatch {
        /// The HF name of the tensor.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },

    /// The tokenizer could not be built or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A download from (or a lookup in the cache of) the Hugging Face hub failed.
    #[error("hub: cannot get {file} from {repo} at revision {revision}: {message}")]
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
        /// Path of the file in the repository.
        file: String,
        /// The reason, with advice when offline.
        message: String,
    },

    /// A gradient handed to an optimizer holds NaN or ±inf (with M-FAC's coupled weight decay:
    /// or the weight, whose wd·w joins the gradient); the optimizer state is unchanged.
    #[error("non-finite gradient in parameter {param} (index {index}; with weight decay, the gradient or the weight); the optimizer state was left unchanged, so this batch can be skipped")]
    NonFiniteGradient {
        /// Position of the parameter in the optimizer's list.
        index: usize,
        /// Its name when known, else its shape.
        param: String,
    },

    /// Training produced a NaN or infinite loss; the parameters are those before that step.
    #[error("the loss is {loss} at step {step}: training stopped{saved}")]
    NonFiniteLoss {
        /// The optimizer step (0-based).
        step: usize,
        /// The loss value.
        loss: f64,
        /// Where the last good model was saved, starting with "; ", or empty.
        saved: String,
    },

    /// Training was stopped on request (Ctrl-C, or `Trainer::stop_at_step`) after a whole
    /// step; the checkpoint written then continues it exactly.
    #[error("training stopped at step {step} of {total}{resume}")]
    Interrupted {
        /// Optimizer steps done.
        step: usize,
        /// Steps the run would have taken.
        total: usize,
        /// The checkpoint written, if an output folder was set.
        checkpoint: Option<PathBuf>,
        /// How to continue, starting with ": ", or why it cannot.
        resume: String,
    },

    /// Runs of a comparison failed (`Comparison::check`, or every run of `compare_optimizers`).
    #[error("{} of {total} runs failed: {}", failed.len(), failed.join("; "))]
    RunsFailed {
        /// "optimizer seed N: error" per failed run.
        failed: Vec<String>,
        /// How many runs were attempted.
        total: usize,
    },

    /// A buffer would not fit in memory; nothing was allocated.
    #[error("{what} needs {needed} but only {available} is available; {fix}")]
    OutOfMemory {
        /// What was to be allocated.
        what: String,
        /// Bytes needed, human readable.
        needed: String,
        /// Bytes available, human readable.
        available: String,
        /// How to make it fit.
        fix: String,
    },

    /// An optimizer option is unknown, malformed or out of range.
    #[error("optimizer option {key:?}: {message} (valid keys: {valid})")]
    OptimizerOption {
        /// The offending key (or the optimizer name).
        key: String,
        /// What is wrong.
        message: String,
        /// The accepted keys (or names).
        valid: String,
    },

    /// A data file could not be read or does not have the expected columns.
    #[error("data {source_name}: {message}")]
    Data {
        /// The file (or embedded sample) involved.
        source_name: String,
        /// What is wrong, naming the columns expected and found.
        message: String,
    },

    /// A CUDA call of M-FAC's device window failed (loading its kernels, allocating, copying,
    /// launching).
    #[error("CUDA: {op} failed: {message}; check the GPU with nvidia-smi (driver ≥ CUDA 13.0, an sm_90 GPU for our kernels' machine code) or train on the CPU (--device cpu)")]
    Cuda {
        /// What was being done.
        op: String,
        /// The driver's error.
        message: String,
    },

    /// JSON could not be written.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// `Result` with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// [`Error::CannotWrite`] for `path`, with the free space of its disk.
    pub fn cannot_write(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        let path = path.into();
        let free = crate::train::free_bytes(&path).map(crate::train::human_bytes);
        Error::CannotWrite {
            message: message.to_string(),
            free,
            path,
        }
    }
}
