//! Read-anywhere, write-scoped access to a forge.
//!
//! A prompt-injected agent holds no forge token, but it can ask the forge sidecar
//! to write. [`ScopedForge`] bounds that: writes reach the inner forge only for the
//! assigned issue and its pull requests, which is tighter than any Gitea token
//! scope (those are repository-wide).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use crate::model::{Comment, Forge, ForgeError, Issue, Label, NewPullRequest, PullRequest};

/// The write operations [`ScopedForge`] guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteOperation {
    PostComment,
    UpdateDescription,
    CreatePr,
    AddLabel,
    RemoveLabel,
}

impl WriteOperation {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PostComment => "post_comment",
            Self::UpdateDescription => "update_description",
            Self::CreatePr => "create_pr",
            Self::AddLabel => "add_label",
            Self::RemoveLabel => "remove_label",
        }
    }
}

impl fmt::Display for WriteOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A write refused because its target lies outside the assigned scope.
///
/// It is its own type (not a forge failure) so that callers can tell "the agent
/// tried something it may not" from "the forge broke", and audit it as such.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{operation}` on `{target}` refused: {reason}")]
pub struct ScopeError {
    pub operation: WriteOperation,
    /// What the write aimed at, e.g. `#500` or `branch other-feature`.
    pub target: String,
    pub reason: String,
}

/// Wraps a [`Forge`]: every read passes through; a write reaches the inner forge
/// only when its target is the assigned issue or one of its pull requests.
///
/// The writable set grows only through this wrapper: when `get_pr_for_issue` on
/// the assigned issue discovers a PR, or when `create_pr` opens (or finds) one.
pub struct ScopedForge {
    inner: Arc<dyn Forge>,
    assigned_issue: u64,
    allowed_head: Option<String>,
    writable: Mutex<BTreeSet<u64>>,
}

impl ScopedForge {
    pub fn new(
        inner: Arc<dyn Forge>,
        assigned_issue: u64,
        assigned_prs: impl IntoIterator<Item = u64>,
    ) -> Self {
        let mut writable: BTreeSet<u64> = assigned_prs.into_iter().collect();
        writable.insert(assigned_issue);
        Self {
            inner,
            assigned_issue,
            allowed_head: None,
            writable: Mutex::new(writable),
        }
    }

    /// Only allow `create_pr` from this head branch (the one the git push-scope
    /// filter lets the agent push to).
    #[must_use]
    pub fn with_allowed_head(mut self, head: impl Into<String>) -> Self {
        self.allowed_head = Some(head.into());
        self
    }

    #[must_use]
    pub fn assigned_issue(&self) -> u64 {
        self.assigned_issue
    }

    /// The issue and PR numbers a write may target right now, ascending.
    #[must_use]
    pub fn writable(&self) -> Vec<u64> {
        self.lock().iter().copied().collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeSet<u64>> {
        // The set is only ever inserted into, so a panic mid-update cannot leave
        // it half-written; keep serving rather than propagate the poison.
        self.writable.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn grow(&self, number: u64) {
        if self.lock().insert(number) {
            tracing::info!(
                assigned_issue = self.assigned_issue,
                pr = number,
                "forge scope grew to a pull request of the assigned issue"
            );
        }
    }

    fn refuse(&self, operation: WriteOperation, target: String, reason: String) -> ForgeError {
        tracing::warn!(
            operation = operation.as_str(),
            target = %target,
            reason = %reason,
            assigned_issue = self.assigned_issue,
            "forge write refused: out of scope"
        );
        ScopeError {
            operation,
            target,
            reason,
        }
        .into()
    }

    fn check_write(&self, operation: WriteOperation, number: u64) -> Result<(), ForgeError> {
        let writable = self.writable();
        if writable.contains(&number) {
            return Ok(());
        }
        let allowed = writable
            .iter()
            .map(|n| format!("#{n}"))
            .collect::<Vec<_>>()
            .join(", ");
        Err(self.refuse(
            operation,
            format!("#{number}"),
            format!("outside the assigned scope (writable: {allowed})"),
        ))
    }
}

#[async_trait]
impl Forge for ScopedForge {
    async fn read_issue(&self, number: u64) -> Result<Issue, ForgeError> {
        self.inner.read_issue(number).await
    }

    async fn read_pr(&self, number: u64) -> Result<PullRequest, ForgeError> {
        self.inner.read_pr(number).await
    }

    async fn read_comments(&self, number: u64) -> Result<Vec<Comment>, ForgeError> {
        self.inner.read_comments(number).await
    }

    async fn post_comment(&self, number: u64, body: &str) -> Result<Comment, ForgeError> {
        self.check_write(WriteOperation::PostComment, number)?;
        self.inner.post_comment(number, body).await
    }

    async fn update_description(&self, number: u64, body: &str) -> Result<(), ForgeError> {
        self.check_write(WriteOperation::UpdateDescription, number)?;
        self.inner.update_description(number, body).await
    }

    async fn is_org_member(&self, org: &str, username: &str) -> Result<bool, ForgeError> {
        self.inner.is_org_member(org, username).await
    }

    async fn get_pr_for_issue(&self, number: u64) -> Result<Option<u64>, ForgeError> {
        let found = self.inner.get_pr_for_issue(number).await?;
        if number == self.assigned_issue
            && let Some(pr) = found
        {
            self.grow(pr);
        }
        Ok(found)
    }

    async fn is_pr_open(&self, number: u64) -> Result<bool, ForgeError> {
        self.inner.is_pr_open(number).await
    }

    async fn create_pr(&self, request: &NewPullRequest) -> Result<PullRequest, ForgeError> {
        if let Some(allowed) = &self.allowed_head
            && *allowed != request.head
        {
            return Err(self.refuse(
                WriteOperation::CreatePr,
                format!("branch {}", request.head),
                format!("pull requests may only come from branch `{allowed}`"),
            ));
        }
        let pr = self.inner.create_pr(request).await?;
        self.grow(pr.number);
        Ok(pr)
    }

    async fn list_labels(&self, number: u64) -> Result<Vec<Label>, ForgeError> {
        self.inner.list_labels(number).await
    }

    async fn add_label(&self, number: u64, name: &str) -> Result<(), ForgeError> {
        self.check_write(WriteOperation::AddLabel, number)?;
        self.inner.add_label(number, name).await
    }

    async fn remove_label(&self, number: u64, name: &str) -> Result<(), ForgeError> {
        self.check_write(WriteOperation::RemoveLabel, number)?;
        self.inner.remove_label(number, name).await
    }
}
