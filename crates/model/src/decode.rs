//! Job files and API bodies → `JobSpec`, reporting *every* problem with its path and a hint.
//!
//! TOML and JSON are both read into one generic tree (`serde_json::Value`) and then walked by hand:
//! serde's derive stops at the first error, and a person fixing a job file wants all of them at once.

use crate::ids::JobKey;
use crate::resources::{cpus_to_milli, ByteSize, MIB};
use crate::spec::*;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One thing wrong with an input, at a path such as `task.mem` or `constraint[1].limit`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub path: String,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)?;
        } else {
            write!(f, "{}: {}", self.path, self.message)?;
        }
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// Every problem found in one input; never empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// What the operator allows; the master passes its settings here.
#[derive(Clone, Debug)]
pub struct ValidationPolicy {
    /// Tasks may run as root (the operator said so explicitly).
    pub allow_root: bool,
    /// Cron schedules whose runs come closer than this are refused
    /// (default [`crate::cron::CRON_INTERVAL_MIN_DEFAULT_MS`]).
    pub cron_interval_min_ms: u64,
}

impl Default for ValidationPolicy {
    fn default() -> Self {
        ValidationPolicy { allow_root: false, cron_interval_min_ms: crate::cron::CRON_INTERVAL_MIN_DEFAULT_MS }
    }
}

pub const INSTANCES_MAX: u32 = 100_000;
/// Constraints in one job at most: each is checked against every candidate agent.
pub const CONSTRAINTS_MAX: usize = 64;
/// The longest task user name (Linux's `LOGIN_NAME_MAX` less the terminating byte is 255; common
/// tools cut at 32).
pub const USER_NAME_BYTES_MAX: usize = 32;
pub const PORTS_MAX: usize = 64;
pub const COMMAND_LEN_MAX: usize = 64 * 1024;
pub const ENV_MAX: usize = 1024;
pub const MEM_MIN: u64 = 4 * MIB;
/// Health checks run at most once a second: a command check is a process the agent starts, so a
/// job must not be able to make it start hundreds a second.
pub const HEALTH_CHECK_INTERVAL_MIN_MS: u64 = 1_000;
pub const HEALTH_CHECK_INTERVAL_MAX_MS: u64 = 3_600_000;
/// A check's timeout: at least this, at most [`HEALTH_CHECK_TIMEOUT_MAX_MS`] and never above the
/// interval (checks never overlap).
pub const HEALTH_CHECK_TIMEOUT_MIN_MS: u64 = 100;
pub const HEALTH_CHECK_TIMEOUT_MAX_MS: u64 = 60_000;

/// A duration in milliseconds as people write it: `1s`, `10s`, `1m`, `1h 30m`, `500ms`.
fn words_ms(ms: u64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
}

/// Parses and validates a job file.
pub fn parse_toml(text: &str, policy: &ValidationPolicy) -> Result<JobSpec, Problems> {
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        let message = e.message().to_string();
        let at = e
            .span()
            .map(|s| {
                let (line, col) = line_col(text, s.start);
                format!("line {line}, column {col}")
            })
            .unwrap_or_default();
        Problems(vec![Problem { path: at, message: format!("not valid TOML: {message}"), hint: None }])
    })?;
    // JSON has no NaN or infinity: such a float would become null and read as "absent" (so
    // `instances = nan` would mean the default). Refuse it at its path instead.
    let mut non_finite = Vec::new();
    let value = toml_to_json(toml::Value::Table(table), "", &mut non_finite);
    let result = decode_value(&value, policy);
    if non_finite.is_empty() {
        return result;
    }
    let mut problems: Vec<Problem> = non_finite
        .iter()
        .map(|path| Problem {
            path: path.clone(),
            message: "is not a finite number".into(),
            hint: Some("nan and inf are not allowed here".into()),
        })
        .collect();
    if let Err(Problems(rest)) = result {
        problems.extend(rest.into_iter().filter(|p| !non_finite.contains(&p.path) && !p.path.is_empty()));
    }
    Err(Problems(problems))
}

/// Parses and validates an API body.
pub fn parse_json(text: &str, policy: &ValidationPolicy) -> Result<JobSpec, Problems> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Problems(vec![Problem {
            path: format!("line {}, column {}", e.line(), e.column()),
            message: format!("not valid JSON: {e}"),
            hint: None,
        }])
    })?;
    decode_value(&value, policy)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

