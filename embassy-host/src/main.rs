//! `embassy`: parse the command line, load plugins, run.

use std::{io::IsTerminal, process::ExitCode};

use clap::{error::ErrorKind, Parser};
use embassy_host::{
    cli::{Cli, Command},
    run::{self, EXIT_USAGE},
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error)
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            // One line: clap's first line names the bad argument and why.
            let text = error.to_string();
            eprintln!(
                "{} (see embassy --help)",
                text.lines().next().unwrap_or("usage error")
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_logging(cli.verbose);
    match dispatch(cli) {
        Ok(code) => code,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let args = match cli.command {
        Some(Command::Check { descriptors }) => return Ok(run::check(&descriptors)),
        Some(Command::Plugins { json }) => {
            let (plugins, failed) = run::load_plugins(&cli.plugin_dir)?;
            return run::list_plugins(&plugins, json, failed);
        }
        Some(Command::Run(args)) => *args,
        None => cli.run,
    };
    let (plugins, _) = run::load_plugins(&cli.plugin_dir)?;
    let runtime = run::runtime(args.threads)?;
    runtime.block_on(run::run(plugins, args))
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("EMBASSY_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
