//! The per-task supervisor as a binary of this crate, so that the agent's integration tests can
//! run real supervisors (`capstan supervise` lives in the `capstan` binary of another crate).
fn main() {
    let Some(sandbox) = std::env::args_os().nth(1) else {
        eprintln!("usage: capstan-agent-test-supervisor SANDBOX_DIR");
        std::process::exit(2);
    };
    std::process::exit(capstan_containerizer::supervise_main(std::path::Path::new(&sandbox)));
}
