//! The `capstan` binary: everything is in the library (`lib.rs`), so that test crates can build
//! the same program under another name.

fn main() {
    capstan_cli::main()
}
