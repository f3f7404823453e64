//! Test binary: the per-task supervisor, as `capstan supervise SANDBOX` would run it.
fn main() {
    let mut args = std::env::args_os().skip(1);
    let Some(sandbox) = args.next() else {
        eprintln!("usage: capstan-supervisor SANDBOX_DIR");
        std::process::exit(2);
    };
    std::process::exit(capstan_containerizer::supervise_main(std::path::Path::new(&sandbox)));
}
