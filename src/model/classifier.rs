//! `BertClassifier`: BERT + pooler + dropout + linear head (HF's `BertForSequenceClassification`),
//! loading, the loss, and its parameters in a fixed order.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::hub::{Hub, RepoKind};
use crate::model::batch::Batch;
use crate::model::config::BertConfig;
use crate::model::engine::{graph, ClassifierOutput, Engine, ModelView};
use crate::model::params::Classifier;
use crate::model::tokenizer::PairTokenizer;
use crate::model::weights::{ParamBuilder, Vb, WeightMap};
use crate::rng::SeededRng;

/// The hub repository of the model card's base model.
pub const BERT_TINY_REPO: &str = "prajjwal1/bert-tiny";
/// The revision of [`BERT_TINY_REPO`] used by default. Pin a commit sha with
/// [`LoadOptions::revision`] for a fully reproducible download.
pub const BERT_TINY_REVISION: &str = "main";

/// CUDA when built with the `cuda` feature and a GPU is present, else the CPU.
///
/// ```
/// let d = mfac_lab::model::best_device();
/// # #[cfg(not(feature = "cuda"))]
/// assert!(d.is_cpu());
/// ```
pub fn best_device() -> Device {
    Device::cuda_if_available(0).unwrap_or(Device::Cpu)
}

/// A short name of `device` for logs and notebooks: `cpu (2 threads)`, or on a GPU
/// `cuda:0 (NVIDIA H100 80GB HBM3)`.
///
/// ```
/// let name = mfac_lab::model::describe_device(&candle_core::Device::Cpu);
/// assert!(name.starts_with("cpu (") && name.ends_with(" threads)"));
/// ```
pub fn describe_device(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let stream = d.cuda_stream();
            let ctx = stream.context();
            match ctx.name() {
                Ok(name) => format!("cuda:{} ({name})", ctx.ordinal()),
                Err(_) => format!("cuda:{}", ctx.ordinal()),
            }
        }
        other => format!("{:?}", other.location()),
    }
}

/// Where a notebook trains, as a notebook shows it: `device: cpu (2 threads)` or
/// `device: cuda:0 (NVIDIA H100 80GB HBM3)`, from [`device_report`]. End a cell with it: evcxr
/// shows the value a cell ends with (its `Debug`) as the cell's result, which Jupyter keeps with
/// the cell; a `println!` in a cell's last instant can reach the notebook after the cell has
/// ended, and is then lost (evcxr_jupyter passes printed lines on from a thread of its own).
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceReport(String);

impl std::fmt::Display for DeviceReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "device: {}", self.0)
    }
}

impl std::fmt::Debug for DeviceReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The [`DeviceReport`] of `device`.
///
/// ```
/// use mfac_lab::prelude::*;
/// let report = device_report(&Device::Cpu);
/// assert_eq!(format!("{report:?}"), format!("device: {}", describe_device(&Device::Cpu)));
/// assert!(report.to_string().starts_with("device: cpu ("));
/// ```
pub fn device_report(device: &Device) -> DeviceReport {
    DeviceReport(describe_device(device))
}

/// How to load a model: labels, device, dtype, hub revision, and the seed of a new head.
///
/// ```
/// use mfac_lab::prelude::*;
/// let opts = LoadOptions::default().num_labels(2).dtype(DType::F64).device(Device::Cpu).seed(7);
/// assert_eq!(opts.num_labels, 2);
/// ```
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Classes of the head (3 for MNLI).
    pub num_labels: usize,
    /// Where the parameters live.
    pub device: Device,
    /// F32 (default) or F64.
    pub dtype: DType,
    /// Hub revision (branch, tag or commit); `None` = `main`.
    pub revision: Option<String>,
    /// The hub to use for repository ids; `None` = `Hub::default()` (environment).
    pub hub: Option<Hub>,
    /// Seed of a newly initialised classifier (and of dropout).
    pub seed: u64,
    /// Truncation length of the tokenizer.
    pub max_seq_length: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            num_labels: 3,
            device: best_device(),
            dtype: DType::F32,
            revision: None,
            hub: None,
            seed: 42,
            max_seq_length: 128,
        }
    }
}

