//! Cron schedules: a job's `cron` expression in its `cron_timezone`, and the fire times it gives.
//!
//! Accepted forms: the standard five fields (`minute hour day-of-month month day-of-week`), six
//! fields with seconds first (`*/10 * * * * *`), and the nicknames `@hourly`, `@daily`, `@weekly`,
//! `@monthly`, `@yearly`. A year field is not accepted. Time zones are IANA names (`Europe/Paris`),
//! default `UTC`; fire times follow the zone's daylight-saving changes (a wall-clock time that does
//! not exist that day is skipped; one that happens twice fires once).
//!
//! Pure: every function takes the time it works from; nothing here reads a clock.

use crate::task::Timestamp;
use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

/// The default `cron_timezone`.
pub const DEFAULT_TIMEZONE: &str = "UTC";

/// Fire times counted at most when a schedule is far behind (a long master downtime); beyond it
/// the count is reported as this number ("at least").
pub const FIRES_COUNTED_MAX: u32 = 10_000;

/// The shortest time between two runs of a cron job, unless the operator sets another
/// (`capstan master --cron-interval-min`): a schedule that fires more often is refused at
/// submission. One minute: the standard five-field cron's own granularity.
pub const CRON_INTERVAL_MIN_DEFAULT_MS: u64 = 60_000;

/// Fire times looked at to find a schedule's shortest interval (from 2000-01-01 in its zone).
pub const INTERVAL_SAMPLE_FIRES: u32 = 256;

/// A parsed, checked schedule.
#[derive(Clone, Debug)]
pub struct CronSchedule {
    cron: Cron,
    tz: Tz,
}

/// Why a schedule is refused, with the job-file key it is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleProblem {
    /// `cron` or `cron_timezone`.
    pub field: &'static str,
    pub message: String,
    pub hint: String,
}

/// Fire times that fell in a window: how many (capped at [`FIRES_COUNTED_MAX`]) and the latest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Due {
    pub count: u32,
    pub latest: Timestamp,
}

impl CronSchedule {
    /// Parses an expression in a time zone (`None`: UTC); every problem of both at once.
    pub fn parse(expr: &str, timezone: Option<&str>) -> Result<CronSchedule, Vec<ScheduleProblem>> {
        let mut problems = Vec::new();
        let tz = match timezone.unwrap_or(DEFAULT_TIMEZONE).parse::<Tz>() {
            Ok(tz) => Some(tz),
            Err(_) => {
                let name = timezone.unwrap_or_default();
                let hint = match name.to_ascii_lowercase().as_str() {
                    "utc" | "gmt" | "z" => "write \"UTC\"".to_string(),
                    _ => "use an IANA time zone name such as \"UTC\", \"Europe/Paris\" or \"America/New_York\"".into(),
                };
                problems.push(ScheduleProblem {
                    field: "cron_timezone",
                    message: format!("\"{name}\" is not a time zone"),
                    hint,
                });
                None
            }
        };
        let fields = expr.split_whitespace().count();
        let parsed = if expr.trim().is_empty() {
            Err("is empty".to_string())
        } else if !expr.trim_start().starts_with('@') && !(5..=6).contains(&fields) {
            Err(format!("\"{expr}\" has {fields} fields"))
        } else {
            CronParser::builder()
                .seconds(Seconds::Optional)
                .year(Year::Disallowed)
                .build()
                .parse(expr)
                .map_err(|e| format!("\"{expr}\" is not a cron expression: {e}"))
        };
        let cron = match parsed {
            Ok(c) => Some(c),
            Err(message) => {
                problems.push(ScheduleProblem {
                    field: "cron",
                    message,
                    hint: "five fields: minute hour day-of-month month day-of-week, e.g. \"*/5 * * * *\"; \
                           or six with seconds first, e.g. \"*/10 * * * * *\""
                        .into(),
                });
                None
            }
        };
        let (Some(cron), Some(tz)) = (cron, tz) else {
            return Err(problems);
        };
        let schedule = CronSchedule { cron, tz };
        // A schedule that can never fire (February 30th) is a mistake worth saying at once. Checked
        // from a fixed time, so that the same file always gives the same answer.
        if schedule.next_after(Timestamp(946_684_800_000)).is_none() {
            return Err(vec![ScheduleProblem {
                field: "cron",
                message: format!("\"{expr}\" never fires"),
                hint: "check the day of month against the month (e.g. 30 and February)".into(),
            }]);
        }
        Ok(schedule)
    }

