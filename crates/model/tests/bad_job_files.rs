//! Job files the decoder must refuse, one row each: the input, and every (path, word) the refusal
//! must contain. Also the JSON form of a few of them, and TOML ⇄ JSON ⇄ `JobSpec` equivalence.

use capstan_model::{parse_json, parse_toml, JobSpec, Problems, ValidationPolicy};

/// What one refusal must say: a problem at `path` whose text (message and hint) contains `word`.
type Expected<'a> = &'a [(&'a str, &'a str)];

/// Refused, and every expected (path, word) is among the problems; every problem has a message.
fn check(input: &str, expected: Expected) {
    check_with(parse_toml(input, &ValidationPolicy::default()), input, expected);
}

fn check_json(input: &str, expected: Expected) {
    check_with(parse_json(input, &ValidationPolicy::default()), input, expected);
}

fn check_with(result: Result<JobSpec, Problems>, input: &str, expected: Expected) {
    let problems = match result {
        Ok(spec) => panic!("accepted a bad job file:\n{input}\nas {spec:#?}"),
        Err(p) => p,
    };
    assert!(!problems.0.is_empty(), "an empty problem list for\n{input}");
    for p in &problems.0 {
        assert!(!p.message.is_empty(), "a problem without a message: {p:?}");
    }
    for (path, word) in expected {
        let found = problems.0.iter().any(|p| p.path == *path && p.to_string().contains(word));
        assert!(found, "expected a problem at `{path}` mentioning `{word}` for\n{input}\ngot:\n{problems}",);
    }
}

/// A valid file; rows below change one thing in it.
const GOOD: &str = r#"
job = "www/prod/hello"
type = "service"
instances = 3

[task]
command = "python3 -m http.server $PORT_HTTP --bind 127.0.0.1"
user = "nobody"
cpus = 0.25
mem = "64MiB"
disk = "256MiB"
ports = ["http"]
kill_grace = "10s"

[task.env]
GREETING = "hello"
"#;

/// `GOOD` with the line starting with `key =` replaced (or removed when `with` is empty).
fn edit(key: &str, with: &str) -> String {
    let prefix = format!("{key} =");
    let mut found = false;
    let lines: Vec<&str> = GOOD
        .lines()
        .filter_map(|l| {
            if l.starts_with(&prefix) {
                found = true;
                (!with.is_empty()).then_some(with)
            } else {
                Some(l)
            }
        })
        .collect();
    assert!(found, "no line `{key} = …` in GOOD");
    lines.join("\n") + "\n"
}

/// `GOOD` with `text` added at the end (inside `[task.env]` unless it opens a table).
fn append(text: &str) -> String {
    format!("{GOOD}{text}\n")
}

#[test]
fn min_healthy_is_a_share_of_a_service_job() {
    let spec = parse_toml(&format!("min_healthy = 0.66\n{GOOD}"), &ValidationPolicy::default()).unwrap();
    assert_eq!(spec.min_healthy, Some(0.66));
    let spec = parse_toml(&format!("min_healthy = 1\n{GOOD}"), &ValidationPolicy::default()).unwrap();
    assert_eq!(spec.min_healthy, Some(1.0), "an integer is a share too");
}

#[test]
fn the_good_file_is_good() {
    let spec = parse_toml(GOOD, &ValidationPolicy::default()).unwrap();
    assert_eq!(spec.instances, 3);
    assert_eq!(spec.task.cpus_milli, 250);
    assert_eq!(spec.task.mem.0, 64 << 20);
    assert_eq!(spec.task.ports, vec!["http".to_string()]);
    assert_eq!(spec.task.env["GREETING"], "hello");
}

#[test]
fn cron_jobs_take_five_fields_six_with_seconds_a_time_zone_and_a_policy() {
    use capstan_model::spec::{CronCollisionPolicy, JobType};
    for (cron, tz, policy) in [
        ("*/5 * * * *", None, None),
        ("30 */10 * * * *", Some("Europe/Paris"), Some("CANCEL_NEW")),
        ("@hourly", Some("UTC"), Some("KILL_EXISTING")),
        ("0 9 * * MON-FRI", Some("America/New_York"), None),
    ] {
        let mut text = edit("type", &format!("type = \"cron\"\ncron = \"{cron}\""));
        if let Some(tz) = tz {
            text = format!("cron_timezone = \"{tz}\"\n{text}");
        }
        if let Some(p) = policy {
            text = format!("cron_collision_policy = \"{p}\"\n{text}");
        }
        let spec = parse_toml(&text, &ValidationPolicy::default()).unwrap_or_else(|p| panic!("{cron}: {p}"));
        assert_eq!(spec.job_type, JobType::Cron);
        assert_eq!(spec.cron.as_deref(), Some(cron));
        assert_eq!(spec.cron_timezone.as_deref(), tz);
        let expected = match policy {
            Some("CANCEL_NEW") => Some(CronCollisionPolicy::CancelNew),
            Some(_) => Some(CronCollisionPolicy::KillExisting),
            None => None,
        };
        assert_eq!(spec.cron_collision_policy, expected);
        // A spec as JSON is a valid API body again.
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(parse_json(&json, &ValidationPolicy::default()).unwrap(), spec);
    }
}