impl LoadOptions {
    /// Sets the number of labels.
    pub fn num_labels(mut self, n: usize) -> Self {
        self.num_labels = n;
        self
    }
    /// Sets the device.
    pub fn device(mut self, d: Device) -> Self {
        self.device = d;
        self
    }
    /// Sets the dtype (F32 or F64).
    pub fn dtype(mut self, d: DType) -> Self {
        self.dtype = d;
        self
    }
    /// Pins a hub revision.
    pub fn revision(mut self, r: impl Into<String>) -> Self {
        self.revision = Some(r.into());
        self
    }
    /// Uses this hub instead of the environment's.
    pub fn hub(mut self, h: Hub) -> Self {
        self.hub = Some(h);
        self
    }
    /// Seeds a new head's initialisation and dropout.
    pub fn seed(mut self, s: u64) -> Self {
        self.seed = s;
        self
    }
    /// Sets the tokenizer's truncation length.
    pub fn max_seq_length(mut self, n: usize) -> Self {
        self.max_seq_length = n;
        self
    }
}

/// The files of a model in HF layout, wherever they came from.
#[derive(Debug, Clone)]
struct ModelFiles {
    source: String,
    config: PathBuf,
    weights: PathBuf,
    tokenizer_json: Option<PathBuf>,
    vocab: Option<PathBuf>,
    tokenizer_config: Option<PathBuf>,
}

impl ModelFiles {
    fn in_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingDir(dir.to_path_buf()));
        }
        let opt = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        let config = opt("config.json").ok_or_else(|| Error::MissingFile {
            dir: dir.to_path_buf(),
            file: "config.json".into(),
            hint: "; is this an HF model folder?".into(),
        })?;
        let weights = opt("model.safetensors")
            .or_else(|| opt("pytorch_model.bin"))
            .ok_or_else(|| Error::MissingFile {
                dir: dir.to_path_buf(),
                file: "model.safetensors or pytorch_model.bin".into(),
                hint: "; sharded and TF/Flax checkpoints are not supported".into(),
            })?;
        Ok(ModelFiles {
            source: dir.display().to_string(),
            config,
            weights,
            tokenizer_json: opt("tokenizer.json"),
            vocab: opt("vocab.txt"),
            tokenizer_config: opt("tokenizer_config.json"),
        })
    }

    fn from_hub(hub: &Hub, repo: &str, revision: &str) -> Result<Self> {
        let get = |f: &str| hub.try_file(RepoKind::Model, repo, revision, f);
        let config = hub.file(RepoKind::Model, repo, revision, "config.json")?;
        let weights = match get("model.safetensors")? {
            Some(p) => p,
            None => get("pytorch_model.bin")?.ok_or_else(|| Error::Hub {
                repo: repo.into(),
                revision: revision.into(),
                file: "model.safetensors or pytorch_model.bin".into(),
                message: "the repository has neither weights file".into(),
            })?,
        };
        let tokenizer_json = get("tokenizer.json")?;
        let vocab = if tokenizer_json.is_none() {
            get("vocab.txt")?
        } else {
            None
        };
        Ok(ModelFiles {
            source: format!("{repo}@{revision}"),
            config,
            weights,
            tokenizer_json,
            vocab,
            tokenizer_config: get("tokenizer_config.json")?,
        })
    }

    fn tokenizer(&self, max_len: usize) -> Result<Option<PairTokenizer>> {
        let tok = if let Some(p) = &self.tokenizer_json {
            PairTokenizer::from_tokenizer_json(p)?
        } else if let Some(p) = &self.vocab {
            let lowercase = self
                .tokenizer_config
                .as_ref()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v.get("do_lower_case").and_then(|b| b.as_bool()))
                .unwrap_or(true);
            PairTokenizer::from_vocab(p, lowercase)?
        } else {
            return Ok(None);
        };
        Ok(Some(tok.with_max_length(max_len)?))
    }
}

/// What loading did: the new (randomly initialised) parameters and the unused checkpoint keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Folder or `repo@revision` the model came from.
    pub source: String,
    /// The weights file read.
    pub weights_file: Option<PathBuf>,
    /// Parameters absent from the checkpoint, initialised like HF (e.g. `classifier.weight`).
    pub newly_initialized: Vec<String>,
    /// Checkpoint tensors the model does not use (e.g. `cls.predictions.*`).
    pub unused: Vec<String>,
}