/// Converts a TOML tree; the paths of non-finite floats (which JSON cannot hold) go to `non_finite`.
fn toml_to_json(v: toml::Value, path: &str, non_finite: &mut Vec<String>) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f).map(Value::Number).unwrap_or_else(|| {
            non_finite.push(path.to_string());
            Value::Null
        }),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(
            a.into_iter().enumerate().map(|(i, v)| toml_to_json(v, &format!("{path}[{i}]"), non_finite)).collect(),
        ),
        toml::Value::Table(t) => Value::Object(
            t.into_iter().map(|(k, v)| (k.clone(), toml_to_json(v, &join(path, &k), non_finite))).collect(),
        ),
    }
}

/// Decodes a generic tree (from TOML or JSON) into a validated `JobSpec`.
pub fn decode_value(value: &Value, policy: &ValidationPolicy) -> Result<JobSpec, Problems> {
    let mut cx = Cx { problems: Vec::new() };
    let spec = cx.job(value, policy);
    match spec {
        Some(spec) if cx.problems.is_empty() => Ok(spec),
        _ => {
            if cx.problems.is_empty() {
                cx.problems.push(Problem { path: String::new(), message: "invalid job".into(), hint: None });
            }
            Err(Problems(cx.problems))
        }
    }
}

struct Cx {
    problems: Vec<Problem>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a float",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table",
    }
}

/// Edit distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A table being read: remembers which keys were consumed to report the rest as unknown.
struct Obj<'a> {
    path: String,
    map: &'a Map<String, Value>,
    known: &'static [&'static str],
}

