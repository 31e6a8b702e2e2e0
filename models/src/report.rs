//! What loading a state dict into a model did: applied, missing, unexpected and
//! shape-mismatched keys, printed the way PyTorch prints `load_state_dict` results.

use std::fmt;

use crate::config::ParamSpec;

/// The outcome of matching checkpoint tensors against a model's parameter table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Keys present in both with equal shapes.
    pub applied: Vec<String>,
    /// Keys the model has and the checkpoint lacks.
    pub missing: Vec<String>,
    /// Keys the checkpoint has and the model lacks.
    pub unexpected: Vec<String>,
    /// Keys present in both with different shapes.
    pub mismatched: Vec<Mismatch>,
}

/// A key present in both with different shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub name: String,
    pub expected: Vec<usize>,
    pub found: Vec<usize>,
}

impl LoadReport {
    /// Compares the model's parameters with the checkpoint's (name, shape) pairs.
    pub fn compare<'a>(
        expected: &[ParamSpec],
        found: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    ) -> Self {
        let found: Vec<(&str, &[usize])> = found.into_iter().collect();
        let mut r = LoadReport::default();
        for p in expected {
            match found.iter().find(|(n, _)| *n == p.name) {
                None => r.missing.push(p.name.clone()),
                Some((_, s)) if *s == p.shape.as_slice() => r.applied.push(p.name.clone()),
                Some((_, s)) => r.mismatched.push(Mismatch {
                    name: p.name.clone(),
                    expected: p.shape.clone(),
                    found: s.to_vec(),
                }),
            }
        }
        for (n, _) in &found {
            if !expected.iter().any(|p| p.name == *n) {
                r.unexpected.push(n.to_string());
            }
        }
        r
    }

    /// True when every key matched.
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }

    /// Drops `key` from `missing` when it starts with one of `prefixes` (the keys a caller
    /// initialises itself, such as a new head); returns whether the rest of `missing` is empty.
    pub fn missing_only(&self, prefixes: &[&str]) -> bool {
        self.missing
            .iter()
            .all(|k| prefixes.iter().any(|p| k.starts_with(p)))
    }
}

fn quoted(keys: &[String]) -> String {
    keys.iter()
        .map(|k| format!("'{k}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_exact() {
            return write!(
                f,
                "<All keys matched successfully> ({} tensors)",
                self.applied.len()
            );
        }
        write!(
            f,
            "_IncompatibleKeys(missing_keys=[{}], unexpected_keys=[{}])",
            quoted(&self.missing),
            quoted(&self.unexpected)
        )?;
        for m in &self.mismatched {
            write!(
                f,
                "\nsize mismatch for {}: copying a param with shape {:?} from checkpoint, \
                 the shape in current model is {:?}.",
                m.name, m.found, m.expected
            )?;
        }
        write!(f, "\napplied {} tensors", self.applied.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_keys_into_the_four_groups() {
        let expected = vec![
            ParamSpec::new("a", [2]),
            ParamSpec::new("b", [3]),
            ParamSpec::new("head.weight", [4, 2]),
        ];
        let found: Vec<(&str, &[usize])> = vec![("a", &[2]), ("b", &[5]), ("decoder_x", &[1])];
        let r = LoadReport::compare(&expected, found);
        assert_eq!(r.applied, vec!["a"]);
        assert_eq!(r.missing, vec!["head.weight"]);
        assert_eq!(r.unexpected, vec!["decoder_x"]);
        assert_eq!(r.mismatched.len(), 1);
        assert_eq!(r.mismatched[0].found, vec![5]);
        assert!(!r.is_exact());
        assert!(r.missing_only(&["head."]));
        assert!(!r.missing_only(&["fc_norm."]));
        let text = r.to_string();
        assert!(text.contains("missing_keys=['head.weight']"), "{text}");
        assert!(text.contains("size mismatch for b"), "{text}");
    }

    #[test]
    fn exact_match_prints_like_pytorch() {
        let expected = vec![ParamSpec::new("a", [2])];
        let found: Vec<(&str, &[usize])> = vec![("a", &[2])];
        let r = LoadReport::compare(&expected, found);
        assert!(r.is_exact());
        assert!(r.to_string().starts_with("<All keys matched successfully>"));
    }
}
