//! Constraints of one job over agents: attribute values, per-value limits, one per host, spread.

use capstan_model::spec::Constraint;
use capstan_model::AgentId;
use capstan_state::{Agent, ClusterState, Job};
use std::collections::HashMap;

pub(crate) enum Verdict {
    /// The agent may take the task; `spread_rank` orders candidates (smaller first) so that
    /// instances go to the least used values of spread attributes.
    Ok { spread_rank: u64 },
    /// The agent may not; the constraint it fails, in words.
    Refused(String),
}

/// Where a job's live instances are: per agent and per attribute value.
pub(crate) struct JobSpread {
    per_agent: HashMap<AgentId, u32>,
    /// (attribute, value) → live instances.
    per_value: HashMap<(String, String), u32>,
    attributes: Vec<String>,
}

impl JobSpread {
    pub(crate) fn of(state: &ClusterState, job: &Job) -> JobSpread {
        let mut attributes: Vec<String> = Vec::new();
        for c in job.spec.constraint.iter().filter_map(|c| c.kind()) {
            if let Constraint::Limit { attribute, .. } | Constraint::Spread { attribute } = c {
                if !attributes.iter().any(|a| a == attribute) {
                    attributes.push(attribute.to_string());
                }
            }
        }
        let mut s = JobSpread { per_agent: HashMap::new(), per_value: HashMap::new(), attributes };
        for id in job.current.values() {
            let Some(t) = state.tasks.get(id) else { continue };
            if !t.state.holds_resources() {
                continue;
            }
            if let Some(agent) = t.agent.and_then(|a| state.agents.get(&a)) {
                s.add(agent);
            }
        }
        s
    }

    pub(crate) fn add(&mut self, agent: &Agent) {
        *self.per_agent.entry(agent.info.id).or_default() += 1;
        for a in &self.attributes {
            if let Some(v) = agent.info.attributes.get(a) {
                *self.per_value.entry((a.clone(), v.clone())).or_default() += 1;
            }
        }
    }

    fn count(&self, attribute: &str, value: &str) -> u32 {
        // Looked up without allocating in the common case of few attributes.
        self.per_value.iter().find(|((a, v), _)| a == attribute && v == value).map(|(_, n)| *n).unwrap_or(0)
    }

    pub(crate) fn check(&self, constraints: &[Constraint], agent: &Agent) -> Verdict {
        let attrs = &agent.info.attributes;
        let mut spread_rank = 0u64;
        for c in constraints {
            let ok = match *c {
                Constraint::Equals { attribute, value } => attrs.get(attribute).is_some_and(|v| v == value),
                Constraint::NotEquals { attribute, value } => attrs.get(attribute).is_none_or(|v| v != value),
                Constraint::In { attribute, values } => attrs.get(attribute).is_some_and(|v| values.contains(v)),
                Constraint::Limit { attribute, limit } => {
                    attrs.get(attribute).is_some_and(|v| self.count(attribute, v) < limit)
                }
                Constraint::DistinctHosts => self.per_agent.get(&agent.info.id).copied().unwrap_or(0) == 0,
                Constraint::Spread { attribute } => match attrs.get(attribute) {
                    Some(v) => {
                        spread_rank += u64::from(self.count(attribute, v));
                        true
                    }
                    None => false,
                },
            };
            if !ok {
                let what = match *c {
                    Constraint::Spread { attribute } => format!("`{attribute}` (needed to spread)"),
                    other => format!("`{other}`"),
                };
                return Verdict::Refused(what);
            }
        }
        Verdict::Ok { spread_rank }
    }
}
