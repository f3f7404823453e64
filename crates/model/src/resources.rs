//! Resources: cpus in millicpus, memory and disk in bytes, ports as ranges. Integer arithmetic only,
//! so that bin-packing never drifts.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A size in bytes; text form `64MiB`, `1GiB`, `512KiB`, `100B`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct ByteSize(pub u64);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
pub const TIB: u64 = 1024 * GIB;

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult = match unit.trim() {
            "B" => 1,
            "KiB" => KIB,
            "MiB" => MIB,
            "GiB" => GIB,
            "TiB" => TIB,
            "" => return Err(format!("\"{s}\" has no unit; write e.g. \"{s}MiB\" (units: KiB, MiB, GiB, TiB)")),
            "KB" | "kB" | "MB" | "GB" | "TB" | "K" | "M" | "G" | "T" | "k" | "m" | "g" | "Mi" | "Gi" | "Ki" => {
                return Err(format!(
                    "\"{s}\" is not a size: use binary units KiB, MiB, GiB or TiB (e.g. \"{num}{}\")",
                    match unit.trim().chars().next() {
                        Some('K' | 'k') => "KiB",
                        Some('M' | 'm') => "MiB",
                        Some('G' | 'g') => "GiB",
                        _ => "TiB",
                    }
                ))
            }
            other => return Err(format!("\"{s}\" is not a size: unknown unit `{other}`; use KiB, MiB, GiB or TiB")),
        };
        if num.is_empty() {
            return Err(format!("\"{s}\" is not a size: it has no number; write e.g. \"64MiB\""));
        }
        let value: f64 = num.parse().map_err(|_| format!("\"{s}\" is not a size: `{num}` is not a number"))?;
        let bytes = value * mult as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("\"{s}\" is too large"));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl ByteSize {
    /// For people: the largest unit, one decimal when it is not exact (`23.5GiB`).
    pub fn human(self) -> String {
        let b = self.0;
        for (unit, size) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
            if b >= size {
                return if b.is_multiple_of(size) {
                    format!("{}{unit}", b / size)
                } else {
                    format!("{:.1}{unit}", b as f64 / size as f64)
                };
            }
        }
        format!("{b}B")
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, size) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
            if b >= size && b.is_multiple_of(size) {
                return write!(f, "{}{unit}", b / size);
            }
        }
        for (unit, size) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
            if b >= size {
                return write!(f, "{:.1}{unit}", b as f64 / size as f64);
            }
        }
        write!(f, "{b}B")
    }
}

/// The stored and JSON form: exact, unlike `Display` (which rounds `1025B` to `1.0KiB`), so that a
/// spec read back is the spec written.
impl From<ByteSize> for String {
    fn from(s: ByteSize) -> String {
        let b = s.0;
        for (unit, size) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
            if b >= size && b.is_multiple_of(size) {
                return format!("{}{unit}", b / size);
            }
        }
        format!("{b}B")
    }
}

impl TryFrom<String> for ByteSize {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// An inclusive range of TCP ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn len(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let parse = |x: &str| {
            x.trim().parse::<u16>().map_err(|_| format!("`{s}` is not a port range: expected LO-HI, e.g. 31000-32000"))
        };
        let (first, last) = (parse(a)?, parse(b)?);
        if first == 0 || first > last {
            return Err(format!("`{s}` is not a port range: need 1 <= LO <= HI"));
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// What one task asks for (ports are counted here; their names live in the task spec).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Demand {
    pub cpus_milli: u32,
    pub mem_bytes: u64,
    pub disk_bytes: u64,
    pub ports: u32,
}

/// What an agent offers in total.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub cpus_milli: u32,
    pub mem_bytes: u64,
    pub disk_bytes: u64,
    pub ports: Vec<PortRange>,
}

