//! `OptimizerSpec`: which optimizer a run uses — a kind with its config, and an optional
//! label — parsed from run_glue's `--optim` / `--optim_args`. The registry below is the one
//! place that lists the kinds.

use candle_core::Var;

use crate::error::{Error, Result};
use crate::optim::args::{option_err, sets_lr};
use crate::optim::label::{num, CARD_LR};
use crate::optim::seam::{parse_config, DynConfig, Optim, OptimConfig};
use crate::optim::{AdamWConfig, MFacConfig, SgdConfig};

/// Keys M-FAC accepts in `--optim_args`.
pub const MFAC_KEYS: &[&str] = MFacConfig::KEYS;
/// Keys AdamW accepts in `--optim_args`.
pub const ADAMW_KEYS: &[&str] = AdamWConfig::KEYS;
/// Keys SGD accepts in `--optim_args`.
pub const SGD_KEYS: &[&str] = SgdConfig::KEYS;

/// Declares the optimizer kinds: the [`OptimKind`] enum, its dispatch to each config's
/// [`OptimConfig`] and the `--optim` name lookup. One line per optimizer.
macro_rules! registry {
    ($($(#[$doc:meta])* $variant:ident($cfg:ty)),+ $(,)?) => {
        /// An optimizer kind with its config (see [`OptimizerSpec`]).
        #[derive(Debug, Clone, PartialEq)]
        pub enum OptimKind {
            $($(#[$doc])* $variant($cfg),)+
        }

        impl OptimKind {
            pub(crate) fn config(&self) -> &dyn DynConfig {
                match self {
                    $(OptimKind::$variant(c) => c,)+
                }
            }

            pub(crate) fn config_mut(&mut self) -> &mut dyn DynConfig {
                match self {
                    $(OptimKind::$variant(c) => c,)+
                }
            }

            /// The kind `--optim NAME` selects, from ARGS; `None` for a name no kind has.
            fn parse(name: &str, args: &str) -> Option<Result<Self>> {
                let name = name.trim();
                $(
                    if <$cfg as OptimConfig>::NAMES.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                        return Some(parse_config::<$cfg>(args).map(OptimKind::$variant));
                    }
                )+
                None
            }

            /// Every `--optim` name, kind by kind.
            pub fn names() -> Vec<&'static str> {
                let mut v = vec![];
                $(v.extend_from_slice(<$cfg as OptimConfig>::NAMES);)+
                v
            }
        }

        $(
            impl From<$cfg> for OptimKind {
                fn from(c: $cfg) -> Self {
                    OptimKind::$variant(c)
                }
            }
        )+
    };
}

registry! {
    /// torch AdamW (HF Trainer's default optimizer).
    AdamW(AdamWConfig),
    /// M-FAC.
    MFac(MFacConfig),
    /// torch SGD (HF's `--optim sgd`).
    Sgd(SgdConfig),
}

/// The optimizer of a run: a kind with its config, and an optional label.
///
/// ```
/// use mfac_lab::optim::{OptimizerSpec, MFacConfig};
/// let spec = OptimizerSpec::parse("MFAC", "lr: 1e-4, num_grads: 1024, damp: 1e-6").unwrap();
/// assert_eq!(spec, OptimizerSpec::mfac(MFacConfig::model_card()));
/// let json = OptimizerSpec::parse("MFAC", r#"{"lr": 1e-4, "num_grads": 1024, "damp": 1e-6}"#).unwrap();
/// assert_eq!(json, spec);
/// assert_eq!(OptimizerSpec::parse("adamw_torch", "").unwrap(), OptimizerSpec::adamw(5e-5));
/// ```
///
/// Every spec has a label that tells it apart in comparisons (tables, legends, run folders):
/// derived from its settings ([`OptimizerSpec::display_name`], [`OptimizerSpec::labels`]) or
/// given by hand ([`OptimizerSpec::label`]).
#[derive(Clone, PartialEq)]
pub struct OptimizerSpec {
    kind: OptimKind,
    label: Option<String>,
}

/// The same text as before the spec had its own type (`AdamW(AdamWConfig { .. })`,
/// `Labeled(.., "text")`): checkpoints' fingerprints hold it, so older checkpoints still resume.
impl std::fmt::Debug for OptimizerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.label {
            None => self.kind.fmt(f),
            Some(text) => f
                .debug_tuple("Labeled")
                .field(&self.kind)
                .field(text)
                .finish(),
        }
    }
}

impl<K: Into<OptimKind>> From<K> for OptimizerSpec {
    fn from(kind: K) -> Self {
        OptimizerSpec {
            kind: kind.into(),
            label: None,
        }
    }
}