    /// The first fire time strictly after `after`; `None` if there is none.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let start = self.tz.from_utc_datetime(&to_utc(after)?.naive_utc());
        self.cron.find_next_occurrence(&start, false).ok().map(|t| Timestamp(t.timestamp_millis().max(0) as u64))
    }

    /// The fire times in `(after, until]`: how many and the latest; `None` when there is none.
    pub fn due(&self, after: Timestamp, until: Timestamp) -> Option<Due> {
        let first = self.next_after(after).filter(|t| *t <= until)?;
        let mut due = Due { count: 1, latest: first };
        while due.count < FIRES_COUNTED_MAX {
            match self.next_after(due.latest) {
                Some(t) if t <= until => {
                    due.count += 1;
                    due.latest = t;
                }
                _ => return Some(due),
            }
        }
        // Too many to count: the latest is the last fire time at or before `until`.
        let end = self.tz.from_utc_datetime(&to_utc(until)?.naive_utc());
        if let Ok(t) = self.cron.find_previous_occurrence(&end, true) {
            due.latest = Timestamp(t.timestamp_millis().max(0) as u64).max(due.latest);
        }
        Some(due)
    }

    /// The shortest time between two consecutive fire times among the first
    /// [`INTERVAL_SAMPLE_FIRES`] from a fixed time (2000-01-01T00:00:00Z), so that the same
    /// schedule always gives the same answer; `None` if it fires at most once in that span. A
    /// schedule whose runs come closer only later than that (a leap-day special, say) is not
    /// seen: the check is for mistakes and abuse such as `* * * * * *`, not a proof.
    pub fn interval_min_ms(&self) -> Option<u64> {
        let mut prev = self.next_after(Timestamp(946_684_800_000))?;
        let mut min: Option<u64> = None;
        for _ in 1..INTERVAL_SAMPLE_FIRES {
            let Some(next) = self.next_after(prev) else { break };
            let gap = next.0.saturating_sub(prev.0);
            min = Some(min.map_or(gap, |m| m.min(gap)));
            prev = next;
        }
        min
    }

    /// The schedule in words (`At every 5th minute`).
    pub fn describe(&self) -> String {
        self.cron.describe()
    }

    /// The time zone's name.
    pub fn timezone(&self) -> &'static str {
        self.tz.name()
    }
}

fn to_utc(t: Timestamp) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp_millis(i64::try_from(t.0).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-01-01T00:00:00Z.
    const JAN_1: Timestamp = Timestamp(1_704_067_200_000);
    const MINUTE: u64 = 60_000;

    #[test]
    fn five_fields_fire_on_minutes_six_on_seconds() {
        let every_5 = CronSchedule::parse("*/5 * * * *", None).unwrap();
        assert_eq!(every_5.next_after(JAN_1), Some(JAN_1.plus_ms(5 * MINUTE)));
        assert_eq!(every_5.next_after(JAN_1.plus_ms(1)), Some(JAN_1.plus_ms(5 * MINUTE)));
        let every_10s = CronSchedule::parse("*/10 * * * * *", None).unwrap();
        assert_eq!(every_10s.next_after(JAN_1), Some(JAN_1.plus_ms(10_000)));
        let hourly = CronSchedule::parse("@hourly", None).unwrap();
        assert_eq!(hourly.next_after(JAN_1), Some(JAN_1.plus_ms(60 * MINUTE)));
    }

    #[test]
    fn time_zones_move_the_fire_times() {
        // 09:00 in Paris is 08:00 UTC in January.
        let paris = CronSchedule::parse("0 9 * * *", Some("Europe/Paris")).unwrap();
        assert_eq!(paris.next_after(JAN_1), Some(JAN_1.plus_ms(8 * 60 * MINUTE)));
        assert_eq!(paris.timezone(), "Europe/Paris");
    }

    #[test]
    fn due_counts_the_fire_times_in_a_window_and_names_the_latest() {
        let every_minute = CronSchedule::parse("* * * * *", None).unwrap();
        assert_eq!(every_minute.due(JAN_1, JAN_1.plus_ms(59_999)), None);
        assert_eq!(
            every_minute.due(JAN_1, JAN_1.plus_ms(MINUTE)),
            Some(Due { count: 1, latest: JAN_1.plus_ms(MINUTE) })
        );
        assert_eq!(
            every_minute.due(JAN_1, JAN_1.plus_ms(3 * MINUTE + 5)),
            Some(Due { count: 3, latest: JAN_1.plus_ms(3 * MINUTE) })
        );
        let every_second = CronSchedule::parse("* * * * * *", None).unwrap();
        let far = every_second.due(JAN_1, JAN_1.plus_ms(86_400_000)).unwrap();
        assert_eq!(far, Due { count: FIRES_COUNTED_MAX, latest: JAN_1.plus_ms(86_400_000) });
    }

    #[test]
    fn the_shortest_interval_of_a_schedule() {
        let of = |e: &str| CronSchedule::parse(e, None).unwrap().interval_min_ms();
        assert_eq!(of("* * * * * *"), Some(1_000));
        assert_eq!(of("*/10 * * * * *"), Some(10_000));
        assert_eq!(of("* * * * *"), Some(MINUTE));
        assert_eq!(of("0 * * * * *"), Some(MINUTE), "six fields, once a minute");
        assert_eq!(of("0,1 * * * *"), Some(MINUTE), "the closest two runs, not the average");
        assert_eq!(of("0,30 9 * * * *"), Some(30_000), "seconds apart once an hour");
        assert_eq!(of("@daily"), Some(24 * 60 * MINUTE));
    }

    #[test]
    fn bad_expressions_and_zones_are_refused_together() {
        let problems = CronSchedule::parse("61 * * * *", Some("Mars/Olympus")).unwrap_err();
        let fields: Vec<&str> = problems.iter().map(|p| p.field).collect();
        assert_eq!(fields, ["cron_timezone", "cron"], "{problems:?}");
        assert!(CronSchedule::parse("* * * *", None).unwrap_err()[0].message.contains("4 fields"));
        assert!(CronSchedule::parse("0 0 * * * * 2030", None).unwrap_err()[0].message.contains("7 fields"));
        assert!(CronSchedule::parse("", None).is_err());
        assert!(CronSchedule::parse("0 0 30 2 *", None).unwrap_err()[0].message.contains("never fires"));
        assert_eq!(CronSchedule::parse("* * * * *", Some("utc")).unwrap_err()[0].hint, "write \"UTC\"");
    }
}
