//! Reading checkpoint tensors (`model.safetensors` or zip-format `pytorch_model.bin`) into a map
//! keyed by canonical HF names (`bert.…`, `classifier.…`), and building parameters from it.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::rng::SeededRng;

/// Tensors of a checkpoint by canonical name, with the file they came from.
#[derive(Debug)]
pub struct WeightMap {
    /// The file read.
    pub path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
    used: BTreeSet<String>,
}

/// Maps a checkpoint key to our canonical HF name: base-model keys get the `bert.` prefix (bare
/// BertModel exports have none), TF-era `gamma`/`beta` become `weight`/`bias`.
fn canonical_name(key: &str) -> String {
    let key = key
        .strip_suffix(".gamma")
        .map(|k| format!("{k}.weight"))
        .or_else(|| key.strip_suffix(".beta").map(|k| format!("{k}.bias")))
        .unwrap_or_else(|| key.to_string());
    for base in ["embeddings.", "encoder.", "pooler."] {
        if key.starts_with(base) {
            return format!("bert.{key}");
        }
    }
    key
}

impl WeightMap {
    /// A map from tensors already in memory (canonical HF names); `label` stands for the path
    /// in messages.
    pub fn from_tensors(label: &str, tensors: Vec<(String, Tensor)>) -> Self {
        WeightMap {
            path: PathBuf::from(label),
            tensors: tensors.into_iter().collect(),
            used: BTreeSet::new(),
        }
    }

    /// Reads a `.safetensors` file or a zip-format torch `.bin` (by extension).
    pub fn read(path: &Path) -> Result<Self> {
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        let raw: Vec<(String, Tensor)> = if is_safetensors {
            let data = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
            candle_core::safetensors::load_buffer(&data, &Device::Cpu)
                .map_err(|e| Error::Weights {
                    path: path.to_path_buf(),
                    message: format!(
                        "{e} (is the file complete? a truncated download looks like this)"
                    ),
                })?
                .into_iter()
                .collect()
        } else {
            Self::read_pickle(path)?
        };
        let tensors = raw
            .into_iter()
            .map(|(k, t)| (canonical_name(&k), t))
            .collect();
        Ok(WeightMap {
            path: path.to_path_buf(),
            tensors,
            used: BTreeSet::new(),
        })
    }

    fn read_pickle(path: &Path) -> Result<Vec<(String, Tensor)>> {
        // candle's reader panics on some malformed inputs; keep that from reaching the user.
        let p = path.to_path_buf();
        let res = std::panic::catch_unwind(move || candle_core::pickle::read_all(&p));
        let err = |message: String| Error::Weights {
            path: path.to_path_buf(),
            message,
        };
        match res {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let msg = e.to_string();
                if msg.contains("central directory") || msg.contains("zip") || msg.contains("Zip") {
                    Err(err(format!(
                        "{msg}: this is a legacy (non-zip) torch pickle, which candle cannot read. \
                         Convert it once with Python: `import torch; from safetensors.torch import save_file; \
                         sd = torch.load('pytorch_model.bin'); save_file({{k: v.contiguous() for k, v in sd.items()}}, 'model.safetensors')` \
                         (or re-save it with torch >= 1.6, whose default is the zip format)"
                    )))
                } else {
                    Err(err(msg))
                }
            }
            Err(_) => Err(err(
                "the torch pickle is malformed (the reader gave up)".into()
            )),
        }
    }

    /// Whether the checkpoint holds `name` (canonical).
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Takes a tensor by canonical name, checking its shape.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let Some(t) = self.tensors.get(name) else {
            return Ok(None);
        };
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        self.used.insert(name.to_string());
        Ok(Some(t.clone()))
    }

    /// Keys present in the file that no parameter used (`position_ids` buffers excluded).
    pub fn unused(&self) -> Vec<String> {
        self.tensors
            .keys()
            .filter(|k| !self.used.contains(*k) && !k.ends_with("position_ids"))
            .cloned()
            .collect()
    }
}

/// How a parameter is initialised when the checkpoint lacks it (HF's `_init_weights`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    /// N(0, initializer_range²); with `Some(row)`, that row (the padding index) set to 0.
    Normal(Option<usize>),
    Zeros,
    Ones,
}

/// Creates the model's parameters in HF order, from a checkpoint or freshly initialised.
pub(crate) struct ParamBuilder<'a> {
    pub weights: Option<&'a mut WeightMap>,
    pub rng: SeededRng,
    pub init_std: f64,
    pub device: Device,
    pub dtype: DType,
    pub vars: Vec<(String, Var)>,
    pub newly_initialized: Vec<String>,
}

impl ParamBuilder<'_> {
    /// The parameter `name` of `shape`. Loaded when the checkpoint has it; otherwise initialised
    /// if `optional` (or when there is no checkpoint), else a [`Error::MissingTensor`].
    pub fn param(
        &mut self,
        name: &str,
        shape: &[usize],
        init: Init,
        optional: bool,
    ) -> Result<Tensor> {
        let loaded = match self.weights.as_deref_mut() {
            Some(w) => w.take(name, shape)?,
            None => None,
        };
        let t = match loaded {
            Some(t) => t.to_dtype(self.dtype)?.to_device(&self.device)?,
            None => {
                if let Some(w) = self.weights.as_deref() {
                    if !optional {
                        return Err(Error::MissingTensor {
                            path: w.path.clone(),
                            name: name.to_string(),
                        });
                    }
                    self.newly_initialized.push(name.to_string());
                }
                self.init(shape, init)?
            }
        };
        let var = Var::from_tensor(&t)?;
        let t = var.as_tensor().clone();
        self.vars.push((name.to_string(), var));
        Ok(t)
    }

    fn init(&mut self, shape: &[usize], init: Init) -> Result<Tensor> {
        Ok(match init {
            Init::Zeros => Tensor::zeros(shape, self.dtype, &self.device)?,
            Init::Ones => Tensor::ones(shape, self.dtype, &self.device)?,
            Init::Normal(pad_row) => {
                let n: usize = shape.iter().product();
                let mut v = self.rng.normal_vec(n, 0.0, self.init_std);
                if let Some(row) = pad_row {
                    let width = shape[1..].iter().product::<usize>();
                    v[row * width..(row + 1) * width]
                        .iter_mut()
                        .for_each(|x| *x = 0.0);
                }
                Tensor::from_vec(v, shape, &Device::Cpu)?
                    .to_dtype(self.dtype)?
                    .to_device(&self.device)?
            }
        })
    }
}

/// A named scope of a [`ParamBuilder`], as candle's `VarBuilder`: `vb.pp("bert").pp("pooler")`
/// creates parameters named `bert.pooler.…`. Scopes are cheap and share one builder.
pub(crate) struct Vb<'p, 'w> {
    pb: &'p RefCell<ParamBuilder<'w>>,
    prefix: String,
}

impl<'p, 'w> Vb<'p, 'w> {
    /// The root scope (no prefix).
    pub fn root(pb: &'p RefCell<ParamBuilder<'w>>) -> Self {
        Vb {
            pb,
            prefix: String::new(),
        }
    }

    /// The sub-scope `name` (a module's attribute name, or a layer's index).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Vb {
            pb: self.pb,
            prefix,
        }
    }

    /// The parameter `name` of this scope (see [`ParamBuilder::param`]).
    pub fn param(&self, name: &str, shape: &[usize], init: Init, optional: bool) -> Result<Tensor> {
        self.pb
            .borrow_mut()
            .param(&self.pp(name).prefix, shape, init, optional)
    }
}
