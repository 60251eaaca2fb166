//! The targeting rule: which issues become forge-managed runs.
//!
//! An issue is targeted when an assignee is a member of `FORGE_ORG` and a label
//! `bot-bottle:<agent>` names a known agent; `bot-bottle-bottle:<name>` may pick
//! the bottle. Membership needs the forge, so the caller asks it first and passes
//! the answer in: the rule itself stays a pure function.

/// The org whose members may hand issues to bot-bottle when `FORGE_ORG` is unset.
pub const DEFAULT_FORGE_ORG: &str = "bot-bottle";

/// Prefix of the label that names the agent.
pub const AGENT_LABEL_PREFIX: &str = "bot-bottle:";

/// Prefix of the label that overrides the agent's default bottle.
pub const BOTTLE_LABEL_PREFIX: &str = "bot-bottle-bottle:";

/// A targeted issue's run parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub agent: String,
    /// `None`: use the agent's default bottle.
    pub bottle: Option<String>,
    /// The first assignee (in the issue's order) who is an org member.
    pub assignee: String,
}

/// Why an issue is, or is not, forge-targeted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetDecision {
    Targeted(Target),
    /// No `bot-bottle:<agent>` label.
    NoAgentLabel,
    /// The label names an agent that has no manifest.
    UnknownAgent(String),
    /// More than one `bot-bottle:<agent>` label names a known agent.
    AmbiguousAgent(Vec<String>),
    /// More than one `bot-bottle-bottle:<name>` label.
    AmbiguousBottle(Vec<String>),
    /// No assignee is a member of the org.
    NoMemberAssignee,
}

/// Apply the targeting rule. `is_member` answers for one assignee login (the
/// caller resolves it through `Forge::is_org_member` beforehand);
/// `known_agents` are the agent manifest names.
pub fn target_issue<S: AsRef<str>>(
    labels: &[S],
    assignees: &[S],
    is_member: impl Fn(&str) -> bool,
    known_agents: &[S],
) -> TargetDecision {
    let suffixes = |prefix: &str| -> Vec<String> {
        labels
            .iter()
            .filter_map(|label| label.as_ref().trim().strip_prefix(prefix))
            .map(|rest| rest.trim().to_owned())
            .filter(|rest| !rest.is_empty())
            .collect()
    };
    let named = suffixes(AGENT_LABEL_PREFIX);
    if named.is_empty() {
        return TargetDecision::NoAgentLabel;
    }
    let mut known: Vec<String> = named
        .iter()
        .filter(|agent| known_agents.iter().any(|k| k.as_ref() == agent.as_str()))
        .cloned()
        .collect();
    known.dedup();
    let agent = match known.len() {
        0 => return TargetDecision::UnknownAgent(named[0].clone()),
        1 => known.remove(0),
        _ => return TargetDecision::AmbiguousAgent(known),
    };
    let mut bottles = suffixes(BOTTLE_LABEL_PREFIX);
    bottles.dedup();
    if bottles.len() > 1 {
        return TargetDecision::AmbiguousBottle(bottles);
    }
    let Some(assignee) = assignees.iter().map(AsRef::as_ref).find(|a| is_member(a)) else {
        return TargetDecision::NoMemberAssignee;
    };
    TargetDecision::Targeted(Target {
        agent,
        bottle: bottles.pop(),
        assignee: assignee.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENTS: &[&str] = &["implementer", "reviewer"];

    fn member(login: &str) -> bool {
        login == "alice"
    }

    #[test]
    fn member_assignee_and_known_agent_is_targeted() {
        assert_eq!(
            TargetDecision::Targeted(Target {
                agent: "implementer".to_owned(),
                bottle: None,
                assignee: "alice".to_owned(),
            }),
            target_issue(
                &["bug", "bot-bottle:implementer"],
                &["mallory", "alice"],
                member,
                AGENTS
            )
        );
    }

    #[test]
    fn bottle_label_overrides_the_bottle() {
        let decision = target_issue(
            &["bot-bottle:implementer", "bot-bottle-bottle:rust-dev"],
            &["alice"],
            member,
            AGENTS,
        );
        assert_eq!(
            TargetDecision::Targeted(Target {
                agent: "implementer".to_owned(),
                bottle: Some("rust-dev".to_owned()),
                assignee: "alice".to_owned(),
            }),
            decision
        );
    }

    #[test]
    fn non_member_assignee_is_not_targeted() {
        assert_eq!(
            TargetDecision::NoMemberAssignee,
            target_issue(&["bot-bottle:implementer"], &["mallory"], member, AGENTS)
        );
        assert_eq!(
            TargetDecision::NoMemberAssignee,
            target_issue(&["bot-bottle:implementer"], &[], member, AGENTS)
        );
    }

    #[test]
    fn unknown_agent_is_not_targeted() {
        assert_eq!(
            TargetDecision::UnknownAgent("hacker".to_owned()),
            target_issue(&["bot-bottle:hacker"], &["alice"], member, AGENTS)
        );
    }

    #[test]
    fn missing_label_is_not_targeted() {
        assert_eq!(
            TargetDecision::NoAgentLabel,
            target_issue(&["bug", "bot-bottle:"], &["alice"], member, AGENTS)
        );
        // The bottle and status prefixes are not agent labels.
        assert_eq!(
            TargetDecision::NoAgentLabel,
            target_issue(
                &["bot-bottle-bottle:implementer", "bot-bottle-status:running"],
                &["alice"],
                member,
                AGENTS
            )
        );
    }

    #[test]
    fn ambiguous_labels_are_refused() {
        assert_eq!(
            TargetDecision::AmbiguousAgent(vec!["implementer".to_owned(), "reviewer".to_owned()]),
            target_issue(
                &["bot-bottle:implementer", "bot-bottle:reviewer"],
                &["alice"],
                member,
                AGENTS
            )
        );
        assert_eq!(
            TargetDecision::AmbiguousBottle(vec!["a".to_owned(), "b".to_owned()]),
            target_issue(
                &[
                    "bot-bottle:implementer",
                    "bot-bottle-bottle:a",
                    "bot-bottle-bottle:b"
                ],
                &["alice"],
                member,
                AGENTS
            )
        );
    }

    #[test]
    fn an_unknown_agent_beside_a_known_one_does_not_block() {
        assert!(matches!(
            target_issue(
                &["bot-bottle:nope", "bot-bottle:reviewer"],
                &["alice"],
                member,
                AGENTS
            ),
            TargetDecision::Targeted(Target { ref agent, .. }) if agent == "reviewer"
        ));
    }
}