impl Capacity {
    /// The same ports as sorted, non-overlapping, non-adjacent ranges, so that counting ranges
    /// counts each port once (`31000-31005;31003-31008` holds 9 ports, not 12).
    pub fn normalized(mut self) -> Capacity {
        self.ports.sort();
        let mut merged: Vec<PortRange> = Vec::with_capacity(self.ports.len());
        for r in self.ports {
            match merged.last_mut() {
                Some(last) if u32::from(r.first) <= u32::from(last.last) + 1 => last.last = last.last.max(r.last),
                _ => merged.push(r),
            }
        }
        self.ports = merged;
        self
    }

    pub fn port_count(&self) -> u32 {
        self.ports.iter().map(PortRange::len).sum()
    }

    /// Parses `cpus=N,mem=SIZE,disk=SIZE,ports=LO-HI[;LO-HI]` over a base (the detected values):
    /// only the keys given are replaced.
    pub fn parse_overrides(base: &Capacity, text: &str) -> Result<Capacity, String> {
        let mut out = base.clone();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("`{item}` is not key=value (keys: cpus, mem, disk, ports)"))?;
            match k.trim() {
                "cpus" => out.cpus_milli = parse_cpus(v.trim())?,
                "mem" => out.mem_bytes = v.trim().parse::<ByteSize>()?.0,
                "disk" => out.disk_bytes = v.trim().parse::<ByteSize>()?.0,
                "ports" => {
                    out.ports = v.split(';').map(|r| r.parse()).collect::<Result<Vec<PortRange>, _>>()?;
                }
                other => return Err(format!("unknown resource `{other}` (known: cpus, mem, disk, ports)")),
            }
        }
        Ok(out)
    }
}

/// `0.25` → 250 millicpus.
pub fn parse_cpus(text: &str) -> Result<u32, String> {
    let v: f64 = text.parse().map_err(|_| format!("`{text}` is not a number of cpus"))?;
    cpus_to_milli(v)
}

pub fn cpus_to_milli(v: f64) -> Result<u32, String> {
    if !v.is_finite() || v <= 0.0 {
        return Err(format!("{v} cpus: must be greater than 0"));
    }
    if v > 4096.0 {
        return Err(format!("{v} cpus is more than any host has (at most 4096)"));
    }
    let milli = (v * 1000.0).round() as u32;
    if milli == 0 {
        return Err(format!("{v} cpus is less than 0.001"));
    }
    Ok(milli)
}

pub fn milli_to_cpus(milli: u32) -> f64 {
    f64::from(milli) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!("64MiB".parse::<ByteSize>().unwrap(), ByteSize(64 * MIB));
        assert_eq!("1.5GiB".parse::<ByteSize>().unwrap(), ByteSize(1536 * MIB));
        assert_eq!(ByteSize(64 * MIB).to_string(), "64MiB");
        assert_eq!(ByteSize(1536 * MIB).to_string(), "1536MiB");
        assert_eq!(ByteSize(1500).to_string(), "1.5KiB");
        assert!("12GB".parse::<ByteSize>().unwrap_err().contains("GiB"));
        assert!("12".parse::<ByteSize>().unwrap_err().contains("no unit"));
        assert!("MiB".parse::<ByteSize>().unwrap_err().contains("no number"));
        assert!("-5MiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn normalized_ranges_count_each_port_once() {
        let r = |first, last| PortRange { first, last };
        let c = Capacity {
            ports: vec![r(31003, 31008), r(31000, 31005), r(31009, 31010), r(40000, 40000)],
            ..Default::default()
        };
        let n = c.normalized();
        assert_eq!(n.ports, vec![r(31000, 31010), r(40000, 40000)]);
        assert_eq!(n.port_count(), 12);
    }

    #[test]
    fn capacity_overrides_replace_only_given_keys() {
        let base = Capacity { cpus_milli: 2000, mem_bytes: GIB, disk_bytes: GIB, ports: vec![] };
        let c = Capacity::parse_overrides(&base, "cpus=4,ports=31000-31010;32000-32000").unwrap();
        assert_eq!(c.cpus_milli, 4000);
        assert_eq!(c.mem_bytes, GIB);
        assert_eq!(c.port_count(), 12);
        assert!(Capacity::parse_overrides(&base, "gpus=1").is_err());
    }
}
