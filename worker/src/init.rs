//! Where a run's initial weights come from (`--init`, a job's `init`): a checkpoint folder of
//! ours (pre-training: `student.safetensors` + `teacher.safetensors`; fine-tuning:
//! `model.safetensors`), an imported published checkpoint, one safetensors file, a PyTorch
//! checkpoint (`.pth`, converted with the venv's torch), locally or in object storage (the
//! coordinator resolves `init = "job:job-3"` to such a URI). Remote sources are copied to a
//! temporary folder first ([`InitSource::localise`]).

use std::path::{Path, PathBuf};

use endofm_shared::StorageUri;

use crate::store::Store;
use crate::{Error, Result};

/// Files a checkpoint folder may hold, in the order they are looked for.
pub const FOLDER_FILES: [&str; 3] = [
    "student.safetensors",
    "teacher.safetensors",
    "model.safetensors",
];

/// Where the initial weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitSource {
    /// A folder with `student.safetensors` (and maybe `teacher.safetensors`) or
    /// `model.safetensors`: one of our checkpoints or an imported published checkpoint.
    Folder(PathBuf),
    /// One safetensors file.
    Weights(PathBuf),
    /// A PyTorch checkpoint (`.pth`), converted with the venv's torch first.
    Pickle(PathBuf),
    /// Any of the above in object storage (`s3://`, `gs://`, `az://`).
    Remote(StorageUri),
}

fn refuse(reason: String) -> Error {
    Error::Input {
        name: "--init".into(),
        reason,
    }
}

fn classify_file(path: &Path, shown: &str) -> Result<InitSource> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => Ok(InitSource::Weights(path.to_path_buf())),
        Some("pth" | "pt" | "ckpt") => Ok(InitSource::Pickle(path.to_path_buf())),
        _ => Err(refuse(format!(
            "{shown}: expected a checkpoint folder, a .safetensors file or a .pth checkpoint"
        ))),
    }
}

/// The newest committed checkpoint folder (`checkpoints/step-N` with a manifest) of a run's
/// local output location, if it has one.
fn newest_checkpoint(run: &Path) -> Option<PathBuf> {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    steps.sort();
    steps.pop()
}

impl InitSource {
    /// The source as the user gave it (a path or URI), for records and comparisons.
    pub fn describe(&self) -> String {
        match self {
            Self::Folder(p) | Self::Weights(p) | Self::Pickle(p) => p.display().to_string(),
            Self::Remote(uri) => uri.to_string(),
        }
    }

    /// Classifies a local path given on the command line. A run's output location stands for
    /// its newest committed checkpoint.
    pub fn parse(path: &Path) -> Result<Self> {
        if path.is_dir()
            && !FOLDER_FILES.iter().any(|f| path.join(f).is_file())
            && let Some(newest) = newest_checkpoint(path)
        {
            tracing::info!(run = %path.display(), checkpoint = %newest.display(), "initialising from the run's newest checkpoint");
            return Ok(Self::Folder(newest));
        }
        if path.is_dir() {
            if !FOLDER_FILES.iter().any(|f| path.join(f).is_file()) {
                return Err(refuse(format!(
                    "{} has none of {}",
                    path.display(),
                    FOLDER_FILES.join(", ")
                )));
            }
            return Ok(Self::Folder(path.to_path_buf()));
        }
        if !path.is_file() {
            return Err(refuse(format!("{} does not exist", path.display())));
        }
        classify_file(path, &path.display().to_string())
    }

    /// Classifies a path or URI (`s3://bucket/run/checkpoints/step-000000120`); a
    /// `job:` reference must have been resolved by the coordinator.
    pub fn parse_uri(text: &str) -> Result<Self> {
        if text.starts_with("job:") {
            return Err(refuse(format!(
                "`{text}` names another job's result: submit it to the coordinator, which resolves it"
            )));
        }
        match StorageUri::parse(text)? {
            StorageUri::Local { path } => Self::parse(&path),
            remote => Ok(Self::Remote(remote)),
        }
    }

