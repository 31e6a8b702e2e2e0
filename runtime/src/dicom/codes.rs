//! The codes of the classes in the results: `--dicom-codes FILE`, a JSON object from class
//! name to its code, for example SNOMED CT for normal and pneumonia:
//!
//! ```json
//! {"normal": {"scheme": "SCT", "value": "17621005", "meaning": "Normal"},
//!  "pneumonia": {"scheme": "SCT", "value": "233604007", "meaning": "Pneumonia"}}
//! ```
//!
//! A class without an entry gets a code of mae's private scheme `99MAE` with the class name as
//! its value (when it fits a Code Value, else `CLASS<index>`) and meaning.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};

/// A coded concept: (coding scheme designator, code value, code meaning).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Code {
    pub scheme: String,
    pub value: String,
    pub meaning: String,
}

impl Code {
    pub fn new(value: &str, scheme: &str, meaning: &str) -> Self {
        Self {
            scheme: scheme.into(),
            value: value.into(),
            meaning: meaning.into(),
        }
    }
}

/// mae's private coding scheme (PS3.16 8.2: designators starting with 99 are private).
pub const PRIVATE_SCHEME: &str = "99MAE";

/// The class codes of `--dicom-codes`.
#[derive(Debug, Clone, Default)]
pub struct Codes {
    map: BTreeMap<String, Code>,
}

/// Whether `s` fits a Short String (SH: 16 characters, no backslash or control character)
/// or, with `max` 64, a Long String (LO).
fn fits(s: &str, max: usize) -> bool {
    !s.trim().is_empty()
        && s.chars().count() <= max
        && !s.chars().any(|c| c == '\\' || c.is_control())
}

impl Codes {
    /// Reads a `--dicom-codes` file, checking every code.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --dicom-codes {}", path.display()))?;
        let map: BTreeMap<String, Code> = serde_json::from_str(&text).with_context(|| {
            format!(
                "--dicom-codes {}: expected a JSON object of class name to \
                 {{\"scheme\", \"value\", \"meaning\"}}",
                path.display()
            )
        })?;
        for (class, c) in &map {
            if !fits(&c.scheme, 16) || !fits(&c.value, 16) || !fits(&c.meaning, 64) {
                bail!(
                    "--dicom-codes {}: class {class:?}: scheme and value need 1 to 16 \
                     characters, meaning 1 to 64, none a backslash",
                    path.display()
                );
            }
        }
        Ok(Self { map })
    }

    /// Checks that every mapped class is one of the model's.
    pub fn check_classes(&self, classes: &[String]) -> anyhow::Result<()> {
        for class in self.map.keys() {
            if !classes.contains(class) {
                bail!("--dicom-codes names the class {class:?}, which the model does not have (its classes: {})", classes.join(", "));
            }
        }
        Ok(())
    }

    /// The code of class `index`, named `name`.
    pub fn class(&self, index: usize, name: &str) -> Code {
        if let Some(c) = self.map.get(name) {
            return c.clone();
        }
        let value = if fits(name, 16) {
            name.to_string()
        } else {
            format!("CLASS{index}")
        };
        let meaning: String = name
            .chars()
            .filter(|c| *c != '\\' && !c.is_control())
            .take(64)
            .collect();
        Code::new(&value, PRIVATE_SCHEME, &meaning)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mapped_and_default_codes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("codes.json");
        std::fs::write(
            &p,
            r#"{"pneumonia": {"scheme": "SCT", "value": "233604007", "meaning": "Pneumonia"}}"#,
        )
        .unwrap();
        let codes = Codes::load(&p).unwrap();
        assert_eq!(codes.class(1, "pneumonia").value, "233604007");
        assert_eq!(
            codes.class(0, "normal"),
            Code::new("normal", "99MAE", "normal")
        );
        let long = "a very long class name indeed";
        assert_eq!(codes.class(3, long).value, "CLASS3");
        assert!(codes.check_classes(&["normal".into()]).is_err());
        std::fs::write(&p, r#"{"x": {"scheme": "", "value": "1", "meaning": "m"}}"#).unwrap();
        assert!(Codes::load(&p).is_err());
    }
}