/// BERT for sequence classification, trainable, f32 or f64, CPU or CUDA.
///
/// ```
/// use mfac_lab::prelude::*;
/// // Any HF-layout folder loads; here one written from a random bert-tiny.
/// # let tmp = tempfile::tempdir().unwrap();
/// # let dir = tmp.path();
/// # BertClassifier::random(&BertConfig::bert_tiny(), 3, 42, &Device::Cpu, DType::F32)?
/// #     .with_tokenizer(PairTokenizer::bert_base_uncased()?).save_pretrained(dir)?;
/// let model = BertClassifier::from_dir(dir, 3, &Device::Cpu, DType::F32)?;
/// let batch = model.tokenizer()?.batch(&[("A man plays.", "Someone plays.")], Some(&[0]), &Device::Cpu)?;
/// let logits = model.forward(&batch, false)?;
/// assert_eq!(logits.dims(), &[1, 3]);
/// let loss = BertClassifier::loss(&logits, batch.labels.as_ref().unwrap())?;
/// let grads = loss.backward()?;
/// assert!(model.vars().iter().all(|v| grads.get(v.as_tensor()).is_some()));
/// # Ok::<(), mfac_lab::Error>(())
/// ```
pub struct BertClassifier {
    config: BertConfig,
    num_labels: usize,
    params: Classifier<Tensor>,
    vars: Vec<(String, Var)>,
    engine: Engine,
    tokenizer: Option<PairTokenizer>,
    dropout_rng: Mutex<SeededRng>,
    report: LoadReport,
    device: Device,
    dtype: DType,
}

impl std::fmt::Debug for BertClassifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertClassifier")
            .field("layers", &self.config.num_hidden_layers)
            .field("hidden_size", &self.config.hidden_size)
            .field("num_labels", &self.num_labels)
            .field("parameters", &self.num_parameters())
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .finish()
    }
}

