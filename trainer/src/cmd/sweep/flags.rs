//! The flags of a sweep cell, in layers: the shared flags (after `--`), then its kind's
//! (`--kind-args`), its size's (`--size-args`), then its init's (`--init-args`, fine-tune cells
//! only). A flag of a later
//! layer replaces the same flag of an earlier one, so a kind's recipe is written once and an
//! init's exception once; flags are matched as the kind's command knows them (long name or
//! alias, `--batch_size` is `--batch-size`).

use anyhow::bail;
use clap::CommandFactory;

use crate::cli::{Cli, SweepKind};

/// Flags the sweep sets per cell; giving them in any layer is an error.
const OWN_FLAGS: [&str; 5] = [
    "--output-dir",
    "--seed",
    "--train-samples",
    "--finetune",
    "--resume",
];

/// Refuses flags that the sweep sets per cell; `place` names where they were given.
pub fn check_own_flags(flags: &[String], place: &str) -> anyhow::Result<()> {
    for f in flags {
        let name = f.split('=').next().unwrap_or(f).replace('_', "-");
        if OWN_FLAGS.contains(&name.as_str()) {
            bail!("{f} is set by the sweep for each cell; leave it out of {place}");
        }
    }
    Ok(())
}

/// The command line of one kind's subcommand.
fn command(kind: SweepKind) -> clap::Command {
    Cli::command()
        .find_subcommand(kind.command())
        .cloned()
        .unwrap_or_else(|| clap::Command::new(kind.command()))
}

/// The argument `--{name}` of `cmd`, by long name or alias.
fn find<'c>(cmd: &'c clap::Command, name: &str) -> Option<&'c clap::Arg> {
    cmd.get_arguments().find(|a| {
        a.get_long() == Some(name) || a.get_all_aliases().is_some_and(|v| v.contains(&name))
    })
}

/// One flag as given: the command's id for it (none when the command does not know it), its
/// name as written and its words (`--blr 0.1`, `--aa=none`, `--cls-token`).
#[derive(Debug, Clone, PartialEq)]
struct Flag {
    id: Option<String>,
    name: String,
    words: Vec<String>,
}

/// Splits `words` into flags as `cmd` reads them; a word that is no flag's value stays with
/// the flag before it, for clap to judge when the cell's flags are parsed.
fn split(cmd: &clap::Command, words: &[String]) -> Vec<Flag> {
    let mut out: Vec<Flag> = Vec::new();
    let mut it = words.iter();
    while let Some(w) = it.next() {
        let Some(long) = w.strip_prefix("--") else {
            match out.last_mut() {
                Some(f) => f.words.push(w.clone()),
                None => out.push(Flag {
                    id: None,
                    name: w.clone(),
                    words: vec![w.clone()],
                }),
            }
            continue;
        };
        let (name, inline) = long
            .split_once('=')
            .map_or((long, false), |(n, _)| (n, true));
        let arg = find(cmd, name);
        let mut words = vec![w.clone()];
        if arg.is_some_and(|a| a.get_action().takes_values()) && !inline {
            words.extend(it.next().cloned());
        }
        out.push(Flag {
            id: arg.map(|a| a.get_id().to_string()),
            name: format!("--{name}"),
            words,
        });
    }
    out
}

/// Refuses a shared flag that some kind's command does not take, naming the flag, the kind
/// and the kinds that do take it. A flag no kind takes is left for clap to name (with its
/// suggestions) when the cells' flags are parsed.
pub fn check_shared_flags_fit(shared: &[String], kinds: &[SweepKind]) -> anyhow::Result<()> {
    let commands: Vec<(SweepKind, clap::Command)> =
        kinds.iter().map(|&k| (k, command(k))).collect();
    for (kind, cmd) in &commands {
        for f in split(cmd, shared) {
            if f.id.is_some() || !f.name.starts_with("--") {
                continue;
            }
            let bare = &f.name[2..];
            let takers: Vec<&str> = commands
                .iter()
                .filter(|(_, c)| find(c, bare).is_some())
                .map(|(k, _)| k.command())
                .collect();
            if let Some(first) = takers.first() {
                bail!(
                    "the shared flag {} is not a flag of `mae-train {}` (only of {}); give it to \
                     the kinds that take it, e.g. --kind-args '{first}={}'",
                    f.name,
                    kind.command(),
                    takers.join(", "),
                    f.words.join(" ")
                );
            }
        }
    }
    Ok(())
}

/// The flags of `kind`'s cell: `layers` in order, each replacing the flags of the earlier ones
/// that it gives again.
pub fn layered(kind: SweepKind, layers: &[&[String]]) -> Vec<String> {
    let cmd = command(kind);
    let mut flags: Vec<Flag> = Vec::new();
    for layer in layers {
        let new = split(&cmd, layer);
        flags.retain(|old| !new.iter().any(|f| old.id.is_some() && f.id == old.id));
        flags.extend(new);
    }
    flags.into_iter().flat_map(|f| f.words).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn later_layers_replace_the_same_flag_under_any_spelling() {
        let shared = s(&[
            "--data-path",
            "d",
            "--blr",
            "5e-4",
            "--batch_size=8",
            "--epochs",
            "50",
        ]);
        let kind = s(&["--blr", "0.1", "--batch-size", "256", "--global-pool"]);
        let got = layered(SweepKind::Linprobe, &[&shared, &kind]);
        assert_eq!(
            got,
            s(&[
                "--data-path",
                "d",
                "--epochs",
                "50",
                "--blr",
                "0.1",
                "--batch-size",
                "256",
                "--global-pool"
            ])
        );
        let init = s(&["--layer-decay", "1.0"]);
        let got = layered(SweepKind::Finetune, &[&shared, &[], &init]);
        assert_eq!(got[..], [&shared[..], &init[..]].concat()[..]);
    }

    #[test]
    fn a_shared_flag_of_one_kind_only_is_named() {
        let kinds = [SweepKind::Finetune, SweepKind::Linprobe];
        let err = check_shared_flags_fit(&s(&["--data-path", "d", "--aa", "none"]), &kinds)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--aa is not a flag of `mae-train linprobe`")
                && err.contains("--kind-args 'finetune=--aa none'"),
            "{err}"
        );
        let err = check_shared_flags_fit(&s(&["--global_pool"]), &kinds)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--global_pool is not a flag of `mae-train finetune`"));
        // Flags both take pass; a flag neither takes is left for clap.
        let both = s(&["--data-path", "d", "--epochs", "3", "--bogus"]);
        assert!(check_shared_flags_fit(&both, &kinds).is_ok());
        assert!(check_shared_flags_fit(&s(&["--aa", "none"]), &kinds[..1]).is_ok());
        assert!(check_own_flags(&s(&["--seed", "3"]), "x").is_err());
        assert!(check_own_flags(&s(&["--output_dir=x"]), "x").is_err());
        assert!(check_own_flags(&s(&["--epochs", "3"]), "x").is_ok());
    }
}
