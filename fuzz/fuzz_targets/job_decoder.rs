//! Fuzz target: any bytes as a job file, TOML or JSON (the first byte chooses), through the same
//! decoders `capstan job create` and `POST /v1/jobs` use. Must hold: no panic; a spec that decodes
//! is valid (it decodes again from its own JSON to the same spec).
#![no_main]

use capstan_model::{parse_json, parse_toml, ValidationPolicy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let policy = ValidationPolicy { allow_root: choice & 2 != 0, ..Default::default() };
    let decoded = if choice & 1 == 0 { parse_toml(text, &policy) } else { parse_json(text, &policy) };
    if let Ok(spec) = decoded {
        let json = serde_json::to_string(&spec).expect("a decoded spec serializes");
        let again =
            parse_json(&json, &policy).unwrap_or_else(|e| panic!("a decoded spec is refused again: {e}\n{json}"));
        assert_eq!(again, spec, "a spec reads back as itself");
    }
});
