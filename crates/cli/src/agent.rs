//! `suture agent run|status|enable` and `suture eligibility`: thin glue over `suture-agent`.

use anyhow::Result;
use serde_json::json;
use suture_agent::config::Overrides;
use suture_agent::{Lock, Settings, Status};

use crate::cli::{AgentCommand, AgentFlags};
use crate::output;

fn settings(f: AgentFlags) -> Result<Settings> {
    Settings::resolve(
        f.config.as_deref(),
        Overrides {
            bundle_dir: f.bundle_dir,
            trust_dir: f.trust_dir,
            state_dir: f.state_dir,
            health_window: f.health_window,
            metrics_addr: f.metrics_addr,
            health_cmd: f.health_cmd,
            interval_ms: f.interval_ms,
            op_timeout_ms: f.op_timeout_ms,
            jobs: f.jobs,
            watch_paths: (!f.watch_paths.is_empty()).then_some(f.watch_paths),
            hold_timeout_ms: f.hold_timeout_ms,
        },
    )
}

pub fn run(j: bool, cmd: AgentCommand) -> Result<i32> {
    match cmd {
        AgentCommand::Run { agent } => {
            suture_agent::run_agent(settings(agent)?)?;
            Ok(0)
        }
        AgentCommand::Status { agent } => status(j, settings(agent)?),
        AgentCommand::Enable { bundle_id, agent } => {
            let s = settings(agent)?;
            let r = suture_agent::journal::enable(&s.state_dir, &bundle_id)?;
            if j {
                output::json(&json!({"ok": true, "enabled": bundle_id, "was": r.reason}));
            } else {
                println!(
                    "enabled {bundle_id} (rolled back because {}); {}",
                    r.reason,
                    if Lock::held(&s.state_dir) {
                        "the running agent applies it on its next pass"
                    } else {
                        "the agent applies it when it runs"
                    }
                );
            }
            Ok(0)
        }
    }
}

fn status(j: bool, s: Settings) -> Result<i32> {
    // A running agent's snapshot; otherwise the journal and a scan of the processes.
    let (status, live) = match suture_agent::report::read_status(&s.state_dir)? {
        Some(st) if Lock::held(&s.state_dir) => (st, true),
        _ => {
            let source = Box::new(suture_agent::source::LocalDir::new(&s.bundle_dir));
            (suture_agent::Agent::observe(s, source)?, false)
        }
    };
    if j {
        let mut v = serde_json::to_value(&status)?;
        v["agent_running"] = json!(live);
        output::json(&v);
        return Ok(0);
    }
    print_status(&status, live);
    Ok(0)
}

fn print_status(st: &Status, live: bool) {
    match (live, st.agent_pid) {
        (true, Some(p)) => println!("agent running (pid {p})"),
        _ => println!("agent not running: state from the journal and the processes"),
    }
    if st.process_events == Some(false) {
        println!("WARNING: the agent sees no process events: crashes do not roll back, new processes wait for the next pass");
    }
    match (&st.gate, live) {
        (Some(g), _) => {
            println!(
                "gate: {} file(s) watched; {} starting process(es) held and patched before they ran, {} let through",
                g.watching.len(),
                g.held,
                g.let_through
            );
            for w in &g.watching {
                println!("  watching {}", output::clean(w));
            }
            if let Some(why) = &g.last_let_through {
                println!("  last let through: {}", output::clean(why));
            }
        }
        (None, true) => println!(
            "WARNING: the gate is off (no fanotify permission events): new processes run unpatched until patched after their start"
        ),
        (None, false) => {}
    }
    if st.bundles.is_empty() {
        println!("no bundles");
    }
    for b in &st.bundles {
        let id = b.id.as_deref().unwrap_or("?");
        let level = b.level.map(|l| format!(" level {l}")).unwrap_or_default();
        let why = b
            .reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        let origin = b
            .origin
            .as_deref()
            .map(|o| format!(" [{o}]"))
            .unwrap_or_default();
        println!(
            "{id}{level} {} in {} process(es){why}{origin}",
            b.state.as_str(),
            b.processes
        );
        for f in &b.failures {
            println!("  pid {}: {}: {}", f.pid, f.kind, f.reason);
        }
    }
}

pub fn eligibility(j: bool, f: AgentFlags) -> Result<i32> {
    let s = settings(f)?;
    let e = suture_agent::eligibility::eligibility(&s.bundle_dir);
    if j {
        output::json(&e);
    } else {
        for c in &e.checks {
            println!(
                "{:<5} {:<28} {}",
                if c.ok { "ok" } else { "NO" },
                c.name,
                c.detail
            );
        }
        for u in &e.unreadable {
            println!("unreadable bundle {u}");
        }
        for p in &e.processes {
            if p.patchable {
                println!(
                    "pid {} ({}): patchable by {} ({})",
                    p.pid, p.command, p.bundle, p.module
                );
            } else {
                println!(
                    "pid {} ({}): NOT patchable by {}: {}",
                    p.pid,
                    p.command,
                    p.bundle,
                    p.problems.join("; ")
                );
            }
        }
        println!(
            "this host {} be live-patched",
            if e.eligible { "can" } else { "cannot" }
        );
    }
    Ok(if e.eligible { 0 } else { 2 })
}
