//! The decoders never panic, whatever they are given: arbitrary text, TOML-ish documents built from
//! a mix of known and unknown keys at random depths, arbitrary JSON. They either accept or say
//! what is wrong. And every valid spec we can generate is accepted, as itself.

use capstan_model::{parse_json, parse_toml, JobSpec, Problems, ValidationPolicy};
use proptest::prelude::*;
use std::collections::BTreeMap;

/// Accepted, or refused with at least one problem, each with a message.
fn check(result: Result<JobSpec, Problems>) {
    if let Err(problems) = result {
        assert!(!problems.0.is_empty(), "refused without a problem");
        for p in &problems.0 {
            assert!(!p.message.trim().is_empty(), "a problem without a message: {p:?}");
            // Display must not panic either.
            let _ = p.to_string();
        }
    }
}

/// Every key the decoder knows, anywhere, plus near-misses and strangers.
const KEYS: &[&str] = &[
    "job",
    "type",
    "instances",
    "max_failures",
    "priority",
    "production",
    "placement",
    "cron",
    "cron_timezone",
    "cron_collision_policy",
    "replace_after",
    "min_healthy",
    "task",
    "health_check",
    "update",
    "constraint",
    "command",
    "user",
    "cpus",
    "mem",
    "disk",
    "ports",
    "env",
    "kill_grace",
    "port",
    "path",
    "interval",
    "timeout",
    "grace_period",
    "consecutive_failures",
    "batch_size",
    "watch",
    "max_per_instance_failures",
    "max_total_failures",
    "rollback_on_failure",
    "canaries",
    "auto_promote",
    "attribute",
    "value",
    "not",
    "in",
    "limit",
    "distinct_hosts",
    "spread",
    "PORT_HTTP",
    "CAPSTAN_X",
    "GREETING",
    "instance",
    "comand",
    "",
    "é",
    "a.b",
    "1ABC",
    "x y",
];

/// Strings that mean something to some field, and some that mean nothing.
const STRINGS: &[&str] = &[
    "www/prod/hello",
    "a/b/c",
    "WWW/x",
    "//",
    "service",
    "batch",
    "cron",
    "system",
    "nobody",
    "root",
    "0",
    "64MiB",
    "4MiB",
    "1.5GiB",
    "12GB",
    "-1MiB",
    "MiB",
    "1e400MiB",
    "99999999999999999999TiB",
    "10s",
    "1h",
    "never",
    "0s",
    "forever",
    "http",
    "HTTP",
    "/health",
    "health",
    "binpack",
    "spread",
    "KILL_EXISTING",
    "",
    " ",
    "\u{0}",
    "ü",
    "ls -l",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(KEYS).prop_map(str::to_string),
        1 => "[a-zA-Z_0-9. -]{0,8}",
    ]
}

fn scalar() -> impl Strategy<Value = toml::Value> {
    prop_oneof![
        prop::sample::select(STRINGS).prop_map(|s| toml::Value::String(s.to_string())),
        any::<String>().prop_map(toml::Value::String),
        any::<i64>().prop_map(toml::Value::Integer),
        (-3i64..5).prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        (-2.0f64..5000.0).prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
    ]
}

/// A TOML tree of random depth; tables draw most of their keys from `KEYS`.
fn toml_value() -> impl Strategy<Value = toml::Value> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            prop::collection::btree_map(key(), inner, 0..6).prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

fn toml_document() -> impl Strategy<Value = toml::Table> {
    prop::collection::btree_map(key(), toml_value(), 0..8).prop_map(|m| m.into_iter().collect())
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from), // NaN and inf become null
        prop::sample::select(STRINGS).prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Text that looks like TOML: lines of `key = value`, table headers and debris.
fn toml_ish_text() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        (key(), prop::sample::select(STRINGS)).prop_map(|(k, v)| format!("{k} = \"{v}\"")),
        (key(), any::<i32>()).prop_map(|(k, v)| format!("{k} = {v}")),
        key().prop_map(|k| format!("[{k}]")),
        key().prop_map(|k| format!("[[{k}]]")),
        key().prop_map(|k| format!("[task.{k}]")),
        "[=\\[\\]{}\",.#a-z0-9 \\t]{0,12}",
    ];
    prop::collection::vec(line, 0..12).prop_map(|lines| lines.join("\n"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        let policy = ValidationPolicy::default();
        check(parse_toml(&text, &policy));
        check(parse_json(&text, &policy));
    }

    #[test]
    fn toml_ish_text_never_panics(text in toml_ish_text()) {
        check(parse_toml(&text, &ValidationPolicy::default()));
    }

    #[test]
    fn random_documents_never_panic(doc in toml_document(), allow_root in any::<bool>()) {
        let policy = ValidationPolicy { allow_root, ..Default::default() };
        if let Ok(text) = toml::to_string(&doc) {
            check(parse_toml(&text, &policy));
        }
        // The same tree as JSON (non-finite floats become null there).
        let json = serde_json::to_string(&doc).unwrap_or_else(|_| "{}".into());
        check(parse_json(&json, &policy));
    }

    #[test]
    fn arbitrary_json_never_panics(value in json_value()) {
        let text = serde_json::to_string(&value).unwrap();
        check(parse_json(&text, &ValidationPolicy::default()));
    }

    /// A good job file with one random key (known or not) set to a random value somewhere.
    #[test]
    fn a_good_file_with_one_random_change_never_panics(
        table in prop::sample::select(&["", "task", "task.env", "health_check"][..]),
        k in key(),
        v in toml_value(),
    ) {
        let mut doc: toml::Table = toml::from_str(GOOD).unwrap();
        let target = match table {
            "" => Some(&mut doc),
            "task" => doc.get_mut("task").and_then(|t| t.as_table_mut()),
            "task.env" => doc.get_mut("task").and_then(|t| t.get_mut("env")).and_then(|t| t.as_table_mut()),
            _ => {
                doc.insert("health_check".into(), toml::Value::Table(toml::Table::new()));
                doc.get_mut("health_check").and_then(|t| t.as_table_mut())
            }
        };
        target.unwrap().insert(k, v);
        if let Ok(text) = toml::to_string(&doc) {
            check(parse_toml(&text, &ValidationPolicy::default()));
        }
    }
}

