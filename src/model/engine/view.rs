//! What the engines read of a model: its parameters, config, number of labels, device and
//! dtype — a borrowed view, so the engines never depend on `BertClassifier` itself.

use candle_core::{DType, Device, Tensor};

use crate::model::config::BertConfig;
use crate::model::params::Classifier;

/// A model as an engine sees it (`BertClassifier::view`).
#[derive(Clone, Copy)]
pub(crate) struct ModelView<'a> {
    pub params: &'a Classifier<Tensor>,
    pub config: &'a BertConfig,
    pub num_labels: usize,
    pub device: &'a Device,
    pub dtype: DType,
}

impl<'a> ModelView<'a> {
    /// The parameters as a typed tree.
    pub fn params(&self) -> &'a Classifier<Tensor> {
        self.params
    }
    /// The architecture.
    pub fn config(&self) -> &'a BertConfig {
        self.config
    }
    /// Outputs of the classifier head.
    pub fn num_labels(&self) -> usize {
        self.num_labels
    }
    /// Where the parameters live.
    pub fn device(&self) -> &'a Device {
        self.device
    }
    /// The parameters' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}
