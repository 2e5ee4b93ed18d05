//! GLUE data as polars DataFrames: from the hub (`nyu-mll/glue`, pinned), a local folder, or
//! the embedded real MNLI sample.

use std::path::{Path, PathBuf};

use polars::prelude::*;

use crate::data::tasks::GlueTask;
use crate::error::{Error, Result};
use crate::hub::Hub;

/// The GLUE dataset repository on the hub.
pub const GLUE_REPO: &str = "nyu-mll/glue";
/// The pinned revision of [`GLUE_REPO`] (its `main` holds the parquet files; ../shared/docs/hub.md).
pub const GLUE_REVISION: &str = "bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c";

const SAMPLE_MATCHED: &[u8] =
    include_bytes!("../../data/mnli-sample/validation_matched-00000-of-00001.parquet");
const SAMPLE_MISMATCHED: &[u8] =
    include_bytes!("../../data/mnli-sample/validation_mismatched-00000-of-00001.parquet");

/// A task's data: the training split and the evaluation splits, as DataFrames with the hub's
/// columns (text columns and an integer `label`).
#[derive(Debug, Clone)]
pub struct GlueData {
    /// The task.
    pub task: GlueTask,
    /// Training rows.
    pub train: DataFrame,
    /// (split name, rows) for each evaluation split, e.g. `validation_matched`.
    pub eval: Vec<(String, DataFrame)>,
}

fn data_err(source: impl Into<String>, message: impl std::fmt::Display) -> Error {
    Error::Data {
        source_name: source.into(),
        message: message.to_string(),
    }
}

/// Checks the columns a task needs: its text column(s) as strings and an integer (or, for
/// stsb, float) `label`.
fn check_schema(task: GlueTask, df: &DataFrame, source: &str) -> Result<()> {
    let (a, b) = task.text_columns();
    let found = || {
        df.get_column_names()
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for col in std::iter::once(a).chain(b) {
        match df.column(col) {
            Ok(c) if c.dtype() == &DataType::String => {}
            Ok(c) => {
                return Err(data_err(
                    source,
                    format!("column {col:?} is {}, expected strings", c.dtype()),
                ))
            }
            Err(_) => {
                return Err(data_err(
                    source,
                    format!("no column {col:?} for {} (found: {})", task.name(), found()),
                ));
            }
        }
    }
    match df.column("label") {
        Ok(c) if c.dtype().is_integer() || (task.is_regression() && c.dtype().is_float()) => Ok(()),
        Ok(c) => Err(data_err(
            source,
            format!("column \"label\" is {}, expected integers", c.dtype()),
        )),
        Err(_) => Err(data_err(
            source,
            format!("no column \"label\" (found: {})", found()),
        )),
    }
}

fn read_parquet_bytes(bytes: &[u8], source: &str) -> Result<DataFrame> {
    ParquetReader::new(std::io::Cursor::new(bytes))
        .finish()
        .map_err(|e| data_err(source, e))
}

fn read_parquet(path: &Path) -> Result<DataFrame> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    read_parquet_bytes(&bytes, &path.display().to_string())
}

/// Reads a TSV with a header (GLUE's original files), or TextFooler's header-less
/// `label<TAB>premise<TAB>hypothesis` lines for mnli.
fn read_tsv(task: GlueTask, path: &Path) -> Result<DataFrame> {
    let source = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines
        .next()
        .ok_or_else(|| data_err(&source, "the file is empty"))?;
    let (a, b) = task.text_columns();
    let header: Vec<&str> = first.split('\t').collect();
    let names = task.label_names();
    let (mut ta, mut tb, mut labels) = (vec![], vec![], Vec::<f64>::new());
    // Class names or ids; stsb's labels are similarity scores (floats).
    let regression = task.is_regression();
    let label_of = |s: &str, line: usize| -> Result<f64> {
        if let Some(i) = names.iter().position(|n| *n == s) {
            return Ok(i as f64);
        }
        let t = s.trim();
        let v = if regression {
            t.parse::<f64>().ok().filter(|v| v.is_finite())
        } else {
            t.parse::<i64>().ok().map(|v| v as f64)
        };
        v.ok_or_else(|| {
            data_err(
                &source,
                if regression {
                    format!("line {line}: label {s:?} is not a number")
                } else {
                    format!("line {line}: label {s:?} is not one of {names:?}")
                },
            )
        })
    };
    if header.contains(&a) {
        let col = |n: &str| header.iter().position(|h| *h == n);
        let ia = col(a).expect("checked");
        let ib = match b {
            Some(b) => Some(
                col(b)
                    .ok_or_else(|| data_err(&source, format!("no column {b:?} in the header")))?,
            ),
            None => None,
        };
        let il = col("label")
            .or_else(|| col("gold_label"))
            .ok_or_else(|| data_err(&source, "no label column in the header"))?;
        for (n, line) in lines.enumerate() {
            let f: Vec<&str> = line.split('\t').collect();
            let get = |i: usize| {
                f.get(i)
                    .copied()
                    .ok_or_else(|| data_err(&source, format!("line {}: too few fields", n + 2)))
            };
            ta.push(get(ia)?.to_string());
            if let Some(ib) = ib {
                tb.push(get(ib)?.to_string());
            }
            labels.push(label_of(get(il)?, n + 2)?);
        }
    } else if task == GlueTask::Mnli && header.len() == 3 {
        for (n, line) in std::iter::once(first).chain(lines).enumerate() {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() != 3 {
                return Err(data_err(
                    &source,
                    format!("line {}: expected label, premise, hypothesis", n + 1),
                ));
            }
            labels.push(label_of(f[0], n + 1)?);
            ta.push(f[1].to_string());
            tb.push(f[2].to_string());
        }
    } else {
        return Err(data_err(&source, format!("no header with a {a:?} column")));
    }
    let mut cols = vec![Column::new(a.into(), ta)];
    if let Some(b) = b {
        cols.push(Column::new(b.into(), tb));
    }
    cols.push(if regression {
        Column::new("label".into(), labels)
    } else {
        Column::new(
            "label".into(),
            labels.iter().map(|&v| v as i64).collect::<Vec<_>>(),
        )
    });
    DataFrame::new_infer_height(cols).map_err(|e| data_err(&source, e))
}

