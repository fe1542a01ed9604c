//! `suture`: one binary over the pipeline's libraries. Each subcommand is thin glue; the work
//! lives in `suture-build`, `suture-bundle` and `suture-engine`.

mod agent;
mod cli;
mod commands;
mod demo;
mod output;

use clap::Parser;

fn main() {
    // Under the name of a compiler, suture is the builder's compiler wrapper.
    if let Some(argv0) = std::env::args().next() {
        suture_build::source::wrapper::maybe_run(&argv0);
    }
    // Output piped into `head` and closed early ends us quietly, as it does any other tool.
    // SAFETY: restoring a signal's default disposition at start, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args = cli::Args::parse();
    // The agent is a daemon: its actions are its log (one line each, for journald).
    let default_level = match &args.command {
        cli::Command::Agent {
            command: cli::AgentCommand::Run { .. },
        } => "info,suture_engine=warn",
        _ => "warn",
    };
    let log = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SUTURE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // Under systemd, journald stamps each line itself.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        log.without_time().init();
    } else {
        log.init();
    }
    let json = args.json;
    let code = match commands::run(args) {
        Ok(code) => code,
        Err(e) => {
            output::error(json, &e);
            1
        }
    };
    std::process::exit(code);
}
