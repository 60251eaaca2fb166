//! What a verified webhook delivery asks the orchestrator to do (pure).

use bot_bottle_forge::WebhookEvent;

/// The issue actions that may start a run: the issue became targeted.
const START_ACTIONS: &[&str] = &["opened", "reopened", "labeled", "label_updated", "assigned"];

/// One delivery's meaning for the orchestrator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// An issue that may now be targeted (checked against labels, org membership and
    /// known agents before anything starts).
    Consider {
        owner: String,
        repo: String,
        issue: u64,
        title: String,
        body: String,
        labels: Vec<String>,
        assignees: Vec<String>,
    },
    /// A human comment on an issue or a pull request.
    Comment {
        owner: String,
        repo: String,
        number: u64,
        is_pull: bool,
        author: String,
        body: String,
        comment_id: u64,
    },
    /// A pull request was opened (its head names the run's branch).
    PrOpened {
        owner: String,
        repo: String,
        pr: u64,
        head: String,
    },
    /// A pull request was closed or merged.
    PrClosed {
        owner: String,
        repo: String,
        pr: u64,
        head: String,
        merged: bool,
    },
    /// An issue was closed.
    IssueClosed {
        owner: String,
        repo: String,
        issue: u64,
    },
    /// Nothing to do, and why.
    Ignore(String),
}

/// Classifies a delivery. The bot's own actions are ignored, so its comments never
/// resume a run.
#[must_use]
pub fn classify(event: &WebhookEvent, bot_user: &str) -> Route {
    let Some(repository) = event.repository() else {
        return Route::Ignore("event type not handled".to_owned());
    };
    let owner = repository.owner.login.clone();
    let repo = repository.name.clone();
    if event.is_from(bot_user) {
        return Route::Ignore(format!("sent by the bot `{bot_user}` itself"));
    }
    match event {
        WebhookEvent::Issues(e) => {
            if e.issue.pull_request.is_some() {
                return Route::Ignore("issue event about a pull request".to_owned());
            }
            if e.action == "closed" {
                return Route::IssueClosed {
                    owner,
                    repo,
                    issue: e.issue.number,
                };
            }
            if !START_ACTIONS.contains(&e.action.as_str()) || e.issue.state != "open" {
                return Route::Ignore(format!("issue action `{}`", e.action));
            }
            Route::Consider {
                owner,
                repo,
                issue: e.issue.number,
                title: e.issue.title.clone(),
                body: e.issue.body.clone(),
                labels: e.issue.labels.iter().map(|l| l.name.clone()).collect(),
                assignees: e.issue.assignees.iter().map(|a| a.login.clone()).collect(),
            }
        }
        WebhookEvent::IssueComment(e) => {
            if e.action != "created" {
                return Route::Ignore(format!("comment action `{}`", e.action));
            }
            Route::Comment {
                owner,
                repo,
                number: e.issue.number,
                is_pull: e.is_pull || e.issue.pull_request.is_some(),
                author: e.comment.user.login.clone(),
                body: e.comment.body.clone(),
                comment_id: u64::try_from(e.comment.id).unwrap_or_default(),
            }
        }
        WebhookEvent::PullRequest(e) => match e.action.as_str() {
            "opened" | "reopened" => Route::PrOpened {
                owner,
                repo,
                pr: e.pull_request.number,
                head: e.pull_request.head.ref_name.clone(),
            },
            "closed" => Route::PrClosed {
                owner,
                repo,
                pr: e.pull_request.number,
                head: e.pull_request.head.ref_name.clone(),
                merged: e.pull_request.merged,
            },
            other => Route::Ignore(format!("pull request action `{other}`")),
        },
        WebhookEvent::Other { event_type } => Route::Ignore(format!("event `{event_type}`")),
    }
}

/// The prompt that starts a run: the issue, then what a forge run must do (the
/// instructions file says it at length).
#[must_use]
pub fn start_prompt(issue: u64, title: &str, body: &str) -> String {
    format!(
        "Work on issue #{issue}: {title}\n\n{body}\n\nUse the forge tools to read the issue and its comments. Clone the repository, commit on your branch and push it, open a pull request with create_pr, then call signal_done with a summary."
    )
}

