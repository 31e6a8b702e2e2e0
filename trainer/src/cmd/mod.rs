//! One file per subcommand. Each turns its arguments into a run description and hands it to
//! the engine (`crate::engine`); the training commands differ only where the recipe does.

pub mod bench;
pub mod eval;
pub mod export_npz;
pub mod finetune;
pub mod info;
pub mod inspect;
pub mod launch;
pub mod linprobe;
pub mod models;
pub mod pretrain;
pub mod sweep;
pub mod synth;
pub mod visualize;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::Path;

    /// Every `.rs` file under `dir`, recursively, with its text.
    fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push((
                    p.display().to_string(),
                    std::fs::read_to_string(&p).unwrap(),
                ));
            }
        }
    }

    /// Commands are thin and side by side: what two of them share lives below `cmd/`, and the
    /// layers below never reach up into it.
    #[test]
    fn no_command_imports_another_and_nothing_below_imports_a_command() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        for dir in ["cmd", "engine", "data", "model"] {
            sources(&src.join(dir), &mut files);
        }
        for f in ["optim.rs", "recon.rs", "plot.rs", "chart.rs", "rng.rs"] {
            let p = src.join(f);
            files.push((f.to_string(), std::fs::read_to_string(p).unwrap()));
        }
        // A path into `cmd` (a mention in prose is no import); spelled in two parts so that
        // this file does not match itself.
        let needles = [";", "::"].map(|end| ["crate::c", "md", end].concat());
        let offenders: Vec<&str> = files
            .iter()
            .filter(|(_, text)| needles.iter().any(|n| text.contains(n.as_str())))
            .map(|(name, _)| name.as_str())
            .collect();
        assert!(
            offenders.is_empty(),
            "files reaching into cmd/: {offenders:?}"
        );
    }
}