impl BertClassifier {
    fn build(
        config: BertConfig,
        num_labels: usize,
        mut weights: Option<WeightMap>,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<(Self, LoadReport)> {
        if num_labels == 0 {
            return Err(Error::InvalidArgument(
                "num_labels must be at least 1".into(),
            ));
        }
        if !matches!(dtype, DType::F32 | DType::F64) {
            return Err(Error::InvalidArgument(format!(
                "dtype {dtype:?} is not supported: use F32 or F64"
            )));
        }
        let mut seeds = SeededRng::new(seed);
        let init_seed = seeds.next_u64();
        let dropout_seed = seeds.next_u64();
        let pb = std::cell::RefCell::new(ParamBuilder {
            weights: weights.as_mut(),
            rng: SeededRng::new(init_seed),
            init_std: config.initializer_range,
            device: device.clone(),
            dtype,
            vars: Vec::new(),
            newly_initialized: Vec::new(),
        });
        let params = Classifier::load(&Vb::root(&pb), &config, num_labels)?;
        let ParamBuilder {
            vars,
            newly_initialized,
            ..
        } = pb.into_inner();
        debug_assert!(
            vars.len() == params.leaves().len()
                && (vars.iter().zip(params.leaves()))
                    .all(|((_, v), t)| v.as_tensor().id() == t.id()),
            "the parameter tree and the named vars are in the same (HF) order"
        );
        let report = LoadReport {
            source: String::new(),
            weights_file: weights.as_ref().map(|w| w.path.clone()),
            newly_initialized,
            unused: weights.as_ref().map(|w| w.unused()).unwrap_or_default(),
        };
        let engine = Engine::for_model(device, dtype, &config);
        let model = BertClassifier {
            config,
            num_labels,
            params,
            vars,
            engine,
            tokenizer: None,
            dropout_rng: Mutex::new(SeededRng::new(dropout_seed)),
            report: report.clone(),
            device: device.clone(),
            dtype,
        };
        Ok((model, report))
    }

    /// The same model (weights, tokenizer, dropout state) with its parameters re-created as new
    /// candle variables, holding copies of the values.
    ///
    /// Why: in an evcxr notebook every cell carries its own copy of candle, and candle's tensor
    /// ids restart at 1 in each. A model made in one cell and trained in another would share ids
    /// with the new cell's tensors and mix up gradients. [`crate::train::Trainer::fit`] calls
    /// this first; call it yourself before a hand-written training loop in a new cell.
    ///
    /// ```
    /// use mfac_lab::prelude::*;
    /// let m = BertClassifier::random(&BertConfig::bert_tiny(), 3, 1, &Device::Cpu, DType::F32)?;
    /// let r = m.rebind()?;
    /// assert_ne!(m.vars()[0].id(), r.vars()[0].id());
    /// let same = (m.vars()[0].as_tensor() - r.vars()[0].as_tensor())?.abs()?.max_all()?;
    /// assert_eq!(same.to_scalar::<f32>()?, 0.0);
    /// # Ok::<(), mfac_lab::Error>(())
    /// ```
    pub fn rebind(&self) -> Result<Self> {
        let tensors = self
            .vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect::<Result<Vec<_>>>()?;
        let weights = WeightMap::from_tensors("<in-memory model>", tensors);
        let (mut m, _) = Self::build(
            self.config.clone(),
            self.num_labels,
            Some(weights),
            0,
            &self.device,
            self.dtype,
        )?;
        m.tokenizer = self.tokenizer.clone();
        m.report = self.report.clone();
        m.engine = self.engine;
        if let (Ok(src), Ok(mut dst)) = (self.dropout_rng.lock(), m.dropout_rng.lock()) {
            *dst = src.clone();
        }
        Ok(m)
    }

    /// A randomly initialised model (HF's init: N(0, initializer_range²) matrices and embeddings,
    /// `[PAD]` row 0, zero biases, unit LayerNorm), reproducible from `seed`. It has no tokenizer;
    /// attach one with [`BertClassifier::with_tokenizer`].
    ///
    /// ```
    /// use mfac_lab::prelude::*;
    /// let m = BertClassifier::random(&BertConfig::bert_tiny(), 3, 42, &Device::Cpu, DType::F32)?;
    /// assert_eq!(m.num_parameters(), 4_386_307);
    /// assert_eq!(m.vars().len(), 41);
    /// # Ok::<(), mfac_lab::Error>(())
    /// ```
    pub fn random(
        config: &BertConfig,
        num_labels: usize,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        config.validate().map_err(|message| Error::Config {
            path: "<BertConfig>".into(),
            message,
        })?;
        let (mut m, _) = Self::build(config.clone(), num_labels, None, seed, device, dtype)?;
        m.report.source = "random initialisation".into();
        Ok(m)
    }

    /// Loads an HF-layout folder (config.json; model.safetensors or pytorch_model.bin;
    /// tokenizer.json or vocab.txt). A missing classifier is initialised (seed 42) and reported.
    pub fn from_dir(
        dir: impl AsRef<Path>,
        num_labels: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let opts = LoadOptions::default()
            .num_labels(num_labels)
            .device(device.clone())
            .dtype(dtype);
        Self::load_files(ModelFiles::in_dir(dir.as_ref())?, &opts)
    }

    /// Loads from a local folder if `repo_or_dir` is one, else from the hub repository
    /// `owner/name` (through the cache; offline with `HF_HUB_OFFLINE=1`).
    ///
    /// ```no_run
    /// use mfac_lab::prelude::*;
    /// let m = BertClassifier::from_pretrained("prajjwal1/bert-tiny", &LoadOptions::default())?;
    /// # Ok::<(), mfac_lab::Error>(())
    /// ```
    pub fn from_pretrained(repo_or_dir: &str, opts: &LoadOptions) -> Result<Self> {
        let path = Path::new(repo_or_dir);
        let files = if path.is_dir() {
            ModelFiles::in_dir(path)?
        } else if path.is_absolute()
            || repo_or_dir.starts_with('.')
            || repo_or_dir.matches('/').count() != 1
        {
            return Err(Error::MissingDir(path.to_path_buf()));
        } else {
            let hub = opts.hub.clone().unwrap_or_default();
            ModelFiles::from_hub(
                &hub,
                repo_or_dir,
                opts.revision.as_deref().unwrap_or("main"),
            )?
        };
        Self::load_files(files, opts)
    }

    fn load_files(files: ModelFiles, opts: &LoadOptions) -> Result<Self> {
        let config = BertConfig::from_file(&files.config)?;
        let weights = WeightMap::read(&files.weights)?;
        let (mut model, mut report) = Self::build(
            config,
            opts.num_labels,
            Some(weights),
            opts.seed,
            &opts.device,
            opts.dtype,
        )?;
        report.source = files.source.clone();
        model.tokenizer = files.tokenizer(opts.max_seq_length)?;
        if model.tokenizer.is_none() {
            log::warn!(
                "{} has no tokenizer.json or vocab.txt; attach a tokenizer with with_tokenizer()",
                files.source
            );
        }
        if !report.newly_initialized.is_empty() {
            log::warn!(
                "Some weights of BertForSequenceClassification were not initialized from {} and are newly initialized: {:?}. Train the model before using it for predictions.",
                report.source, report.newly_initialized
            );
        }
        if !report.unused.is_empty() {
            log::warn!(
                "Some weights of {} were not used when initializing BertForSequenceClassification: {:?}",
                report.source, report.unused
            );
        }
        model.report = report;
        Ok(model)
    }

    /// Attaches (or replaces) the tokenizer.
    pub fn with_tokenizer(mut self, tokenizer: PairTokenizer) -> Self {
        self.tokenizer = Some(tokenizer);
        self
    }

    /// The tokenizer loaded with the model.
    pub fn tokenizer(&self) -> Result<&PairTokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "this model has no tokenizer; attach one with with_tokenizer()".into(),
            )
        })
    }

    /// What loading reported (new and unused parameters).
    pub fn load_report(&self) -> &LoadReport {
        &self.report
    }

    /// The architecture.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Number of classes.
    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// The parameters' device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The parameters' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every trainable parameter, in HF's `named_parameters()` order (41 for bert-tiny).
    pub fn vars(&self) -> Vec<Var> {
        self.vars.iter().map(|(_, v)| v.clone()).collect()
    }

    /// `(HF name, parameter)` pairs in the same order as [`BertClassifier::vars`].
    pub fn named_vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Total number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Reseeds the dropout stream (two runs with the same seed see the same masks).
    pub fn set_dropout_seed(&self, seed: u64) {
        if let Ok(mut r) = self.dropout_rng.lock() {
            *r = SeededRng::new(seed);
        }
    }

    /// The exact position of the dropout stream (saved in checkpoints).
    pub fn dropout_rng_state(&self) -> Result<crate::rng::RngState> {
        Ok(self
            .dropout_stream(true)?
            .expect("train locks the stream")
            .state())
    }

    /// Moves the dropout stream to `state` (from [`BertClassifier::dropout_rng_state`]).
    pub fn set_dropout_rng_state(&self, state: &crate::rng::RngState) -> Result<()> {
        *self.dropout_stream(true)?.expect("train locks the stream") = SeededRng::from_state(state);
        Ok(())
    }

    /// What the engines read: parameters, config, labels, device, dtype.
    pub(crate) fn view(&self) -> ModelView<'_> {
        ModelView {
            params: &self.params,
            config: &self.config,
            num_labels: self.num_labels,
            device: &self.device,
            dtype: self.dtype,
        }
    }

    /// The parameters as a typed tree, one struct per HF module
    /// ([`crate::model::params`]).
    ///
    /// ```
    /// use mfac_lab::prelude::*;
    /// let m = BertClassifier::random(&BertConfig::bert_tiny(), 3, 0, &Device::Cpu, DType::F32)?;
    /// assert_eq!(m.params().bert.layers[1].intermediate.weight.dims(), &[512, 128]);
    /// assert_eq!(m.params().leaves().len(), 41);
    /// # Ok::<(), mfac_lab::Error>(())
    /// ```
    pub fn params(&self) -> &Classifier<Tensor> {
        &self.params
    }

    /// The engine that [`BertClassifier::loss_and_grads`] and [`BertClassifier::logits`] run
    /// ([`Engine::for_model`] unless set with [`BertClassifier::with_engine`]).
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The same model run by `engine` (an error if that engine cannot run it).
    pub fn with_engine(mut self, engine: Engine) -> Result<Self> {
        engine.check(&self.view())?;
        self.engine = engine;
        Ok(self)
    }

    /// The last hidden state `[B, T, H]` (eval mode, through the graph).
    pub fn encode(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        let batch = Batch::new(
            input_ids.clone(),
            token_type_ids.clone(),
            attention_mask.clone(),
            None,
        )?;
        let out = self.forward_full(&batch, false)?;
        Ok(out.bert.last_hidden_state().clone())
    }

    /// Logits `[B, num_labels]` through the graph, so `loss.backward()` works on them. With
    /// `train`, the five dropout sites are active (masks from the model's seeded stream);
    /// without it, the pass is deterministic. To evaluate, [`BertClassifier::logits`] is faster.
    pub fn forward(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        Ok(self.forward_full(batch, train)?.logits)
    }

    /// Evaluation-mode logits `[B, num_labels]` (no dropout, no graph), from the model's
    /// [`Engine`]: on the CPU the hand-written pass's forward.
    ///
    /// ```
    /// use mfac_lab::prelude::*;
    /// let m = BertClassifier::random(&BertConfig::bert_tiny(), 3, 0, &Device::Cpu, DType::F32)?;
    /// let ids = Tensor::new(&[[101u32, 7592, 102]], &Device::Cpu)?;
    /// let batch = Batch::new(ids.clone(), ids.zeros_like()?, ids.ones_like()?, None)?;
    /// let fast = m.logits(&batch)?;
    /// let graph = m.forward(&batch, false)?;
    /// let diff = (fast - graph)?.abs()?.max_all()?.to_scalar::<f32>()?;
    /// assert!(diff < 1e-5);
    /// # Ok::<(), mfac_lab::Error>(())
    /// ```
    pub fn logits(&self, batch: &Batch) -> Result<Tensor> {
        batch.validate()?;
        self.engine.logits(&self.view(), batch)
    }

    /// The dropout stream, locked, when `train` (no dropout otherwise).
    fn dropout_stream(&self, train: bool) -> Result<Option<std::sync::MutexGuard<'_, SeededRng>>> {
        if !train {
            return Ok(None);
        }
        self.dropout_rng
            .lock()
            .map(Some)
            .map_err(|_| Error::InvalidArgument("dropout RNG poisoned".into()))
    }

    /// Like [`BertClassifier::forward`], also returning hidden states and the pooled output.
    pub fn forward_full(&self, batch: &Batch, train: bool) -> Result<ClassifierOutput> {
        batch.validate()?;
        let mut guard = self.dropout_stream(train)?;
        graph::forward(&self.view(), batch, guard.as_deref_mut())
    }

    /// The mean loss of a labelled batch (as [`BertClassifier::loss`]) and the gradient of every
    /// parameter, keyed like `loss.backward()`'s, from the model's [`Engine`]. With `train`,
    /// dropout is on (the model's seeded stream). On the CPU (f32/f64) this is the hand-written
    /// pass, several times cheaper than the graph's backward and equal to it; elsewhere the graph.
    ///
    /// ```
    /// use mfac_lab::prelude::*;
    /// let m = BertClassifier::random(&BertConfig::bert_tiny(), 3, 0, &Device::Cpu, DType::F32)?;
    /// let ids = Tensor::new(&[[101u32, 7592, 102]], &Device::Cpu)?;
    /// let batch = Batch::new(ids.clone(), ids.zeros_like()?, ids.ones_like()?,
    ///                        Some(Tensor::new(&[1u32], &Device::Cpu)?))?;
    /// let (loss, grads) = m.loss_and_grads(&batch, true)?;
    /// assert!(loss > 0.0);
    /// assert!(m.vars().iter().all(|v| grads.get(v.as_tensor()).is_some()));
    /// # Ok::<(), mfac_lab::Error>(())
    /// ```
    pub fn loss_and_grads(
        &self,
        batch: &Batch,
        train: bool,
    ) -> Result<(f64, candle_core::backprop::GradStore)> {
        batch.validate()?;
        let mut guard = self.dropout_stream(train)?;
        self.engine
            .loss_and_grads(&self.view(), batch, guard.as_deref_mut())
    }

    /// Per-example loss `[B]`: cross-entropy of `logits` `[B, C]` against class ids `labels` `[B]`,
    /// or the squared error when `C = 1` and `labels` are floats (regression).
    pub fn per_example_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        crate::model::engine::loss::per_example(logits, labels)
    }

    /// Mean loss over the batch, a scalar: cross-entropy (HF's single-label classification), or
    /// the mean squared error for a one-output model with float labels (regression, stsb).
    pub fn loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        crate::model::engine::loss::mean(logits, labels)
    }
}
