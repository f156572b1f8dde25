//! What a binary accepts, read from its `--help`: the flags and the `[env: FORGER_X=]`
//! variables clap prints for them, for the binary and for each of its subcommands.
//!
//! Reading the built binary's help rather than a list kept beside the manifests means a flag
//! renamed in the code fails these checks at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, ensure};

use crate::manifest_check::Binary;

/// The flags and environment variables of one command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Surface {
    /// How to name it in a message: `forger-worker` or `forger-worker generate`.
    pub command: String,
    /// Long flags without their dashes.
    pub flags: BTreeSet<String>,
    pub env: BTreeSet<String>,
    /// The variables of flags that take no value (`--mtls`): clap reads them as `true` or
    /// `false` and refuses anything else (`1`, `yes`) at start.
    pub switches: BTreeSet<String>,
}

impl Surface {
    /// Reads clap's help text.
    pub fn parse(command: &str, help: &str) -> Surface {
        let mut surface = Surface {
            command: command.to_string(),
            ..Surface::default()
        };
        // Whether the option last named takes no value; its `[env: ...]` may come lines later.
        let mut switch = false;
        for line in help.lines() {
            let trimmed = line.trim_start();
            // Option lines start with the option: `-h, --help` or `--spec <SPEC>`.
            if trimmed.starts_with('-') {
                // A value shows as `<SPEC>` or `[=<yes|no|auto>]`, before any description
                // on the same line (two spaces on).
                let option = trimmed.split("  ").next().unwrap_or(trimmed);
                switch = !option.contains('<');
                for word in trimmed.split([' ', ',']) {
                    if let Some(flag) = word.strip_prefix("--") {
                        let name: String = flag
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                            .collect();
                        if !name.is_empty() {
                            surface.flags.insert(name);
                        }
                    }
                }
            }
            // `[env: FORGER_SPEC=]`, or with the value the environment held when it ran.
            let mut rest = line;
            while let Some(start) = rest.find("[env: ") {
                rest = &rest[start + "[env: ".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    if switch {
                        surface.switches.insert(name.clone());
                    }
                    surface.env.insert(name);
                }
            }
        }
        surface
    }
}

/// The subcommands a help text lists under `Commands:`, leaving out clap's own `help`.
pub fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| line.trim() != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Everything a binary accepts.
#[derive(Debug, Clone)]
pub struct Cli {
    pub binary: Binary,
    pub top: Surface,
    pub subcommands: BTreeMap<String, Surface>,
}

impl Cli {
    /// Builds it from help texts: the binary's, then each subcommand's.
    pub fn from_help(binary: Binary, top: &str, subcommands: &[(&str, &str)]) -> Cli {
        Cli {
            binary,
            top: Surface::parse(binary.name(), top),
            subcommands: subcommands
                .iter()
                .map(|(name, help)| {
                    (
                        name.to_string(),
                        Surface::parse(&format!("{} {name}", binary.name()), help),
                    )
                })
                .collect(),
        }
    }

    /// Runs the built executable's `--help`, and each subcommand's.
    pub fn load(binary: Binary, executable: &Path) -> anyhow::Result<Cli> {
        let top = help(executable, &[])?;
        let names = subcommands(&top);
        let mut texts = Vec::new();
        for name in &names {
            texts.push((name.as_str(), help(executable, &[name])?));
        }
        let pairs: Vec<(&str, &str)> = texts.iter().map(|(n, t)| (*n, t.as_str())).collect();
        Ok(Cli::from_help(binary, &top, &pairs))
    }

    /// The command that `args` run: a leading word that is not a flag names a subcommand.
    pub fn surface_for(&self, args: &[String]) -> Result<&Surface, String> {
        match args.first() {
            Some(word) if !word.starts_with('-') => self.subcommands.get(word).ok_or_else(|| {
                format!(
                    "`{word}` is not a subcommand of {} (it has {})",
                    self.binary.name(),
                    self.subcommands.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            }),
            _ => Ok(&self.top),
        }
    }
}

/// `executable [subcommand] --help`, with no FORGER_* variables from this environment, so
/// what clap prints does not depend on who runs the test.
fn help(executable: &Path, subcommand: &[&str]) -> anyhow::Result<String> {
    let mut command = Command::new(executable);
    command.args(subcommand).arg("--help");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("FORGER_") {
            command.env_remove(name);
        }
    }
    let output = command
        .output()
        .with_context(|| format!("failed to run {} --help", executable.display()))?;
    ensure!(
        output.status.success(),
        "{} {} --help exited with {}: {}",
        executable.display(),
        subcommand.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).context("--help printed something other than UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of clap 4's long help, trimmed.
    const TOP: &str = "\
A forger worker

Usage: forger-worker [OPTIONS]
       forger-worker <COMMAND>

Commands:
  generate  Draw faces from a checkpoint as one grid image
  help      Print this message or the help of the given subcommand(s)

Options:
      --coordinator <COORDINATOR>
          The coordinator's address

          [env: FORGER_COORDINATOR=http://10.0.0.5:50051]

      --patience-secs <PATIENCE_SECS>
          How long [env: FORGER_PATIENCE_SECS=] [default: 300]

      --insecure
          No TLS

          [env: FORGER_INSECURE=]

      --resume[=<yes|no|auto>]  Continue [env: FORGER_RESUME=]

  -h, --help
          Print help (see a summary with '-h')
";

    #[test]
    fn flags_env_names_and_subcommands_come_from_the_help_text() {
        let surface = Surface::parse("forger-worker", TOP);
        assert_eq!(
            surface.flags.iter().map(String::as_str).collect::<Vec<_>>(),
            ["coordinator", "help", "insecure", "patience-secs", "resume"]
        );
        assert_eq!(
            surface.env.iter().map(String::as_str).collect::<Vec<_>>(),
            [
                "FORGER_COORDINATOR",
                "FORGER_INSECURE",
                "FORGER_PATIENCE_SECS",
                "FORGER_RESUME"
            ]
        );
        // Only the flag that takes no value reads its variable as a boolean.
        assert_eq!(
            surface.switches.iter().map(String::as_str).collect::<Vec<_>>(),
            ["FORGER_INSECURE"]
        );
        assert_eq!(subcommands(TOP), ["generate"]);
    }

    #[test]
    fn a_leading_word_picks_the_subcommand() {
        let cli = Cli::from_help(Binary::Worker, TOP, &[("generate", "      --count <COUNT>\n")]);
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(cli.surface_for(&args(&["generate"])).unwrap().flags.contains("count"));
        assert!(
            cli.surface_for(&args(&["--coordinator", "x"]))
                .unwrap()
                .flags
                .contains("coordinator")
        );
        let err = cli.surface_for(&args(&["train"])).unwrap_err();
        assert!(err.contains("`train` is not a subcommand of forger-worker"), "{err}");
    }
}