#[test]
fn bad_job_files() {
    let rows: Vec<(&str, String, Expected)> = vec![
        // --- unknown keys, with and without a did-you-mean hint
        ("unknown top-level key", format!("colour = \"red\"\n{GOOD}"), &[("colour", "unknown key")]),
        ("typo at top level", edit("instances", "instance = 3"), &[("instance", "did you mean `instances`")]),
        ("unknown key in [task]", edit("kill_grace", "flavour = \"x\""), &[("task.flavour", "unknown key")]),
        (
            "typo in [task]",
            edit("command", "comand = \"ls\""),
            &[("task.comand", "did you mean `command`"), ("task.command", "required")],
        ),
        (
            "unknown key in [health_check]",
            append("[health_check]\ntype = \"http\"\nport = \"http\"\nintervl = \"5s\"\nbogus = 1"),
            &[("health_check.intervl", "did you mean `interval`"), ("health_check.bogus", "unknown key")],
        ),
        // --- health check timing: at most one check a second, each bounded
        (
            "check interval of 1 ms",
            append("[health_check]\ntype = \"command\"\ncommand = \"true\"\ninterval = \"1ms\"\ntimeout = \"1ms\""),
            &[("health_check.interval", "use 1s to 1h"), ("health_check.timeout", "use 100ms to 1ms")],
        ),
        (
            "check interval above an hour",
            append("[health_check]\ntype = \"command\"\ncommand = \"true\"\ninterval = \"2h\""),
            &[("health_check.interval", "out of range")],
        ),
        (
            "check timeout above a minute",
            append("[health_check]\ntype = \"command\"\ncommand = \"true\"\ninterval = \"10m\"\ntimeout = \"5m\""),
            &[("health_check.timeout", "use 100ms to 1m")],
        ),
        (
            "check timeout above the interval",
            append("[health_check]\ntype = \"command\"\ncommand = \"true\"\ninterval = \"2s\"\ntimeout = \"3s\""),
            &[("health_check.timeout", "at most the interval")],
        ),
        (
            "check timeout of 0s",
            append("[health_check]\ntype = \"command\"\ncommand = \"true\"\ntimeout = \"0s\""),
            &[("health_check.timeout", "use 100ms to 5s")],
        ),
        // --- sizes
        ("decimal unit", edit("mem", "mem = \"12GB\""), &[("task.mem", "GiB")]),
        ("size without a unit", edit("mem", "mem = \"12\""), &[("task.mem", "no unit")]),
        ("negative size", edit("disk", "disk = \"-1MiB\""), &[("task.disk", "not a size")]),
        ("size as an integer", edit("mem", "mem = 12"), &[("task.mem", "12MiB")]),
        ("mem below the minimum", edit("mem", "mem = \"1MiB\""), &[("task.mem", "4MiB")]),
        // --- cpus
        ("negative cpus", edit("cpus", "cpus = -1"), &[("task.cpus", "greater than 0")]),
        ("zero cpus", edit("cpus", "cpus = 0"), &[("task.cpus", "greater than 0")]),
        ("cpus as text", edit("cpus", "cpus = \"a lot\""), &[("task.cpus", "expected a number")]),
        ("cpus not finite", edit("cpus", "cpus = nan"), &[("task.cpus", "finite")]),
        ("too many cpus", edit("cpus", "cpus = 5000"), &[("task.cpus", "4096")]),
        // --- instances
        ("zero instances", edit("instances", "instances = 0"), &[("instances", "out of range")]),
        ("too many instances", edit("instances", "instances = 100001"), &[("instances", "out of range")]),
        ("fractional instances", edit("instances", "instances = 1.5"), &[("instances", "whole number")]),
        ("instances not finite", edit("instances", "instances = nan"), &[("instances", "finite")]),
        // --- job keys
        ("two-part job key", edit("job", "job = \"www/hello\""), &[("job", "role/environment/name")]),
        ("uppercase job key", edit("job", "job = \"WWW/prod/hello\""), &[("job", "lowercase")]),
        ("empty part in job key", edit("job", "job = \"www//hello\""), &[("job", "environment is empty")]),
        ("bad character in job key", edit("job", "job = \"www/prod/hel.lo\""), &[("job", "`.`")]),
        ("four-part job key", edit("job", "job = \"a/b/c/d\""), &[("job", "role/environment/name")]),
        ("job key not a string", edit("job", "job = 7"), &[("job", "expected a string")]),
        ("missing job key", edit("job", ""), &[("job", "required")]),
        // --- command and user
        ("missing command", edit("command", ""), &[("task.command", "required")]),
        ("empty command", edit("command", "command = \"   \""), &[("task.command", "empty")]),
        ("missing user", edit("user", ""), &[("task.user", "required")]),
        ("root user", edit("user", "user = \"root\""), &[("task.user", "root")]),
        ("uid 0", edit("user", "user = \"0\""), &[("task.user", "root")]),
        ("user with a space", edit("user", "user = \"no body\""), &[("task.user", "not a valid user name")]),
        (
            "a table where a string belongs",
            edit("user", "user = { name = \"nobody\" }"),
            &[("task.user", "found a table")],
        ),
        (
            "an array where a string belongs",
            edit("command", "command = [\"ls\", \"-l\"]"),
            &[("task.command", "found an array")],
        ),
        // --- the [task] table itself
        ("missing [task]", "job = \"www/prod/hello\"\ninstances = 1\n".to_string(), &[("task", "required")]),
        ("task is a string", "job = \"www/prod/hello\"\ntask = \"run\"\n".to_string(), &[("task", "expected a table")]),
        // --- ports
        ("uppercase port name", edit("ports", "ports = [\"HTTP\"]"), &[("task.ports[0]", "not a port name")]),
        (
            "port name starting with a digit",
            edit("ports", "ports = [\"8080\"]"),
            &[("task.ports[0]", "not a port name")],
        ),
        ("duplicate port", edit("ports", "ports = [\"http\", \"admin\", \"http\"]"), &[("task.ports[2]", "twice")]),
        ("ports not an array", edit("ports", "ports = \"http\""), &[("task.ports", "array")]),
        // --- environment
        ("reserved PORT_ variable", append("PORT_X = \"1\""), &[("task.env.PORT_X", "reserved")]),
        ("reserved CAPSTAN_ variable", append("CAPSTAN_X = \"1\""), &[("task.env.CAPSTAN_X", "reserved")]),
        ("bad variable name", append("\"1ABC\" = \"1\""), &[("task.env.1ABC", "not an environment variable name")]),
        ("variable holding a table", append("NESTED = { a = 1 }"), &[("task.env.NESTED", "expected a string")]),
        // --- durations
        ("bad kill_grace", edit("kill_grace", "kill_grace = \"10 parsecs\""), &[("task.kill_grace", "not a duration")]),
        (
            "kill_grace as a number",
            edit("kill_grace", "kill_grace = 10"),
            &[("task.kill_grace", "expected a duration")],
        ),
        (
            "kill_grace over an hour",
            edit("kill_grace", "kill_grace = \"2h\""),
            &[("task.kill_grace", "longer than an hour")],
        ),
        // --- job types
        ("system job with instances", edit("type", "type = \"system\""), &[("instances", "remove `instances`")]),
        (
            "system job with limit",
            format!(
                "{}\n[[constraint]]\nattribute = \"rack\"\nlimit = 1\n",
                edit("instances", "").replace("type = \"service\"", "type = \"system\"")
            ),
            &[("constraint[0]", "every matching agent")],
        ),
        ("cron type without a schedule", edit("type", "type = \"cron\""), &[("cron", "is required")]),
        (
            "cron expression with 4 fields",
            edit("type", "type = \"cron\"\ncron = \"* * * *\""),
            &[("cron", "4 fields"), ("cron", "minute hour")],
        ),
        (
            "cron expression out of range",
            edit("type", "type = \"cron\"\ncron = \"61 * * * *\""),
            &[("cron", "not a cron expression")],
        ),
        (
            "cron expression with a year",
            edit("type", "type = \"cron\"\ncron = \"0 0 0 1 1 * 2030\""),
            &[("cron", "7 fields")],
        ),
        ("cron that never fires", edit("type", "type = \"cron\"\ncron = \"0 0 30 2 *\""), &[("cron", "never fires")]),
        (
            "cron every second",
            edit("type", "type = \"cron\"\ncron = \"* * * * * *\""),
            &[
                ("cron", "runs 1s after the run before it"),
                ("cron", "at least 1m apart"),
                ("cron", "--cron-interval-min"),
            ],
        ),
        (
            "cron twice a minute, once an hour",
            edit("type", "type = \"cron\"\ncron = \"0,30 0 * * * *\""),
            &[("cron", "runs 30s after")],
        ),
        (
            "unknown cron time zone",
            edit("type", "type = \"cron\"\ncron = \"* * * * *\"\ncron_timezone = \"Europe/Pariss\""),
            &[("cron_timezone", "not a time zone"), ("cron_timezone", "IANA")],
        ),
        (
            "bad time zone and bad expression at once",
            edit("type", "type = \"cron\"\ncron = \"x y\"\ncron_timezone = \"Nowhere\""),
            &[("cron_timezone", "not a time zone"), ("cron", "2 fields")],
        ),
        (
            "time zone without a schedule",
            edit("type", "type = \"cron\"\ncron_timezone = \"Nowhere\""),
            &[("cron", "is required"), ("cron_timezone", "not a time zone")],
        ),
        (
            "unknown collision policy",
            edit("type", "type = \"cron\"\ncron = \"* * * * *\"\ncron_collision_policy = \"KILL\""),
            &[("cron_collision_policy", "KILL_EXISTING, CANCEL_NEW")],
        ),
        (
            "cron_timezone on a service",
            format!("cron_timezone = \"UTC\"\n{GOOD}"),
            &[("cron_timezone", "only applies")],
        ),
        ("unknown type", edit("type", "type = \"daemon\""), &[("type", "not one of")]),
        ("cron key on a service", format!("cron = \"* * * * *\"\n{GOOD}"), &[("cron", "only applies")]),
        ("min_healthy over 1", format!("min_healthy = 1.5\n{GOOD}"), &[("min_healthy", "not a share")]),
        ("min_healthy below 0", format!("min_healthy = -0.1\n{GOOD}"), &[("min_healthy", "not a share")]),
        ("min_healthy as text", format!("min_healthy = \"66%\"\n{GOOD}"), &[("min_healthy", "expected a number")]),
        (
            "min_healthy on a batch job",
            format!("min_healthy = 0.5\n{}", edit("type", "type = \"batch\"")),
            &[("min_healthy", "only applies to long-running jobs")],
        ),
        // --- syntax
        ("unclosed string", edit("user", "user = \"nobody"), &[("line 8, column 15", "not valid TOML")]),
        ("missing value", edit("cpus", "cpus = "), &[("line 9, column 8", "not valid TOML")]),
        ("duplicate key", edit("mem", "mem = \"64MiB\"\nmem = \"32MiB\""), &[("line 11, column 1", "not valid TOML")]),
    ];
    assert!(rows.len() >= 25);
    for (name, input, expected) in rows {
        eprintln!("--- {name}");
        check(&input, expected);
    }
}