/// Downloads (or takes from the cache) a task's parquet files from `nyu-mll/glue` at the
/// pinned revision and reads them.
///
/// ```no_run
/// use mfac_lab::{data::{load_glue, GlueTask}, hub::Hub};
/// let data = load_glue(GlueTask::Mnli, &Hub::default())?;
/// assert_eq!(data.eval.len(), 2);
/// # Ok::<(), mfac_lab::Error>(())
/// ```
pub fn load_glue(task: GlueTask, hub: &Hub) -> Result<GlueData> {
    load_glue_at(task, hub, GLUE_REVISION)
}

/// Like [`load_glue`] at another revision (branch, tag or commit).
pub fn load_glue_at(task: GlueTask, hub: &Hub, revision: &str) -> Result<GlueData> {
    let get = |split: &str| -> Result<DataFrame> {
        let file = format!("{}/{split}-00000-of-00001.parquet", task.name());
        let path = hub.dataset_file(GLUE_REPO, revision, &file)?;
        let df = read_parquet(&path)?;
        check_schema(task, &df, &format!("{GLUE_REPO}/{file}"))?;
        Ok(df)
    };
    let train = get("train")?;
    let eval = task
        .eval_splits()
        .iter()
        .map(|s| Ok((s.to_string(), get(s)?)))
        .collect::<Result<_>>()?;
    Ok(GlueData { task, train, eval })
}

/// MNLI from the hub (pinned revision), through the cache; `HF_HUB_OFFLINE=1` for cache only.
pub fn load_mnli() -> Result<GlueData> {
    load_glue(GlueTask::Mnli, &Hub::default())
}

/// A task's data from a local folder: for each split (`train`, then the eval splits) a file
/// `<split>-00000-of-00001.parquet`, `<split>.parquet` or `<split>.tsv`, in the folder or its
/// `<task>/` subfolder. Splits other than train may be missing; train may not.
pub fn load_glue_dir(task: GlueTask, dir: impl AsRef<Path>) -> Result<GlueData> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        return Err(Error::MissingDataDir(dir.to_path_buf()));
    }
    let find = |split: &str| -> Option<PathBuf> {
        [dir.to_path_buf(), dir.join(task.name())]
            .iter()
            .find_map(|d| {
                [
                    format!("{split}-00000-of-00001.parquet"),
                    format!("{split}.parquet"),
                    format!("{split}.tsv"),
                ]
                .iter()
                .map(|f| d.join(f))
                .find(|p| p.is_file())
            })
    };
    let train_path = find("train").ok_or_else(|| Error::MissingFile {
        dir: dir.to_path_buf(),
        file: "train-00000-of-00001.parquet, train.parquet or train.tsv".into(),
        hint: String::new(),
    })?;
    let train = read_split(task, &train_path)?;
    let mut eval = vec![];
    for split in task.eval_splits() {
        if let Some(p) = find(split) {
            eval.push((split.to_string(), read_split(task, &p)?));
        }
    }
    Ok(GlueData { task, train, eval })
}

