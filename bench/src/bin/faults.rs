//! The fault suite (`bench/faults`): runs the scenarios of `embassy_tests::faults` one after
//! another, prints a markdown table on stdout and writes one JSON line per scenario.
//!
//! ```text
//! faults [--only NAME]... [--scale F] [--results FILE] [--embassy-arg ARG]... [--list]
//! ```
//!
//! Exits 1 if any scenario fails one of its pass criteria (or could not be set up), 64 on a
//! usage error; a scenario that cannot run here (no private dockerd, too low an open-file
//! limit) is reported as skipped with the reason and fails nothing.

use std::{io::Write, path::PathBuf, process::ExitCode};

use embassy_tests::faults::{self, Options, Report};

fn usage(error: &str) -> ExitCode {
    eprintln!("faults: {error} (usage: faults [--only NAME].. [--scale F] [--results FILE] [--embassy-arg ARG].. [--list])");
    ExitCode::from(64)
}

fn main() -> ExitCode {
    let mut only = Vec::new();
    let mut options = Options::default();
    let mut results = faults::workspace_path("bench/results/faults.jsonl");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_string(), Some(value.to_string()))
            }
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--only" => match value("--only") {
                Ok(name) if faults::scenario(&name).is_some() => only.push(name),
                Ok(name) => {
                    let known: Vec<&str> = faults::scenarios::ALL.iter().map(|s| s.name).collect();
                    return usage(&format!(
                        "unknown scenario {name:?}; known: {}",
                        known.join(" ")
                    ));
                }
                Err(error) => return usage(&error),
            },
            "--scale" => match value("--scale").map(|v| v.parse::<f64>()) {
                Ok(Ok(scale)) if (0.1..=100.0).contains(&scale) => options.scale = scale,
                Ok(_) => return usage("--scale takes a number from 0.1 to 100"),
                Err(error) => return usage(&error),
            },
            "--results" => match value("--results") {
                Ok(path) => results = PathBuf::from(path),
                Err(error) => return usage(&error),
            },
            "--embassy-arg" => match value("--embassy-arg") {
                Ok(extra) => options.embassy_args.push(extra),
                Err(error) => return usage(&error),
            },
            "--list" => {
                for s in faults::scenarios::ALL {
                    let tests = if s.in_tests {
                        " [also in tests/tests/faults.rs]"
                    } else {
                        ""
                    };
                    println!("{:<20} {}{tests}", s.name, s.about);
                }
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let selected: Vec<_> = faults::scenarios::ALL
        .iter()
        .filter(|s| only.is_empty() || only.iter().any(|name| name == s.name))
        .collect();
    let (commit, date) = (
        commit(),
        command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    );
    let mut reports: Vec<Report> = Vec::new();
    for scenario in selected {
        eprintln!("faults: running {} ({})", scenario.name, scenario.about);
        let report = faults::run(scenario, &options);
        for line in report.describe().lines() {
            eprintln!("faults: {line}");
        }
        reports.push(report);
    }
    if let Err(error) = write_results(&results, &reports, &commit, &date, &options) {
        eprintln!("faults: cannot write {}: {error}", results.display());
    } else {
        eprintln!("faults: results in {}", results.display());
    }
    println!(
        "Fault suite, commit {commit}, {date}, scale {}\n",
        options.scale
    );
    print!("{}", faults::table(&reports));
    if reports.iter().any(Report::failed) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn write_results(
    path: &PathBuf,
    reports: &[Report],
    commit: &str,
    date: &str,
    options: &Options,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::File::create(path)?;
    for report in reports {
        let mut line = report.json();
        line["commit"] = commit.into();
        line["date"] = date.into();
        line["scale"] = options.scale.into();
        line["embassy_args"] = options.embassy_args.clone().into();
        writeln!(file, "{line}")?;
    }
    Ok(())
}

/// The workspace's commit, `+dirty` when the tree has changes.
fn commit() -> String {
    let root = faults::workspace_path("");
    let root = root.to_string_lossy();
    let hash = command_output("git", &["-C", &root, "rev-parse", "--short=12", "HEAD"]);
    let dirty = !command_output(
        "git",
        &["-C", &root, "status", "--porcelain", "--untracked-files=no"],
    )
    .is_empty();
    if dirty {
        format!("{hash}+dirty")
    } else {
        hash
    }
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}