/// The prompt that resumes a run from a human comment.
#[must_use]
pub fn comment_prompt(author: &str, number: u64, body: &str) -> String {
    format!(
        "@{author} commented on #{number}:\n\n{body}\n\nAddress this. Push fixes to your branch, answer with post_comment if useful, then call signal_done again."
    )
}

/// The prompt that resumes a run the orchestrator lost while it ran.
pub const RESTART_PROMPT: &str = "bot-bottle's orchestrator restarted while you were working, and your session was stopped. Check what you had finished (git status, your branch, your pull request), continue where you left off, and call signal_done when done.";

#[cfg(test)]
mod tests {
    use super::*;
    use bot_bottle_forge::parse_event;
    use serde_json::json;

    fn repo() -> serde_json::Value {
        json!({"id": 1, "name": "widget", "full_name": "acme/widget", "owner": {"id": 2, "login": "acme"}})
    }

    fn issue(number: u64, state: &str) -> serde_json::Value {
        json!({"id": 10, "number": number, "title": "Fix it", "body": "Please", "state": state,
               "user": {"id": 3, "login": "alice"}, "labels": [{"id": 1, "name": "bot-bottle:impl"}],
               "assignees": [{"id": 4, "login": "agent1"}], "updated_at": "2026-01-01T00:00:00Z"})
    }

    fn route(event_type: &str, body: &serde_json::Value) -> Route {
        let event = parse_event(event_type, body.to_string().as_bytes()).expect("parse");
        classify(&event, "bot")
    }

    #[test]
    fn a_labelled_open_issue_is_considered() {
        let body = json!({"action": "label_updated", "number": 5, "issue": issue(5, "open"),
                          "repository": repo(), "sender": {"id": 3, "login": "alice"}});
        match route("issues", &body) {
            Route::Consider {
                owner,
                repo,
                issue,
                labels,
                assignees,
                ..
            } => {
                assert_eq!(
                    (owner.as_str(), repo.as_str(), issue),
                    ("acme", "widget", 5)
                );
                assert_eq!(labels, vec!["bot-bottle:impl"]);
                assert_eq!(assignees, vec!["agent1"]);
            }
            other => panic!("{other:?}"),
        }
        let closed = json!({"action": "label_updated", "number": 5, "issue": issue(5, "closed"),
                            "repository": repo(), "sender": {"id": 3, "login": "alice"}});
        assert!(matches!(route("issues", &closed), Route::Ignore(_)));
        let edited = json!({"action": "edited", "number": 5, "issue": issue(5, "open"),
                            "repository": repo(), "sender": {"id": 3, "login": "alice"}});
        assert!(matches!(route("issues", &edited), Route::Ignore(_)));
    }

    #[test]
    fn the_bots_own_comment_never_resumes() {
        let comment = |login: &str| {
            json!({"action": "created", "issue": issue(5, "open"), "is_pull": false,
                   "comment": {"id": 9, "body": "hi", "user": {"id": 7, "login": login},
                               "created_at": "x", "updated_at": "x"},
                   "repository": repo(), "sender": {"id": 7, "login": login}})
        };
        assert!(matches!(
            route("issue_comment", &comment("BOT")),
            Route::Ignore(_)
        ));
        assert!(matches!(
            route("issue_comment", &comment("alice")),
            Route::Comment {
                number: 5,
                comment_id: 9,
                ..
            }
        ));
    }

    #[test]
    fn pull_requests_open_and_close() {
        let pr = |action: &str, merged: bool| {
            json!({"action": action, "number": 6, "repository": repo(), "sender": {"id": 3, "login": "alice"},
                   "pull_request": {"id": 60, "number": 6, "title": "t", "body": "", "state": "closed",
                                    "merged": merged, "user": {"id": 1, "login": "bot"},
                                    "head": {"ref": "bot-bottle/widget-5-ab12", "sha": "a"},
                                    "base": {"ref": "main", "sha": "b"}, "updated_at": "x"}})
        };
        assert_eq!(
            route("pull_request", &pr("closed", true)),
            Route::PrClosed {
                owner: "acme".into(),
                repo: "widget".into(),
                pr: 6,
                head: "bot-bottle/widget-5-ab12".into(),
                merged: true
            }
        );
        assert!(matches!(
            route("pull_request", &pr("opened", false)),
            Route::PrOpened { pr: 6, .. }
        ));
        assert!(matches!(
            route("pull_request", &pr("edited", false)),
            Route::Ignore(_)
        ));
    }
}