/// Reads one file (parquet or TSV) and checks it has the task's columns.
///
/// ```
/// use mfac_lab::data::{read_split, GlueTask};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("validation_matched.tsv");
/// std::fs::write(&path, "premise\thypothesis\tlabel\nA man plays.\tSomeone plays.\tentailment\n\
///                        A man plays.\tNobody plays.\t2\n").unwrap();
/// let df = read_split(GlueTask::Mnli, &path).unwrap();
/// assert_eq!(df.height(), 2);
/// assert_eq!(df.column("label").unwrap().i64().unwrap().get(0), Some(0));
/// ```
pub fn read_split(task: GlueTask, path: impl AsRef<Path>) -> Result<DataFrame> {
    let path = path.as_ref();
    let df = if path.extension().is_some_and(|e| e == "tsv") {
        read_tsv(task, path)?
    } else {
        read_parquet(path)?
    };
    check_schema(task, &df, &path.display().to_string())?;
    Ok(df)
}

/// The embedded real MNLI sample (1,600 dev rows, offline): train = first 600 of matched +
/// first 600 of mismatched; eval = the last 200 of each.
///
/// ```
/// let d = mfac_lab::data::mnli_sample()?;
/// assert_eq!(d.train.height(), 1200);
/// assert_eq!(d.eval[0].0, "validation_matched");
/// assert_eq!(d.eval[1].1.height(), 200);
/// # Ok::<(), mfac_lab::Error>(())
/// ```
pub fn mnli_sample() -> Result<GlueData> {
    let m = read_parquet_bytes(SAMPLE_MATCHED, "embedded mnli sample (matched)")?;
    let mm = read_parquet_bytes(SAMPLE_MISMATCHED, "embedded mnli sample (mismatched)")?;
    check_schema(GlueTask::Mnli, &m, "embedded mnli sample")?;
    check_schema(GlueTask::Mnli, &mm, "embedded mnli sample")?;
    let train = m
        .slice(0, 600)
        .vstack(&mm.slice(0, 600))
        .map_err(|e| data_err("embedded mnli sample", e))?;
    Ok(GlueData {
        task: GlueTask::Mnli,
        train,
        eval: vec![
            ("validation_matched".into(), m.slice(600, 200)),
            ("validation_mismatched".into(), mm.slice(600, 200)),
        ],
    })
}

/// (first text, second text) pairs and their labels.
pub type Pairs = (Vec<(String, String)>, Vec<u32>);

impl GlueData {
    /// The (first text, second text) pairs and labels of a split, ready to tokenize. Single-
    /// sentence tasks get an empty second text.
    pub fn pairs(&self, df: &DataFrame) -> Result<Pairs> {
        if self.task.is_regression() {
            return Err(data_err(
                self.task.name(),
                "labels are scores, not class ids: use GlueData::texts and GlueData::scores",
            ));
        }
        Ok((self.texts(df)?, self.class_labels(df)?))
    }

    /// The regression targets of a split (stsb's similarity scores), as f32.
    pub fn scores(&self, df: &DataFrame) -> Result<Vec<f32>> {
        let err = |e: PolarsError| data_err(self.task.name(), e);
        df.column("label")
            .map_err(err)?
            .cast(&DataType::Float64)
            .map_err(err)?
            .f64()
            .map_err(err)?
            .iter()
            .map(|v| match v {
                Some(v) if v.is_finite() && v >= 0.0 => Ok(v as f32),
                _ => Err(data_err(
                    self.task.name(),
                    format!("label {v:?} is not a score (test split?)"),
                )),
            })
            .collect()
    }

    /// The (first text, second text) pairs of a split. Single-sentence tasks get an empty
    /// second text.
    pub fn texts(&self, df: &DataFrame) -> Result<Vec<(String, String)>> {
        let (a, b) = self.task.text_columns();
        let err = |e: PolarsError| data_err(self.task.name(), e);
        let texts = |c: &str| -> Result<Vec<String>> {
            Ok(df
                .column(c)
                .map_err(err)?
                .str()
                .map_err(err)?
                .iter()
                .map(|s| s.unwrap_or("").to_string())
                .collect())
        };
        let first = texts(a)?;
        let second = match b {
            Some(b) => texts(b)?,
            None => vec![String::new(); first.len()],
        };
        Ok(first.into_iter().zip(second).collect())
    }

    fn class_labels(&self, df: &DataFrame) -> Result<Vec<u32>> {
        let err = |e: PolarsError| data_err(self.task.name(), e);
        df.column("label")
            .map_err(err)?
            .cast(&DataType::Int64)
            .map_err(err)?
            .i64()
            .map_err(err)?
            .iter()
            .map(|l| l.unwrap_or(-1))
            .map(|l| {
                u32::try_from(l).map_err(|_| {
                    data_err(
                        self.task.name(),
                        format!("label {l} is not a class id (test split?)"),
                    )
                })
            })
            .collect::<Result<_>>()
    }
}
