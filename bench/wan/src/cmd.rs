//! Running the external tools the WAN is built with (`ip`, `tc`, `iperf3`,
//! `ping`): find them, run them, and turn a failure into an error that names the
//! exact command line and what it printed on stderr.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Directories searched after `PATH`, so that `ip`/`tc` are found even when the
/// caller's `PATH` lacks the sbin directories.
const FALLBACK_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// An external command that could not be found, started, or that failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The tool is not installed.
    #[error(
        "`{tool}` is not installed (not in PATH, /usr/sbin, /sbin, /usr/bin or /bin): run scripts/setup"
    )]
    ToolMissing {
        /// The program name, e.g. `tc`.
        tool: String,
    },
    /// The tool exists but could not be started.
    #[error("could not start `{command}`")]
    Spawn {
        /// The full command line.
        command: String,
        /// Why `exec` failed.
        source: io::Error,
    },
    /// The tool ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The full command line.
        command: String,
        /// The exit status, as printed by the standard library.
        status: String,
        /// What the tool printed on stderr (trimmed).
        stderr: String,
    },
}

/// Finds `tool` in `PATH`, then in the usual system directories.
pub fn find_tool(tool: &str) -> Result<PathBuf, CommandError> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| CommandError::ToolMissing {
            tool: tool.to_string(),
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Renders a command line for error messages: program and arguments, space
/// separated.
pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `tool args…` to completion and returns its stdout; a non-zero exit is a
/// [`CommandError::Failed`] carrying stderr.
pub fn run<I, S>(tool: &str, args: I) -> Result<String, CommandError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(find_tool(tool)?);
    cmd.args(args);
    run_command(&mut cmd)
}

/// Runs a prepared command to completion and returns its stdout; a non-zero exit
/// is a [`CommandError::Failed`] carrying stderr.
pub fn run_command(cmd: &mut Command) -> Result<String, CommandError> {
    let output = output(cmd)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Like [`run_command`] but returns the whole [`Output`] of a successful run.
pub fn output(cmd: &mut Command) -> Result<Output, CommandError> {
    let output = cmd.output().map_err(|source| CommandError::Spawn {
        command: display(cmd),
        source,
    })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(CommandError::Failed {
            command: display(cmd),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_says_run_setup() {
        let e = find_tool("wanmig-no-such-tool").unwrap_err();
        assert!(e.to_string().contains("scripts/setup"), "{e}");
    }

    #[test]
    fn failure_carries_command_and_stderr() {
        let e = run("sh", ["-c", "echo oops >&2; exit 3"]).unwrap_err();
        match e {
            CommandError::Failed {
                command, stderr, ..
            } => {
                assert!(
                    command.ends_with("sh -c echo oops >&2; exit 3"),
                    "{command}"
                );
                assert_eq!(stderr, "oops");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(run("sh", ["-c", "echo hi"]).unwrap(), "hi\n");
    }
}
