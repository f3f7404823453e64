//! Identifiers: newtypes so that a task id is never mistaken for an agent id.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(into = "String", try_from = "String")]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:016x}", self.0)
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!(
                        "`{s}` is not a {}: expected 16 hexadecimal digits",
                        stringify!($name)
                    ));
                }
                u64::from_str_radix(s, 16).map($name).map_err(|e| e.to_string())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.to_string()
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                s.parse()
            }
        }
    };
}

hex_id!(
    /// One run of one instance of a job. A replacement is a new task with a new id.
    TaskId
);
hex_id!(
    /// An agent, chosen by the agent on its first start and kept in its data directory.
    AgentId
);

/// A deterministic successor id: the core derives new ids from old ones or from a seed carried in
/// a command, so that replaying the log yields the same ids (SplitMix64 finaliser).
pub fn derive_id(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A job's identity: `role/environment/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct JobKey {
    pub role: String,
    pub env: String,
    pub name: String,
}

/// Why a job key was refused; `Display` says what a valid one looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobKeyError(pub String);

impl fmt::Display for JobKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl JobKey {
    pub const PART_MAX_LEN: usize = 63;

    /// Checks one part of a key: lowercase letters, digits, `-` and `_`, starting with a letter or
    /// digit, at most 63 characters (so that every key can become a DNS label later).
    fn check_part(what: &str, part: &str) -> Result<(), String> {
        if part.is_empty() {
            return Err(format!("the {what} is empty"));
        }
        if part.len() > Self::PART_MAX_LEN {
            return Err(format!("the {what} `{part}` is longer than {} characters", Self::PART_MAX_LEN));
        }
        let first = part.as_bytes()[0];
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return Err(format!("the {what} `{part}` must start with a lowercase letter or a digit"));
        }
        if let Some(bad) =
            part.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
        {
            return Err(format!("the {what} `{part}` contains `{bad}`; use lowercase letters, digits, `-` and `_`"));
        }
        Ok(())
    }
}

impl FromStr for JobKey {
    type Err = JobKeyError;
    fn from_str(s: &str) -> Result<Self, JobKeyError> {
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() != 3 {
            return Err(JobKeyError(format!(
                "`{s}` is not a job key: expected role/environment/name, e.g. www/prod/hello"
            )));
        }
        for (what, part) in ["role", "environment", "name"].iter().zip(&parts) {
            JobKey::check_part(what, part).map_err(JobKeyError)?;
        }
        Ok(JobKey { role: parts[0].into(), env: parts[1].into(), name: parts[2].into() })
    }
}

impl fmt::Display for JobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.role, self.env, self.name)
    }
}

impl From<JobKey> for String {
    fn from(k: JobKey) -> String {
        k.to_string()
    }
}

impl TryFrom<String> for JobKey {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse().map_err(|e: JobKeyError| e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        let id = TaskId(0x00ab_cdef_0123_4567);
        assert_eq!(id.to_string(), "00abcdef01234567");
        assert_eq!("00abcdef01234567".parse::<TaskId>().unwrap(), id);
        assert!("xyz".parse::<TaskId>().is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"00abcdef01234567\"");
    }

    #[test]
    fn job_keys_are_checked_part_by_part() {
        assert_eq!("www/prod/hello".parse::<JobKey>().unwrap().name, "hello");
        for (bad, needle) in [
            ("www/prod", "expected role/environment/name"),
            ("www//hello", "environment is empty"),
            ("www/prod/hEllo", "`E`"),
            ("-x/prod/hello", "must start"),
            ("a/b/c/d", "expected role/environment/name"),
        ] {
            let err = bad.parse::<JobKey>().unwrap_err().0;
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn derived_ids_differ() {
        let a = derive_id(1);
        let b = derive_id(2);
        assert_ne!(a, b);
        assert_eq!(a, derive_id(1));
    }
}