impl Cx {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>, hint: Option<String>) {
        self.problems.push(Problem { path: path.into(), message: message.into(), hint });
    }

    fn obj<'a>(&mut self, path: &str, v: &'a Value, known: &'static [&'static str]) -> Option<Obj<'a>> {
        match v {
            Value::Object(map) => {
                for key in map.keys() {
                    if !known.contains(&key.as_str()) {
                        let best = known.iter().min_by_key(|k| distance(key, k)).filter(|k| distance(key, k) <= 2);
                        let hint = match best {
                            Some(k) => format!("did you mean `{k}`?"),
                            None => format!("known keys here: {}", known.join(", ")),
                        };
                        self.err(join(path, key), format!("unknown key `{key}`"), Some(hint));
                    }
                }
                Some(Obj { path: path.to_string(), map, known })
            }
            other => {
                self.err(path, format!("expected a table, found {}", kind_of(other)), None);
                None
            }
        }
    }

    fn get<'a>(&mut self, o: &Obj<'a>, key: &'static str) -> Option<&'a Value> {
        debug_assert!(o.known.contains(&key), "{key} not declared as known");
        match o.map.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    fn required<'a>(&mut self, o: &Obj<'a>, key: &'static str, example: &str) -> Option<&'a Value> {
        let v = self.get(o, key);
        if v.is_none() {
            self.err(join(&o.path, key), "is required", Some(format!("add e.g. {key} = {example}")));
        }
        v
    }

    fn string(&mut self, path: &str, v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            other => {
                self.err(path, format!("expected a string, found {}", kind_of(other)), None);
                None
            }
        }
    }

    fn boolean(&mut self, path: &str, v: &Value) -> Option<bool> {
        match v {
            Value::Bool(b) => Some(*b),
            other => {
                self.err(path, format!("expected true or false, found {}", kind_of(other)), None);
                None
            }
        }
    }

    fn integer(&mut self, path: &str, v: &Value, min: i64, max: i64) -> Option<i64> {
        match v.as_i64() {
            Some(i) if i < min || i > max => {
                self.err(path, format!("{i} is out of range"), Some(format!("use a whole number from {min} to {max}")));
                None
            }
            Some(i) => Some(i),
            // A whole number past i64 (e.g. 2^63) is a number out of range, not a wrong kind.
            None if v.is_u64() => {
                self.err(path, format!("{v} is out of range"), Some(format!("use a whole number from {min} to {max}")));
                None
            }
            None => {
                self.err(path, format!("expected a whole number, found {}", kind_of(v)), None);
                None
            }
        }
    }

    fn size(&mut self, path: &str, v: &Value) -> Option<ByteSize> {
        match v {
            Value::String(s) => match s.parse::<ByteSize>() {
                Ok(b) => Some(b),
                Err(e) => {
                    self.err(path, e, Some("sizes look like \"64MiB\" or \"1GiB\"".into()));
                    None
                }
            },
            Value::Number(n) => {
                self.err(
                    path,
                    format!("{n} has no unit"),
                    Some(format!("write a string with a unit, e.g. \"{n}MiB\"")),
                );
                None
            }
            other => {
                self.err(path, format!("expected a size such as \"64MiB\", found {}", kind_of(other)), None);
                None
            }
        }
    }

    fn duration(&mut self, path: &str, v: &Value) -> Option<DurationMs> {
        match v {
            Value::String(s) => match s.parse::<DurationMs>() {
                Ok(d) => Some(d),
                Err(e) => {
                    self.err(path, e, None);
                    None
                }
            },
            other => {
                self.err(
                    path,
                    format!("expected a duration such as \"10s\", found {}", kind_of(other)),
                    Some("durations are strings: \"500ms\", \"10s\", \"5m\"".into()),
                );
                None
            }
        }
    }

    fn enum_of<T: Copy>(&mut self, path: &str, v: &Value, options: &[(&str, T)]) -> Option<T> {
        let s = self.string(path, v)?;
        match options.iter().find(|(name, _)| *name == s) {
            Some((_, t)) => Some(*t),
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.err(path, format!("\"{s}\" is not one of {}", names.join(", ")), None);
                None
            }
        }
    }

    fn job(&mut self, v: &Value, policy: &ValidationPolicy) -> Option<JobSpec> {
        const KNOWN: &[&str] = &[
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
        ];
        let o = self.obj("", v, KNOWN)?;

        let key = self.required(&o, "job", "\"www/prod/hello\"").and_then(|v| {
            let s = self.string("job", v)?;
            match s.parse::<JobKey>() {
                Ok(k) => Some(k),
                Err(e) => {
                    self.err("job", e.0, Some("a job key is role/environment/name, e.g. \"www/prod/hello\"".into()));
                    None
                }
            }
        });
        let job_type = match self.get(&o, "type") {
            None => Some(JobType::Service),
            Some(v) => self.enum_of(
                "type",
                v,
                &[
                    ("service", JobType::Service),
                    ("batch", JobType::Batch),
                    ("cron", JobType::Cron),
                    ("system", JobType::System),
                ],
            ),
        };
        let is_system = job_type == Some(JobType::System);
        let instances = match self.get(&o, "instances") {
            None if is_system => Some(0),
            Some(v) if is_system => self.system_instances(v),
            None => Some(1),
            Some(v) => self.integer("instances", v, 1, i64::from(INSTANCES_MAX)).map(|i| i as u32),
        };
        let max_failures = match self.get(&o, "max_failures") {
            None => Some(3),
            Some(v) => self.integer("max_failures", v, 0, 1000).map(|i| i as u32),
        };
        let priority = match self.get(&o, "priority") {
            None => Some(0),
            Some(v) => self.integer("priority", v, -1_000_000, 1_000_000).map(|i| i as i32),
        };
        let production = match self.get(&o, "production") {
            None => Some(false),
            Some(v) => self.boolean("production", v),
        };
        let placement = match self.get(&o, "placement") {
            None => Some(PlacementPolicy::Binpack),
            Some(v) => self.enum_of(
                "placement",
                v,
                &[("binpack", PlacementPolicy::Binpack), ("spread", PlacementPolicy::Spread)],
            ),
        };
        let cron = self.get(&o, "cron").and_then(|v| self.string("cron", v));
        let cron_timezone = self.get(&o, "cron_timezone").and_then(|v| self.string("cron_timezone", v));
        let cron_collision_policy = self.get(&o, "cron_collision_policy").and_then(|v| {
            self.enum_of(
                "cron_collision_policy",
                v,
                &[("KILL_EXISTING", CronCollisionPolicy::KillExisting), ("CANCEL_NEW", CronCollisionPolicy::CancelNew)],
            )
        });
        let is_cron = job_type == Some(JobType::Cron);
        for (field, present) in [
            ("cron", cron.is_some()),
            ("cron_timezone", cron_timezone.is_some()),
            ("cron_collision_policy", cron_collision_policy.is_some()),
        ] {
            if present && !is_cron {
                self.err(field, "only applies to type = \"cron\"", None);
            }
        }
        if is_cron {
            self.cron_schedule(cron.as_deref(), cron_timezone.as_deref(), policy.cron_interval_min_ms);
        }
        let replace_after = self.get(&o, "replace_after").and_then(|v| match v {
            Value::String(s) if s == "never" => Some(ReplaceAfter::Never),
            other => self.duration("replace_after", other).map(ReplaceAfter::After),
        });
        let min_healthy = self.get(&o, "min_healthy").and_then(|v| match v.as_f64() {
            Some(f) if (0.0..=1.0).contains(&f) => Some(f),
            Some(f) => {
                self.err("min_healthy", format!("{f} is not a share"), Some("use a number from 0.0 to 1.0".into()));
                None
            }
            None => {
                self.err("min_healthy", format!("expected a number, found {}", kind_of(v)), None);
                None
            }
        });
        if min_healthy.is_some() && matches!(job_type, Some(JobType::Batch | JobType::Cron)) {
            self.err(
                "min_healthy",
                "only applies to long-running jobs (type = \"service\" or \"system\")",
                Some("remove it: drains leave batch tasks to finish".into()),
            );
        }
        let task = match self.get(&o, "task") {
            None => {
                self.err("task", "is required", Some("add a [task] table with command, user, cpus, mem, disk".into()));
                None
            }
            Some(v) => self.task(v, policy),
        };
        let health_check = self.get(&o, "health_check").and_then(|v| self.health_check(v, task.as_ref()));
        let update = self.get(&o, "update").and_then(|v| self.update(v));
        // Checked on the raw table too, so that it is reported beside the table's own problems.
        let canaries = update
            .as_ref()
            .map(|u| i64::from(u.canaries))
            .or_else(|| self.get(&o, "update").and_then(|u| u.get("canaries")).and_then(|c| c.as_i64()));
        if let (Some(c), Some(n)) = (canaries, instances) {
            if c > i64::from(n) {
                self.err(
                    "update.canaries",
                    format!("{c} canaries but the job has {n} instances"),
                    Some(format!("use at most {n}")),
                );
            }
        }
        if update.is_some() && job_type.is_some_and(|t| t != JobType::Service) {
            self.err(
                "update",
                "only applies to type = \"service\"",
                Some("remove [update]; other job types are not updated in place".into()),
            );
        }
        let constraint = match self.get(&o, "constraint") {
            None => Some(Vec::new()),
            Some(Value::Array(items)) if items.len() > CONSTRAINTS_MAX => {
                self.err(
                    "constraint",
                    format!("{} constraints; a job may have at most {CONSTRAINTS_MAX}", items.len()),
                    Some("combine values with `in = [...]`".into()),
                );
                None
            }
            Some(Value::Array(items)) => {
                let parsed: Vec<Option<ConstraintSpec>> =
                    items.iter().enumerate().map(|(i, v)| self.constraint(&format!("constraint[{i}]"), v)).collect();
                parsed.into_iter().collect()
            }
            Some(other) => {
                self.err(
                    "constraint",
                    format!("expected an array of tables, found {}", kind_of(other)),
                    Some("write each constraint as a [[constraint]] table".into()),
                );
                None
            }
        };

        if let (true, Some(constraint)) = (is_system, &constraint) {
            self.system_constraints(constraint);
        }
        Some(JobSpec {
            job: key?,
            job_type: job_type?,
            instances: instances?,
            max_failures: max_failures?,
            priority: priority?,
            production: production?,
            placement: placement?,
            cron,
            cron_timezone,
            cron_collision_policy,
            replace_after,
            min_healthy,
            task: task?,
            health_check,
            update,
            constraint: constraint?,
        })
    }

    /// A cron job's schedule: the expression is required and must parse, the time zone must exist.
    fn cron_schedule(&mut self, cron: Option<&str>, timezone: Option<&str>, interval_min_ms: u64) {
        let Some(expr) = cron else {
            self.err(
                "cron",
                "is required for type = \"cron\"",
                Some("add e.g. cron = \"*/5 * * * *\" (minute hour day-of-month month day-of-week)".into()),
            );
            if let Some(tz) = timezone {
                if let Err(problems) = crate::cron::CronSchedule::parse("* * * * *", Some(tz)) {
                    for p in problems {
                        self.err(p.field, p.message, Some(p.hint));
                    }
                }
            }
            return;
        };
        match crate::cron::CronSchedule::parse(expr, timezone) {
            Err(problems) => {
                for p in problems {
                    self.err(p.field, p.message, Some(p.hint));
                }
            }
            Ok(schedule) => {
                if let Some(every) = schedule.interval_min_ms().filter(|ms| *ms < interval_min_ms) {
                    self.err(
                        "cron",
                        format!(
                            "\"{expr}\" runs {} after the run before it; runs of a cron job must be at least {} apart",
                            words_ms(every),
                            words_ms(interval_min_ms)
                        ),
                        Some(format!(
                            "choose a schedule whose runs are at least {} apart, e.g. \"* * * * *\" (every minute); \
                             a job that must run more often is a service; the cluster's operator sets the \
                             minimum with `capstan master --cron-interval-min`",
                            words_ms(interval_min_ms)
                        )),
                    );
                }
            }
        }
    }

    fn task(&mut self, v: &Value, policy: &ValidationPolicy) -> Option<TaskSpec> {
        const KNOWN: &[&str] = &["command", "user", "cpus", "mem", "disk", "ports", "env", "kill_grace"];
        let o = self.obj("task", v, KNOWN)?;
        let command = self.required(&o, "command", "\"./server --port $PORT_HTTP\"").and_then(|v| {
            let s = self.string("task.command", v)?;
            if s.trim().is_empty() {
                self.err("task.command", "is empty", Some("give the command line to run".into()));
                None
            } else if s.len() > COMMAND_LEN_MAX {
                self.err("task.command", format!("is longer than {COMMAND_LEN_MAX} bytes"), None);
                None
            } else if s.contains('\0') {
                self.err("task.command", "contains a NUL byte", None);
                None
            } else {
                Some(s)
            }
        });
        let user = self.required(&o, "user", "\"nobody\"").and_then(|v| {
            let s = self.string("task.user", v)?;
            // Debian's (and POSIX's portable) user names: lower case, never starting with a digit
            // or a dash, so that `ROOT` or `-x` are refused here rather than retried at launch.
            let starts_well = s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') || s == "0";
            if s.is_empty()
                || s.len() > USER_NAME_BYTES_MAX
                || !starts_well
                || !s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' || c == '.')
            {
                self.err(
                    "task.user",
                    format!("\"{s}\" is not a valid user name"),
                    Some(format!(
                        "user names are lower case letters, digits, '_', '-' and '.', start with a letter or '_', \
                         and have at most {USER_NAME_BYTES_MAX} bytes"
                    )),
                );
                return None;
            }
            if (s == "root" || s == "0") && !policy.allow_root {
                self.err(
                    "task.user",
                    "tasks may not run as root",
                    Some("use an unprivileged user such as \"nobody\"; an operator can allow root with --allow-root-tasks".into()),
                );
                return None;
            }
            Some(s)
        });
        let cpus_milli = self.required(&o, "cpus", "0.25").and_then(|v| match v.as_f64() {
            Some(f) => match cpus_to_milli(f) {
                Ok(m) => Some(m),
                Err(e) => {
                    self.err("task.cpus", e, Some("cpus is a positive number such as 0.25 or 2".into()));
                    None
                }
            },
            None => {
                self.err("task.cpus", format!("expected a number, found {}", kind_of(v)), Some("cpus = 0.25".into()));
                None
            }
        });
        let mem = self.required(&o, "mem", "\"64MiB\"").and_then(|v| self.size("task.mem", v));
        let mem = mem.and_then(|m| {
            if m.0 < MEM_MIN {
                self.err("task.mem", format!("{m} is too little to run a process"), Some("use at least 4MiB".into()));
                None
            } else {
                Some(m)
            }
        });
        let disk = self.required(&o, "disk", "\"256MiB\"").and_then(|v| self.size("task.disk", v)).and_then(|d| {
            if d.0 == 0 {
                // "0B" once meant "no limit at all"; every task has a disk limit.
                self.err(
                    "task.disk",
                    "must be more than 0B: every task has a disk limit",
                    Some("give the space the task may write, e.g. \"256MiB\"".into()),
                );
                return None;
            }
            Some(d)
        });
        let ports = match self.get(&o, "ports") {
            None => Some(Vec::new()),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                let mut seen = BTreeSet::new();
                let mut ok = true;
                for (i, item) in items.iter().enumerate() {
                    let path = format!("task.ports[{i}]");
                    match self.string(&path, item) {
                        Some(name) => {
                            let valid = !name.is_empty()
                                && name.len() <= 32
                                && name.as_bytes()[0].is_ascii_lowercase()
                                && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                            if !valid {
                                self.err(
                                    path,
                                    format!("\"{name}\" is not a port name"),
                                    Some(
                                        "use lowercase letters, digits and _, starting with a letter: \"http\"".into(),
                                    ),
                                );
                                ok = false;
                            } else if !seen.insert(name.clone()) {
                                self.err(path, format!("port \"{name}\" is named twice"), None);
                                ok = false;
                            } else {
                                out.push(name);
                            }
                        }
                        None => ok = false,
                    }
                }
                if out.len() > PORTS_MAX {
                    self.err("task.ports", format!("more than {PORTS_MAX} ports"), None);
                    ok = false;
                }
                ok.then_some(out)
            }
            Some(other) => {
                self.err(
                    "task.ports",
                    format!("expected an array of names, found {}", kind_of(other)),
                    Some("ports = [\"http\"]".into()),
                );
                None
            }
        };
        let env = match self.get(&o, "env") {
            None => Some(BTreeMap::new()),
            Some(Value::Object(map)) => {
                let mut out = BTreeMap::new();
                let mut ok = true;
                for (k, v) in map {
                    let path = format!("task.env.{k}");
                    let valid_name = !k.is_empty()
                        && !k.as_bytes()[0].is_ascii_digit()
                        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !valid_name {
                        self.err(
                            &path,
                            format!("`{k}` is not an environment variable name"),
                            Some("use letters, digits and _, not starting with a digit".into()),
                        );
                        ok = false;
                    } else if k.starts_with("CAPSTAN_") || k.starts_with("PORT_") {
                        self.err(&path, format!("`{k}` is reserved: Capstan sets CAPSTAN_* and PORT_* itself"), None);
                        ok = false;
                    }
                    match v {
                        Value::String(s) if !s.contains('\0') => {
                            out.insert(k.clone(), s.clone());
                        }
                        Value::Number(n) => {
                            out.insert(k.clone(), n.to_string());
                        }
                        Value::Bool(b) => {
                            out.insert(k.clone(), b.to_string());
                        }
                        other => {
                            self.err(&path, format!("expected a string, found {}", kind_of(other)), None);
                            ok = false;
                        }
                    }
                }
                if out.len() > ENV_MAX {
                    self.err("task.env", format!("more than {ENV_MAX} variables"), None);
                    ok = false;
                }
                ok.then_some(out)
            }
            Some(other) => {
                self.err(
                    "task.env",
                    format!("expected a table, found {}", kind_of(other)),
                    Some("[task.env] then NAME = \"value\" lines".into()),
                );
                None
            }
        };
        let kill_grace = match self.get(&o, "kill_grace") {
            None => Some(TaskSpec::DEFAULT_KILL_GRACE),
            Some(v) => self.duration("task.kill_grace", v).and_then(|d| {
                if d.0 > 3_600_000 {
                    self.err("task.kill_grace", format!("{d} is longer than an hour"), None);
                    None
                } else {
                    Some(d)
                }
            }),
        };
        Some(TaskSpec {
            command: command?,
            user: user?,
            cpus_milli: cpus_milli?,
            mem: mem?,
            disk: disk?,
            ports: ports?,
            env: env?,
            kill_grace: kill_grace?,
        })
    }

    /// `[health_check]`; its interval and timeout within [`HEALTH_CHECK_INTERVAL_MIN_MS`] …
    /// [`HEALTH_CHECK_INTERVAL_MAX_MS`] and [`HEALTH_CHECK_TIMEOUT_MIN_MS`] … the smaller of
    /// [`HEALTH_CHECK_TIMEOUT_MAX_MS`] and the interval.
    fn health_check(&mut self, v: &Value, task: Option<&TaskSpec>) -> Option<HealthCheckSpec> {
        const KNOWN: &[&str] =
            &["type", "port", "path", "command", "interval", "timeout", "grace_period", "consecutive_failures"];
        let o = self.obj("health_check", v, KNOWN)?;
        let check_type = self.required(&o, "type", "\"http\"").and_then(|v| {
            self.enum_of(
                "health_check.type",
                v,
                &[
                    ("http", HealthCheckType::Http),
                    ("tcp", HealthCheckType::Tcp),
                    ("command", HealthCheckType::Command),
                ],
            )
        });
        let port = self.get(&o, "port").and_then(|v| self.string("health_check.port", v));
        let path = self.get(&o, "path").and_then(|v| self.string("health_check.path", v));
        let command = self.get(&o, "command").and_then(|v| self.string("health_check.command", v));
        let dur = |cx: &mut Cx, key: &'static str, default: u64| match cx.get(&o, key) {
            None => Some(DurationMs(default)),
            Some(v) => cx.duration(&format!("health_check.{key}"), v),
        };
        let interval = dur(self, "interval", 5_000);
        let timeout = dur(self, "timeout", 2_000);
        let grace_period = dur(self, "grace_period", 10_000);
        let consecutive_failures = match self.get(&o, "consecutive_failures") {
            None => Some(3),
            Some(v) => self.integer("health_check.consecutive_failures", v, 1, 100).map(|i| i as u32),
        };
        match check_type {
            Some(HealthCheckType::Http | HealthCheckType::Tcp) => match &port {
                None => self.err(
                    "health_check.port",
                    "is required for http and tcp checks",
                    Some("name one of task.ports".into()),
                ),
                Some(p) => {
                    if let Some(t) = task {
                        if !t.ports.contains(p) {
                            self.err("health_check.port", format!("\"{p}\" is not one of task.ports"), None);
                        }
                    }
                }
            },
            Some(HealthCheckType::Command) if command.is_none() => {
                self.err("health_check.command", "is required for command checks", None)
            }
            _ => {}
        }
        if let (Some(path), Some(HealthCheckType::Http)) = (&path, check_type) {
            if !path.starts_with('/') {
                self.err("health_check.path", format!("\"{path}\" must start with /"), None);
            }
        }
        if let Some(i) = interval {
            if !(HEALTH_CHECK_INTERVAL_MIN_MS..=HEALTH_CHECK_INTERVAL_MAX_MS).contains(&i.0) {
                self.err(
                    "health_check.interval",
                    format!("{i} is out of range: a check runs at most once a second and at least once an hour"),
                    Some(format!(
                        "use {} to {}",
                        DurationMs(HEALTH_CHECK_INTERVAL_MIN_MS),
                        DurationMs(HEALTH_CHECK_INTERVAL_MAX_MS)
                    )),
                );
            }
        }
        if let Some(t) = timeout {
            let max = interval.map_or(HEALTH_CHECK_TIMEOUT_MAX_MS, |i| i.0.min(HEALTH_CHECK_TIMEOUT_MAX_MS));
            if !(HEALTH_CHECK_TIMEOUT_MIN_MS..=max).contains(&t.0) {
                self.err(
                    "health_check.timeout",
                    format!("{t} is out of range: it must be at most the interval and at most a minute"),
                    Some(format!("use {} to {}", DurationMs(HEALTH_CHECK_TIMEOUT_MIN_MS), DurationMs(max))),
                );
            }
        }
        Some(HealthCheckSpec {
            check_type: check_type?,
            port,
            path: path.or_else(|| (check_type == Some(HealthCheckType::Http)).then(|| "/".to_string())),
            command,
            interval: interval?,
            timeout: timeout?,
            grace_period: grace_period?,
            consecutive_failures: consecutive_failures?,
        })
    }

    fn update(&mut self, v: &Value) -> Option<UpdateSpec> {
        const KNOWN: &[&str] = &[
            "batch_size",
            "watch",
            "max_per_instance_failures",
            "max_total_failures",
            "rollback_on_failure",
            "canaries",
            "auto_promote",
        ];
        let o = self.obj("update", v, KNOWN)?;
        let int = |cx: &mut Cx, key: &'static str, min: i64, default: u32| match cx.get(&o, key) {
            None => Some(default),
            Some(v) => cx.integer(&format!("update.{key}"), v, min, i64::from(INSTANCES_MAX)).map(|i| i as u32),
        };
        let batch_size = int(self, "batch_size", 1, 1);
        let max_per_instance_failures = int(self, "max_per_instance_failures", 0, 0);
        let max_total_failures = int(self, "max_total_failures", 0, 0);
        let canaries = int(self, "canaries", 0, 0);
        let watch = match self.get(&o, "watch") {
            None => Some(DurationMs(10_000)),
            Some(v) => self.duration("update.watch", v),
        };
        let flag = |cx: &mut Cx, key: &'static str, default: bool| match cx.get(&o, key) {
            None => Some(default),
            Some(v) => cx.boolean(&format!("update.{key}"), v),
        };
        let rollback_on_failure = flag(self, "rollback_on_failure", true);
        let auto_promote = flag(self, "auto_promote", false);
        Some(UpdateSpec {
            batch_size: batch_size?,
            watch: watch?,
            max_per_instance_failures: max_per_instance_failures?,
            max_total_failures: max_total_failures?,
            rollback_on_failure: rollback_on_failure?,
            canaries: canaries?,
            auto_promote: auto_promote?,
        })
    }

    fn constraint(&mut self, path: &str, v: &Value) -> Option<ConstraintSpec> {
        const KNOWN: &[&str] = &["attribute", "value", "not", "in", "limit", "distinct_hosts", "spread"];
        let o = self.obj(path, v, KNOWN)?;
        let s = |cx: &mut Cx, key: &'static str| cx.get(&o, key).and_then(|v| cx.string(&join(path, key), v));
        let attribute = s(self, "attribute");
        let value = s(self, "value");
        let not = s(self, "not");
        let spread = s(self, "spread");
        let in_set = self.get(&o, "in").and_then(|v| match v {
            Value::Array(items) if !items.is_empty() => {
                items.iter().enumerate().map(|(i, x)| self.string(&format!("{path}.in[{i}]"), x)).collect()
            }
            _ => {
                self.err(join(path, "in"), "expected a non-empty array of strings", None);
                None
            }
        });
        let limit =
            self.get(&o, "limit").and_then(|v| self.integer(&join(path, "limit"), v, 1, 100_000)).map(|i| i as u32);
        let distinct_hosts =
            self.get(&o, "distinct_hosts").and_then(|v| self.boolean(&join(path, "distinct_hosts"), v));
        if distinct_hosts == Some(false) {
            self.err(join(path, "distinct_hosts"), "false asks for nothing", Some("remove this constraint".into()));
        }
        let forms = [value.is_some(), not.is_some(), in_set.is_some(), limit.is_some()].iter().filter(|b| **b).count();
        let standalone = [distinct_hosts.is_some(), spread.is_some()].iter().filter(|b| **b).count();
        if attribute.is_some() {
            if forms != 1 || standalone != 0 {
                self.err(
                    path,
                    "a constraint on an attribute takes exactly one of value, not, in, limit",
                    Some("e.g. attribute = \"rack\" and limit = 1".into()),
                );
            }
        } else if forms != 0 || standalone != 1 {
            self.err(
                path,
                "a constraint needs an attribute (with value, not, in or limit), or distinct_hosts = true, or spread = \"ATTRIBUTE\"",
                None,
            );
        }
        Some(ConstraintSpec { attribute, value, not, in_set, limit, distinct_hosts, spread })
    }
}

