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
    // SIGINT, SIGTERM and SIGHUP ask the engine to stop at its next phase boundary: what has
    // not committed is undone, what has is finished, and we exit with one line. A second one
    // ends us at once (exit 130), for commands that have nothing to undo.
    let flag = suture_engine::interrupt::flag();
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let registered = signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())
            .and_then(|_| signal_hook::flag::register(sig, flag.clone()));
        if let Err(e) = registered {
            eprintln!("warning: cannot handle signal {sig}: {e}");
        }
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
    tracing::debug!("started");
    let json = args.json;
    let code = match commands::run(args) {
        Ok(code) => code,
        Err(e) => {
            output::error(json, &e);
            // A refusal is a correct answer (the fix needs a restart), not a tool failure.
            match e.downcast_ref::<suture_engine::EngineError>() {
                Some(suture_engine::EngineError::Interrupted(_)) => 130,
                _ if suture_build::source::refusal_of(&e).is_some() => 3,
                _ => 1,
            }
        }
    };
    std::process::exit(code);
}