/// A person fixing a file wants every mistake at once, not one per attempt.
#[test]
fn every_mistake_is_reported_at_once() {
    let input = r#"
job = "www/Prod"
type = "cron"
instances = 0
colour = "red"

[task]
comand = "ls"
user = "root"
cpus = -2
mem = "12GB"
disk = 12
ports = ["http", "HTTP", "http"]
kill_grace = "soon"

[task.env]
PORT_HTTP = "80"
CAPSTAN_JOB = "x"
"#;
    check(
        input,
        &[
            ("job", "role/environment/name"),
            ("cron", "is required"),
            ("instances", "out of range"),
            ("colour", "unknown key"),
            ("task.comand", "did you mean `command`"),
            ("task.command", "required"),
            ("task.user", "root"),
            ("task.cpus", "greater than 0"),
            ("task.mem", "GiB"),
            ("task.disk", "no unit"),
            ("task.ports[1]", "not a port name"),
            ("task.ports[2]", "twice"),
            ("task.kill_grace", "not a duration"),
            ("task.env.PORT_HTTP", "reserved"),
            ("task.env.CAPSTAN_JOB", "reserved"),
        ],
    );
}

/// Root is refused by default and allowed only when the operator says so.
#[test]
fn root_is_allowed_only_by_policy() {
    let input = edit("user", "user = \"root\"");
    assert!(parse_toml(&input, &ValidationPolicy::default()).is_err());
    let spec = parse_toml(&input, &ValidationPolicy { allow_root: true, ..Default::default() }).unwrap();
    assert_eq!(spec.task.user, "root");
}

