//! `mae-train launch` (several processes of one node, as torchrun) and `mae-train slurm` (a
//! batch script for several nodes, as upstream's submitit scripts).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cli::{LaunchArgs, SlurmArgs};

/// The subcommands that run as distributed processes.
const DISTRIBUTED: [&str; 4] = ["finetune", "pretrain", "linprobe", "eval"];

/// How long the remaining ranks get to exit on their own after one failed.
const GRACE: Duration = Duration::from_secs(10);

fn check_command(cmd: &[String]) -> anyhow::Result<()> {
    match cmd.first() {
        Some(c) if DISTRIBUTED.contains(&c.as_str()) => Ok(()),
        Some(c) => bail!(
            "cannot launch '{c}': the command must be one of {} (e.g. `mae-train launch --nproc-per-node 2 -- finetune --data-path DATA`)",
            DISTRIBUTED.join(", ")
        ),
        None => bail!("no command to launch"),
    }
}

/// A free TCP port on `addr`.
fn free_port(addr: &str) -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind((addr, 0))
        .with_context(|| format!("cannot bind a port on {addr}"))?;
    Ok(l.local_addr()?.port())
}

/// `mae-train launch`.
pub fn launch(a: &LaunchArgs) -> anyhow::Result<ExitCode> {
    check_command(&a.command)?;
    if a.nproc_per_node == 0 {
        bail!("--nproc-per-node must be at least 1");
    }
    let port = if a.master_port == 0 {
        free_port(&a.master_addr)?
    } else {
        a.master_port
    };
    let exe = std::env::current_exe().context("cannot find the mae-train executable")?;
    let n = a.nproc_per_node;
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(n);
    for rank in 0..n {
        let mut c = Command::new(&exe);
        c.args(&a.command)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", &a.master_addr)
            .env("MASTER_PORT", port.to_string());
        if rank > 0 && !a.all_output {
            c.stdout(Stdio::null());
        }
        match c.spawn() {
            Ok(child) => children.push((rank, child)),
            Err(e) => {
                stop_all(&mut children);
                return Err(e).with_context(|| format!("cannot start rank {rank}"));
            }
        }
    }
    wait_all(children)
}

/// Waits for every rank; when one fails, gives the others [`GRACE`] to fail too (their
/// collectives notice the lost peer), then kills what remains. Exits with the first failure.
fn wait_all(mut children: Vec<(usize, Child)>) -> anyhow::Result<ExitCode> {
    let mut failure: Option<(usize, std::process::ExitStatus)> = None;
    let mut failed_at: Option<Instant> = None;
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            match children[i].1.try_wait() {
                Ok(Some(status)) => {
                    let (rank, _) = children.remove(i);
                    if !status.success() && failure.is_none() {
                        failure = Some((rank, status));
                        failed_at = Some(Instant::now());
                    }
                }
                Ok(None) => i += 1,
                Err(e) => {
                    let rank = children[i].0;
                    stop_all(&mut children);
                    return Err(e).with_context(|| format!("cannot wait for rank {rank}"));
                }
            }
        }
        if failed_at.is_some_and(|t| t.elapsed() > GRACE) && !children.is_empty() {
            eprintln!(
                "mae-train launch: stopping {} remaining rank(s)",
                children.len()
            );
            stop_all(&mut children);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match failure {
        None => Ok(ExitCode::SUCCESS),
        Some((rank, status)) => {
            eprintln!("mae-train launch: rank {rank} failed ({status})");
            let code = status.code().unwrap_or(1).clamp(1, 255) as u8;
            Ok(ExitCode::from(code))
        }
    }
}

fn stop_all(children: &mut Vec<(usize, Child)>) {
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    children.clear();
}

/// Quotes a word for a POSIX shell.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The sbatch script of `a`, running `exe`.
pub fn sbatch_script(a: &SlurmArgs, exe: &Path, job_dir: &Path) -> anyhow::Result<String> {
    check_command(&a.command)?;
    if a.nodes == 0 || a.gpus_per_node == 0 {
        bail!("--nodes and --gpus-per-node must be at least 1");
    }
    let mut cmd = a.command.clone();
    let names_output = cmd
        .iter()
        .any(|w| w == "--output-dir" || w == "--output_dir" || w.starts_with("--output-dir="));
    if !names_output && cmd[0] != "eval" {
        cmd.push("--output-dir".into());
        cmd.push(job_dir.display().to_string());
    }
    let mut s = String::from("#!/bin/bash\n");
    let mut sb = |k: &str, v: String| s.push_str(&format!("#SBATCH --{k}={v}\n"));
    sb("job-name", format!("mae-{}", cmd[0]));
    sb("nodes", a.nodes.to_string());
    sb("ntasks-per-node", a.gpus_per_node.to_string());
    sb("gpus-per-node", a.gpus_per_node.to_string());
    sb("cpus-per-task", a.cpus_per_task.to_string());
    sb("mem", format!("{}G", a.mem_per_gpu * a.gpus_per_node));
    sb("time", a.timeout.to_string());
    if let Some(p) = &a.partition {
        sb("partition", p.clone());
    }
    if let Some(c) = &a.constraint {
        sb("constraint", c.clone());
    }
    sb(
        "output",
        job_dir.join("%j_%t_log.out").display().to_string(),
    );
    sb("error", job_dir.join("%j_%t_log.err").display().to_string());
    s.push_str(
        "\n# Rank placement comes from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the first host\n\
         # of SLURM_JOB_NODELIST; the rendezvous port from the job id.\n\
         export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))\n\n",
    );
    let words: Vec<String> = std::iter::once(exe.display().to_string())
        .chain(cmd)
        .map(|w| shell_quote(&w))
        .collect();
    s.push_str(&format!("srun --kill-on-bad-exit=1 {}\n", words.join(" ")));
    Ok(s)
}

/// `mae-train slurm`.
pub fn slurm(a: &SlurmArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&a.job_dir)
        .with_context(|| format!("cannot create --job-dir {}", a.job_dir.display()))?;
    let job_dir = a
        .job_dir
        .canonicalize()
        .with_context(|| format!("--job-dir {}", a.job_dir.display()))?;
    let exe: PathBuf = std::env::current_exe().context("cannot find the mae-train executable")?;
    let script = sbatch_script(a, &exe, &job_dir)?;
    let path = job_dir.join("submit.sbatch");
    mae_models::io::atomic_write(&path, script.as_bytes())?;
    println!("wrote {}", path.display());
    if a.dry_run {
        return Ok(ExitCode::SUCCESS);
    }
    let out = Command::new("sbatch")
        .arg(&path)
        .output()
        .context("cannot run sbatch (is this a SLURM login node?); the script is written, submit it with `sbatch`")?;
    if !out.status.success() {
        bail!(
            "sbatch {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("--lr"), "--lr");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn only_training_commands_launch() {
        assert!(check_command(&["finetune".into()]).is_ok());
        let e = check_command(&["synth".into()]).unwrap_err().to_string();
        assert!(e.contains("synth") && e.contains("finetune"), "{e}");
    }
}
