//! Tidy check: every HTTP server of the daemons goes through `capstan_api::serve` (connection
//! caps and timeouts), never `axum::serve` or a hand-rolled hyper loop, in any crate's `src/`.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn daemons_serve_http_only_through_capstan_api_serve() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("crates/").to_path_buf();
    let mut files = vec![];
    for c in std::fs::read_dir(&crates).unwrap().flatten() {
        rust_files(&c.path().join("src"), &mut files);
    }
    assert!(files.len() > 20, "the crates' sources were not found under {}", crates.display());
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| !f.ends_with("api/src/serve.rs"))
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            text.contains("axum::serve(") || text.contains("serve_connection(")
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(offenders.is_empty(), "HTTP served outside capstan_api::serve: {offenders:?}");
}
