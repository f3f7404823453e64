//! The `capstan` program under another name, so that the hostile-input tests of this crate run the
//! real binary (`CARGO_BIN_EXE_capstan-under-test`) as the CLI's own tests do.

fn main() {
    capstan_cli::main()
}