impl OptimizerSpec {
    /// A spec of this kind (any optimizer's config), without a label.
    ///
    /// ```
    /// use mfac_lab::optim::{OptimizerSpec, SgdConfig};
    /// let spec = OptimizerSpec::new(SgdConfig { lr: 1e-2, momentum: 0.9, ..Default::default() });
    /// assert_eq!(spec, OptimizerSpec::parse("sgd", "lr: 1e-2, momentum: 0.9").unwrap());
    /// ```
    pub fn new(kind: impl Into<OptimKind>) -> Self {
        kind.into().into()
    }

    /// AdamW with HF Trainer's defaults and this learning rate.
    pub fn adamw(lr: f64) -> Self {
        Self::new(AdamWConfig {
            lr,
            ..Default::default()
        })
    }

    /// M-FAC with this config.
    pub fn mfac(cfg: MFacConfig) -> Self {
        Self::new(cfg)
    }

    /// torch SGD with this config.
    pub fn sgd(cfg: SgdConfig) -> Self {
        Self::new(cfg)
    }

    /// The kind with its config.
    ///
    /// ```
    /// use mfac_lab::optim::{MFacConfig, OptimKind, OptimizerSpec};
    /// let spec = OptimizerSpec::mfac(MFacConfig::model_card()).label("card");
    /// assert!(matches!(spec.kind(), OptimKind::MFac(c) if c.num_grads == 1024));
    /// ```
    pub fn kind(&self) -> &OptimKind {
        &self.kind
    }

    /// The kind with its config, mutable.
    pub fn kind_mut(&mut self) -> &mut OptimKind {
        &mut self.kind
    }

    /// The same spec, named `text` in comparisons (tables, legends, run folders) instead of
    /// the label derived from its settings. Labelling a labelled spec replaces the label.
    ///
    /// ```
    /// use mfac_lab::optim::{MFacConfig, OptimizerSpec};
    /// let spec = OptimizerSpec::mfac(MFacConfig::model_card()).label("M-FAC (card)");
    /// assert_eq!(spec.display_name(), "M-FAC (card)");
    /// assert_eq!((spec.name(), spec.lr()), ("mfac", 1e-4));
    /// assert_eq!(spec.unlabeled(), OptimizerSpec::mfac(MFacConfig::model_card()));
    /// ```
    pub fn label(self, text: impl Into<String>) -> Self {
        OptimizerSpec {
            label: Some(text.into()),
            ..self
        }
    }

    /// The hand-given label, if any.
    pub fn given_label(&self) -> Option<&str> {
        self.label.as_deref()
    }

    /// The same spec without its hand-given label.
    pub fn unlabeled(&self) -> Self {
        self.kind.clone().into()
    }

    fn config(&self) -> &dyn DynConfig {
        self.kind.config()
    }

