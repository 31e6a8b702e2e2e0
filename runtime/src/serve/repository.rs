//! `mae-run serve --model-repository DIR`: a model repository laid out as Triton's,
//! `DIR/{name}/{version}/model.onnx`, with numeric versions. Every version found is served;
//! a request that names no version gets the highest.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// One model file of a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub version: u64,
    pub path: PathBuf,
}

/// Model names as URLs and metric labels take them.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

/// The models of `dir`, sorted by name then version. Folders without a `model.onnx` in any
/// version are refused, naming them, as are names that cannot appear in a URL.
pub fn scan(dir: &Path) -> anyhow::Result<Vec<Entry>> {
    let read = |d: &Path| -> anyhow::Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .with_context(|| format!("cannot read model repository folder {}", d.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        v.sort();
        Ok(v)
    };
    let mut out = Vec::new();
    for model_dir in read(dir)? {
        let name = model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if !valid_name(&name) {
            bail!(
                "{}: model names may hold only letters, digits, '-', '_' and '.'",
                model_dir.display()
            );
        }
        let mut found = 0;
        for version_dir in read(&model_dir)? {
            let v = version_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let Ok(version) = v.parse::<u64>() else {
                continue;
            };
            let path = version_dir.join("model.onnx");
            if path.is_file() {
                out.push(Entry {
                    name: name.clone(),
                    version,
                    path,
                });
                found += 1;
            }
        }
        if found == 0 {
            bail!(
                "{}: no version folder with a model.onnx (the layout is {}/NAME/VERSION/model.onnx)",
                model_dir.display(),
                dir.display()
            );
        }
    }
    if out.is_empty() {
        bail!(
            "model repository {} holds no model (the layout is NAME/VERSION/model.onnx)",
            dir.display()
        );
    }
    out.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn triton_layout() {
        let dir = tempfile::tempdir().unwrap();
        let put = |rel: &str| {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        };
        put("chest/2/model.onnx");
        put("chest/10/model.onnx");
        put("chest/notes/model.onnx");
        put("skin/1/model.onnx");
        put("skin/config.pbtxt");
        let found = scan(dir.path()).unwrap();
        let got: Vec<(&str, u64)> = found.iter().map(|e| (e.name.as_str(), e.version)).collect();
        assert_eq!(got, [("chest", 2), ("chest", 10), ("skin", 1)]);
        std::fs::create_dir_all(dir.path().join("empty/1")).unwrap();
        let e = scan(dir.path()).unwrap_err().to_string();
        assert!(e.contains("empty") && e.contains("model.onnx"), "{e}");
        let none = tempfile::tempdir().unwrap();
        assert!(scan(none.path()).is_err());
    }
}
