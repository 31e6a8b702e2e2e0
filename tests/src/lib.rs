//! Helpers for running the built binaries end to end in temporary folders, and the entry
//! points of the fuzz targets.

pub mod fuzz;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// The folder holding the binaries of the profile these tests were built with.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable inside target/<profile>/deps")
        .to_path_buf()
}

/// The project virtualenv's Python, which the tests use to make PyTorch reference files.
pub fn python() -> PathBuf {
    let p = workspace_root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh first",
        p.display()
    );
    p
}

/// A binary of the workspace, run in a temporary working folder.
#[derive(Debug)]
pub struct TestCommand {
    cmd: Command,
    name: String,
}

impl TestCommand {
    /// `name` is one of `mae-train`, `mae-export`, `mae-run`.
    pub fn new(name: &str, dir: &Path) -> Self {
        let path = bin_dir().join(name);
        assert!(
            path.exists(),
            "{} is missing: build the binaries first (cargo build --workspace --bins)",
            path.display()
        );
        let mut cmd = Command::new(path);
        cmd.current_dir(dir);
        Self {
            cmd,
            name: name.to_string(),
        }
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd.args(args);
        self
    }

    pub fn env_remove(&mut self, key: &str) -> &mut Self {
        self.cmd.env_remove(key);
        self
    }

    fn output(&mut self) -> Output {
        self.cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.name))
    }

    /// Runs the command, asserts success and returns its standard output.
    pub fn stdout(&mut self) -> String {
        let out = self.output();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        assert!(
            out.status.success(),
            "{} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.name,
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Runs the command, asserts success and returns its standard output and standard error.
    pub fn stdout_stderr(&mut self) -> (String, String) {
        let out = self.output();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        assert!(
            out.status.success(),
            "{} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.name,
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        (text(&out.stdout), text(&out.stderr))
    }

    /// The underlying command, for callers that arrange its pipes themselves.
    pub fn command(&mut self) -> &mut Command {
        &mut self.cmd
    }

    /// Runs the command, asserts failure without a panic and returns its standard error.
    pub fn fails(&mut self) -> String {
        let out = self.output();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "{} unexpectedly succeeded",
            self.name
        );
        assert!(
            !stderr.contains("panicked"),
            "{} panicked:\n{stderr}",
            self.name
        );
        assert_ne!(
            out.status.code(),
            Some(101),
            "{} panicked:\n{stderr}",
            self.name
        );
        stderr
    }
}