const GOOD: &str = r#"
job = "www/prod/hello"
[task]
command = "true"
user = "nobody"
cpus = 0.5
mem = "64MiB"
disk = "1MiB"
[task.env]
A = "b"
"#;

/// The parts of a valid spec, and what they must decode to.
#[derive(Debug, Clone)]
struct Valid {
    job: String,
    batch: bool,
    instances: u32,
    max_failures: u32,
    priority: i32,
    production: bool,
    command: String,
    user: String,
    cpus_milli: u32,
    mem_kib: u64,
    disk_kib: u64,
    ports: Vec<String>,
    env: BTreeMap<String, String>,
    kill_grace_ms: u64,
}

fn part() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9_-]{0,20}"
}

fn valid() -> impl Strategy<Value = Valid> {
    let job = (
        (part(), part(), part()).prop_map(|(r, e, n)| format!("{r}/{e}/{n}")),
        any::<bool>(),
        1u32..=100_000,
        0u32..=1000,
        -1_000_000i32..=1_000_000,
        any::<bool>(),
    );
    let task = (
        "[ -~]{0,40}[!-~]",
        "[a-z_][a-z0-9_.-]{0,20}".prop_filter("not root", |u| u != "root"),
        1u32..=4_096_000,
        (4 * 1024u64)..(1 << 30),
        0u64..(1 << 32),
        prop::collection::btree_set("[a-z][a-z0-9_]{0,10}", 0..5),
        prop::collection::btree_map(
            "[A-Za-z_][A-Za-z0-9_]{0,10}"
                .prop_filter("not reserved", |k| !k.starts_with("PORT_") && !k.starts_with("CAPSTAN_")),
            "[ -~]{0,20}",
            0..5,
        ),
        0u64..=3_600_000,
    );
    (job, task).prop_map(|(job, task)| {
        let (job, batch, instances, max_failures, priority, production) = job;
        let (command, user, cpus_milli, mem_kib, disk_kib, ports, env, kill_grace_ms) = task;
        Valid {
            job,
            batch,
            instances,
            max_failures,
            priority,
            production,
            command,
            user,
            cpus_milli,
            mem_kib,
            disk_kib,
            ports: ports.into_iter().collect(),
            env,
            kill_grace_ms,
        }
    })
}

impl Valid {
    /// As a job file, written by hand (not by a serializer) the way a person would.
    fn to_toml(&self) -> String {
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        let mut t = String::new();
        t += &format!("job = {}\n", q(&self.job));
        t += &format!("type = \"{}\"\n", if self.batch { "batch" } else { "service" });
        t += &format!("instances = {}\nmax_failures = {}\n", self.instances, self.max_failures);
        t += &format!("priority = {}\nproduction = {}\n", self.priority, self.production);
        t += "[task]\n";
        t += &format!("command = {}\nuser = {}\n", q(&self.command), q(&self.user));
        t += &format!("cpus = {}\n", f64::from(self.cpus_milli) / 1000.0);
        t += &format!("mem = \"{}KiB\"\ndisk = \"{}KiB\"\n", self.mem_kib, self.disk_kib);
        let ports: Vec<String> = self.ports.iter().map(|p| q(p)).collect();
        t += &format!("ports = [{}]\n", ports.join(", "));
        t += &format!("kill_grace = \"{}ms\"\n", self.kill_grace_ms);
        t += "[task.env]\n";
        for (k, v) in &self.env {
            t += &format!("{k} = {}\n", q(v));
        }
        t
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn valid_specs_decode_as_written(v in valid()) {
        let policy = ValidationPolicy::default();
        let text = v.to_toml();
        let spec = parse_toml(&text, &policy).unwrap_or_else(|e| panic!("{text}\nwas refused:\n{e}"));
        prop_assert_eq!(spec.job.to_string(), v.job.clone());
        prop_assert_eq!(spec.job_type.as_str(), if v.batch { "batch" } else { "service" });
        prop_assert_eq!(spec.instances, v.instances);
        prop_assert_eq!(spec.max_failures, v.max_failures);
        prop_assert_eq!(spec.priority, v.priority);
        prop_assert_eq!(spec.production, v.production);
        prop_assert_eq!(&spec.task.command, &v.command);
        prop_assert_eq!(&spec.task.user, &v.user);
        prop_assert_eq!(spec.task.cpus_milli, v.cpus_milli);
        prop_assert_eq!(spec.task.mem.0, v.mem_kib * 1024);
        prop_assert_eq!(spec.task.disk.0, v.disk_kib * 1024);
        prop_assert_eq!(&spec.task.ports, &v.ports);
        prop_assert_eq!(&spec.task.env, &v.env);
        prop_assert_eq!(spec.task.kill_grace.0, v.kill_grace_ms);

        // And the spec as JSON is an API body that means the same.
        let json = serde_json::to_string(&spec).unwrap();
        let back = parse_json(&json, &policy).unwrap_or_else(|e| panic!("{json}\nwas refused:\n{e}"));
        prop_assert_eq!(back, spec);
    }
}
