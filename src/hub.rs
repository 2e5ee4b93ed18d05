//! `Hub`: where model and dataset files come from — the Hugging Face hub through its cache
//! (hf-hub 1.0, blocking), or the cache alone when offline.
//!
//! The endpoint, cache folder and offline switch are set explicitly on the client (hf-hub 1.1
//! drops its own environment handling), from `HF_ENDPOINT`, `HF_HUB_CACHE` / `HF_HOME` and
//! `HF_HUB_OFFLINE` by default.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The public hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Whether a repository is a model or a dataset (they live under different URLs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    /// `{endpoint}/{owner}/{name}/resolve/…`
    Model,
    /// `{endpoint}/datasets/{owner}/{name}/resolve/…`
    Dataset,
}

/// Access to the Hugging Face hub and its local cache.
///
/// ```
/// use mfac_lab::hub::Hub;
/// let hub = Hub::new("http://127.0.0.1:9", std::env::temp_dir().join("hf-cache")).offline(true);
/// assert!(hub.is_offline());
/// // Offline and not cached: an error naming repo, revision and file, and no request made.
/// let err = hub.model_file("prajjwal1/bert-tiny", "main", "config.json").unwrap_err();
/// assert!(err.to_string().contains("prajjwal1/bert-tiny"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Hub {
    endpoint: String,
    cache_dir: PathBuf,
    offline: bool,
    token: Option<String>,
    progress: bool,
}

/// Never shows the token (evcxr prints a cell's value with `Debug`): only whether one is set.
///
/// ```
/// let hub = mfac_lab::hub::Hub::new("http://127.0.0.1:9", "/tmp/c").token("hf_secret");
/// let shown = format!("{hub:?}");
/// assert!(!shown.contains("hf_secret") && shown.contains("token: Some(\"<redacted>\")"));
/// ```
impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("progress", &self.progress)
            .finish()
    }
}

impl Default for Hub {
    /// From the environment: `HF_ENDPOINT`, `HF_HUB_CACHE` / `HF_HOME` / `XDG_CACHE_HOME`,
    /// `HF_HUB_OFFLINE`, `HF_TOKEN`.
    fn default() -> Self {
        Self::from_env_with(|k| std::env::var(k).ok())
    }
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

impl Hub {
    /// A hub at `endpoint` with its cache in `cache_dir` (online, progress shown).
    pub fn new(endpoint: impl Into<String>, cache_dir: impl Into<PathBuf>) -> Self {
        Hub {
            endpoint: endpoint.into().trim_end_matches('/').to_string(),
            cache_dir: cache_dir.into(),
            offline: false,
            token: None,
            progress: true,
        }
    }