    /// A local source: remote ones are downloaded (the folder's checkpoint files, or the one
    /// object) into a temporary folder that lives as long as the returned value.
    pub fn localise(&self) -> Result<Localised> {
        let Self::Remote(uri) = self else {
            return Ok(Localised {
                source: self.clone(),
                origin: self.describe(),
                _tmp: None,
            });
        };
        let tmp = temp_dir()?;
        let text = uri.to_string();
        let name = text.rsplit('/').next().unwrap_or_default().to_string();
        let source = if name.ends_with(".safetensors")
            || name.ends_with(".pth")
            || name.ends_with(".pt")
            || name.ends_with(".ckpt")
        {
            let parent = text[..text.len() - name.len()]
                .trim_end_matches('/')
                .to_string();
            let store = Store::open(&StorageUri::parse(&parent)?, false)?;
            let local = tmp.path().join(&name);
            download(&store, &name, &local)?;
            classify_file(&local, &text)?
        } else {
            let store = Store::open(uri, false)?;
            let mut found = 0;
            for f in FOLDER_FILES {
                if store.exists(f)? {
                    download(&store, f, &tmp.path().join(f))?;
                    found += 1;
                }
            }
            if found == 0 {
                return Err(refuse(format!(
                    "{text} holds none of {}",
                    FOLDER_FILES.join(", ")
                )));
            }
            InitSource::Folder(tmp.path().to_path_buf())
        };
        tracing::info!(from = %text, "initial weights downloaded");
        Ok(Localised {
            source,
            origin: text,
            _tmp: Some(tmp),
        })
    }
}

/// A new temporary folder (removed when dropped).
pub(crate) fn temp_dir() -> Result<tempfile::TempDir> {
    tempfile::tempdir().map_err(|source| Error::Io {
        action: "creating a temporary directory",
        path: std::env::temp_dir(),
        source,
    })
}

/// Copies the object `key` of `store` to the local file `dest`.
pub(crate) fn download(store: &Store, key: &str, dest: &Path) -> Result<()> {
    let bytes = store.get(key)?;
    std::fs::write(dest, &bytes).map_err(|source| Error::Io {
        action: "writing",
        path: dest.to_path_buf(),
        source,
    })
}

/// A local initialisation source (and the temporary folder holding it, when downloaded).
#[derive(Debug)]
pub struct Localised {
    /// The local source (never [`InitSource::Remote`]).
    pub source: InitSource,
    /// The source as the user named it (path or URI).
    origin: String,
    _tmp: Option<tempfile::TempDir>,
}

impl Localised {
    /// The source as the user named it.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// How to name a local file of this source in messages: the user's location (a file of a
    /// downloaded folder is named by its URI, never by the temporary copy, which is gone when
    /// the user reads the message).
    pub fn name_of(&self, path: &Path) -> String {
        match (&self._tmp, path.file_name()) {
            (Some(tmp), Some(name)) if path.starts_with(tmp.path()) => {
                if matches!(self.source, InitSource::Folder(_)) {
                    format!(
                        "{}/{}",
                        self.origin.trim_end_matches('/'),
                        name.to_string_lossy()
                    )
                } else {
                    self.origin.clone()
                }
            }
            _ => path.display().to_string(),
        }
    }

    /// `NAME` of a checkpoint folder source, or an error naming the user's source, the
    /// missing file and what it is needed for (`purpose`).
    pub fn require(&self, name: &str, purpose: &str) -> Result<PathBuf> {
        let InitSource::Folder(dir) = &self.source else {
            return Err(refuse(format!(
                "{} is a single weights file, not a checkpoint folder with {name} ({purpose})",
                self.origin
            )));
        };
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
        let present: Vec<&str> = FOLDER_FILES
            .iter()
            .copied()
            .filter(|f| dir.join(f).is_file())
            .collect();
        Err(refuse(format!(
            "{} has no {name} ({purpose}); it holds {}",
            self.origin,
            if present.is_empty() {
                "no weights".to_string()
            } else {
                present.join(", ")
            }
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_classified_and_bad_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = InitSource::parse(dir.path()).unwrap_err().to_string();
        assert!(err.contains("has none of"), "{err}");
        std::fs::write(dir.path().join("model.safetensors"), b"x").unwrap();
        assert!(matches!(
            InitSource::parse(dir.path()).unwrap(),
            InitSource::Folder(_)
        ));
        let f = dir.path().join("w.pth");
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(
            InitSource::parse(&f).unwrap(),
            InitSource::Pickle(_)
        ));
        let f = dir.path().join("w.bin");
        std::fs::write(&f, b"x").unwrap();
        assert!(
            InitSource::parse(&f)
                .unwrap_err()
                .to_string()
                .contains("expected")
        );
        assert!(
            InitSource::parse_uri("job:job-3")
                .unwrap_err()
                .to_string()
                .contains("coordinator")
        );
        let missing = InitSource::parse(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("does not exist"), "{missing}");
        let local = InitSource::parse_uri(dir.path().to_str().unwrap()).unwrap();
        assert!(matches!(
            local.localise().unwrap().source,
            InitSource::Folder(_)
        ));
    }
}