/// System jobs (`type = "system"`): one instance on every agent that matches the constraints.
impl Cx {
    /// A system job's instance count follows its matching agents: `instances` is not given. The
    /// spec's own JSON form writes `0` (not fixed), which is accepted so that it decodes again.
    fn system_instances(&mut self, v: &Value) -> Option<u32> {
        if v.as_u64() == Some(0) {
            return Some(0);
        }
        self.err(
            "instances",
            "a system job runs one instance on every agent that matches its constraints; its instance count is not given",
            Some("remove `instances`; choose agents with [[constraint]] value, not or in".into()),
        );
        None
    }

    /// Only the constraints that choose agents make sense: `distinct_hosts`, `limit` and `spread`
    /// are about spreading a fixed number of instances, and are refused rather than ignored.
    fn system_constraints(&mut self, constraints: &[ConstraintSpec]) {
        for (i, c) in constraints.iter().enumerate() {
            let path = format!("constraint[{i}]");
            let why = match c.kind() {
                Some(Constraint::DistinctHosts) => "a system job runs at most one instance per agent already",
                Some(Constraint::Limit { .. }) => {
                    "a system job runs on every matching agent; a limit per value would leave matching agents without their instance"
                }
                Some(Constraint::Spread { .. }) => "a system job runs on every matching agent; there is nothing to spread",
                _ => continue,
            };
            self.err(path, why, Some("choose agents with attribute and value, not or in".into()));
        }
    }
}
