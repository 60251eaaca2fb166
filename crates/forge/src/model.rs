//! The provider-agnostic forge surface: domain types and the [`Forge`] trait.
//!
//! `signal_done` is deliberately not a forge operation: completion is a sidecar
//! concept relayed to the orchestrator through the queue dir.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::gitea::GiteaError;
use crate::scoped::ScopeError;

/// Whether an issue or pull request is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IssueState {
    Open,
    Closed,
}

impl fmt::Display for IssueState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Open => "open",
            Self::Closed => "closed",
        })
    }
}

/// A forge issue. Kept apart from [`PullRequest`] even though Gitea serves a PR
/// through the issue endpoints too: a PR carries merge and branch state an issue
/// does not, and the two are read through different operations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issue {
    pub number: u64,
    pub title: String,
    pub body: String,
    pub state: IssueState,
    /// Login of the author.
    pub author: String,
    pub assignees: Vec<String>,
    pub labels: Vec<String>,
    /// True when this number is a pull request (Gitea gives a PR an issue with
    /// the same number).
    pub is_pull: bool,
    pub updated_at: String,
}

/// One side of a pull request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchRef {
    /// Branch name.
    pub name: String,
    /// Commit SHA at the tip; empty when the forge did not say.
    pub sha: String,
}

/// A forge pull request, including its merge state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequest {
    pub number: u64,
    pub title: String,
    pub body: String,
    pub state: IssueState,
    pub merged: bool,
    pub head: BranchRef,
    pub base: BranchRef,
    pub author: String,
}

/// A comment on an issue or pull request thread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Comment {
    pub id: u64,
    /// Login of the author.
    pub user: String,
    pub body: String,
    pub created_at: String,
}

/// A repository label as attached to an issue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    pub id: u64,
    pub name: String,
    pub color: String,
}

/// What [`Forge::create_pr`] needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewPullRequest {
    pub title: String,
    pub body: String,
    /// Source branch.
    pub head: String,
    /// Target branch.
    pub base: String,
}

/// Every way a [`Forge`] operation can fail.
#[derive(Debug, thiserror::Error)]
pub enum ForgeError {
    /// A write outside the assigned scope, refused before it reached the forge.
    #[error(transparent)]
    Scope(#[from] ScopeError),
    #[error(transparent)]
    Gitea(#[from] GiteaError),
    /// A failure of another forge implementation (test doubles, later forges).
    #[error("forge operation `{operation}` failed: {message}")]
    Other {
        operation: &'static str,
        message: String,
    },
}

impl ForgeError {
    /// The scope refusal, when this is one.
    #[must_use]
    pub fn as_scope(&self) -> Option<&ScopeError> {
        match self {
            Self::Scope(error) => Some(error),
            _ => None,
        }
    }
}

/// Provider-agnostic forge operations on one repository.
///
/// Reads accept any number; whether a write is allowed is decided by a wrapper
/// ([`crate::ScopedForge`]), never by the implementation.
#[async_trait]
pub trait Forge: Send + Sync {
    async fn read_issue(&self, number: u64) -> Result<Issue, ForgeError>;

    async fn read_pr(&self, number: u64) -> Result<PullRequest, ForgeError>;

    async fn read_comments(&self, number: u64) -> Result<Vec<Comment>, ForgeError>;

    /// Post a comment to an issue or PR; returns the new comment.
    async fn post_comment(&self, number: u64, body: &str) -> Result<Comment, ForgeError>;

    /// Replace the body of an issue or PR.
    async fn update_description(&self, number: u64, body: &str) -> Result<(), ForgeError>;

    async fn is_org_member(&self, org: &str, username: &str) -> Result<bool, ForgeError>;

    /// The PR that belongs to issue `number`, if any: the number itself when it
    /// is a PR, else a PR whose body closes it (`Closes #N`, `Fixes #N`, …).
    async fn get_pr_for_issue(&self, number: u64) -> Result<Option<u64>, ForgeError>;

    async fn is_pr_open(&self, number: u64) -> Result<bool, ForgeError>;

    /// Open a PR, or return the open PR that already has the same head and base,
    /// so a retried call never opens a second one.
    async fn create_pr(&self, request: &NewPullRequest) -> Result<PullRequest, ForgeError>;

    async fn list_labels(&self, number: u64) -> Result<Vec<Label>, ForgeError>;

    /// Attach a label by name, creating it in the repository when missing.
    async fn add_label(&self, number: u64, name: &str) -> Result<(), ForgeError>;

    /// Detach a label by name; detaching one that is not attached is success.
    async fn remove_label(&self, number: u64, name: &str) -> Result<(), ForgeError>;
}

/// Whether `body` closes issue `number` with one of the keywords Gitea and
/// Forgejo recognise (`close[sd]`, `fix(e[sd])`, `resolve[sd]`), case-insensitive.
#[must_use]
pub fn body_closes_issue(body: &str, number: u64) -> bool {
    const KEYWORDS: &[&str] = &[
        "close", "closes", "closed", "fix", "fixes", "fixed", "resolve", "resolves", "resolved",
    ];
    let target = format!("#{number}");
    let words: Vec<&str> = body
        .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .filter(|w| !w.is_empty())
        .collect();
    words.windows(2).any(|pair| {
        let keyword = pair[0].trim_end_matches(':').to_ascii_lowercase();
        let reference = pair[1].trim_end_matches(['.', ';', ':', '!']);
        KEYWORDS.contains(&keyword.as_str()) && reference == target
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_keywords_are_recognised() {
        assert!(body_closes_issue("Closes #17", 17));
        assert!(body_closes_issue("This PR\n\nfixes: #17.", 17));
        assert!(body_closes_issue("resolved #17, and more", 17));
        assert!(!body_closes_issue("Closes #170", 17));
        assert!(!body_closes_issue("see #17", 17));
        assert!(!body_closes_issue("Closes #1", 17));
        assert!(!body_closes_issue("", 17));
    }

    #[test]
    fn state_displays_like_the_wire() {
        assert_eq!("open", IssueState::Open.to_string());
        assert_eq!(
            "\"closed\"",
            serde_json::to_string(&IssueState::Closed).expect("serialize")
        );
    }
}