    /// Checks every field of the config (finite, in range); the error names the key.
    ///
    /// ```
    /// use mfac_lab::optim::OptimizerSpec;
    /// assert!(OptimizerSpec::adamw(f64::NAN).label("x").validate().is_err());
    /// assert!(OptimizerSpec::adamw(1e-4).validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<()> {
        self.config().validate()
    }

    /// The optimizer over named parameters (as `BertClassifier::named_vars` gives them),
    /// behind the seam every kind shares.
    pub fn build(&self, vars: &[(String, Var)]) -> Result<Box<dyn Optim>> {
        self.config().build(vars)
    }

    /// The spec's label on its own: the hand-given one, else derived from its settings —
    /// M-FAC always shows m and shows lr when it differs from the card's 1e-4
    /// ([`CARD_LR`]); AdamW and SGD show their lr when it differs. Specs compared together may
    /// need more fields to tell them apart: [`OptimizerSpec::labels`] adds them.
    ///
    /// ```
    /// use mfac_lab::optim::{MFacConfig, OptimizerSpec};
    /// assert_eq!(OptimizerSpec::adamw(1e-4).display_name(), "AdamW");
    /// assert_eq!(OptimizerSpec::adamw(3e-4).display_name(), "AdamW lr 3e-4");
    /// assert_eq!(OptimizerSpec::mfac(MFacConfig::model_card()).display_name(), "M-FAC m=1024");
    /// assert_eq!(
    ///     OptimizerSpec::mfac(MFacConfig::model_card_with(32)).display_name(),
    ///     "M-FAC m=32 (lr 3.2e-3)"
    /// );
    /// ```
    pub fn display_name(&self) -> String {
        match &self.label {
            Some(text) => text.clone(),
            None => self.config().label(),
        }
    }

    /// The labels of specs compared together, one per spec, all different. Each starts as
    /// [`OptimizerSpec::display_name`]; derived labels that still collide gain the other fields
    /// that differ among them (e.g. `M-FAC m=32 (damp 1e-5)` beside `M-FAC m=32 (damp 1e-6)`).
    /// Two specs that still share a label (the same settings twice, or a hand-given label used
    /// twice or equal to another's) are an [`Error::InvalidArgument`] naming the label.
    ///
    /// ```
    /// use mfac_lab::optim::{MFacConfig, OptimizerSpec};
    /// let specs = [
    ///     OptimizerSpec::adamw(1e-4),
    ///     OptimizerSpec::mfac(MFacConfig { num_grads: 32, ..MFacConfig::model_card() }),
    ///     OptimizerSpec::mfac(MFacConfig { num_grads: 32, damp: 1e-5, ..MFacConfig::model_card() }),
    /// ];
    /// assert_eq!(
    ///     OptimizerSpec::labels(&specs).unwrap(),
    ///     ["AdamW", "M-FAC m=32 (damp 1e-6)", "M-FAC m=32 (damp 1e-5)"]
    /// );
    /// let twice = [OptimizerSpec::adamw(1e-4), OptimizerSpec::adamw(1e-4)];
    /// assert!(OptimizerSpec::labels(&twice).unwrap_err().to_string().contains("AdamW"));
    /// ```
    pub fn labels(specs: &[OptimizerSpec]) -> Result<Vec<String>> {
        let mut out: Vec<String> = specs.iter().map(|s| s.display_name()).collect();
        let derived = |i: usize| specs[i].label.is_none();
        let fields = |i: usize, full: bool| specs[i].config().fields(full);
        // Derived labels that collide: add the fields that differ within the group (rounded
        // first, then with every digit if rounding hides the difference).
        for full in [false, true] {
            let first = out.clone();
            for i in 0..specs.len() {
                if !derived(i) {
                    continue;
                }
                let group: Vec<usize> = (0..specs.len())
                    .filter(|&k| derived(k) && first[k] == first[i])
                    .collect();
                if group.len() < 2 {
                    continue;
                }
                // lr stays when the label showed it (it differs from the card's).
                let lr_shown = num(specs[i].lr(), false) != num(CARD_LR, false);
                let extras: Vec<String> = fields(i, full)
                    .iter()
                    .enumerate()
                    .filter(|(f, (key, value))| {
                        let differs = group
                            .iter()
                            .any(|&k| fields(k, full).get(*f).map(|x| &x.1) != Some(value));
                        differs || (*key == "lr" && lr_shown)
                    })
                    .map(|(_, (key, value))| format!("{key} {value}"))
                    .collect();
                out[i] = specs[i].config().compose(&extras);
            }
        }
        for i in 0..out.len() {
            if let Some(j) = (0..i).find(|&j| out[j] == out[i]) {
                return Err(Error::InvalidArgument(format!(
                    "optimizers {} and {} (of {}) share the label {:?}: give one a different \
                     label with OptimizerSpec::label(..), or drop the duplicate",
                    j + 1,
                    i + 1,
                    out.len(),
                    out[i]
                )));
            }
        }
        Ok(out)
    }

    /// A short name of the kind: `adamw`, `mfac` or `sgd` (also for a labelled spec).
    pub fn name(&self) -> &'static str {
        self.config().kind()
    }

    /// The (peak) learning rate.
    pub fn lr(&self) -> f64 {
        self.config().lr()
    }

    /// Sets the (peak) learning rate.
    pub fn set_lr(&mut self, lr: f64) {
        self.kind.config_mut().set_lr(lr)
    }

    /// run_glue's `--weight_decay`: HF Trainer's decoupled decay for AdamW and SGD (their
    /// parameter groups: none on biases and LayerNorm); M-FAC keeps its own `weight_decay` key.
    pub fn set_hf_weight_decay(&mut self, wd: f64) {
        self.kind.config_mut().set_hf_weight_decay(wd)
    }

    /// Every name `--optim` accepts.
    ///
    /// ```
    /// let names = mfac_lab::optim::OptimizerSpec::known_names();
    /// assert!(names.contains(&"MFAC") && names.contains(&"adamw_torch") && names.contains(&"sgd"));
    /// ```
    pub fn known_names() -> Vec<&'static str> {
        OptimKind::names()
    }

    /// Like [`OptimizerSpec::parse`], with `lr` (run_glue's `--learning_rate`) used unless ARGS
    /// sets `lr` itself.
    ///
    /// ```
    /// use mfac_lab::optim::OptimizerSpec;
    /// assert_eq!(OptimizerSpec::parse_with_lr("MFAC", "num_grads: 8", 3e-4).unwrap().lr(), 3e-4);
    /// assert_eq!(OptimizerSpec::parse_with_lr("MFAC", "lr: 1e-4", 3e-4).unwrap().lr(), 1e-4);
    /// ```
    pub fn parse_with_lr(name: &str, args: &str, lr: f64) -> Result<Self> {
        Self::parse_with_default_lr(name, args, |_| lr)
    }

    /// Like [`OptimizerSpec::parse`] for `compare`: unless ARGS sets `lr`, every kind gets the
    /// card's lr 1e-4, and M-FAC gets it scaled to its window,
    /// [`MFacConfig::model_card_with`]`(num_grads).lr` = 1e-4 × 1024 / num_grads (M-FAC's step
    /// length grows with num_grads; docs/MFAC_LR.md).
    ///
    /// ```
    /// use mfac_lab::optim::OptimizerSpec;
    /// let scaled = OptimizerSpec::parse_scaled_lr("MFAC", "num_grads: 32").unwrap();
    /// assert!((scaled.lr() - 3.2e-3).abs() < 1e-15);
    /// assert_eq!(OptimizerSpec::parse_scaled_lr("MFAC", "num_grads: 32, lr: 1e-4").unwrap().lr(), 1e-4);
    /// assert_eq!(OptimizerSpec::parse_scaled_lr("adamw_torch", "").unwrap().lr(), 1e-4);
    /// ```
    pub fn parse_scaled_lr(name: &str, args: &str) -> Result<Self> {
        Self::parse_with_default_lr(name, args, |c| c.compare_lr())
    }

    /// [`OptimizerSpec::parse`], then, unless ARGS sets `lr`, the lr `default` gives for the
    /// parsed config (validated again).
    fn parse_with_default_lr(
        name: &str,
        args: &str,
        default: impl FnOnce(&dyn DynConfig) -> f64,
    ) -> Result<Self> {
        let mut spec = Self::parse(name, args)?;
        if !sets_lr(args, spec.config().keys())? {
            let lr = default(spec.config());
            spec.set_lr(lr);
            spec.validate()?;
        }
        Ok(spec)
    }

    /// Parses run_glue's `--optim NAME --optim_args ARGS`. ARGS is `key: value, …`,
    /// `key=value,…` or a JSON object; missing keys keep the defaults (AdamW: HF Trainer's;
    /// M-FAC: the authors'; SGD: torch's). An unknown key, a bad number or an out-of-range
    /// value is an error naming the key and listing the valid ones; an unknown NAME lists the
    /// known names.
    ///
    /// ```
    /// use mfac_lab::optim::OptimizerSpec;
    /// let e = OptimizerSpec::parse("lion", "").unwrap_err().to_string();
    /// assert!(e.contains("lion") && e.contains("MFAC") && e.contains("sgd"), "{e}");
    /// ```
    pub fn parse(name: &str, args: &str) -> Result<Self> {
        match OptimKind::parse(name, args) {
            Some(kind) => Ok(kind?.into()),
            None => Err(option_err(name, "unknown optimizer", &OptimKind::names())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_text_is_the_fingerprint_of_older_checkpoints() {
        // Checkpoints before the seam stored `format!("{:?}", spec)` of the old enum.
        let a = OptimizerSpec::adamw(1e-4);
        assert!(format!("{a:?}").starts_with("AdamW(AdamWConfig { lr: 0.0001, "));
        let m = OptimizerSpec::mfac(MFacConfig::model_card()).label("card");
        let t = format!("{m:?}");
        assert!(
            t.starts_with("Labeled(MFac(MFacConfig { lr: 0.0001, num_grads: 1024"),
            "{t}"
        );
        assert!(t.ends_with(", \"card\")"), "{t}");
    }

    #[test]
    fn every_name_is_parsed_to_its_kind_and_unknown_names_list_them_all() {
        for name in OptimKind::names() {
            let spec = OptimizerSpec::parse(name, "").unwrap();
            assert!(spec.config().kind().len() > 2, "{name}");
            assert_eq!(
                OptimizerSpec::parse(&name.to_uppercase(), "").unwrap(),
                spec
            );
        }
        let e = OptimizerSpec::parse("adafactor", "").unwrap_err();
        let msg = e.to_string();
        for name in OptimKind::names() {
            assert!(msg.contains(name), "{msg}");
        }
        assert!(matches!(e, Error::OptimizerOption { key, .. } if key == "adafactor"));
    }
}