    /// The settings as `Hub::default()` reads them, with `get` standing in for the environment.
    ///
    /// ```
    /// use mfac_lab::hub::Hub;
    /// let hub = Hub::from_env_with(|k| match k {
    ///     "HF_ENDPOINT" => Some("http://127.0.0.1:8080".into()),
    ///     "HF_HOME" => Some("/data/hf".into()),
    ///     "HF_HUB_OFFLINE" => Some("1".into()),
    ///     _ => None,
    /// });
    /// assert_eq!(hub.endpoint(), "http://127.0.0.1:8080");
    /// assert_eq!(hub.cache_dir(), std::path::Path::new("/data/hf/hub"));
    /// assert!(hub.is_offline());
    /// ```
    pub fn from_env_with(get: impl Fn(&str) -> Option<String>) -> Self {
        let nonempty = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let endpoint = nonempty("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let cache_dir = nonempty("HF_HUB_CACHE")
            .or_else(|| nonempty("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .or_else(|| nonempty("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| {
                nonempty("XDG_CACHE_HOME").map(|h| PathBuf::from(h).join("huggingface").join("hub"))
            })
            .unwrap_or_else(|| {
                let home = nonempty("HOME").unwrap_or_else(|| ".".into());
                PathBuf::from(home)
                    .join(".cache")
                    .join("huggingface")
                    .join("hub")
            });
        let mut hub = Hub::new(endpoint, cache_dir);
        hub.offline = nonempty("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v));
        hub.token = nonempty("HF_TOKEN");
        hub
    }

    /// Offline: files come from the cache only, and no request is ever made.
    pub fn offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// Show download progress on stderr (default on).
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// An access token for gated or private repositories.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The cache folder (HF's layout: `models--owner--name/{blobs,refs,snapshots}`).
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Whether the hub is used offline.
    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// The local path of `file` in model repo `repo` (`owner/name`) at `revision`, downloading it
    /// into the cache when needed.
    pub fn model_file(&self, repo: &str, revision: &str, file: &str) -> Result<PathBuf> {
        self.file(RepoKind::Model, repo, revision, file)
    }

    /// The local path of `file` in dataset repo `repo` at `revision`.
    pub fn dataset_file(&self, repo: &str, revision: &str, file: &str) -> Result<PathBuf> {
        self.file(RepoKind::Dataset, repo, revision, file)
    }

    /// Like [`Hub::file`], but `Ok(None)` when the repository has no such file (or, offline,
    /// when the cache does not hold it).
    pub fn try_file(
        &self,
        kind: RepoKind,
        repo: &str,
        revision: &str,
        file: &str,
    ) -> Result<Option<PathBuf>> {
        match self.fetch(kind, repo, revision, file) {
            Ok(p) => Ok(Some(p)),
            Err(Fetch::NotFound(_)) => Ok(None),
            Err(Fetch::Other(message)) => Err(self.error(repo, revision, file, message)),
        }
    }

    /// The local path of one file of a repository.
    pub fn file(&self, kind: RepoKind, repo: &str, revision: &str, file: &str) -> Result<PathBuf> {
        self.fetch(kind, repo, revision, file).map_err(|e| {
            let message = match e {
                Fetch::NotFound(m) | Fetch::Other(m) => m,
            };
            self.error(repo, revision, file, message)
        })
    }

    fn error(&self, repo: &str, revision: &str, file: &str, message: String) -> Error {
        Error::Hub {
            repo: repo.into(),
            revision: revision.into(),
            file: file.into(),
            message,
        }
    }

    fn split(repo: &str) -> std::result::Result<(&str, &str), Fetch> {
        match repo.split_once('/') {
            Some((o, n)) if !o.is_empty() && !n.is_empty() && !n.contains('/') => Ok((o, n)),
            _ => Err(Fetch::Other(format!(
                "{repo:?} is not a repository id of the form owner/name"
            ))),
        }
    }
}

/// Why a fetch failed: the file is not there (a 404, or not cached offline), or anything else.
enum Fetch {
    NotFound(String),
    Other(String),
}

#[cfg(feature = "hub")]
mod client {
    use super::*;
    use hf_hub::progress::{DownloadEvent, ProgressEvent, ProgressHandler};
    use hf_hub::{HFClient, HFError};
    use std::sync::Mutex;
    use std::time::Instant;

    /// Prints download progress with rate and ETA, at most every half second.
    struct StderrProgress {
        label: String,
        state: Mutex<(Instant, Instant, u64)>,
    }

    impl StderrProgress {
        fn report(&self, done: u64, total: u64) {
            let Ok(mut s) = self.state.lock() else { return };
            let now = Instant::now();
            let finished = total > 0 && done >= total;
            if now.duration_since(s.1).as_millis() < 500 && !finished {
                return;
            }
            if finished && s.2 == u64::MAX {
                return;
            }
            s.1 = now;
            let secs = now.duration_since(s.0).as_secs_f64().max(1e-3);
            let rate = done as f64 / secs;
            let mb = |b: u64| b as f64 / 1e6;
            if total > 0 {
                let eta = if rate > 0.0 {
                    (total.saturating_sub(done)) as f64 / rate
                } else {
                    f64::NAN
                };
                eprintln!(
                    "downloading {}: {:.1}/{:.1} MB ({:.0}%), {:.1} MB/s, ETA {:.0} s",
                    self.label,
                    mb(done),
                    mb(total),
                    100.0 * done as f64 / total as f64,
                    rate / 1e6,
                    eta
                );
            } else {
                eprintln!(
                    "downloading {}: {:.1} MB, {:.1} MB/s",
                    self.label,
                    mb(done),
                    rate / 1e6
                );
            }
            if finished {
                s.2 = u64::MAX;
            }
        }
    }

    impl ProgressHandler for StderrProgress {
        fn on_progress(&self, event: &ProgressEvent) {
            match event {
                ProgressEvent::Download(DownloadEvent::Progress { files }) => {
                    for f in files {
                        self.report(f.bytes_completed, f.total_bytes);
                    }
                }
                ProgressEvent::Download(DownloadEvent::AggregateProgress {
                    bytes_completed,
                    total_bytes,
                    ..
                }) => self.report(*bytes_completed, *total_bytes),
                _ => {}
            }
        }
    }

    impl Hub {
        pub(super) fn fetch(
            &self,
            kind: RepoKind,
            repo: &str,
            revision: &str,
            file: &str,
        ) -> std::result::Result<PathBuf, Fetch> {
            let (owner, name) = Self::split(repo)?;
            let mut builder = HFClient::builder()
                .endpoint(self.endpoint.clone())
                .cache_dir(self.cache_dir.clone())
                .retry_max_attempts(3)
                .retry_base_delay(std::time::Duration::from_millis(200));
            if let Some(t) = &self.token {
                builder = builder.token(t.clone());
            }
            let client = builder
                .build_sync()
                .map_err(|e| Fetch::Other(e.to_string()))?;
            let progress = self.progress.then(|| {
                let now = Instant::now();
                StderrProgress {
                    label: format!("{repo}/{file}"),
                    state: Mutex::new((now, now, 0)),
                }
            });
            let res = match kind {
                RepoKind::Model => {
                    let r = client.model(owner, name);
                    r.download_file()
                        .filename(file)
                        .revision(revision)
                        .local_files_only(self.offline)
                        .maybe_progress(progress)
                        .send()
                }
                RepoKind::Dataset => {
                    let r = client.dataset(owner, name);
                    r.download_file()
                        .filename(file)
                        .revision(revision)
                        .local_files_only(self.offline)
                        .maybe_progress(progress)
                        .send()
                }
            };
            res.map_err(|e| match e {
                HFError::EntryNotFound { .. } => Fetch::NotFound("the repository has no such file".into()),
                HFError::LocalEntryNotFound { .. } if self.offline => Fetch::NotFound(
                    "not in the cache and the hub is offline (HF_HUB_OFFLINE=1); download it once online".into(),
                ),
                HFError::RepoNotFound { .. } => Fetch::Other("no such repository (or it is private: set HF_TOKEN)".into()),
                HFError::RevisionNotFound { .. } => Fetch::Other("no such revision".into()),
                other => Fetch::Other(format!(
                    "{other} (endpoint {}; set HF_HUB_OFFLINE=1 to use only the cache at {})",
                    self.endpoint,
                    self.cache_dir.display()
                )),
            })
        }
    }
}

#[cfg(not(feature = "hub"))]
impl Hub {
    fn fetch(
        &self,
        _kind: RepoKind,
        repo: &str,
        _revision: &str,
        _file: &str,
    ) -> std::result::Result<PathBuf, Fetch> {
        Self::split(repo)?;
        Err(Fetch::Other(
            "mfac-lab was built without the `hub` feature; use a local model folder".into(),
        ))
    }
}