#[test]
fn bad_json_bodies() {
    let task = r#""command": "ls", "user": "nobody", "cpus": 0.25, "mem": "64MiB", "disk": "1MiB""#;
    let rows: Vec<(&str, String, Expected)> = vec![
        ("unknown key", format!(r#"{{"job": "www/prod/hello", "colour": 1, "task": {{{task}}}}}"#), &[("colour", "unknown key")]),
        ("typo in task", format!(r#"{{"job": "www/prod/hello", "task": {{{task}, "portz": []}}}}"#), &[("task.portz", "did you mean `ports`")]),
        (
            "bad size",
            r#"{"job": "www/prod/hello", "task": {"command": "ls", "user": "nobody", "cpus": 1, "mem": "12GB", "disk": "1MiB"}}"#.into(),
            &[("task.mem", "GiB")],
        ),
        (
            "cpus as a string",
            r#"{"job": "www/prod/hello", "task": {"command": "ls", "user": "nobody", "cpus": "0.25", "mem": "64MiB", "disk": "1MiB"}}"#.into(),
            &[("task.cpus", "expected a number")],
        ),
        (
            "root user",
            r#"{"job": "www/prod/hello", "task": {"command": "ls", "user": "root", "cpus": 1, "mem": "64MiB", "disk": "1MiB"}}"#.into(),
            &[("task.user", "root")],
        ),
        ("missing task", r#"{"job": "www/prod/hello"}"#.into(), &[("task", "required")]),
        ("not an object", "[1, 2, 3]".into(), &[("", "expected a table")]),
        ("negative instances", format!(r#"{{"job": "www/prod/hello", "instances": -1, "task": {{{task}}}}}"#), &[("instances", "out of range")]),
        ("huge instances", format!(r#"{{"job": "www/prod/hello", "instances": 18446744073709551615, "task": {{{task}}}}}"#), &[("instances", "whole number")]),
        (
            "system job with distinct_hosts and spread",
            format!(r#"{{"job": "www/prod/hello", "type": "system", "constraint": [{{"distinct_hosts": true}}, {{"spread": "rack"}}], "task": {{{task}}}}}"#),
            &[("constraint[0]", "one instance per agent"), ("constraint[1]", "nothing to spread")],
        ),
        ("system job with instances", format!(r#"{{"job": "www/prod/hello", "type": "system", "instances": 2, "task": {{{task}}}}}"#), &[("instances", "not given")]),
        ("syntax error", "{\n  \"job\": \"www/prod/hello\",\n  \"task\": {,}\n}".into(), &[("line 3, column 12", "not valid JSON")]),
        ("empty body", String::new(), &[("line 1, column 0", "not valid JSON")]),
    ];
    for (name, input, expected) in rows {
        eprintln!("--- {name}");
        check_json(&input, expected);
    }
}

/// The same job as a job file and as an API body.
const GOOD_JSON: &str = r#"{
  "job": "www/prod/hello",
  "type": "service",
  "instances": 3,
  "task": {
    "command": "python3 -m http.server $PORT_HTTP --bind 127.0.0.1",
    "user": "nobody",
    "cpus": 0.25,
    "mem": "64MiB",
    "disk": "256MiB",
    "ports": ["http"],
    "kill_grace": "10s",
    "env": {"GREETING": "hello"}
  }
}"#;

#[test]
fn toml_and_json_decode_to_the_same_spec() {
    let policy = ValidationPolicy::default();
    let from_toml = parse_toml(GOOD, &policy).unwrap();
    let from_json = parse_json(GOOD_JSON, &policy).unwrap();
    assert_eq!(from_toml, from_json);
}

/// A spec written as JSON (what the API returns, what the CLI sends) reads back as itself.
#[test]
fn a_spec_as_json_parses_back_to_itself() {
    let policy = ValidationPolicy::default();
    let batch = r#"
job = "batch/test/crunch-2"
type = "batch"
instances = 7
max_failures = 0
priority = -5
production = true

[task]
command = "./crunch --part $CAPSTAN_INSTANCE"
user = "daemon"
cpus = 1.337
mem = "4097KiB"
disk = "1025B"
kill_grace = "59m 30s 250ms"

[task.env]
N = 3
FLAG = true
"#;
    let system = r#"
job = "infra/prod/node-exporter"
type = "system"

[task]
command = "./node_exporter"
user = "nobody"
cpus = 0.1
mem = "32MiB"
disk = "1MiB"

[[constraint]]
attribute = "role"
in = ["worker", "edge"]
"#;
    let spec = parse_toml(system, &policy).unwrap();
    assert_eq!((spec.job_type, spec.instances), (capstan_model::JobType::System, 0), "instances follow the agents");
    for text in [GOOD, batch, system] {
        let spec = parse_toml(text, &policy).unwrap();
        let json = serde_json::to_string_pretty(&spec).unwrap();
        let back = parse_json(&json, &policy).unwrap_or_else(|e| panic!("{json}\nwas refused:\n{e}"));
        assert_eq!(back, spec, "{json}");
    }
}

/// `[update]`: every problem with its path, and the table's own defaults.
#[test]
fn bad_update_tables() {
    let with = |table: &str| format!("{GOOD}\n[update]\n{table}\n");
    let rows: Vec<(&str, String, Expected)> = vec![
        ("batch_size zero", with("batch_size = 0"), &[("update.batch_size", "out of range")]),
        ("batch_size as text", with("batch_size = \"2\""), &[("update.batch_size", "expected")]),
        ("bad watch", with("watch = \"soon\""), &[("update.watch", "not a duration")]),
        ("negative failures", with("max_total_failures = -1"), &[("update.max_total_failures", "out of range")]),
        (
            "negative per-instance failures",
            with("max_per_instance_failures = -2"),
            &[("update.max_per_instance_failures", "out of range")],
        ),
        ("rollback flag as text", with("rollback_on_failure = \"yes\""), &[("update.rollback_on_failure", "expected")]),
        ("auto_promote as number", with("auto_promote = 1"), &[("update.auto_promote", "expected")]),
        ("more canaries than instances", with("canaries = 4"), &[("update.canaries", "at most 3")]),
        ("typo", with("batchsize = 2"), &[("update.batchsize", "did you mean `batch_size`")]),
        ("not a table", format!("update = 3\n{GOOD}"), &[("update", "expected a table")]),
        (
            "on a batch job",
            with("batch_size = 1").replace("type = \"service\"", "type = \"batch\""),
            &[("update", "only applies to type = \"service\"")],
        ),
    ];
    for (name, input, expected) in rows {
        eprintln!("--- {name}");
        check(&input, expected);
    }
    // Several at once.
    check(
        &with("batch_size = 0\nwatch = 5\ncanaries = 9"),
        &[("update.batch_size", "out of range"), ("update.watch", "duration"), ("update.canaries", "9 canaries")],
    );
}

#[test]
fn an_update_table_is_accepted_with_its_defaults() {
    let policy = ValidationPolicy::default();
    let spec =
        parse_toml(&format!("{GOOD}\n[update]\nbatch_size = 2\nwatch = \"2s\"\ncanaries = 1\n"), &policy).unwrap();
    let u = spec.update.clone().expect("an update table");
    assert_eq!((u.batch_size, u.watch.0, u.canaries), (2, 2000, 1));
    assert_eq!((u.max_per_instance_failures, u.max_total_failures), (0, 0));
    assert!(u.rollback_on_failure && !u.auto_promote);
    let json = serde_json::to_string(&spec).unwrap();
    assert_eq!(parse_json(&json, &policy).unwrap(), spec, "{json}");
}

/// The operator may allow closer runs (`capstan master --cron-interval-min`), or ask for fewer.
#[test]
fn the_cron_interval_minimum_is_the_operators() {
    let every_2s = edit("type", "type = \"cron\"\ncron = \"*/2 * * * * *\"");
    let lenient = ValidationPolicy { cron_interval_min_ms: 1_000, ..Default::default() };
    assert!(parse_toml(&every_2s, &lenient).is_ok());
    let strict = ValidationPolicy { cron_interval_min_ms: 3_600_000, ..Default::default() };
    let every_5m = edit("type", "type = \"cron\"\ncron = \"*/5 * * * *\"");
    check_with(parse_toml(&every_5m, &strict), &every_5m, &[("cron", "at least 1h apart")]);
}
