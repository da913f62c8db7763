//! `embassy`: parse the command line, load plugins, run.

use std::{process::ExitCode, time::Duration};

use clap::{error::ErrorKind, Parser};
use embassy_host::{
    cli::{Cli, Command},
    logging,
    requests::checked_run_args,
    run::{self, UsageError, EXIT_USAGE},
    signals,
};

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
    // Kept to the end of main: dropping it writes out what is still queued.
    let log = logging::init(cli.verbose, cli.log_format);
    let code = match dispatch(cli) {
        Ok(code) => code,
        Err(error) => {
            tracing::error!("{error:#}");
            if error.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    };
    drop(log);
    code
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let args = match cli.command {
        Some(Command::Check { descriptors }) => {
            return Ok(run::check(&descriptors, &cli.plugin_dir))
        }
        Some(Command::Plugins { json }) => {
            let (plugins, failed) = run::load_plugins(&cli.plugin_dir)?;
            return run::list_plugins(&plugins, json, failed);
        }
        Some(Command::Ctl {
            operation,
            admin,
            token_file,
        }) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            return runtime.block_on(embassy_host::status::ctl(
                &admin,
                token_file.as_deref(),
                operation,
            ));
        }
        Some(Command::Status {
            service,
            json,
            admin,
        }) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            return runtime.block_on(embassy_host::status::status(
                &admin,
                service.as_deref(),
                json,
            ));
        }
        Some(Command::Run(args)) => *args,
        None => cli.run,
    };
    let requests = checked_run_args(&args, std::env::vars())?;
    if let Some(path) = &args.admin_token_file {
        run::check_token_file(path)?;
    }
    // The short-lived commands above keep SIGHUP's default.
    signals::ignore_hangup();
    let (plugins, _) = run::load_plugins(&cli.plugin_dir)?;
    let runtime = run::runtime(args.threads)?;
    let code = runtime.block_on(run::run(plugins, cli.plugin_dir, args, requests));
    // Connection tasks are dropped; a name lookup still running must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}
